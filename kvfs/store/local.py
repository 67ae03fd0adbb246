"""The `local` store: objects as files in a directory (local disk, tmpfs, NFS)."""

import ctypes
import ctypes.util
import errno
import os
import uuid
from collections.abc import Iterator

from ..errors import KvfsError, NoSpace, NotFound, StoreError
from .base import ObjectStat, Store, StoreReader, StoreWriter, Usage

# fallocate(2) with its mode (os.posix_fallocate has none)
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _oserror(exc: OSError, what: str):
    if exc.errno == errno.ENOENT:
        return NotFound(what)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"store full: {what}")
    return StoreError(f"{what}: {exc}")


def _fs_type(path: str) -> str:
    """The filesystem type of the mount holding PATH, from /proc/self/mounts."""
    best, kind = "", ""
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1].replace("\\040", " ")
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(
                    best
                ):
                    best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


class LocalWriter(StoreWriter):
    """Staged in DIR/staging/NODE/<key with / as %>; that name doubles as the
    intent record of a commit in flight until `forget_intent` removes it."""

    def __init__(self, store: "LocalStore", key: str):
        self._store = store
        self._key = key
        self._tmp = os.path.join(store.staging_dir, key.replace("/", "%"))
        self._published = False
        try:
            self._fd = os.open(self._tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise _oserror(exc, f"staging {key}") from exc

    def pwrite(self, data, offset: int) -> int:
        try:
            return os.pwrite(self._fd, data, offset)
        except OSError as exc:
            raise _oserror(exc, f"write {self._key}") from exc

    def pread(self, size: int, offset: int) -> bytes:
        return os.pread(self._fd, size, offset)

    def truncate(self, size: int) -> None:
        try:
            os.ftruncate(self._fd, size)
        except OSError as exc:
            raise _oserror(exc, f"truncate {self._key}") from exc

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def fileno(self) -> int:
        return self._fd

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        if _libc.fallocate(self._fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))

    def data_ranges(self, size: int):
        """(start, end) extents holding data, from SEEK_DATA/SEEK_HOLE."""
        off = 0
        try:
            while off < size:
                start = os.lseek(self._fd, off, os.SEEK_DATA)
                end = min(os.lseek(self._fd, start, os.SEEK_HOLE), size)
                if start >= size:
                    return
                yield start, end
                off = end
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after OFF
                return
            yield off, size  # no hole support: read it all

    def commit(self) -> None:
        path = self._store.path(self._key)
        try:
            if self._store.durable:
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            os.makedirs(os.path.dirname(path), exist_ok=True)
            # a hard link, not a rename: the staged name stays as the intent
            # record until etcd has the entry (see LocalStore.clean_staging)
            # (through a temporary name, so an existing object is replaced atomically)
            tmp_link = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
            os.link(self._tmp, tmp_link)
            os.rename(tmp_link, path)
            self._published = True
            if self._store.durable:
                _fsync_dir(os.path.dirname(path))
        except OSError as exc:
            self.abort()
            raise _oserror(exc, f"commit {self._key}") from exc

    def forget_intent(self) -> None:
        try:
            os.unlink(self._tmp)
        except OSError:
            pass

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        for p in ([self._store.path(self._key)] if self._published else []) + [self._tmp]:
            try:
                os.unlink(p)
            except OSError:
                pass


def _fsync_dir(path: str) -> None:
    dfd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class LocalReader(StoreReader):
    def __init__(self, path: str, key: str, store: "LocalStore | None" = None):
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise _oserror(exc, f"open {key}") from exc
        self._key = key
        self._store = store

    def pread_nowait(self, size: int, offset: int) -> bytes:
        s = self._store
        if s is not None and s.memory_backed:
            return self.pread(size, offset)  # tmpfs: the bytes are in memory
        if s is None or not s.nowait_ok:
            raise BlockingIOError
        buf = bytearray(size)
        try:
            n = os.preadv(self._fd, [buf], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            raise
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                s.nowait_ok = False
                raise BlockingIOError from None
            raise _oserror(exc, f"read {self._key}") from exc
        if n < size:
            # a short RWF_NOWAIT read may just mean "the rest is not cached"
            raise BlockingIOError
        return bytes(buf) if n == size else bytes(buf[:n])

    def pread(self, size: int, offset: int) -> bytes:
        try:
            return os.pread(self._fd, size, offset)
        except OSError as exc:
            raise _oserror(exc, f"read {self._key}") from exc

    def readinto(self, buf, offset: int) -> int:
        try:
            return os.preadv(self._fd, [buf], offset)
        except OSError as exc:
            raise _oserror(exc, f"read {self._key}") from exc

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class LocalStore(Store):
    """Objects live in DIR/objects/KEY; staged writes in DIR/staging/NODE/."""

    rereads_cheaply = True
    fds_of_objects = True

    def __init__(self, root: str, node: str = "default", durable: bool = True, **_):
        self.root = os.path.abspath(root)
        self.url = f"local:{self.root}"
        self.durable = durable
        self.objects_dir = os.path.join(self.root, "objects")
        self.staging_dir = os.path.join(self.root, "staging", node)
        os.makedirs(self.objects_dir, exist_ok=True)
        os.makedirs(self.staging_dir, exist_ok=True)
        # reads from RAM never block, so the daemon may serve them inline
        self.memory_backed = _fs_type(self.root) in ("tmpfs", "ramfs")
        self.nowait_ok = hasattr(os, "RWF_NOWAIT")

    def path(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise StoreError(f"bad object key {key!r}")
        return os.path.join(self.objects_dir, key)

    def put(self, key: str, data: bytes) -> None:
        w = self.writer(key)
        try:
            w.pwrite(data, 0)
        except BaseException:
            w.abort()
            raise
        w.commit()
        w.forget_intent()

    def get(self, key: str, offset: int = 0, size: int = -1) -> bytes:
        try:
            with open(self.path(key), "rb", buffering=0) as f:
                f.seek(offset)
                return f.read() if size < 0 else f.read(size)
        except OSError as exc:
            raise _oserror(exc, f"get {key}") from exc

    def exists(self, key: str) -> bool:
        return os.path.exists(self.path(key))

    def delete(self, key: str) -> None:
        try:
            os.unlink(self.path(key))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _oserror(exc, f"delete {key}") from exc

    def list(self, prefix: str = "") -> Iterator[str]:
        for dirpath, _dirs, files in os.walk(self.objects_dir):
            rel = os.path.relpath(dirpath, self.objects_dir)
            for f in files:
                if f.endswith(".tmp"):
                    continue
                key = f if rel == "." else f"{rel}/{f}"
                if key.startswith(prefix):
                    yield key

    def stat(self, key: str) -> ObjectStat:
        try:
            st = os.stat(self.path(key))
        except OSError as exc:
            raise _oserror(exc, f"stat {key}") from exc
        return ObjectStat(st.st_size, st.st_mtime)

    def writer(self, key: str) -> StoreWriter:
        self.path(key)  # validates the key before any bytes move
        return LocalWriter(self, key)

    def reader(self, key: str) -> StoreReader:
        return LocalReader(self.path(key), key, self)

    def open_fd(self, key: str) -> int:
        try:
            return os.open(self.path(key), os.O_RDONLY)
        except OSError as exc:
            raise _oserror(exc, f"open {key}") from exc

    def rewrite_header(self, key: str, data: bytes) -> None:
        try:
            fd = os.open(self.path(key), os.O_WRONLY)
        except OSError as exc:
            raise _oserror(exc, f"header of {key}") from exc
        try:
            os.pwrite(fd, data, 0)
        finally:
            os.close(fd)

    def usage(self) -> Usage:
        st = os.statvfs(self.root)
        return Usage(total=st.f_blocks * st.f_frsize, free=st.f_bavail * st.f_frsize)

    def clean_staging(self, is_live=None) -> int:
        """Settle this node's commits that a crash interrupted.

        A staged name whose object IS_LIVE(key) confirms (etcd references it)
        was committed: only the intent goes. Anything else never committed:
        the staged bytes and any published object go.
        """
        n = 0
        for f in os.listdir(self.staging_dir):
            key = f.replace("%", "/")
            staged = os.path.join(self.staging_dir, f)
            try:
                live = is_live is not None and os.path.exists(self.path(key)) and is_live(key)
            except Exception:
                continue  # cannot tell now (etcd down?): decide at the next start
            try:
                if not live:
                    try:
                        os.unlink(self.path(key))
                    except (FileNotFoundError, KvfsError):
                        pass
                os.unlink(staged)
                n += 1
            except OSError:
                pass
        return n

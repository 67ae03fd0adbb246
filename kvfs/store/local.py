"""The `local` store: objects as files in a directory (local disk, tmpfs, NFS)."""

import errno
import os
import uuid
from collections.abc import Iterator

from ..errors import NoSpace, NotFound, StoreError
from .base import ObjectStat, Store, StoreReader, StoreWriter, Usage


def _oserror(exc: OSError, what: str):
    if exc.errno == errno.ENOENT:
        return NotFound(what)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"store full: {what}")
    return StoreError(f"{what}: {exc}")


class LocalWriter(StoreWriter):
    def __init__(self, store: "LocalStore", key: str):
        self._store = store
        self._key = key
        self._tmp = os.path.join(store.staging_dir, uuid.uuid4().hex)
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

    def commit(self) -> None:
        path = self._store.path(self._key)
        try:
            if self._store.durable:
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.rename(self._tmp, path)
            if self._store.durable:
                dfd = os.open(os.path.dirname(path), os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except OSError as exc:
            self.abort()
            raise _oserror(exc, f"commit {self._key}") from exc

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            os.unlink(self._tmp)
        except OSError:
            pass


class LocalReader(StoreReader):
    def __init__(self, path: str, key: str):
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise _oserror(exc, f"open {key}") from exc
        self._key = key

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

    def __init__(self, root: str, node: str = "default", durable: bool = True, **_):
        self.root = os.path.abspath(root)
        self.url = f"local:{self.root}"
        self.durable = durable
        self.objects_dir = os.path.join(self.root, "objects")
        self.staging_dir = os.path.join(self.root, "staging", node)
        os.makedirs(self.objects_dir, exist_ok=True)
        os.makedirs(self.staging_dir, exist_ok=True)

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
        return LocalReader(self.path(key), key)

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

    def clean_staging(self) -> int:
        n = 0
        for f in os.listdir(self.staging_dir):
            try:
                os.unlink(os.path.join(self.staging_dir, f))
                n += 1
            except OSError:
                pass
        return n

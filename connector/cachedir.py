"""The cache directory: a live kvfs mount, its session directories and their chunk files."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import struct
import threading
from collections.abc import Mapping

import torch

from .chunkfile import ChunkFile, write_chunk, write_chunk_open
from .counters import Counters
from .keys import KeySpace, valid_session

FUSE_SUPER_MAGIC = 0x65735546  # statfs f_type of every FUSE filesystem
STORE_XATTR = "user.kvfs.store"  # set on the root of a kvfs mount, by kvfs only
PASSTHROUGH_XATTR = "user.kvfs.passthrough"  # "on" when the kernel reads files itself
# b"1" on a session directory that is an index: kvfs removes a file whose only
# names left are in index directories, so an index finds files, never keeps them
INDEX_XATTR = "user.kvfs.index"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def fs_type(path: str) -> int:
    """statfs(2)'s f_type, which os.statvfs does not give."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if _libc.statfs(os.fsencode(path), buf) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    return struct.unpack_from("l", buf)[0]  # f_type is the first field, a long


def _passthrough(root: str) -> bool:
    try:
        return os.getxattr(root, PASSTHROUGH_XATTR) == b"on"
    except OSError:
        return False  # an older kvfs: the daemon serves reads


class NotMounted(OSError):
    """The cache directory is not a live kvfs mount."""

    def __init__(self, path: str, why: str):
        super().__init__(errno.ENOTCONN, f"not a live kvfs mount: {why}", path)
        self.why = why


class CacheDir:
    """The mount, checked before every write and lookup: when the kvfs daemon
    dies and the mount is cleared, the path is a bare directory on the root
    filesystem, and KV written there would fill it and outlive `rm` on kvfs."""

    def __init__(
        self,
        root: str,
        *,
        require_kvfs: bool = True,
        file_mode: int = 0o600,
        dir_mode: int = 0o700,
        counters: Counters | None = None,
        log: logging.Logger | None = None,
        shared: bool | None = None,
    ):
        self.root = root
        # Sessions share chunks through index directories only on a checked
        # kvfs mount: elsewhere an index's names would keep every file alive
        # after `rm -r` of its session.
        self.shared = require_kvfs if shared is None else shared
        self._indexes: set[str] = set()  # sessions that are index directories
        self._marked: set[str] = set()  # index directories seen marked as such
        self._link_failed: set[int | None] = set()  # errnos of failed links, logged once
        self.require_kvfs = require_kvfs
        self.passthrough = False  # learnt from the mount's root at the first check
        self.file_mode = file_mode
        self.dir_mode = dir_mode
        self.counters = counters or Counters()
        self.log = log or logging.getLogger(__name__)
        self._kvfs_dev: int | None = None  # st_dev of the mount last found to be kvfs
        self._down: str | None = None  # why the mount is not live, as last logged
        self._lock = threading.Lock()

    # -- is it kvfs? -------------------------------------------------------------

    def _why_not_kvfs(self) -> str | None:
        try:
            if fs_type(self.root) != FUSE_SUPER_MAGIC:
                return "not a FUSE filesystem (the kvfs daemon is not mounted there)"
            dev = os.stat(self.root).st_dev
            if dev != self._kvfs_dev:  # a new mount: once, ask kvfs itself
                os.getxattr(self.root, STORE_XATTR)
                self._kvfs_dev = dev
                self.passthrough = _passthrough(self.root)
        except OSError as e:
            if e.errno in (errno.ENODATA, errno.ENOTSUP):
                return f"a FUSE filesystem without {STORE_XATTR}, not kvfs"
            return e.strerror or str(e)
        return None

    def live(self) -> bool:
        """True if the root is a live kvfs mount (any directory when
        require_kvfs is off); a refusal is counted and logged once per outage."""
        if not self.require_kvfs:
            return True
        why = self._why_not_kvfs()
        with self._lock:
            if why is None:
                if self._down is not None:
                    self.log.warning("kvfs: %s is a live kvfs mount again", self.root)
                self._down = None
                return True
            if why != self._down:
                self.log.warning(
                    "kvfs: %s refused, cache off until it is mounted again: %s", self.root, why
                )
            self._down = why
        self.counters.add("mount_errors", 1)
        return False

    def check(self) -> None:
        if not self.live():
            raise NotMounted(self.root, self._down or "")

    # -- names -------------------------------------------------------------------

    def path(self, session: str, name: str) -> str:
        return os.path.join(self.root, session, name)

    def exists(self, session: str, name: str) -> bool:
        return os.path.exists(self.path(session, name))

    def open(self, session: str, name: str) -> ChunkFile:
        # with FUSE passthrough the kernel reads the store's file directly; a
        # readahead hint would only make the daemon read it a second time
        return ChunkFile(self.path(session, name), willneed=not self.passthrough)

    # -- writing -----------------------------------------------------------------

    def declare_index(self, session: str) -> None:
        """`session` is an index directory: marked as one (user.kvfs.index=1)
        whenever this process creates it or first writes or links into it."""
        self._indexes.add(session)

    def _session_dir(self, session: str) -> str:
        d = os.path.join(self.root, session)
        try:
            os.mkdir(d, self.dir_mode)
        except FileExistsError:
            if session in self._indexes and session not in self._marked:
                self._mark_index(d, session)
            return d
        if self.dir_mode & 0o077:  # shared on purpose: the umask must not undo it
            os.chmod(d, self.dir_mode)
        if session in self._indexes:
            self._mark_index(d, session)
        return d

    def _mark_index(self, d: str, session: str) -> None:
        """Mark `d` an index, and read the mark back: a kvfs without index
        directories accepts any user.kvfs.* attribute and keeps none, and there
        an index would keep every file alive. Raises OSError if not marked."""
        try:
            marked = os.getxattr(d, INDEX_XATTR) == b"1"
        except OSError:
            marked = False
        if not marked:
            os.setxattr(d, INDEX_XATTR, b"1")
            if os.getxattr(d, INDEX_XATTR) != b"1":
                raise OSError(errno.ENOTSUP, "this kvfs has no index directories", d)
        self._marked.add(session)

    def link(self, src_session: str, name: str, dst_session: str, replace: bool = False) -> bool:
        """Give the chunk file `src_session/name` a second name, `dst_session/name`:
        one file, one copy of its bytes, as `ln`. True if the name exists
        afterwards, whoever made it (another worker may link first: EEXIST);
        with `replace`, an existing name is first removed (it may hold a damaged
        file). False if the link failed: the chunk is then not shared, nothing
        else changes. Raises NotMounted, never linking outside a live mount."""
        self.check()
        try:
            dst = os.path.join(self._session_dir(dst_session), name)
            src = self.path(src_session, name)
            try:
                os.link(src, dst)
            except FileExistsError:
                if not replace:
                    return True
                try:
                    os.unlink(dst)
                except FileNotFoundError:
                    pass
                try:
                    os.link(src, dst)
                except FileExistsError:
                    return True  # another worker's repair, just as new
        except OSError as e:
            self.counters.add("link_errors", 1)
            # once per kind of failure: a source removed meanwhile (rm -r of its
            # session) is routine, the same error on every chunk would flood
            level = logging.DEBUG if e.errno in self._link_failed else logging.WARNING
            self._link_failed.add(e.errno)
            self.log.log(
                level,
                "kvfs: linking %s/%s into %s failed, not shared: %s",
                src_session,
                name,
                dst_session,
                e.strerror or e,
            )
            return False
        return True

    def write(
        self,
        session: str,
        name: str,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str],
        replace: bool = False,
        keep_open: bool = False,
    ) -> int | tuple[int, int] | None:
        """Write one chunk file; None if it exists and `replace` is off.
        Raises NotMounted, never writing outside a live kvfs mount.
        With `keep_open`, (bytes, descriptor): the caller closes it, and the
        file appears at that close (see write_chunk_open)."""
        self.check()
        path = os.path.join(self._session_dir(session), name)
        try:
            # created exclusively, not looked up first: one round trip fewer
            if keep_open:
                return write_chunk_open(
                    path, tensors, metadata, mode=self.file_mode, exclusive=not replace
                )
            return write_chunk(path, tensors, metadata, mode=self.file_mode, exclusive=not replace)
        except FileExistsError:
            return None


def shared_index(cache: CacheDir, space: KeySpace, log: logging.Logger) -> str | None:
    """The index directory of `space`'s configuration, declared to `cache`; None
    where sessions do not share (not a checked kvfs mount)."""
    if not cache.shared:
        return None
    name = space.index_session()
    if not valid_session(name):  # a model name no slug could tame: no sharing
        log.warning("kvfs: index name %r is not a valid session name, sessions do not share", name)
        return None
    cache.declare_index(name)
    return name

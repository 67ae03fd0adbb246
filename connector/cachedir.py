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

from .chunkfile import ChunkFile, write_chunk
from .counters import Counters

FUSE_SUPER_MAGIC = 0x65735546  # statfs f_type of every FUSE filesystem
STORE_XATTR = "user.kvfs.store"  # set on the root of a kvfs mount, by kvfs only
PASSTHROUGH_XATTR = "user.kvfs.passthrough"  # "on" when the kernel reads files itself

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
    ):
        self.root = root
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

    def _session_dir(self, session: str) -> str:
        d = os.path.join(self.root, session)
        try:
            os.mkdir(d, self.dir_mode)
        except FileExistsError:
            return d
        if self.dir_mode & 0o077:  # shared on purpose: the umask must not undo it
            os.chmod(d, self.dir_mode)
        return d

    def write(
        self,
        session: str,
        name: str,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str],
        replace: bool = False,
    ) -> int | None:
        """Write one chunk file; None if it exists and `replace` is off.
        Raises NotMounted, never writing outside a live kvfs mount."""
        self.check()
        path = os.path.join(self._session_dir(session), name)
        if not replace and os.path.exists(path):
            return None
        return write_chunk(path, tensors, metadata, mode=self.file_mode)

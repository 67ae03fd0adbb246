"""The attributes (stat) the kernel sees for each kind of node."""

import stat
import time

import pyfuse3

from ..records import Entry, SessionInfo
from .inodes import ROOT, Node, WriterNode

TIMEOUT = 1.0  # seconds the kernel may trust a name or attributes without asking
# ... a committed file's name and attributes, while the etcd watch is up: every
# change to them (here, by another mount, by expiry) invalidates the kernel's
# copy, so the time only bounds how long a missed invalidation could last. A
# name asked for again after TIMEOUT is a request through the daemon (~0.2 ms):
# the connector stats every chunk of a prompt at each lookup.
FILE_TIMEOUT = 10.0
BLKSIZE = 1 << 20  # tells cp and friends to move bytes in 1 MiB requests


def _base(ino: int, timeout: float = TIMEOUT) -> pyfuse3.EntryAttributes:
    a = pyfuse3.EntryAttributes()
    a.st_ino = ino
    a.st_blksize = BLKSIZE
    a.entry_timeout = a.attr_timeout = timeout
    return a


def negative() -> pyfuse3.EntryAttributes:
    """A "no such name" answer the kernel may cache briefly (watches invalidate it)."""
    a = pyfuse3.EntryAttributes()
    a.st_ino = 0
    a.entry_timeout = TIMEOUT
    return a


def root_attr(uid: int, gid: int, started_ns: int) -> pyfuse3.EntryAttributes:
    a = _base(ROOT)
    a.st_mode = stat.S_IFDIR | 0o755
    a.st_nlink = 2
    a.st_uid, a.st_gid = uid, gid
    a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = started_ns
    return a


def session_attr(
    node: Node, info: SessionInfo, entry_timeout: float = TIMEOUT
) -> pyfuse3.EntryAttributes:
    """ENTRY_TIMEOUT: how long the name may be kept (its removal is watched);
    the attributes change with every file made in it, unwatched: 1 s."""
    a = _base(node.ino)
    a.entry_timeout = entry_timeout
    a.st_mode = stat.S_IFDIR | (info.mode & 0o7777)
    a.st_nlink = 2
    a.st_uid, a.st_gid = info.uid, info.gid
    a.st_ctime_ns = info.ctime_ns
    a.st_mtime_ns = a.st_atime_ns = max(info.mtime_ns, info.ctime_ns)
    a.st_size = 0
    return a


def file_attr(node: Node, entry: Entry, timeout: float = TIMEOUT) -> pyfuse3.EntryAttributes:
    a = _base(node.ino, timeout)
    a.st_mode = stat.S_IFREG | (entry.mode & 0o1777)
    a.st_nlink = entry.nlink
    a.st_uid, a.st_gid = entry.uid, entry.gid
    a.st_size = entry.size
    a.st_blocks = (entry.size + 511) // 512
    a.st_mtime_ns = entry.mtime_ns
    a.st_atime_ns = entry.atime_ns or entry.mtime_ns
    a.st_ctime_ns = entry.ctime_ns
    return a


def writer_attr(node: WriterNode, uid: int, gid: int) -> pyfuse3.EntryAttributes:
    """What the writing process sees of its unfinished version.

    UID/GID own a brand-new file nobody has set an owner for yet.
    """
    p = node.pending
    base = node.entry
    now = time.time_ns()
    if p is not None:
        mode, uid, gid, size = p.mode, p.uid, p.gid, p.size
        mtime = p.mtime_ns or now
    elif base is not None:
        mode, uid, gid, size, mtime = base.mode, base.uid, base.gid, base.size, base.mtime_ns
    else:
        mode, size, mtime = stat.S_IFREG | 0o644, 0, now
    # private to the writer and changing: the kernel must always look the name
    # up again. Its attributes too, unless the kernel writes the file itself
    # (passthrough): then it keeps the size current, and asking on every
    # write (the kernel checks for setuid bits to drop) would halve the speed
    a = _base(node.ino, timeout=0)
    if node.path == "passthrough":
        a.attr_timeout = TIMEOUT
    a.st_mode = stat.S_IFREG | (mode & 0o1777)
    a.st_nlink = 1
    a.st_uid, a.st_gid = uid, gid
    a.st_size = size
    a.st_blocks = (size + 511) // 512
    a.st_mtime_ns = a.st_atime_ns = mtime
    a.st_ctime_ns = now
    return a

"""The FUSE operations: translates kernel requests into Namespace calls.

Inodes are per name (ROOT, a session, a layer) and live while the kernel
holds them. Committed versions are immutable, so the kernel keeps their pages
(keep_cache) until a replace or delete, here or on another node, drops them.
"""

import errno
import functools
import logging
import os
import stat
import time
from collections import Counter
from dataclasses import dataclass, field

import crc32c
import pyfuse3
import trio

from .errors import Conflict, Corrupt, KvfsError, NotFound, NotPermitted
from .meta import Entry, SessionInfo
from .names import check_name
from .namespace import Namespace, check_xattr_room
from .objects import BLOCK, HEADER_SIZE, decode_blocks

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
TIMEOUT = 1.0  # seconds the kernel may trust a name or attributes without asking
BLKSIZE = 1 << 20  # tells cp and friends to move bytes in 1 MiB requests
XATTR_PREFIX = "user.kvfs."
XATTR_NAME_MAX = 255


@dataclass(eq=False)
class Node:
    ino: int
    session: str | None  # None for the root
    name: str | None  # None for a session directory
    lookups: int = 0
    handles: int = 0
    detached: bool = False
    cache_version: str | None = None  # version whose pages the kernel may hold
    open_versions: Counter = field(default_factory=Counter)
    writers: list = field(default_factory=list)  # handles with pending data


@dataclass(eq=False)
class Handle:
    fh: int
    node: Node
    writable: bool
    entry: Entry | None = None  # the version this handle reads
    reader: object = None
    pending: object = None
    truncate_on_write: bool = False
    owner: int = 0  # process (tgid) that opened it
    flushed: bool = False  # close(2) was called on some descriptor of it
    released: trio.Event = field(default_factory=trio.Event)
    sums: list | None = None  # the version's block CRC32Cs, decoded on first read
    block: tuple | None = None  # (index, bytes) of the last verified block


def tgid(pid: int) -> int:
    """The process a (possibly multi-threaded) requester belongs to."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return pid


def holds_file(pid: int, path: str) -> bool:
    """Does process PID still have PATH open? (readlink only: never enters FUSE)"""
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"{fd_dir}/{fd}") == path:
                return True
        except OSError:
            pass
    return False


def _fuse_error(exc: KvfsError) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(exc.errno)


def _guard(fn):
    """Turn a bug in one request into EIO and a logged traceback, not a dead mount."""

    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except (pyfuse3.FUSEError, trio.Cancelled):
            raise
        except KvfsError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception:
            log.exception("internal error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class _Guarded(type(pyfuse3.Operations)):
    def __new__(mcs, name, bases, ns):
        for k, v in list(ns.items()):
            if k in _FUSE_METHODS:
                ns[k] = _guard(v)
        return super().__new__(mcs, name, bases, ns)


_FUSE_METHODS = {
    "lookup",
    "forget",
    "getattr",
    "setattr",
    "mkdir",
    "rmdir",
    "opendir",
    "readdir",
    "releasedir",
    "unlink",
    "rename",
    "link",
    "symlink",
    "mknod",
    "readlink",
    "open",
    "create",
    "read",
    "write",
    "flush",
    "fsync",
    "release",
    "getxattr",
    "listxattr",
    "setxattr",
    "removexattr",
    "statfs",
}


class Operations(pyfuse3.Operations, metaclass=_Guarded):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(
        self,
        ns: Namespace,
        *,
        touch_on_read: bool = True,
        touch_interval: float = 60.0,
        status_fn=None,
        control_fn=None,
        mountpoint: str = "",
    ):
        super().__init__()
        self.ns = ns
        self.touch_on_read = touch_on_read
        self.touch_interval = touch_interval
        self.status_fn = status_fn
        self.control_fn = control_fn
        self.nodes: dict[int, Node] = {ROOT: Node(ROOT, None, None, lookups=1)}
        self.by_name: dict[tuple, int] = {}
        self.handles: dict[int, Handle] = {}
        self._next_ino = ROOT + 1
        self._next_fh = 1
        self._send_inval, self.recv_inval = trio.open_memory_channel(100000)
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.started = time.time_ns()
        self.mountpoint = mountpoint
        self.proc_limiter = trio.CapacityLimiter(4)

    # -- inode table ----------------------------------------------------------------

    def _node(self, session: str, name: str | None) -> Node:
        key = (session, name)
        ino = self.by_name.get(key)
        if ino is not None:
            return self.nodes[ino]
        ino = self._next_ino
        self._next_ino += 1
        node = Node(ino, session, name)
        self.nodes[ino] = node
        self.by_name[key] = ino
        return node

    def _get(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def detach(self, session: str, name: str | None) -> Node | None:
        """A name went away: later lookups get a fresh inode."""
        ino = self.by_name.pop((session, name), None)
        if ino is None:
            return None
        node = self.nodes[ino]
        node.detached = True
        self._maybe_free(node)
        return node

    def _maybe_free(self, node: Node) -> None:
        if node.ino != ROOT and node.lookups <= 0 and node.handles <= 0:
            self.nodes.pop(node.ino, None)
            if self.by_name.get((node.session, node.name)) == node.ino:
                del self.by_name[(node.session, node.name)]

    def invalidate(self, kind: str, *args) -> None:
        """Queue a kernel cache invalidation; a background task sends it."""
        try:
            self._send_inval.send_nowait((kind, args))
        except trio.WouldBlock:
            log.warning("invalidation queue full; dropping %s%s", kind, args)

    async def run_invalidator(self, task_status=trio.TASK_STATUS_IGNORED):
        # Sent from a thread: the kernel may wait for requests we are serving.
        task_status.started()
        async for kind, args in self.recv_inval:
            fn = pyfuse3.invalidate_inode if kind == "inode" else pyfuse3.invalidate_entry
            try:
                await trio.to_thread.run_sync(fn, *args)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                    log.debug("invalidate %s%s: %s", kind, args, exc)

    def on_entry_changed(self, session: str, name: str, entry: Entry | None) -> None:
        """A watch event (or a local commit) changed SESSION/NAME."""
        ino = self.by_name.get((session, name))
        sino = self.by_name.get((session, None))
        if entry is None:
            if sino is not None:
                self.invalidate("entry", sino, name.encode())
            self.detach(session, name)
            return
        if ino is not None:
            node = self.nodes[ino]
            if node.cache_version != entry.version:
                node.cache_version = None
                self.invalidate("inode", ino)

    def on_session_changed(self, session: str, info: SessionInfo | None) -> None:
        if info is None:
            self.invalidate("entry", ROOT, session.encode())
            self.detach(session, None)
            for key in [k for k in self.by_name if k[0] == session]:
                self.detach(*key)

    # -- attributes -------------------------------------------------------------------

    def _root_attr(self) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ROOT
        a.st_mode = stat.S_IFDIR | 0o755
        a.st_nlink = 2
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.started
        a.st_blksize = BLKSIZE
        a.entry_timeout = a.attr_timeout = TIMEOUT
        return a

    def _session_attr(self, node: Node, info: SessionInfo) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.st_mode = stat.S_IFDIR | (info.mode & 0o7777)
        a.st_nlink = 2
        a.st_uid, a.st_gid = info.uid, info.gid
        a.st_ctime_ns = info.ctime_ns
        a.st_mtime_ns = a.st_atime_ns = max(info.mtime_ns, info.ctime_ns)
        a.st_size = 0
        a.st_blksize = BLKSIZE
        a.entry_timeout = a.attr_timeout = TIMEOUT
        return a

    def _file_attr(self, node: Node, entry: Entry) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.st_mode = stat.S_IFREG | (entry.mode & 0o7777)
        a.st_nlink = 1
        a.st_uid, a.st_gid = entry.uid, entry.gid
        a.st_size = entry.size
        a.st_blocks = (entry.size + 511) // 512
        a.st_blksize = BLKSIZE
        a.st_mtime_ns = a.st_atime_ns = entry.mtime_ns
        a.st_ctime_ns = entry.ctime_ns
        a.entry_timeout = a.attr_timeout = TIMEOUT
        return a

    def _pending_attr(self, node: Node, h: Handle) -> pyfuse3.EntryAttributes:
        p = h.pending
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.st_mode = stat.S_IFREG | (p.mode & 0o7777)
        a.st_nlink = 1
        a.st_uid, a.st_gid = p.uid, p.gid
        a.st_size = p.size
        a.st_blocks = (p.size + 511) // 512
        a.st_blksize = BLKSIZE
        now = time.time_ns()
        a.st_mtime_ns = a.st_atime_ns = p.mtime_ns or now
        a.st_ctime_ns = now
        # not yet committed: the kernel must ask again
        a.entry_timeout = a.attr_timeout = 0
        return a

    async def _attr(self, node: Node, ctx=None) -> pyfuse3.EntryAttributes:
        if node.ino == ROOT:
            return self._root_attr()
        if node.name is None:
            info = await self.ns.get_session(node.session)
            if info is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._session_attr(node, info)
        if node.writers and ctx is not None:
            # a writer sees its own unfinished version; everyone else the committed one
            me = tgid(ctx.pid)
            for h in reversed(node.writers):
                if h.owner == me and h.pending is not None and h.pending.dirty:
                    return self._pending_attr(node, h)
        entry = await self.ns.get_entry(node.session, node.name)
        if entry is None:
            if node.writers:
                return self._pending_attr(node, node.writers[-1])
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._file_attr(node, entry)

    # -- lookups ----------------------------------------------------------------------

    async def lookup(self, parent_inode, name, ctx=None):
        log.debug("lookup %d %r", parent_inode, name)
        try:
            if parent_inode == ROOT:
                session = check_name(name)
                info = await self.ns.get_session(session)
                if info is None:
                    raise NotFound(session)
                node = self._node(session, None)
                attr = self._session_attr(node, info)
            else:
                parent = self._get(parent_inode)
                if parent.name is not None:
                    raise pyfuse3.FUSEError(errno.ENOTDIR)
                fname = check_name(name)
                ino = self.by_name.get((parent.session, fname))
                if ino is not None and self.nodes[ino].writers:
                    await self._await_closing_writers(self.nodes[ino])
                entry = await self.ns.get_entry(parent.session, fname)
                if entry is None:
                    raise NotFound(fname)
                node = self._node(parent.session, fname)
                attr = self._file_attr(node, entry)
        except KvfsError as exc:
            if isinstance(exc, NotFound):
                # a negative entry the kernel may cache briefly; watches invalidate it
                a = pyfuse3.EntryAttributes()
                a.st_ino = 0
                a.entry_timeout = TIMEOUT
                return a
            raise _fuse_error(exc) from None
        node.lookups += 1
        return attr

    async def forget(self, inode_list):
        for ino, n in inode_list:
            node = self.nodes.get(ino)
            if node is None:
                continue
            node.lookups -= n
            self._maybe_free(node)

    async def getattr(self, inode, ctx=None):
        node = self._get(inode)
        try:
            return await self._attr(node, ctx)
        except KvfsError as exc:
            raise _fuse_error(exc) from None

    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self._get(inode)
        try:
            if node.ino == ROOT:
                raise NotPermitted("the root's attributes are fixed")
            if node.name is None:
                await self._setattr_session(node, attr, fields)
            else:
                await self._setattr_file(node, attr, fields, fh, ctx)
            return await self._attr(node, ctx)
        except KvfsError as exc:
            raise _fuse_error(exc) from None

    async def _setattr_session(self, node, attr, fields):
        def mutate(info: SessionInfo):
            if fields.update_mode:
                info.mode = attr.st_mode
            if fields.update_uid:
                info.uid = attr.st_uid
            if fields.update_gid:
                info.gid = attr.st_gid
            if fields.update_mtime:
                info.mtime_ns = attr.st_mtime_ns

        await self.ns.update_session(node.session, mutate)

    async def _setattr_file(self, node, attr, fields, fh, ctx):
        h = self.handles.get(fh) if fh is not None else None
        if fields.update_size:
            if h is not None and h.writable:
                await self._ensure_pending(h)
                await self.ns.call_io(h.pending.truncate, attr.st_size)
            else:
                # truncate(2) by path: a new version, committed at once
                h = await self._open_handle(node, writable=True, ctx=ctx)
                try:
                    await self._ensure_pending(h)
                    await self.ns.call_io(h.pending.truncate, attr.st_size)
                    await self._commit(h)
                finally:
                    await self._close_handle(h)
                h = None
        if not (
            fields.update_mtime
            or fields.update_mode
            or fields.update_uid
            or fields.update_gid
            or fields.update_atime
        ):
            return
        pending = None
        for w in node.writers:
            if w.pending is not None:
                pending = w.pending
        entry = await self.ns.get_entry(node.session, node.name)
        if entry is None and pending is None:
            raise NotFound(node.name)
        if pending is not None:
            if fields.update_mtime:
                pending.mtime_ns = attr.st_mtime_ns
            if fields.update_mode:
                pending.mode = stat.S_IFREG | (attr.st_mode & 0o7777)
            if fields.update_uid:
                pending.uid = attr.st_uid
            if fields.update_gid:
                pending.gid = attr.st_gid
        if entry is None:
            return

        def mutate(e: Entry):
            if fields.update_mtime:
                e.mtime_ns = attr.st_mtime_ns
            elif fields.update_atime:
                # touch -a: access extends life like a read does
                e.mtime_ns = max(e.mtime_ns, attr.st_atime_ns)
            if fields.update_mode:
                e.mode = stat.S_IFREG | (attr.st_mode & 0o7777)
            if fields.update_uid:
                e.uid = attr.st_uid
            if fields.update_gid:
                e.gid = attr.st_gid

        new = await self.ns.update_entry(node.session, node.name, mutate)
        node.cache_version = new.version if node.cache_version == new.version else None

    # -- directories ------------------------------------------------------------------

    async def mkdir(self, parent_inode, name, mode, ctx):
        try:
            if parent_inode != ROOT:
                self._get(parent_inode)
                raise NotPermitted("sessions hold files only; no deeper directories")
            session = check_name(name)
            info = await self.ns.mkdir(session, stat.S_IFDIR | (mode & 0o7777), ctx.uid, ctx.gid)
        except KvfsError as exc:
            raise _fuse_error(exc) from None
        node = self._node(session, None)
        node.lookups += 1
        return self._session_attr(node, info)

    async def rmdir(self, parent_inode, name, ctx):
        try:
            if parent_inode != ROOT:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            session = check_name(name)
            await self.ns.rmdir(session)
        except KvfsError as exc:
            raise _fuse_error(exc) from None
        self.detach(session, None)

    async def opendir(self, inode, ctx):
        node = self._get(inode)
        if node.name is not None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        node = self._get(fh)
        try:
            if node.ino != ROOT and start_id == 0:
                for other in list(self.nodes.values()):
                    if other.session == node.session and other.writers:
                        await self._await_closing_writers(other)
            if node.ino == ROOT:
                items = [(s.name, s) for s in await self.ns.list_sessions()]
            else:
                items = [(e.name, e) for e in await self.ns.list_entries(node.session)]
        except KvfsError as exc:
            raise _fuse_error(exc) from None
        items.sort(key=lambda it: it[0])
        for i in range(start_id, len(items)):
            name, rec = items[i]
            if node.ino == ROOT:
                child = self._node(name, None)
                attr = self._session_attr(child, rec)
            else:
                child = self._node(node.session, name)
                attr = self._file_attr(child, rec)
            if not pyfuse3.readdir_reply(token, name.encode(), attr, i + 1):
                break
            child.lookups += 1

    async def releasedir(self, fh):
        pass

    # -- names ------------------------------------------------------------------------

    def _file_parent(self, parent_inode) -> Node:
        parent = self._get(parent_inode)
        if parent.ino == ROOT:
            raise NotPermitted("the root holds session directories only")
        if parent.name is not None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return parent

    async def unlink(self, parent_inode, name, ctx):
        try:
            parent = self._file_parent(parent_inode)
            fname = check_name(name)
            await self.ns.unlink(parent.session, fname)
        except KvfsError as exc:
            raise _fuse_error(exc) from None
        self.detach(parent.session, fname)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        try:
            if parent_inode_old == ROOT or parent_inode_new == ROOT:
                if parent_inode_old == parent_inode_new:
                    # whole sessions do not move in one transaction; mv copies instead
                    raise KvfsError("sessions cannot be renamed in place", errno.EXDEV)
                raise NotPermitted("the root holds session directories only")
            old_parent = self._file_parent(parent_inode_old)
            new_parent = self._file_parent(parent_inode_new)
            old, new = check_name(name_old), check_name(name_new)
            # taken before the await: the watch may retire the old name meanwhile
            src = self.by_name.get((old_parent.session, old))
            moved = await self.ns.rename(
                old_parent.session,
                old,
                new_parent.session,
                new,
                noreplace=bool(flags & pyfuse3.RENAME_NOREPLACE),
            )
        except KvfsError as exc:
            raise _fuse_error(exc) from None
        # the inode follows its name: move the node, retire what was replaced
        self.detach(new_parent.session, new)
        if self.by_name.get((old_parent.session, old)) == src:
            self.by_name.pop((old_parent.session, old), None)
        node = self.nodes.get(src) if src is not None else None
        if node is not None:
            node.session, node.name = new_parent.session, new
            node.detached = False
            self.by_name[(new_parent.session, new)] = node.ino
            node.cache_version = moved.version if node.cache_version == moved.version else None

    async def link(self, inode, new_parent_inode, new_name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def symlink(self, parent_inode, name, target, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def readlink(self, inode, ctx):
        raise pyfuse3.FUSEError(errno.EINVAL)

    # -- files --------------------------------------------------------------------------

    def _new_handle(self, node: Node, writable: bool, ctx=None) -> Handle:
        fh = self._next_fh
        self._next_fh += 1
        h = Handle(fh, node, writable, owner=tgid(ctx.pid) if ctx is not None else 0)
        self.handles[fh] = h
        node.handles += 1
        return h

    async def _open_handle(self, node: Node, *, writable: bool, ctx) -> Handle:
        entry = await self.ns.get_entry(node.session, node.name)
        if entry is None and not node.writers:
            raise NotFound(node.name)
        h = self._new_handle(node, writable, ctx)
        h.entry = entry
        if writable:
            node.writers.append(h)
        return h

    async def _close_handle(self, h: Handle) -> None:
        node = h.node
        self.handles.pop(h.fh, None)
        if h in node.writers:
            node.writers.remove(h)
        if h.pending is not None:
            await self.ns.call_io(h.pending.abort)
            h.pending = None
        if h.reader is not None:
            reader, h.reader = h.reader, None
            await self.ns.call_io(reader.close)
        if h.entry is not None and not h.writable:
            node.open_versions[h.entry.version] -= 1
            if node.open_versions[h.entry.version] <= 0:
                del node.open_versions[h.entry.version]
        node.handles -= 1
        self._maybe_free(node)

    async def open(self, inode, flags, ctx):
        node = self._get(inode)
        log.debug("open ino=%d %s/%s flags=%o", inode, node.session, node.name, flags)
        if node.name is None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        try:
            if node.writers:
                await self._await_closing_writers(node)
            h = await self._open_handle(node, writable=writable, ctx=ctx)
            if writable:
                if flags & os.O_TRUNC:
                    await self._ensure_pending(h, empty=True)
                    h.pending.dirty = True
                # writes bypass the page cache: the inode's pages must keep
                # holding the committed version for every other reader
                return pyfuse3.FileInfo(fh=h.fh, keep_cache=False, direct_io=True)
            entry = h.entry
            if entry is None:
                await self._close_handle(h)
                raise NotFound(node.name)
            fi = pyfuse3.FileInfo(fh=h.fh)
            others = [v for v in node.open_versions if v != entry.version]
            if others:
                # an older version is still being read through this inode: keep
                # the new reader off the shared page cache
                fi.direct_io = True
                fi.keep_cache = False
            elif node.cache_version == entry.version:
                fi.keep_cache = True
            else:
                fi.keep_cache = False  # the kernel drops whatever it held
                node.cache_version = entry.version
            node.open_versions[entry.version] += 1
            self.ns.counters["files_read"] += 1
            if self.touch_on_read:
                self._maybe_touch(entry)
            return fi
        except KvfsError as exc:
            raise _fuse_error(exc) from None

    def _maybe_touch(self, entry: Entry) -> None:
        now = time.time_ns()
        if now - entry.mtime_ns < self.touch_interval * 1e9:
            return
        # bounded by touch_interval: at most one etcd write per entry per interval
        entry.mtime_ns = now
        self.spawn(self._touch, entry.session, entry.name, now)

    async def _touch(self, session, name, now):
        def mutate(e: Entry):
            e.mtime_ns = max(e.mtime_ns, now)

        try:
            await self.ns.update_entry(session, name, mutate)
        except KvfsError as exc:
            log.debug("touch-on-read of %s/%s skipped: %s", session, name, exc)

    def spawn(self, fn, *args):
        self.nursery.start_soon(fn, *args)

    async def create(self, parent_inode, name, mode, flags, ctx):
        try:
            parent = self._file_parent(parent_inode)
            fname = check_name(name)
            if await self.ns.get_session(parent.session) is None:
                raise NotFound(parent.session)
            node = self._node(parent.session, fname)
            h = self._new_handle(node, True, ctx)
            node.writers.append(h)
            try:
                h.pending = await self.ns.new_pending(
                    parent.session,
                    fname,
                    mode=stat.S_IFREG | (mode & 0o7777),
                    uid=ctx.uid,
                    gid=ctx.gid,
                )
            except BaseException:
                await self._close_handle(h)
                raise
            h.pending.dirty = True  # an empty new file is still a file
        except KvfsError as exc:
            raise _fuse_error(exc) from None
        node.lookups += 1
        fi = pyfuse3.FileInfo(fh=h.fh, keep_cache=False, direct_io=True)
        return fi, self._pending_attr(node, h)

    async def _ensure_pending(self, h: Handle, empty: bool = False) -> None:
        if h.pending is not None:
            return
        node = h.node
        # a truncating open starts empty but, as on any filesystem, the file
        # keeps its mode, owner and attributes
        base = await self.ns.get_entry(node.session, node.name)
        mode = base.mode if base else stat.S_IFREG | 0o644
        uid = base.uid if base else self.uid
        gid = base.gid if base else self.gid
        xattrs = base.xattrs if base else {}
        p = await self.ns.new_pending(
            node.session, node.name, mode=mode, uid=uid, gid=gid, xattrs=xattrs
        )
        if base is not None and base.size and not empty:
            reader = await self.ns.call_io(self.ns.store.reader, base.object)
            try:
                await self.ns.call_io(p.copy_from, reader, base.size)
            finally:
                await self.ns.call_io(reader.close)
        h.pending = p

    async def read(self, fh, off, size):
        h = self.handles.get(fh)
        if h is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        try:
            if h.pending is not None:
                return await self.ns.call_io(h.pending.read, size, off)
            entry = h.entry
            if entry is None:
                return b""
            size = max(0, min(size, entry.size - off))
            if size == 0:
                return b""
            if h.reader is None:
                h.reader = await self.ns.call_io(self.ns.store.reader, entry.object)
            data = await self.ns.call_io(self._read_verified, h, off, size)
            self.ns.counters["bytes_read"] += len(data)
            return data
        except Corrupt as exc:
            self.ns.counters["corrupt"] += 1
            self.ns.last_corrupt = f"{h.entry.session}/{h.entry.name}"
            log.error(
                "%s/%s (object %s): %s; read refused",
                h.entry.session,
                h.entry.name,
                h.entry.object,
                exc,
            )
            raise pyfuse3.FUSEError(errno.EIO) from None
        except KvfsError as exc:
            raise _fuse_error(exc) from None

    @staticmethod
    def _read_verified(h: Handle, off: int, size: int):
        """Bytes [off, off+size) of the handle's version, every block checked.

        Runs in a worker thread. Whole blocks are read and their CRC32C
        compared with the entry's; the last block stays with the handle, so
        small sequential requests do not read it again.
        """
        entry = h.entry
        if h.sums is None:
            h.sums = decode_blocks(entry.blocks) if entry.blocks else []
        sums = h.sums
        first, last = off // BLOCK, (off + size - 1) // BLOCK
        cached = h.block
        if cached is not None and cached[0] == first and last == first:
            start = first * BLOCK
            return memoryview(cached[1])[off - start : off - start + size]
        start = first * BLOCK
        end = min(entry.size, (last + 1) * BLOCK)
        if not sums:  # metadata without block sums (written by an older kvfs)
            start, end = off, off + size
        buf = h.reader.pread(end - start, HEADER_SIZE + start)
        if len(buf) < end - start:
            raise Corrupt(f"object truncated: {end - start - len(buf)} bytes missing at {start}")
        if sums:
            mv = memoryview(buf)
            for i in range(first, last + 1):
                lo = (i - first) * BLOCK
                if i >= len(sums) or crc32c.crc32c(mv[lo : lo + BLOCK]) != sums[i]:
                    raise Corrupt(f"checksum mismatch in block {i} (bytes {i * BLOCK}...)")
            h.block = (last, buf[(last - first) * BLOCK :] if last > first else buf)
        if start == off and len(buf) == size:
            return buf
        return memoryview(buf)[off - start : off - start + size]

    async def write(self, fh, off, buf):
        h = self.handles.get(fh)
        if h is None or not h.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        try:
            await self._ensure_pending(h)
            return await self.ns.call_io(h.pending.write, buf, off)
        except KvfsError as exc:
            raise _fuse_error(exc) from None

    async def _commit(self, h: Handle) -> None:
        p = h.pending
        entry = await self.ns.commit(p)
        h.pending = None
        node = h.node
        if not node.detached:
            # writers are direct_io, so the inode's pages can only hold an
            # older version some reader cached; without one, attributes suffice
            attr_only = node.cache_version is None
            node.cache_version = None
            self.invalidate("inode", node.ino, attr_only)
        else:
            # a writer of an unlinked-then-recreated name: its new name
            self._node(entry.session, entry.name)

    async def flush(self, fh):
        # Every close(2) of every descriptor lands here, also a forked child
        # closing an inherited one (before its exec). So the commit happens
        # here only when the process that opened the file no longer holds it:
        # its own close. Otherwise the commit waits for release (the last
        # close) and flush only checks it could happen. Either way close(2)
        # reports the errno of a commit that cannot happen.
        h = self.handles.get(fh)
        if h is None or h.pending is None or not h.pending.dirty:
            return
        h.flushed = True
        if h.pending.failed is not None:
            raise (
                _fuse_error(h.pending.failed)
                if isinstance(h.pending.failed, KvfsError)
                else pyfuse3.FUSEError(errno.EIO)
            )
        try:
            if await self._owner_closed(h):
                await self._commit(h)
            else:
                await self.ns.check_commit(h.pending)
        except KvfsError as exc:
            log.warning("%s/%s cannot be committed: %s", h.node.session, h.node.name, exc)
            if h.pending is not None:
                await self.ns.call_io(h.pending.abort)
                h.pending = None
            raise _fuse_error(exc) from None

    async def _owner_closed(self, h: Handle) -> bool:
        if not self.mountpoint or not h.owner:
            return False
        path = os.path.join(self.mountpoint, h.node.session, h.node.name)
        return not await trio.to_thread.run_sync(
            holds_file, h.owner, path, limiter=self.proc_limiter
        )

    async def _await_closing_writers(self, node: Node) -> None:
        """Let a just-closed writer's commit land before a reader looks.

        The kernel sends release shortly after the last close(2) returns; a
        reader arriving in between would see the previous version.
        """
        for w in list(node.writers):
            if w.flushed and w.pending is not None and w.pending.dirty:
                with trio.move_on_after(0.5):
                    await w.released.wait()

    async def fsync(self, fh, datasync):
        pass

    async def release(self, fh):
        h = self.handles.get(fh)
        if h is None:
            return
        try:
            if h.pending is not None and h.pending.failed is not None:
                log.warning(
                    "%s/%s: not committed after a failed write (%s)",
                    h.node.session,
                    h.node.name,
                    h.pending.failed,
                )
            elif h.pending is not None and h.pending.dirty:
                try:
                    await self._commit(h)
                except KvfsError as exc:
                    self.ns.counters["failed_commits"] += 1
                    log.error(
                        "commit of %s/%s failed, the new version is dropped: %s",
                        h.node.session,
                        h.node.name,
                        exc,
                    )
        finally:
            h.released.set()
            await self._close_handle(h)

    # -- xattrs ---------------------------------------------------------------------------

    async def _computed_xattrs(self, node: Node) -> dict[str, bytes]:
        if node.ino == ROOT:
            out = {"user.kvfs.store": self.ns.store.url.encode()}
            if self.status_fn is not None:
                out["user.kvfs.status"] = self.status_fn().encode()
            return out
        if node.name is None:
            info = await self.ns.get_session(node.session)
            if info is None:
                raise NotFound(node.session)
            entries = await self.ns.list_entries(node.session)
            return {
                "user.kvfs.ctime": str(info.ctime_ns).encode(),
                "user.kvfs.files": str(len(entries)).encode(),
                "user.kvfs.size": str(sum(e.size for e in entries)).encode(),
            }
        entry = await self.ns.get_entry(node.session, node.name)
        if entry is None:
            raise NotFound(node.name)
        return {
            "user.kvfs.size": str(entry.size).encode(),
            "user.kvfs.ctime": str(entry.ctime_ns).encode(),
            "user.kvfs.mtime": str(entry.mtime_ns).encode(),
            "user.kvfs.store": entry.store.encode(),
            "user.kvfs.object": entry.object.encode(),
            "user.kvfs.version": entry.version.encode(),
            "user.kvfs.checksum": entry.checksum.encode(),
        }

    async def _user_xattrs(self, node: Node) -> dict[str, bytes]:
        if node.ino == ROOT:
            return {}
        if node.name is None:
            info = await self.ns.get_session(node.session)
            if info is None:
                raise NotFound(node.session)
            return info.xattrs
        for w in node.writers:
            if w.pending is not None:
                return w.pending.xattrs
        entry = await self.ns.get_entry(node.session, node.name)
        if entry is None:
            raise NotFound(node.name)
        return entry.xattrs

    async def getxattr(self, inode, name, ctx):
        node = self._get(inode)
        key = name.decode("utf-8", "surrogateescape")
        try:
            if key.startswith(XATTR_PREFIX):
                values = await self._computed_xattrs(node)
            elif key.startswith("user."):
                values = await self._user_xattrs(node)
            else:
                raise pyfuse3.FUSEError(errno.ENODATA)
        except KvfsError as exc:
            raise _fuse_error(exc) from None
        if key not in values:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return values[key]

    async def listxattr(self, inode, ctx):
        node = self._get(inode)
        try:
            names = list(await self._computed_xattrs(node)) + list(await self._user_xattrs(node))
        except KvfsError as exc:
            raise _fuse_error(exc) from None
        return [n.encode() for n in names]

    def _check_xattr_name(self, name: bytes) -> str:
        if len(name) > XATTR_NAME_MAX:
            raise pyfuse3.FUSEError(errno.ERANGE)
        key = name.decode("utf-8", "surrogateescape")
        if key.startswith(XATTR_PREFIX):
            raise pyfuse3.FUSEError(errno.EPERM)  # computed by kvfs, read-only
        if not key.startswith("user.") or key == "user.":
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        return key

    async def setxattr(self, inode, name, value, ctx):
        node = self._get(inode)
        if node.ino == ROOT and name.startswith(b"user.kvfs.control."):
            if self.control_fn is None:
                raise pyfuse3.FUSEError(errno.ENOTSUP)
            try:
                await self.control_fn(name[len(b"user.kvfs.control.") :].decode(), value)
            except KvfsError as exc:
                raise _fuse_error(exc) from None
            return
        key = self._check_xattr_name(name)
        await self._change_xattrs(node, lambda x: x.__setitem__(key, bytes(value)))

    async def removexattr(self, inode, name, ctx):
        node = self._get(inode)
        key = self._check_xattr_name(name)

        def drop(x):
            if key not in x:
                raise pyfuse3.FUSEError(errno.ENODATA)
            del x[key]

        await self._change_xattrs(node, drop)

    async def _change_xattrs(self, node: Node, change) -> None:
        try:
            if node.ino == ROOT:
                raise NotPermitted("the root has no user attributes")
            if node.name is None:

                def mutate_s(info: SessionInfo):
                    change(info.xattrs)
                    check_xattr_room(info.xattrs)

                await self.ns.update_session(node.session, mutate_s)
                return
            for w in node.writers:
                if w.pending is not None:
                    x = dict(w.pending.xattrs)
                    change(x)
                    check_xattr_room(x)
                    w.pending.xattrs = x
                    if await self.ns.get_entry(node.session, node.name) is None:
                        return
            await self.ns.update_entry(node.session, node.name, lambda e: change(e.xattrs))
        except Conflict as exc:
            raise _fuse_error(exc) from None
        except KvfsError as exc:
            raise _fuse_error(exc) from None

    # -- the filesystem -------------------------------------------------------------------

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        bs = 4096
        usage = None
        try:
            usage = await self.ns.call_io(self.ns.store.usage)
        except KvfsError:
            pass
        if self.ns.capacity is not None:
            total = self.ns.capacity
            free = max(0, total - self.ns.used)
            if usage is not None:
                free = min(free, usage.free)
        elif usage is not None:
            total, free = usage.total, usage.free
        else:
            total, free = 1 << 40, 1 << 40
        s.f_bsize = bs
        s.f_frsize = bs
        s.f_blocks = total // bs
        s.f_bfree = free // bs
        s.f_bavail = free // bs
        s.f_files = len(self.ns.index) + 1_000_000
        s.f_ffree = 1_000_000
        s.f_favail = 1_000_000
        s.f_namemax = 255
        return s

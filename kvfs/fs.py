"""The FUSE operations: translates kernel requests into Namespace calls.

Every committed version of a file is its own inode, immutable, so its size
and pages in the kernel never change under a reader and the page cache keeps
them (keep_cache). A process that opens a name for writing gets an inode of
its own (a "writer" inode) through one ESTALE retry of its open, so the
kernel's truncation and size updates for the writer never touch what readers
see. A name moves to its new version's inode when the commit lands, here or,
through the etcd watch, on another node.
"""

import errno
import functools
import logging
import os
import stat
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import crc32c
import pyfuse3
import trio

from .errors import Corrupt, KvfsError, NotFound, NotPermitted
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
CLAIM_TTL = 10.0  # seconds a writer inode waits for the open it was made for


@dataclass(eq=False)
class Node:
    ino: int
    kind: str  # "root" | "session" | "version" | "writer"
    session: str | None = None
    name: str | None = None
    entry: Entry | None = None  # version: its metadata; writer: the version it replaces
    lookups: int = 0
    handles: int = 0
    owner: int = 0  # writer: the process (tgid) it belongs to
    pinned: float = 0.0  # writer: claimed at (monotonic) and not yet used by an open
    writers: list = field(default_factory=list)  # writer: handles that write


@dataclass(eq=False)
class Handle:
    fh: int
    node: Node
    writable: bool
    entry: Entry | None = None  # the version this handle reads
    reader: object = None
    pending: object = None
    owner: int = 0  # process (tgid) that opened it
    flushed: bool = False  # close(2) was called on some descriptor of it
    released: trio.Event = field(default_factory=trio.Event)
    sums: list | None = None  # the version's block CRC32Cs, decoded on first read
    block: tuple | None = None  # (index, bytes) of the last verified block


_TGID: dict[int, tuple[int, float]] = {}


def tgid(pid: int) -> int:
    """The process a (possibly multi-threaded) requester belongs to."""
    now = time.monotonic()
    hit = _TGID.get(pid)
    if hit is not None and now - hit[1] < 2.0:  # thread ids are reused: trust briefly
        return hit[0]
    if len(_TGID) > 4096:
        _TGID.clear()
    found = _read_tgid(pid)
    _TGID[pid] = (found, now)
    return found


def _read_tgid(pid: int) -> int:
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
            # an invalidated name reads back as "PATH (deleted)"
            if os.readlink(f"{fd_dir}/{fd}").removesuffix(" (deleted)") == path:
                return True
        except OSError:
            pass
    return False


def _fuse_error(exc: KvfsError) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(exc.errno)


def _guard(fn):
    """Turn a bug in one request into EIO and a logged traceback, not a dead mount."""

    op = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            self.op_errors[op] += 1
            raise
        except trio.Cancelled:
            raise
        except KvfsError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception:
            log.exception("internal error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            dt = time.perf_counter() - t0
            stat_ = self.op_time[op]
            stat_[0] += 1
            stat_[1] += dt
            stat_[2] = max(stat_[2], dt)

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
        self.nodes: dict[int, Node] = {ROOT: Node(ROOT, "root", lookups=1)}
        self.sessions: dict[str, int] = {}  # session -> ino
        self.versions: dict[tuple, int] = {}  # (session, name, version) -> ino
        self.claims: dict[tuple, int] = {}  # (session, name, tgid) -> writer ino
        self.handles: dict[int, Handle] = {}
        self._next_ino = ROOT + 1
        self._next_fh = 1
        self._send_inval, self.recv_inval = trio.open_memory_channel(100000)
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.started = time.time_ns()
        self.mountpoint = mountpoint
        self.proc_limiter = trio.CapacityLimiter(4)
        self.inline_writes = bool(getattr(ns.store, "memory_backed", False))
        # per FUSE operation: [count, total seconds, max seconds]; errors by errno
        self.op_time = defaultdict(lambda: [0, 0.0, 0.0])
        self.op_errors = Counter()

    def latencies(self) -> dict:
        return {
            op: {
                "count": n,
                "mean_ms": round(1000 * total / n, 3),
                "max_ms": round(1000 * peak, 3),
                "errors": self.op_errors.get(op, 0),
            }
            for op, (n, total, peak) in sorted(self.op_time.items())
            if n
        }

    # -- inode table ----------------------------------------------------------------

    def _new_node(self, kind: str, session=None, name=None, entry=None) -> Node:
        ino = self._next_ino
        self._next_ino += 1
        node = Node(ino, kind, session, name, entry)
        self.nodes[ino] = node
        return node

    def _session_node(self, session: str) -> Node:
        ino = self.sessions.get(session)
        if ino is None:
            node = self._new_node("session", session)
            self.sessions[session] = node.ino
            return node
        return self.nodes[ino]

    def _version_node(self, entry: Entry) -> Node:
        key = (entry.session, entry.name, entry.version)
        ino = self.versions.get(key)
        if ino is None:
            node = self._new_node("version", entry.session, entry.name, entry)
            self.versions[key] = node.ino
            return node
        node = self.nodes[ino]
        node.entry = entry  # same version, maybe newer times or attributes
        return node

    def _get(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _maybe_free(self, node: Node) -> None:
        if node.ino == ROOT or node.lookups > 0 or node.handles > 0:
            return
        self.nodes.pop(node.ino, None)
        if node.kind == "session" and self.sessions.get(node.session) == node.ino:
            del self.sessions[node.session]
        elif node.kind == "version":
            key = (node.session, node.name, node.entry.version)
            if self.versions.get(key) == node.ino:
                del self.versions[key]
        elif node.kind == "writer":
            if node.pinned and time.monotonic() - node.pinned < CLAIM_TTL:
                # the kernel forgets the inode its ESTALE revalidation saw; the
                # open that follows still needs the claim
                self.nodes[node.ino] = node
                return
            self._drop_claim(node)

    def _drop_claim(self, node: Node) -> None:
        key = (node.session, node.name, node.owner)
        if self.claims.get(key) == node.ino:
            del self.claims[key]

    def _writer_nodes(self, session: str, name: str) -> list[Node]:
        return [
            self.nodes[ino]
            for (s, n, _), ino in self.claims.items()
            if s == session and n == name and ino in self.nodes
        ]

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

    def _forget_name(self, session: str, name: str, keep: str | None = None) -> None:
        """Make the kernel look SESSION/NAME up again at its next use.

        Only needed while it may hold the name bound to another version's
        inode (writer inodes are never cached); dropping a name needlessly
        can evict an inode and its pages.
        """
        sino = self.sessions.get(session)
        if sino is None:
            return
        if any(s == session and n == name and v != keep for s, n, v in self.versions):
            self.invalidate("entry", sino, name.encode())

    def on_entry_changed(self, session: str, name: str, entry: Entry | None) -> None:
        """A watch event (or a local commit) changed SESSION/NAME."""
        if entry is not None:
            ino = self.versions.get((session, name, entry.version))
            if ino is not None:
                # the same version with new times or attributes
                self.nodes[ino].entry = entry
                self.invalidate("inode", ino, True)
                return
        # a new version, or gone: the name must resolve afresh
        self._forget_name(session, name, keep=entry.version if entry else None)

    def on_session_changed(self, session: str, info: SessionInfo | None) -> None:
        if info is None:
            self.invalidate("entry", ROOT, session.encode())

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

    def _writer_attr(self, node: Node) -> pyfuse3.EntryAttributes:
        """What the writing process sees of its unfinished version."""
        p = next((h.pending for h in reversed(node.writers) if h.pending is not None), None)
        base = node.entry
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        now = time.time_ns()
        if p is not None:
            mode, uid, gid, size = p.mode, p.uid, p.gid, p.size
            mtime = p.mtime_ns or now
        elif base is not None:
            mode, uid, gid, size, mtime = base.mode, base.uid, base.gid, base.size, base.mtime_ns
        else:
            mode, uid, gid, size, mtime = stat.S_IFREG | 0o644, self.uid, self.gid, 0, now
        a.st_mode = stat.S_IFREG | (mode & 0o7777)
        a.st_nlink = 1
        a.st_uid, a.st_gid = uid, gid
        a.st_size = size
        a.st_blocks = (size + 511) // 512
        a.st_blksize = BLKSIZE
        a.st_mtime_ns = a.st_atime_ns = mtime
        a.st_ctime_ns = now
        # private to the writer and changing: the kernel must always ask
        a.entry_timeout = a.attr_timeout = 0
        return a

    async def _attr(self, node: Node) -> pyfuse3.EntryAttributes:
        if node.kind == "root":
            return self._root_attr()
        if node.kind == "session":
            info = await self.ns.get_session(node.session)
            if info is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._session_attr(node, info)
        if node.kind == "writer":
            return self._writer_attr(node)
        current = await self.ns.get_entry(node.session, node.name)
        if current is not None and current.version == node.entry.version:
            node.entry = current
        return self._file_attr(node, node.entry)

    # -- lookups ----------------------------------------------------------------------

    async def lookup(self, parent_inode, name, ctx=None):
        log.debug("lookup %d %r pid=%s", parent_inode, name, ctx.pid if ctx else None)
        try:
            if parent_inode == ROOT:
                session = check_name(name)
                info = await self.ns.get_session(session)
                if info is None:
                    raise NotFound(session)
                node = self._session_node(session)
                attr = self._session_attr(node, info)
            else:
                parent = self._get(parent_inode)
                if parent.kind != "session":
                    raise pyfuse3.FUSEError(errno.ENOTDIR)
                fname = check_name(name)
                claim = None
                if ctx is not None and any(
                    k[0] == parent.session and k[1] == fname for k in self.claims
                ):
                    claim = self.claims.get((parent.session, fname, tgid(ctx.pid)))
                if claim is not None and claim in self.nodes:
                    node = self.nodes[claim]  # a writer finds its own inode
                    attr = self._writer_attr(node)
                else:
                    await self._await_closing_writers(parent.session, fname)
                    entry = await self.ns.get_entry(parent.session, fname)
                    if entry is None:
                        raise NotFound(fname)
                    node = self._version_node(entry)
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
            return await self._attr(node)
        except KvfsError as exc:
            raise _fuse_error(exc) from None

    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self._get(inode)
        log.debug(
            "setattr %d (%s) size=%s fh=%s",
            inode,
            node.kind,
            attr.st_size if fields.update_size else None,
            fh,
        )
        try:
            if node.kind == "root":
                raise NotPermitted("the root's attributes are fixed")
            if node.kind == "session":
                await self._setattr_session(node, attr, fields)
            elif node.kind == "writer":
                await self._setattr_writer(node, attr, fields, fh)
            else:
                await self._setattr_version(node, attr, fields, ctx)
            return await self._attr(node)
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

    async def _setattr_writer(self, node, attr, fields, fh):
        h = self.handles.get(fh) if fh is not None else None
        if h is not None and not h.writable:
            h = None
        if fields.update_size:
            if h is None:
                # truncate(2) by path, even from the writing process: its own
                # version, committed at once (a closing writer may be gone)
                await self._truncate_by_path(node, attr.st_size, None)
            else:
                await self._ensure_pending(h)
                await self.ns.call_io(h.pending.truncate, attr.st_size)
        if h is None:
            h = next((w for w in reversed(node.writers) if w.pending is not None), None)
        if not (
            fields.update_mtime
            or fields.update_mode
            or fields.update_uid
            or fields.update_gid
            or fields.update_atime
        ):
            return
        if h is not None and h.pending is not None and h.pending.dirty:
            # a version being written: its metadata commits with it
            p = h.pending
            if fields.update_mtime:
                p.mtime_ns = attr.st_mtime_ns
            if fields.update_mode:
                p.mode = stat.S_IFREG | (attr.st_mode & 0o7777)
            if fields.update_uid:
                p.uid = attr.st_uid
            if fields.update_gid:
                p.gid = attr.st_gid
            return
        if node.entry is not None:
            # opened for writing but unchanged (touch does this): the committed entry
            node.entry = await self._update_meta(node.session, node.name, attr, fields)

    async def _setattr_version(self, node, attr, fields, ctx):
        if fields.update_size:
            await self._truncate_by_path(node, attr.st_size, ctx)
        if not (
            fields.update_mtime
            or fields.update_mode
            or fields.update_uid
            or fields.update_gid
            or fields.update_atime
        ):
            return

        await self._update_meta(node.session, node.name, attr, fields)

    async def _truncate_by_path(self, node: Node, size: int, ctx) -> None:
        """truncate(2) without a descriptor: a new version, committed at once."""
        w = self._new_node("writer", node.session, node.name, node.entry)
        h = self._new_handle(w, True, ctx)
        w.writers.append(h)
        try:
            await self._ensure_pending(h)
            await self.ns.call_io(h.pending.truncate, size)
            await self._commit(h)
        finally:
            await self._close_handle(h)

    async def _update_meta(self, session, name, attr, fields) -> Entry:
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

        new = await self.ns.update_entry(session, name, mutate)
        self._version_node(new)
        return new

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
        node = self._session_node(session)
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

    async def opendir(self, inode, ctx):
        node = self._get(inode)
        if node.kind not in ("root", "session"):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        node = self._get(fh)
        try:
            if node.kind == "session" and start_id == 0:
                for (s, n, _), _ino in list(self.claims.items()):
                    if s == node.session:
                        await self._await_closing_writers(s, n)
            if node.kind == "root":
                items = [(s.name, s) for s in await self.ns.list_sessions()]
            else:
                items = [(e.name, e) for e in await self.ns.list_entries(node.session)]
        except KvfsError as exc:
            raise _fuse_error(exc) from None
        items.sort(key=lambda it: it[0])
        for i in range(start_id, len(items)):
            name, rec = items[i]
            if node.kind == "root":
                child = self._session_node(name)
                attr = self._session_attr(child, rec)
            else:
                child = self._version_node(rec)
                attr = self._file_attr(child, rec)
            if not pyfuse3.readdir_reply(token, name.encode(), attr, i + 1):
                break
            child.lookups += 1

    async def releasedir(self, fh):
        pass

    # -- names ------------------------------------------------------------------------

    def _file_parent(self, parent_inode) -> Node:
        parent = self._get(parent_inode)
        if parent.kind == "root":
            raise NotPermitted("the root holds session directories only")
        if parent.kind != "session":
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return parent

    async def unlink(self, parent_inode, name, ctx):
        try:
            parent = self._file_parent(parent_inode)
            fname = check_name(name)
            await self.ns.unlink(parent.session, fname)
        except KvfsError as exc:
            raise _fuse_error(exc) from None

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
            moved = await self.ns.rename(
                old_parent.session,
                old,
                new_parent.session,
                new,
                noreplace=bool(flags & pyfuse3.RENAME_NOREPLACE),
            )
        except KvfsError as exc:
            raise _fuse_error(exc) from None
        # the kernel moved its dentry: the version's inode now answers to the new name
        ino = self.versions.pop((old_parent.session, old, moved.version), None)
        if ino is not None and ino in self.nodes:
            n = self.nodes[ino]
            n.session, n.name, n.entry = new_parent.session, new, moved
            self.versions[(new_parent.session, new, moved.version)] = ino

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
        owner = tgid(ctx.pid) if ctx is not None and writable else 0
        h = Handle(fh, node, writable, owner=owner)
        self.handles[fh] = h
        node.handles += 1
        return h

    async def _close_handle(self, h: Handle) -> None:
        node = h.node
        self.handles.pop(h.fh, None)
        if h in node.writers:
            node.writers.remove(h)
            if not node.writers and not (
                node.pinned and time.monotonic() - node.pinned < CLAIM_TTL
            ):
                # the writer is done: its process finds the committed version again
                self._drop_claim(node)
        if h.pending is not None:
            await self.ns.call_io(h.pending.abort)
            h.pending = None
        if h.reader is not None:
            reader, h.reader = h.reader, None
            await self.ns.call_io(reader.close)
        node.handles -= 1
        self._maybe_free(node)

    def _claim(self, session: str, name: str, owner: int, base: Entry | None) -> Node:
        """A writer inode for OWNER's writes to SESSION/NAME."""
        key = (session, name, owner)
        ino = self.claims.get(key)
        if ino is not None and ino in self.nodes:
            node = self.nodes[ino]
            if node.writers or time.monotonic() - node.pinned < CLAIM_TTL:
                node.pinned = time.monotonic()  # another open is on its way
                return node
        w = self._new_node("writer", session, name, base)
        w.owner = owner
        w.pinned = time.monotonic()
        self.claims[key] = w.ino
        return w

    async def open(self, inode, flags, ctx):
        node = self._get(inode)
        if node.kind in ("root", "session"):
            raise pyfuse3.FUSEError(errno.EISDIR)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        me = tgid(ctx.pid)
        log.debug(
            "open %d (%s %s/%s) flags=%o pid=%d",
            inode,
            node.kind,
            node.session,
            node.name,
            flags,
            ctx.pid,
        )
        try:
            if node.kind == "version":
                current = await self.ns.get_entry(node.session, node.name)
                if writable:
                    # Not on this inode: readers share it. Hand the writer an
                    # inode of its own; the kernel retries the open once on
                    # ESTALE, looking the name up again, and finds it.
                    self._claim(node.session, node.name, me, current)
                    raise pyfuse3.FUSEError(errno.ESTALE)
                if current is not None and current.version == node.entry.version:
                    node.entry = current
                # the version this name resolved to, even if a replace landed
                # since (as an open file outlives a rename over it); opened now,
                # not at the first read, since reads arrive concurrently
                direct = False
                try:
                    reader = await self.ns.call_io(self.ns.store.reader, node.entry.object)
                    current = node.entry
                except NotFound:
                    # replaced long enough ago that its bytes are gone: serve what
                    # etcd has now, past the page cache (this inode's size is the
                    # old version's)
                    current = await self.ns.call_meta(
                        self.ns.meta.get_entry, node.session, node.name
                    )
                    if current is None:
                        raise
                    reader = await self.ns.call_io(self.ns.store.reader, current.object)
                    direct = True
                h = self._new_handle(node, False, ctx)
                h.entry = current
                h.reader = reader
                self.ns.counters["files_read"] += 1
                if self.touch_on_read:
                    self._maybe_touch(current)
                if direct:
                    return pyfuse3.FileInfo(fh=h.fh, keep_cache=False, direct_io=True)
                # committed versions never change: the kernel may keep their pages
                return pyfuse3.FileInfo(fh=h.fh, keep_cache=True)
            # a writer inode
            if not writable:
                # reading by path while the process writes the name: the
                # committed version, as every other reader sees it
                current = await self.ns.get_entry(node.session, node.name)
                if current is None:
                    raise NotFound(node.name)
                reader = await self.ns.call_io(self.ns.store.reader, current.object)
                h = self._new_handle(node, False, ctx)
                h.entry = current
                h.reader = reader
                return pyfuse3.FileInfo(fh=h.fh, keep_cache=False, direct_io=True)
            h = self._new_handle(node, True, ctx)
            node.writers.append(h)
            node.pinned = 0.0
            if flags & os.O_TRUNC:
                await self._ensure_pending(h, empty=True)
                h.pending.dirty = True
            # writes bypass the page cache: nothing to keep coherent
            return pyfuse3.FileInfo(fh=h.fh, keep_cache=False, direct_io=True)
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
            me = tgid(ctx.pid)
            base = await self.ns.get_entry(parent.session, fname)
            w = self._claim(parent.session, fname, me, base)
            h = self._new_handle(w, True, ctx)
            w.writers.append(h)
            w.pinned = 0.0
            try:
                h.pending = await self.ns.new_pending(
                    parent.session,
                    fname,
                    mode=stat.S_IFREG | (mode & 0o7777),
                    uid=ctx.uid,
                    gid=ctx.gid,
                    xattrs=base.xattrs if base else None,
                )
            except BaseException:
                await self._close_handle(h)
                raise
            h.pending.dirty = True  # an empty new file is still a file
        except KvfsError as exc:
            raise _fuse_error(exc) from None
        w.lookups += 1
        fi = pyfuse3.FileInfo(fh=h.fh, keep_cache=False, direct_io=True)
        return fi, self._writer_attr(w)

    async def _ensure_pending(self, h: Handle, empty: bool = False) -> None:
        if h.pending is not None:
            return
        node = h.node
        # the version being replaced lends its mode, owner and attributes, and
        # (unless truncated) its bytes
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
            try:
                # bytes that are already in memory need no worker thread
                data = self._read_verified(h, off, size, nowait=True)
                self.ns.counters["inline_reads"] += 1
            except BlockingIOError:
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
    def _read_verified(h: Handle, off: int, size: int, nowait: bool = False):
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
        read = h.reader.pread_nowait if nowait else h.reader.pread
        buf = read(end - start, HEADER_SIZE + start)
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
            if self.inline_writes:
                # a RAM-backed store: copying into it cannot block
                return h.pending.write(buf, off)
            return await self.ns.call_io(h.pending.write, buf, off)
        except KvfsError as exc:
            raise _fuse_error(exc) from None

    async def _commit(self, h: Handle) -> None:
        p = h.pending
        entry = await self.ns.commit(p)
        log.debug(
            "committed %s/%s version %s size %d",
            entry.session,
            entry.name,
            entry.version[:8],
            entry.size,
        )
        h.pending = None
        # the name moves to the new version's inode; wait for the kernel to
        # forget the old binding, so the writer's next open finds the new one
        # (none of close, release or setattr holds the directory's lock)
        sino = self.sessions.get(p.session)
        if sino is not None and any(
            s == p.session and n == p.name and v != entry.version for s, n, v in self.versions
        ):
            try:
                await trio.to_thread.run_sync(pyfuse3.invalidate_entry, sino, p.name.encode())
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                    log.debug("invalidate %s/%s: %s", p.session, p.name, exc)

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
        # procfs answers from kernel memory (readlink never enters a filesystem),
        # so this does not block the loop
        return not holds_file(h.owner, path)

    async def _await_closing_writers(self, session: str, name: str) -> None:
        """Let a just-closed writer's commit land before a reader looks.

        The kernel sends release shortly after the last close(2) returns; a
        reader arriving in between would see the previous version.
        """
        for node in self._writer_nodes(session, name):
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

    async def _file_entry(self, node: Node) -> Entry | None:
        """The metadata a file inode shows: its version's, kept current."""
        if node.kind == "version":
            current = await self.ns.get_entry(node.session, node.name)
            if current is not None and current.version == node.entry.version:
                node.entry = current
            return node.entry
        return node.entry  # a writer: the version it replaces, if any

    async def _computed_xattrs(self, node: Node) -> dict[str, bytes]:
        if node.kind == "root":
            out = {"user.kvfs.store": self.ns.store.url.encode()}
            if self.status_fn is not None:
                out["user.kvfs.status"] = self.status_fn().encode()
            return out
        if node.kind == "session":
            info = await self.ns.get_session(node.session)
            if info is None:
                raise NotFound(node.session)
            entries = await self.ns.list_entries(node.session)
            return {
                "user.kvfs.ctime": str(info.ctime_ns).encode(),
                "user.kvfs.files": str(len(entries)).encode(),
                "user.kvfs.size": str(sum(e.size for e in entries)).encode(),
            }
        if node.kind == "writer":
            return {"user.kvfs.size": str(self._writer_attr(node).st_size).encode()}
        entry = await self._file_entry(node)
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
        if node.kind == "root":
            return {}
        if node.kind == "session":
            info = await self.ns.get_session(node.session)
            if info is None:
                raise NotFound(node.session)
            return info.xattrs
        if node.kind == "writer":
            for w in reversed(node.writers):
                if w.pending is not None:
                    return w.pending.xattrs
            return node.entry.xattrs if node.entry else {}
        return (await self._file_entry(node)).xattrs

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
            if node.kind == "root":
                raise NotPermitted("the root has no user attributes")
            if node.kind == "session":

                def mutate_s(info: SessionInfo):
                    change(info.xattrs)
                    check_xattr_room(info.xattrs)

                await self.ns.update_session(node.session, mutate_s)
                return
            if node.kind == "writer":
                # attributes set while writing commit with the bytes
                if not node.writers:
                    raise KvfsError("the writer has closed the file", errno.ESTALE)
                h = node.writers[-1]
                await self._ensure_pending(h)
                x = dict(h.pending.xattrs)
                change(x)
                check_xattr_room(x)
                h.pending.xattrs = x
                return

            def mutate(e: Entry):
                change(e.xattrs)

            new = await self.ns.update_entry(node.session, node.name, mutate)
            self._version_node(new)
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

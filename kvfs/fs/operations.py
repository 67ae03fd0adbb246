"""The FUSE operations: translate kernel requests into calls on the rooms below.

Inodes (`inodes`), handles (`handles`), attributes (`attrs`), the read path
(`reads`), the write path (`writes`), xattrs (`xattrs`) and the kernel's
notifications (`kernel`) each have a module; errors cross into FUSE only in
`boundary.fuse_operation`, which wraps every handler here.
"""

import errno
import logging
import os
import stat
import time

import pyfuse3

from ..errors import Exists, KvfsError, NotFound, NotPermitted
from ..names import check_name
from ..namespace import Namespace
from ..records import Entry, SessionInfo
from . import attrs
from .boundary import OpStats, fuse_operation
from .handles import HandleTable
from .inodes import ROOT, InodeTable, RootNode, SessionNode, VersionNode, WriterNode
from .kernel import Kernel
from .passthrough import Passthrough
from .procfs import tgid
from .reads import Reads, Toucher
from .writes import Sealed, Writes
from .xattrs import CONTROL, INDEX_XATTR, Xattrs, check_xattr_name

log = logging.getLogger(__name__)

# Files never keep setuid/setgid bits (a KV cache holds no programs). That is
# what lets kvfs tell the kernel it handles "kill privileges on write"
# (HANDLE_KILLPRIV_V2), so the kernel stops asking for security.capability
# before every write: with passthrough, the write path's only trip here.
FILE_MODE_BITS = 0o1777


def _apply_setattr(target, attr, fields) -> None:
    """Times, mode and owner from a setattr onto an Entry or a PendingFile."""
    if fields.update_mtime:
        target.mtime_ns = attr.st_mtime_ns
    if fields.update_atime:
        # as set; touch -a extends life like a read does
        target.atime_ns = attr.st_atime_ns
    if fields.update_mode:
        target.mode = stat.S_IFREG | (attr.st_mode & FILE_MODE_BITS)
    if fields.update_uid:
        target.uid = attr.st_uid
    if fields.update_gid:
        target.gid = attr.st_gid


def _times_or_owner(fields) -> bool:
    return bool(
        fields.update_mtime
        or fields.update_mode
        or fields.update_uid
        or fields.update_gid
        or fields.update_atime
    )


class _DirStream:
    """An open directory: its node and, once read, its listing."""

    __slots__ = ("node", "items")

    def __init__(self, node):
        self.node = node
        self.items: list[Entry] | list[SessionInfo] | None = None


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(
        self,
        ns: Namespace,
        *,
        kernel: Kernel | None = None,
        touch_on_read: bool = True,
        touch_interval: float = 60.0,
        status_fn=None,
        control_fn=None,
        mountpoint: str = "",
        passthrough: bool = True,
        verify_reads: bool = False,
    ):
        super().__init__()
        # asks pyfuse3 (patched) for FUSE passthrough at init
        self.enable_passthrough = passthrough
        self.handle_killpriv_v2 = True
        self.ns = ns
        self.kernel = kernel or Kernel()
        # The etcd watch is up and delivering: names may be cached long (file_timeout).
        self.coherent = False
        self.control_fn = control_fn
        self.uid, self.gid = os.getuid(), os.getgid()
        self.started = time.time_ns()
        self.inodes = InodeTable()
        self.handles = HandleTable()
        self._dirs: dict[int, _DirStream] = {}  # open directory streams by handle
        self._next_dir = 0
        self.op_stats = OpStats()
        self.passthrough = Passthrough(self.kernel, ns, passthrough)
        self.inodes.on_free = self.passthrough.forgotten
        self.toucher = Toucher(ns, touch_interval, enabled=touch_on_read)
        self.reads = Reads(
            ns,
            self.inodes,
            self.handles,
            self.passthrough,
            self.toucher,
            verify_reads=verify_reads,
        )
        self.writes = Writes(
            ns,
            self.inodes,
            self.handles,
            self.kernel,
            mountpoint=mountpoint,
            uid=self.uid,
            gid=self.gid,
            passthrough=self.passthrough,
        )
        self.xattrs = Xattrs(ns, self.writes, status_fn, self.passthrough.state)

    def statistics(self) -> dict:
        return self.op_stats.statistics()

    # -- coherence with etcd (called by the watch) -----------------------------------

    @property
    def file_timeout(self) -> float:
        """How long the kernel may keep a committed file's name and attributes:
        long only while the watch tells us of every change."""
        return attrs.FILE_TIMEOUT if self.coherent else attrs.TIMEOUT

    def forget_all_names(self) -> None:
        """The watch missed events (an outage, a record it could not read):
        names the kernel holds may be stale; make it look each one up again."""
        for session, name in {(s, n) for s, n, _ in self.inodes.bound_names()}:
            sino = self.inodes.session_ino(session)
            if sino is not None:
                self.kernel.invalidate_entry(sino, name)
        for session in self.inodes.session_names():
            self.kernel.invalidate_entry(ROOT, session)

    def _forget_name(self, session: str, name: str, keep: str | None = None) -> None:
        """Make the kernel look SESSION/NAME up again at its next use.

        Only needed while it may hold the name bound to another version's
        inode (writer inodes are never cached); dropping a name needlessly
        can evict an inode and its pages.
        """
        bound = self.inodes.versions_bound(session, name, keep)
        for node in bound:
            # its object may be deleted soon: a kept backing file would hold its space
            self.passthrough.forgotten(node)
            if len(node.keys) > 1:  # a hard link's other names remain: st_nlink
                self.kernel.invalidate_inode(node.ino)
        sino = self.inodes.session_ino(session)
        if sino is not None and bound:
            self.kernel.invalidate_entry(sino, name)

    def on_entry_changed(self, session: str, name: str, entry: Entry | None) -> None:
        """A watch event (or a local commit) changed SESSION/NAME."""
        if entry is not None:
            ino = self.inodes.version_ino(session, name, entry.version)
            if ino is not None:
                # the same version with new times or attributes
                self.inodes.nodes[ino].entry = entry
                self.kernel.invalidate_inode(ino)
                return
            other = self.inodes.file_ino(entry.version)
            if other is not None:  # a new name of a file known by another: st_nlink
                self.kernel.invalidate_inode(other)
        # a new version, or gone: the name must resolve afresh
        self._forget_name(session, name, keep=entry.version if entry else None)

    def on_session_changed(self, session: str, info: SessionInfo | None) -> None:
        if info is None:
            self.kernel.invalidate_entry(ROOT, session)

    # -- attributes -------------------------------------------------------------------

    async def _attr(self, node) -> pyfuse3.EntryAttributes:
        if isinstance(node, RootNode):
            return attrs.root_attr(self.uid, self.gid, self.started)
        if isinstance(node, SessionNode):
            info = await self.ns.get_session(node.session)
            if info is None:
                raise NotFound(node.session)
            return attrs.session_attr(node, info)
        if isinstance(node, WriterNode):
            return attrs.writer_attr(node, self.uid, self.gid)
        current = await self.ns.get_entry(node.session, node.name)
        if current is not None and current.version == node.entry.version:
            node.entry = current
        return attrs.file_attr(node, node.entry, self.file_timeout)

    def _session_of(self, parent_inode) -> SessionNode:
        """The session directory PARENT_INODE names, for an operation on a file in it."""
        parent = self.inodes.get(parent_inode)
        if isinstance(parent, RootNode):
            raise NotPermitted("the root holds session directories only")
        if not isinstance(parent, SessionNode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return parent

    # -- lookups ----------------------------------------------------------------------

    @fuse_operation
    async def lookup(self, parent_inode, name, ctx=None):
        try:
            if parent_inode == ROOT:
                session = check_name(name)
                info = await self.ns.get_session(session)
                if info is None:
                    raise NotFound(session)
                node = self.inodes.session(session)
                attr = attrs.session_attr(node, info, self.file_timeout)
            else:
                parent = self.inodes.get(parent_inode)
                if not isinstance(parent, SessionNode):
                    raise pyfuse3.FUSEError(errno.ENOTDIR)
                fname = check_name(name)
                claim = None
                if ctx is not None:
                    claim = self.inodes.claim_of(parent.session, fname, ctx.pid)
                if claim is not None:
                    node = claim  # a writer finds its own inode
                    attr = attrs.writer_attr(node, self.uid, self.gid)
                else:
                    await self.writes.await_closing(parent.session, fname)
                    entry = await self.ns.get_entry(parent.session, fname)
                    if entry is None:
                        raise NotFound(fname)
                    node = self.inodes.version(entry)
                    attr = attrs.file_attr(node, entry, self.file_timeout)
                    if ctx is not None and self.inodes.reopening(ctx.pid, node.ino):
                        # the retry of a writable open of this linked file: the
                        # writer inode goes to the name it came by
                        node = self.inodes.claim(
                            parent.session, fname, ctx.pid, tgid(ctx.pid), entry
                        )
                        attr = attrs.writer_attr(node, self.uid, self.gid)
        except NotFound:
            return attrs.negative()
        self.inodes.looked_up(node)
        return attr

    @fuse_operation
    async def forget(self, inode_list):
        for ino, n in inode_list:
            self.inodes.forget(ino, n)

    @fuse_operation
    async def getattr(self, inode, ctx=None):
        return await self._attr(self.inodes.get(inode))

    @fuse_operation
    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self.inodes.get(inode)
        if isinstance(node, RootNode):
            raise NotPermitted("the root's attributes are fixed")
        if isinstance(node, SessionNode):
            await self._setattr_session(node, attr, fields)
        elif isinstance(node, WriterNode):
            await self._setattr_writer(node, attr, fields, fh)
        else:
            if fields.update_size:
                await self.writes.truncate_by_path(
                    node.session, node.name, node.entry, attr.st_size
                )
            if _times_or_owner(fields):
                await self._update_meta(node.session, node.name, attr, fields)
        return await self._attr(node)

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

    async def _setattr_writer(self, node: WriterNode, attr, fields, fh):
        h = self.handles.get(fh) if fh is not None else None
        if h is not None and not h.writable:
            h = None
        if fields.update_size:
            if h is None:
                # truncate(2) by path, even from the writing process: its own
                # version, committed at once (a closing writer may be gone)
                await self.writes.truncate_by_path(
                    node.session, node.name, node.entry, attr.st_size
                )
            else:
                await self.writes.ensure_pending(node)
                await self.ns.call_io(node.pending.truncate, attr.st_size)
        if not _times_or_owner(fields):
            return
        p = node.pending
        if p is not None and await self.ns.call_io(lambda: p.dirty):
            # a version being written: its metadata commits with it
            _apply_setattr(p, attr, fields)
            return
        # nothing being written (touch opens for writing and changes nothing),
        # or the version was committed at its close already (rsync sets times
        # after closing): the committed entry
        if await self.ns.get_entry(node.session, node.name) is not None:
            node.entry = await self._update_meta(node.session, node.name, attr, fields)

    async def _update_meta(self, session, name, attr, fields) -> Entry:
        new = await self.ns.update_entry(session, name, lambda e: _apply_setattr(e, attr, fields))
        self.inodes.version(new)
        return new

    # -- directories ------------------------------------------------------------------

    @fuse_operation
    async def mkdir(self, parent_inode, name, mode, ctx):
        if parent_inode != ROOT:
            self.inodes.get(parent_inode)
            raise NotPermitted("sessions hold files only; no deeper directories")
        session = check_name(name)
        info = await self.ns.mkdir(session, stat.S_IFDIR | (mode & 0o7777), ctx.uid, ctx.gid)
        node = self.inodes.session(session)
        self.inodes.looked_up(node)
        return attrs.session_attr(node, info)

    @fuse_operation
    async def rmdir(self, parent_inode, name, ctx):
        if parent_inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        await self.ns.rmdir(check_name(name))

    @fuse_operation
    async def opendir(self, inode, ctx):
        node = self.inodes.get(inode)
        if not isinstance(node, RootNode | SessionNode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        self._next_dir += 1
        self._dirs[self._next_dir] = _DirStream(node)
        return self._next_dir

    @fuse_operation
    async def readdir(self, fh, start_id, token):
        d = self._dirs.get(fh)
        if d is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        node = d.node
        if start_id == 0 or d.items is None:
            # the listing is taken at the start (and at a rewinddir) and kept
            # for the rest of the stream: the offsets the kernel resumes at
            # name the same entries, and a session of 10,000 files is sorted
            # once per `ls`, not once per reply buffer
            if isinstance(node, RootNode):
                d.items = await self.ns.list_sessions()  # sorted by name
            else:
                for name in self.inodes.claimed_names(node.session):
                    await self.writes.await_closing(node.session, name)
                d.items = await self.ns.list_entries(node.session)  # sorted by name
        items = d.items
        root = isinstance(node, RootNode)
        timeout = self.file_timeout
        for i in range(start_id, len(items)):
            rec = items[i]
            if root:
                child = self.inodes.session(rec.name)
                attr = attrs.session_attr(child, rec, timeout)
            else:
                child = self.inodes.version(rec)
                attr = attrs.file_attr(child, rec, timeout)
            if not self.kernel.readdir_reply(token, rec.name.encode(), attr, i + 1):
                break
            self.inodes.looked_up(child)

    @fuse_operation
    async def releasedir(self, fh):
        self._dirs.pop(fh, None)

    # -- names ------------------------------------------------------------------------

    @fuse_operation
    async def unlink(self, parent_inode, name, ctx):
        parent = self._session_of(parent_inode)
        fname = check_name(name)
        try:
            old = await self.ns.unlink(parent.session, fname)
        except NotFound:
            # a name only being written (never committed) is still a name
            if not self.inodes.writers_of(parent.session, fname):
                raise
        else:
            ino = self.inodes.version_ino(parent.session, fname, old.version)
            self.inodes.name_gone(parent.session, fname)
            if ino is not None and old.links:
                self.kernel.invalidate_inode(ino)  # one name fewer: st_nlink
        self.writes.orphan(parent.session, fname)

    @fuse_operation
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if parent_inode_old == ROOT or parent_inode_new == ROOT:
            if parent_inode_old == parent_inode_new:
                # whole sessions do not move in one transaction; mv copies instead
                raise KvfsError("sessions cannot be renamed in place", errno.EXDEV)
            raise NotPermitted("the root holds session directories only")
        old_parent = self._session_of(parent_inode_old)
        new_parent = self._session_of(parent_inode_new)
        old, new = check_name(name_old), check_name(name_new)
        noreplace = bool(flags & pyfuse3.RENAME_NOREPLACE)
        # the caller's own file, open for writing (safetensors renames its
        # temporary file before closing it): its version moves with the name
        mine = self.inodes.claim_of(
            old_parent.session, old, ctx.pid
        ) or self.inodes.writer_of_process(old_parent.session, old, tgid(ctx.pid))
        try:
            moved = await self.ns.rename(
                old_parent.session, old, new_parent.session, new, noreplace=noreplace
            )
        except NotFound:
            if mine is None or mine.orphaned:
                raise
            moved = None
            # nothing committed under the old name yet: the target goes now,
            # the writer's version takes its place at close
            if await self.ns.get_entry(new_parent.session, new) is not None:
                if noreplace:
                    raise Exists(f"{new_parent.session}/{new}") from None
                await self.ns.unlink(new_parent.session, new)
        if moved is not None:
            # the kernel moved its dentry: the version's inode now answers to the new name
            self.inodes.moved(old_parent.session, old, moved)
        if mine is not None:
            self.writes.orphan(new_parent.session, new)  # others' writes to the target
            self.inodes.move_claim(mine, new_parent.session, new)

    @fuse_operation
    async def link(self, inode, new_parent_inode, new_name, ctx):
        node = self.inodes.get(inode)
        if isinstance(node, WriterNode):
            if node.pending is not None or node.entry is None:
                # its bytes are not a file yet: they become one at close
                raise KvfsError("a file being written can be linked once closed", errno.EBUSY)
            entry = node.entry
        elif isinstance(node, VersionNode):
            entry = node.entry
        else:
            raise NotPermitted("directories have no hard links")
        parent = self._session_of(new_parent_inode)
        fname = check_name(new_name)
        new = await self.ns.link_file(entry, parent.session, fname)
        node = self.inodes.version(new)
        self.inodes.looked_up(node)
        return attrs.file_attr(node, new, self.file_timeout)

    @fuse_operation
    async def symlink(self, parent_inode, name, target, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    @fuse_operation
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        if not stat.S_ISREG(mode):
            raise NotPermitted("sessions hold regular files only")
        # an empty regular file (tar --xattrs makes files this way): created
        # and committed at once, as open(O_CREAT) then close would
        parent = self._session_of(parent_inode)
        fname = check_name(name)
        if await self.ns.get_entry(parent.session, fname) is not None:
            raise Exists(f"{parent.session}/{fname}")
        fi, attr = await self.create(parent_inode, name, mode, os.O_WRONLY, ctx)
        await self.release(fi.fh)
        self.inodes.forget(attr.st_ino, 1)
        return await self.lookup(parent_inode, name, ctx)

    @fuse_operation
    async def readlink(self, inode, ctx):
        raise pyfuse3.FUSEError(errno.EINVAL)

    # -- files --------------------------------------------------------------------------

    @fuse_operation
    async def open(self, inode, flags, ctx):
        node = self.inodes.get(inode)
        if isinstance(node, RootNode | SessionNode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        log.debug("open %d (%s) flags=%o pid=%d", inode, type(node).__name__, flags, ctx.pid)
        if isinstance(node, VersionNode):
            if writable:
                # Not on this inode: readers share it. Hand the writer an inode
                # of its own; the kernel retries the open once on ESTALE,
                # looking the name up again, and finds it.
                if node.entry.links or len({(s, n) for s, n, _ in node.keys}) > 1:
                    # a file with several names: which one is being opened
                    # shows only in the lookup the retry makes (see lookup)
                    self.inodes.expect_reopen(ctx.pid, node.ino)
                else:
                    current = await self.ns.get_entry(node.session, node.name)
                    self.inodes.claim(node.session, node.name, ctx.pid, tgid(ctx.pid), current)
                raise pyfuse3.FUSEError(errno.ESTALE)
            return await self.reads.open_version(node)
        if not writable:
            return await self.reads.open_writer_for_reading(node)
        if node.sealed:
            return await self._reopen_elsewhere(node, ctx)
        truncate = bool(flags & os.O_TRUNC)
        try:
            _, fi = await self.writes.open_writer_file(node, tgid(ctx.pid), truncate)
        except Sealed:
            return await self._reopen_elsewhere(node, ctx)
        return fi

    async def _reopen_elsewhere(self, node: WriterNode, ctx):
        """NODE's backing file was committed: a fresh writer inode for this
        process, through the kernel's one retry on ESTALE (as for a version)."""
        current = await self.ns.get_entry(node.session, node.name)
        self.inodes.claim(node.session, node.name, ctx.pid, tgid(ctx.pid), current)
        raise pyfuse3.FUSEError(errno.ESTALE)

    @fuse_operation
    async def create(self, parent_inode, name, mode, flags, ctx):
        parent = self._session_of(parent_inode)
        fname = check_name(name)
        base = await self.writes.base_for_write(parent.session, fname)
        if base is not None and flags & os.O_EXCL:
            # the kernel's lookup found no name, but one was committed since
            # (another daemon, or a close that landed in between)
            raise pyfuse3.FUSEError(errno.EEXIST)
        w = self.inodes.claim(parent.session, fname, ctx.pid, tgid(ctx.pid), base)
        h = self.writes.open_writer(w, tgid(ctx.pid))
        try:
            if w.pending is None:
                w.pending = await self.ns.new_pending(
                    parent.session,
                    fname,
                    mode=stat.S_IFREG | (mode & FILE_MODE_BITS),
                    uid=ctx.uid,
                    gid=ctx.gid,
                    xattrs=base.xattrs if base else None,
                )
            w.pending.dirty = True  # an empty new file is still a file
            fi = self.writes.file_info(h)
        except BaseException:
            await self.writes.close_handle(h)
            raise
        self.inodes.looked_up(w)
        return fi, attrs.writer_attr(w, self.uid, self.gid)

    @fuse_operation
    async def read(self, fh, off, size):
        h = self.handles.get(fh)
        if h is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if h.writable:
            # an O_RDWR open reads the version it is changing: stage it now
            await self.writes.ensure_pending(h.node)
            return await self.ns.call_io(h.node.pending.read, size, off)
        return await self.reads.read(h, off, size)

    @fuse_operation
    async def write(self, fh, off, buf):
        h = self.handles.get(fh)
        if h is None or not h.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        node = h.node
        await self.writes.ensure_pending(node)
        if self.ns.memory_backed:
            # a RAM-backed store: copying into it cannot block
            return node.pending.write(buf, off)
        return await self.ns.call_io(node.pending.write, buf, off)

    @fuse_operation
    async def fallocate(self, fh, mode, offset, length):
        h = self.handles.get(fh)
        if h is None or not h.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        node = h.node
        await self.writes.ensure_pending(node)
        await self.ns.call_io(node.pending.fallocate, mode, offset, length)

    @fuse_operation
    async def flush(self, fh):
        h = self.handles.get(fh)
        if h is not None:
            await self.writes.flush(h)

    @fuse_operation
    async def fsync(self, fh, datasync):
        pass

    @fuse_operation
    async def release(self, fh):
        h = self.handles.get(fh)
        if h is not None:
            await self.writes.release(h)

    # -- xattrs ---------------------------------------------------------------------------

    @fuse_operation
    async def getxattr(self, inode, name, ctx):
        return await self.xattrs.get(self.inodes.get(inode), name)

    @fuse_operation
    async def listxattr(self, inode, ctx):
        return await self.xattrs.names(self.inodes.get(inode))

    @fuse_operation
    async def setxattr(self, inode, name, value, ctx):
        node = self.inodes.get(inode)
        if isinstance(node, RootNode) and name.startswith(CONTROL):
            if self.control_fn is None:
                raise pyfuse3.FUSEError(errno.ENOTSUP)
            await self.control_fn(name[len(CONTROL) :].decode(), value)
            return
        if isinstance(node, SessionNode) and name == INDEX_XATTR:
            await self.xattrs.mark_index(node, bytes(value))
            return
        key = check_xattr_name(name)
        if key is not None:
            await self._change_xattrs(node, lambda x: x.__setitem__(key, bytes(value)))

    @fuse_operation
    async def removexattr(self, inode, name, ctx):
        node = self.inodes.get(inode)
        key = check_xattr_name(name)
        if key is None:
            return

        def drop(x):
            if key not in x:
                raise pyfuse3.FUSEError(errno.ENODATA)
            del x[key]

        await self._change_xattrs(node, drop)

    async def _change_xattrs(self, node, change) -> None:
        new = await self.xattrs.change(node, change)
        if new is not None:
            self.inodes.version(new)

    # -- the filesystem -------------------------------------------------------------------

    @fuse_operation
    async def statfs(self, ctx):
        total, free, files = await self.ns.space()
        bs = 4096
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = bs
        s.f_blocks = total // bs
        s.f_bfree = s.f_bavail = free // bs
        s.f_files = files + 1_000_000
        s.f_ffree = s.f_favail = 1_000_000
        s.f_namemax = 255
        return s

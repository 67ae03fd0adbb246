"""The write path: writer inodes, staged versions, and the commit at close.

A process that writes a name gets its own `WriterNode`; its writable opens
share the node's `PendingFile`, made at the first change (or at open, when
the kernel writes the staged file directly: FUSE passthrough). The commit
runs at the opener's own close (seen in procfs) or at the last close
(`release`), whichever comes first.
"""

import errno
import logging
import os
import stat

import pyfuse3
import trio

from ..errors import KvfsError, NotFound
from ..namespace import Namespace
from .handles import Handle, HandleTable
from .inodes import FileNode, InodeTable, WriterNode
from .kernel import Kernel
from .passthrough import Passthrough
from .procfs import holds_file, open_fd_count

log = logging.getLogger(__name__)

CLOSING_WAIT = 0.5  # seconds a reader waits for a just-closed writer's commit
# a closing process with more open descriptors than this is looked through
# in a worker thread (see Writes._owner_gone)
INLINE_FDS = 64


class CommitInFlight:
    """One writer's commit under way: its end, and its failure if it failed."""

    __slots__ = ("done", "error")

    def __init__(self):
        self.done = trio.Event()
        self.error: BaseException | None = None


class Sealed(Exception):
    """A writable open raced the commit of its writer inode: open it afresh."""


class Writes:
    def __init__(
        self,
        ns: Namespace,
        inodes: InodeTable,
        handles: HandleTable,
        kernel: Kernel,
        *,
        mountpoint: str = "",
        uid: int = 0,
        gid: int = 0,
        passthrough: Passthrough,
    ):
        self.ns = ns
        self.inodes = inodes
        self.handles = handles
        self.kernel = kernel
        self.mountpoint = mountpoint
        self.uid, self.gid = uid, gid
        self.pt = passthrough

    # -- opening and closing -----------------------------------------------------------

    def open_writer(self, node: WriterNode, owner: int) -> Handle:
        h = self.handles.new(node, True, owner)
        self.inodes.opened(node)
        node.writers.append(h)
        node.pinned = 0.0
        return h

    async def open_writer_file(self, node: WriterNode, owner: int, truncate: bool):
        """A writable open of NODE: (handle, FileInfo), by passthrough where it can."""
        h = self.open_writer(node, owner)
        try:
            if truncate:
                await self.ensure_pending(node, empty=True)
                node.pending.dirty = True
            if self.pt.on and node.path != "daemon":
                # the kernel needs the staged file now, not at the first write
                await self.ensure_pending(node)
            if node.sealed:
                # committed while this open was on its way: not through that file
                raise Sealed
        except BaseException:
            await self.close_handle(h)
            raise
        return h, self.file_info(h)

    def file_info(self, h: Handle) -> pyfuse3.FileInfo:
        """The open reply for writer handle H: passthrough to the staged file if it can."""
        node = h.node
        p = node.pending
        if p is not None and self.pt.attach(node, p.passthrough):
            h.passthrough = True
            # the kernel reads and writes the staged file; no page cache of ours
            return pyfuse3.FileInfo(fh=h.fh, backing_id=node.backing_id, keep_cache=False)
        self.pt.served_by_daemon(node)
        # writes bypass the page cache: nothing to keep coherent
        return pyfuse3.FileInfo(fh=h.fh, keep_cache=False, direct_io=True)

    async def close_handle(self, h: Handle) -> None:
        """Forget handle H: an uncommitted version is dropped, a reader closed."""
        node = h.node
        self.handles.pop(h.fh)
        if isinstance(node, WriterNode) and h in node.writers:
            node.writers.remove(h)
        try:
            if isinstance(node, WriterNode) and not node.writers and node.pending is not None:
                pending, node.pending = node.pending, None
                self._seal(node)
                await self.ns.call_io(pending.abort)
            if h.reader is not None:
                reader, h.reader = h.reader, None
                await self.ns.call_io(reader.close)
        finally:
            if isinstance(node, FileNode) and node.handles == 1:
                # the last open file of the inode: the kernel keeps what it needs
                self.pt.release(node)
            self.inodes.closed(node)

    # -- the staged version ---------------------------------------------------------------

    async def ensure_pending(self, node: WriterNode, empty: bool = False) -> None:
        """Stage NODE's new version, starting from the current one's bytes unless EMPTY."""
        if node.pending is not None:
            return
        if node.sealed:
            raise KvfsError("this open file's version was committed; open it again", errno.ESTALE)
        # the version being replaced lends its mode, owner and attributes, and
        # (unless truncated) its bytes
        base = await self.ns.get_entry(node.session, node.name)
        p = await self.ns.new_pending(
            node.session,
            node.name,
            mode=base.mode if base else stat.S_IFREG | 0o644,
            uid=base.uid if base else self.uid,
            gid=base.gid if base else self.gid,
            xattrs=base.xattrs if base else {},
        )
        if base is not None and base.size and not empty:
            try:
                await self.ns.copy_version(p, base)
            except BaseException:
                await self.ns.call_io(p.abort)
                raise
        if node.pending is not None:  # another request staged it meanwhile
            await self.ns.call_io(p.abort)
            return
        node.pending = p

    async def commit(self, node: WriterNode) -> None:
        # taken off the node first: a flush and a release of two opens of one
        # writer may both get here, and a version commits once
        p, node.pending = node.pending, None
        if p is None:
            return
        self._seal(node)
        node.committing = inflight = CommitInFlight()
        try:
            # a file opened under one of its several names is written under all
            entry = await self.ns.commit(p, through=node.entry)
        except BaseException as exc:
            inflight.error = exc
            with trio.CancelScope(shield=True):
                await self.ns.call_io(p.abort)
            raise
        finally:
            node.committing = None
            inflight.done.set()
        log.debug(
            "committed %s/%s version %s size %d",
            entry.session,
            entry.name,
            entry.version[:8],
            entry.size,
        )
        # the name moves to the new version's inode; wait for the kernel to
        # forget the old binding, so the writer's next open finds the new one
        # (none of close, release or setattr holds the directory's lock)
        for session, name in entry.names:
            sino = self.inodes.session_ino(session)
            if sino is not None and self.inodes.other_version_bound(session, name, entry.version):
                await self.kernel.forget_entry_now(sino, name)

    def _seal(self, node: WriterNode) -> None:
        """NODE's staged version is gone (committed or dropped).

        While the kernel still holds it as NODE's backing file (a reader of
        the node keeps it open), no new version may be staged on NODE: its
        writes would land in the old file. Later writable opens by this
        process get a fresh writer inode (see Operations.open).
        """
        if node.backing_id:
            log.debug("writer inode %d of %s/%s sealed", node.ino, node.session, node.name)
            node.sealed = True
            self.inodes.drop_claim(node)

    async def truncate_by_path(self, session: str, name: str, base, size: int) -> None:
        """truncate(2) without a descriptor: a new version, committed at once."""
        w = self.inodes.new_writer(session, name, base)
        h = self.open_writer(w, 0)
        try:
            await self.ensure_pending(w)
            await self.ns.call_io(w.pending.truncate, size)
            await self.commit(w)
        finally:
            await self.close_handle(h)

    def orphan(self, session: str, name: str) -> int:
        """SESSION/NAME was removed: versions being written to it never commit.

        As on any filesystem, an open file outlives its name and its writer's
        bytes go nowhere; the name stays removed. Returns how many writers.
        """
        nodes = self.inodes.writers_of(session, name)
        for node in nodes:
            node.orphaned = True
            self.inodes.drop_claim(node)
        return len(nodes)

    # -- close ------------------------------------------------------------------------------

    async def flush(self, h: Handle) -> None:
        # Every close(2) of every descriptor lands here, also a forked child
        # closing an inherited one (before its exec). So the commit happens
        # here only when the process that opened the file no longer holds it:
        # its own close. Otherwise the commit waits for release (the last
        # close) and flush only checks it could happen. Either way close(2)
        # reports the errno of a commit that cannot happen.
        if not h.writable:
            return
        node = h.node
        p = node.pending
        if p is None or node.orphaned or not await self._dirty(p):
            # A close of an inherited descriptor (a forked child's, or the
            # parent's while the child closes) can arrive while another close
            # of the same open file is committing: it returns only once the
            # bytes are published, or with the commit's errno.
            await self._await_commit(node)
            return
        h.flushed = True
        failed = p.failed
        if failed is not None:
            raise failed if isinstance(failed, KvfsError) else KvfsError(str(failed), errno.EIO)
        try:
            # the only open of this writer, and its process holds the name no
            # more: its own close. (An open on its way counts as held: a
            # version commits once no one can write it.)
            if node.pending is not p:
                # another close took it while we looked (see above)
                await self._await_commit(node)
            elif node.writers == [h] and await self._owner_gone(h):
                await self.commit(node)
            else:
                log.debug(
                    "%s/%s: commit deferred to the last close (%d open)",
                    node.session,
                    node.name,
                    len(node.writers),
                )
                await self.ns.check_commit(p)
        except KvfsError as exc:
            log.warning("%s/%s cannot be committed: %s", node.session, node.name, exc)
            if node.pending is not None:
                pending, node.pending = node.pending, None
                self._seal(node)
                await self.ns.call_io(pending.abort)
            raise

    async def _await_commit(self, node: WriterNode) -> None:
        inflight = node.committing
        if inflight is None:
            return
        await inflight.done.wait()
        failed = inflight.error
        if failed is not None:
            raise failed if isinstance(failed, KvfsError) else KvfsError(str(failed), errno.EIO)

    async def _dirty(self, p) -> bool:
        # A passthrough-written file is compared with the staged file: one
        # fstat of a file this daemon created, answered from the inode in
        # memory, cheaper than the worker-thread trip it once took.
        await trio.lowlevel.checkpoint()
        return p.dirty

    async def _owner_gone(self, h: Handle) -> bool:
        """owner_closed, in a worker thread for a process with many open
        descriptors: a readlink each, and a CUDA process has hundreds (a
        millisecond or two the loop would otherwise spend on every close)."""
        if h.owner and open_fd_count(h.owner) > INLINE_FDS:
            return await self.ns.call_io(self.owner_closed, h)
        return self.owner_closed(h)

    def owner_closed(self, h: Handle) -> bool:
        if not self.mountpoint or not h.owner:
            return False
        path = os.path.join(self.mountpoint, h.node.session, h.node.name)
        # procfs answers from kernel memory (readlink never enters a
        # filesystem), so this does not block the loop
        return not holds_file(h.owner, path)

    async def release(self, h: Handle) -> None:
        node = h.node
        try:
            if h in getattr(node, "writers", ()):
                # taken off first, so two releases at once cannot both see the other
                node.writers.remove(h)
            p = node.pending if h.writable else None
            if p is None or node.writers:
                pass  # other opens of this writer commit at their close
            elif node.orphaned:
                log.debug("%s/%s was removed while open: not committed", p.session, p.name)
            elif p.failed is not None:
                log.warning(
                    "%s/%s: not committed after a failed write (%s)", p.session, p.name, p.failed
                )
            elif node.pending is p and await self._dirty(p) and not node.writers:
                # (checked again after the wait: an open may have joined meanwhile)
                try:
                    await self.commit(node)
                except KvfsError as exc:
                    self.ns.count("failed_commits")
                    log.error(
                        "commit of %s/%s failed, the new version is dropped: %s",
                        p.session,
                        p.name,
                        exc,
                    )
        finally:
            h.released.set()
            await self.close_handle(h)

    async def await_closing(self, session: str, name: str) -> None:
        """Let a just-closed writer's commit land before a reader looks.

        The kernel sends release shortly after the last close(2) returns; a
        reader arriving in between would see the previous version.
        """
        for node in self.inodes.writers_of(session, name):
            if node.pending is None:
                continue
            for w in list(node.writers):
                if w.flushed:
                    with trio.move_on_after(CLOSING_WAIT):
                        await w.released.wait()

    async def base_for_write(self, session: str, name: str):
        """The committed entry a new writer of SESSION/NAME replaces (None if new)."""
        if await self.ns.get_session(session) is None:
            raise NotFound(session)
        return await self.ns.get_entry(session, name)

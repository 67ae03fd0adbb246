"""The write path: writer inodes, staged versions, and the commit at close.

A process that writes a name gets its own `WriterNode`; each writable open
is a `Handle` whose `PendingFile` (made at the first change) stages the new
version. The commit runs at the opener's own close (seen in procfs) or at
the last close (`release`), whichever comes first.
"""

import errno
import logging
import os
import stat

import trio

from ..errors import KvfsError, NotFound
from ..namespace import Namespace
from .handles import Handle, HandleTable
from .inodes import InodeTable, WriterNode
from .kernel import Kernel
from .procfs import holds_file

log = logging.getLogger(__name__)

CLOSING_WAIT = 0.5  # seconds a reader waits for a just-closed writer's commit


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
    ):
        self.ns = ns
        self.inodes = inodes
        self.handles = handles
        self.kernel = kernel
        self.mountpoint = mountpoint
        self.uid, self.gid = uid, gid

    def open_writer(self, node: WriterNode, owner: int) -> Handle:
        h = self.handles.new(node, True, owner)
        self.inodes.opened(node)
        node.writers.append(h)
        node.pinned = 0.0
        return h

    async def close_handle(self, h: Handle) -> None:
        """Forget handle H: an uncommitted version is dropped, a reader closed."""
        node = h.node
        self.handles.pop(h.fh)
        if isinstance(node, WriterNode) and h in node.writers:
            node.writers.remove(h)
        try:
            if h.pending is not None:
                pending, h.pending = h.pending, None
                await self.ns.call_io(pending.abort)
            if h.reader is not None:
                reader, h.reader = h.reader, None
                await self.ns.call_io(reader.close)
        finally:
            self.inodes.closed(node)

    async def ensure_pending(self, h: Handle, empty: bool = False) -> None:
        """Stage H's new version, starting from the current one's bytes unless EMPTY."""
        if h.pending is not None:
            return
        node = h.node
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
        h.pending = p

    async def commit(self, h: Handle) -> None:
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
        sino = self.inodes.session_ino(p.session)
        if sino is not None and self.inodes.other_version_bound(p.session, p.name, entry.version):
            await self.kernel.forget_entry_now(sino, p.name)

    async def truncate_by_path(self, session: str, name: str, base, size: int) -> None:
        """truncate(2) without a descriptor: a new version, committed at once."""
        w = self.inodes.new_writer(session, name, base)
        h = self.open_writer(w, 0)
        try:
            await self.ensure_pending(h)
            await self.ns.call_io(h.pending.truncate, size)
            await self.commit(h)
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

    async def flush(self, h: Handle) -> None:
        # Every close(2) of every descriptor lands here, also a forked child
        # closing an inherited one (before its exec). So the commit happens
        # here only when the process that opened the file no longer holds it:
        # its own close. Otherwise the commit waits for release (the last
        # close) and flush only checks it could happen. Either way close(2)
        # reports the errno of a commit that cannot happen.
        if h.pending is None or not h.pending.dirty or h.node.orphaned:
            return
        h.flushed = True
        failed = h.pending.failed
        if failed is not None:
            raise failed if isinstance(failed, KvfsError) else KvfsError(str(failed), errno.EIO)
        try:
            if self.owner_closed(h):
                await self.commit(h)
            else:
                await self.ns.check_commit(h.pending)
        except KvfsError as exc:
            log.warning("%s/%s cannot be committed: %s", h.node.session, h.node.name, exc)
            if h.pending is not None:
                pending, h.pending = h.pending, None
                await self.ns.call_io(pending.abort)
            raise

    def owner_closed(self, h: Handle) -> bool:
        if not self.mountpoint or not h.owner:
            return False
        path = os.path.join(self.mountpoint, h.node.session, h.node.name)
        # procfs answers from kernel memory (readlink never enters a
        # filesystem), so this does not block the loop
        return not holds_file(h.owner, path)

    async def release(self, h: Handle) -> None:
        try:
            p = h.pending
            if p is not None and getattr(h.node, "orphaned", False):
                log.debug("%s/%s was removed while open: not committed", p.session, p.name)
            elif p is not None and p.failed is not None:
                log.warning(
                    "%s/%s: not committed after a failed write (%s)",
                    h.node.session,
                    h.node.name,
                    p.failed,
                )
            elif p is not None and p.dirty:
                try:
                    await self.commit(h)
                except KvfsError as exc:
                    self.ns.count("failed_commits")
                    log.error(
                        "commit of %s/%s failed, the new version is dropped: %s",
                        h.node.session,
                        h.node.name,
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
            for w in list(node.writers):
                if w.flushed and w.pending is not None and w.pending.dirty:
                    with trio.move_on_after(CLOSING_WAIT):
                        await w.released.wait()

    async def base_for_write(self, session: str, name: str):
        """The committed entry a new writer of SESSION/NAME replaces (None if new)."""
        if await self.ns.get_session(session) is None:
            raise NotFound(session)
        return await self.ns.get_entry(session, name)

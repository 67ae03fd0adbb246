"""The read path: committed versions, by passthrough or with every block checked.

A committed version's data object backs its inode (FUSE passthrough): the
kernel reads it directly and keeps its pages. Otherwise (passthrough off,
`--verify-reads`, an object of the old layout, a store that is not local
files) the daemon serves each read, checking every block against its CRC32C.
"""

import logging
import os
import threading
import time
from collections import OrderedDict

import pyfuse3
import trio

from ..errors import Corrupt, KvfsError, NotFound
from ..namespace import Namespace
from ..objects import BLOCK, check_blocks, data_offset, decode_blocks, is_legacy
from ..records import Entry
from .handles import Handle, HandleTable
from .inodes import FileNode, InodeTable, VersionNode, WriterNode
from .passthrough import Passthrough

log = logging.getLogger(__name__)

TOUCH_QUEUE_MAX = 100_000  # names waiting for a touch-on-read; beyond it, one is skipped


def _read_only(h, **kw) -> pyfuse3.FileInfo:
    # a read-only open file has nothing to flush: the kernel need not ask at
    # each close (FOPEN_NOFLUSH), one request fewer per open
    return pyfuse3.FileInfo(fh=h.fh, noflush=True, **kw)


class Reads:
    def __init__(
        self,
        ns: Namespace,
        inodes: InodeTable,
        handles: HandleTable,
        passthrough: Passthrough,
        toucher: "Toucher",
        *,
        verify_reads: bool = False,
    ):
        self.ns = ns
        self.inodes = inodes
        self.handles = handles
        self.pt = passthrough
        self.toucher = toucher
        self.verify_reads = verify_reads
        self.blocks = VerifiedBlocks()
        # (entry) -> None, told of every read open, on the loop; must not block
        # (the SSD cache's prefetch: kvfs/store/prefetch.py)
        self.on_open = None

    def _handle(self, node: FileNode, entry: Entry, reader=None) -> Handle:
        h = self.handles.new(node, False)
        self.inodes.opened(node)
        h.entry, h.reader = entry, reader
        self.ns.count("files_read")
        self.toucher.note(entry)
        if self.on_open is not None:
            self.on_open(entry)
        return h

    async def open_version(self, node: VersionNode) -> pyfuse3.FileInfo:
        """A read-only open of version NODE.

        The version this name resolved to, even if a replace landed since (as
        an open file outlives a rename over it); opened now, not at the first
        read, since reads arrive concurrently.
        """
        current = await self.ns.get_entry(node.session, node.name)
        if current is not None and current.version == node.entry.version:
            node.entry = current
        entry = node.entry
        if entry.bad:
            exc = Corrupt(f"quarantined by scrub: {entry.bad}")
            self.ns.note_corrupt(entry, exc)
            raise exc
        if await self._backed(node, entry.object):
            h = self._handle(node, entry)
            h.passthrough = True
            return _read_only(h, backing_id=node.backing_id, keep_cache=False)
        entry, reader, past_cache = await self._daemon_reader(node)
        self.pt.served_by_daemon(node)
        h = self._handle(node, entry, reader)
        if past_cache:
            return _read_only(h, keep_cache=False, direct_io=True)
        # committed versions never change: the kernel may keep their pages
        return _read_only(h, keep_cache=True)

    async def open_writer_for_reading(self, node: WriterNode) -> pyfuse3.FileInfo:
        """A read-only open by path of a name the process is writing."""
        if node.path == "passthrough" and node.backing_id:
            # the same backing file as its writes: the process reads what it wrote
            h = self._handle(node, node.entry)
            h.passthrough = True
            self.ns.count("opens_passthrough")
            return _read_only(h, backing_id=node.backing_id, keep_cache=False)
        # the committed version, as every other reader sees it
        current = await self.ns.get_entry(node.session, node.name)
        if current is None:
            raise NotFound(node.name)
        if not node.writers and node.pending is None and await self._backed(node, current.object):
            # nothing being written any more (the kernel trusts a name for up
            # to a clock tick even with a zero timeout, so a just-closed
            # writer's inode can still be opened): the committed object backs
            # it now, so no later write may go through this inode
            node.sealed = True
            self.inodes.drop_claim(node)
            h = self._handle(node, current)
            h.passthrough = True
            return _read_only(h, backing_id=node.backing_id, keep_cache=False)
        try:
            reader = await self.ns.open_reader(current.object)
        except NotFound:
            raise self._missing(current) from None
        self.pt.served_by_daemon(node)
        h = self._handle(node, current, reader)
        return _read_only(h, keep_cache=False, direct_io=True)

    async def _backed(self, node: FileNode, key: str) -> bool:
        """Serve NODE by passthrough from data object KEY, if it can be."""
        if self.verify_reads or not self.pt.on or node.path == "daemon" or is_legacy(key):
            return False
        fd = None
        if not node.backing_id:
            try:
                fd = await self.ns.open_fd(key)
            except NotFound:
                return False  # its bytes are gone: the daemon serves what etcd has now
            if fd is None:
                return False  # not a local file
        try:
            return self.pt.attach(node, lambda: fd)
        finally:
            if fd is not None:
                os.close(fd)  # the kernel holds its own reference

    async def _daemon_reader(self, node: VersionNode) -> tuple[Entry, object, bool]:
        """(entry, reader, past the page cache) for the daemon to serve NODE."""
        try:
            return node.entry, await self.ns.open_reader(node.entry.object), False
        except NotFound:
            pass
        # replaced long enough ago that its bytes are gone: serve what etcd has
        # now, past the page cache (this inode's size is the old version's)
        tried = node.entry.object
        for _ in range(3):
            current = await self.ns.get_entry_uncached(node.session, node.name)
            if current is None:
                raise NotFound(node.name)
            try:
                return current, await self.ns.open_reader(current.object), True
            except NotFound:
                if current.object == tried:
                    raise self._missing(current) from None
                tried = current.object  # replaced again meanwhile: once more
        raise NotFound(node.name)

    def _missing(self, entry: Entry) -> Corrupt:
        """A name etcd has whose bytes the store lost (a wiped Crail, a deleted
        object file): EIO, logged and counted, not "No such file" for a name
        that `ls` shows."""
        exc = Corrupt(f"object {entry.object} is missing from the store")
        self.ns.note_corrupt(entry, exc)
        return exc

    async def read(self, h: Handle, off: int, size: int):
        node = h.node
        if h.passthrough and isinstance(node, WriterNode) and node.pending is not None:
            # a reader sharing its writer's staged file (the kernel asks the
            # daemon only for its own readahead, e.g. posix_fadvise)
            return await self.ns.call_io(node.pending.read, size, off)
        entry = h.entry
        if entry is None:
            return b""
        if h.reader is None:
            # a passthrough open: the kernel reads the backing file itself, but
            # readahead into the inode's own pages (posix_fadvise WILLNEED)
            # still asks the daemon, which must answer with the true bytes
            h.reader = await self.ns.open_reader(entry.object)
        size = max(0, min(size, entry.size - off))
        if size == 0:
            return b""
        try:
            try:
                # bytes that are already in memory need no worker thread
                data = read_verified(h, off, size, self.blocks, nowait=True)
                self.ns.count("inline_reads")
            except BlockingIOError:
                data = await self.ns.call_io(read_verified, h, off, size, self.blocks)
        except Corrupt as exc:
            self.ns.note_corrupt(entry, exc)
            raise
        self.ns.count("bytes_read", len(data))
        return data


class VerifiedBlocks:
    """The last verified blocks, shared by every handle and bounded.

    Small sequential reads of one block need not read and check it again;
    kept here rather than per handle, an open file costs no block of memory
    (300 open files once held 300 MiB).
    """

    def __init__(self, max_blocks: int = 32):
        self.max_blocks = max_blocks
        self._blocks: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            data = self._blocks.get(key)
            if data is not None:
                self._blocks.move_to_end(key)
            return data

    def put(self, key, data) -> None:
        with self._lock:
            self._blocks[key] = data
            self._blocks.move_to_end(key)
            while len(self._blocks) > self.max_blocks:
                self._blocks.popitem(last=False)


def read_verified(h: Handle, off: int, size: int, blocks: VerifiedBlocks, nowait: bool = False):
    """Bytes [off, off+size) of the handle's version, every block checked.

    Runs in a worker thread (or inline with NOWAIT, where the store raises
    BlockingIOError rather than block). Whole blocks are read and their
    CRC32C compared with the entry's; the last one read is kept in BLOCKS,
    so small sequential requests do not read it again.
    """
    entry = h.entry
    if h.sums is None:
        h.sums = decode_blocks(entry.blocks) if entry.blocks else []
    sums = h.sums
    first, last = off // BLOCK, (off + size - 1) // BLOCK
    start = first * BLOCK
    if last == first:
        cached = blocks.get((entry.object, first))
        if cached is not None:
            return memoryview(cached)[off - start : off - start + size]
    end = min(entry.size, (last + 1) * BLOCK)
    if not sums:  # metadata without block sums (written by an older kvfs)
        start, end = off, off + size
    read = h.reader.pread_nowait if nowait else h.reader.pread
    buf = read(end - start, data_offset(entry.object) + start)
    if len(buf) < end - start:
        raise Corrupt(f"object truncated: {end - start - len(buf)} bytes missing at {start}")
    if sums:
        check_blocks(buf, start, sums)
        blocks.put((entry.object, last), buf[(last - first) * BLOCK :] if last > first else buf)
    if start == off and len(buf) == size:
        return buf
    return memoryview(buf)[off - start : off - start + size]


class Toucher:
    """Read-extends-life: an opened entry's atime moves to now, at most once per interval.

    A service: `note` only queues (deduplicated by name, bounded), and one
    task writes the new times to etcd, so a burst of opens costs at most one
    etcd write per name per interval and never one task per open.
    """

    def __init__(self, ns: Namespace, interval: float, enabled: bool = True):
        self.ns = ns
        self.interval_ns = int(interval * 1e9)
        self.enabled = enabled
        self._due: dict[tuple[str, str], int] = {}
        self._wake = trio.Event()
        self.skipped = 0

    def note(self, entry: Entry) -> None:
        if not self.enabled:
            return
        now = time.time_ns()
        if now - entry.last_use_ns < self.interval_ns:
            return
        entry.atime_ns = now  # the next open in this interval needs no touch
        key = (entry.session, entry.name)
        if key not in self._due and len(self._due) >= TOUCH_QUEUE_MAX:
            self.skipped += 1
            return
        self._due[key] = now
        self._wake.set()

    async def run(self, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            due, self._due = self._due, {}
            for (session, name), now in due.items():
                await self._touch(session, name, now)

    async def _touch(self, session: str, name: str, now: int) -> None:
        def mutate(e: Entry):
            # the atime, never the mtime: a time someone set stays as set
            e.atime_ns = max(e.atime_ns, now)

        try:
            await self.ns.update_entry(session, name, mutate)
        except KvfsError as exc:
            log.debug("touch-on-read of %s/%s skipped: %s", session, name, exc)

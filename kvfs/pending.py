"""A version being written: a staged store object whose data starts at HEADER_SIZE.

The commit that publishes it is `Namespace.commit`.
"""

import errno

from .errors import Corrupt, KvfsError, NoSpace
from .objects import HEADER_SIZE, BlockSums, block_checksum, check_blocks, new_object_key, sums_of
from .store import Store

COPY_CHUNK = 8 << 20


class PendingFile:
    """A version under construction. Methods block: call them from a worker thread."""

    def __init__(
        self,
        store: Store,
        session: str,
        name: str,
        *,
        mode: int,
        uid: int,
        gid: int,
        xattrs: dict | None = None,
        capacity: int | None = None,
        max_size: int | None = None,
    ):
        self.store = store
        self.session = session
        self.name = name
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.xattrs = dict(xattrs or {})
        self.capacity = capacity
        self.max_size = max_size
        self.mtime_ns: int | None = None  # set by utimens before the commit
        self.version, self.key = new_object_key()
        self.writer = store.writer(self.key)
        self.crc = BlockSums()
        self.size = 0
        self.dirty = False
        self.closed = False
        # a failed write (ENOSPC, EIO) leaves a hole: such a version never commits
        self.failed: Exception | None = None

    def _check_size(self, end: int) -> None:
        if self.max_size is not None and end > self.max_size:
            raise KvfsError(
                f"{self.session}/{self.name}: {end} bytes exceed the largest file kvfs "
                f"takes ({self.max_size}, --max-file-size)",
                errno.EFBIG,
            )

    def _check_room(self, end: int) -> None:
        self._check_size(end)
        if self.capacity is not None and end > self.capacity:
            raise NoSpace(f"{self.session}/{self.name}: {end} bytes exceed the store capacity")

    def copy_from(self, reader, size: int, sums: list[int] | None = None) -> None:
        """Start from an existing version's bytes (copy-on-write of a committed file).

        With SUMS (the version's per-block CRC32Cs) every block is checked as
        it is copied: a new version must never turn corrupt bytes into valid
        ones by checksumming them afresh.
        """
        self._check_room(size)
        off = 0
        while off < size:
            chunk = reader.pread(min(COPY_CHUNK, size - off), HEADER_SIZE + off)
            if len(chunk) < min(COPY_CHUNK, size - off):
                raise Corrupt(f"object truncated: {size - off - len(chunk)} bytes missing")
            if sums:
                check_blocks(chunk, off, sums)
            self.writer.pwrite(chunk, HEADER_SIZE + off)
            self.crc.update(chunk, off)
            off += len(chunk)
        self.size = off

    def write(self, data, offset: int) -> int:
        end = offset + len(data)
        self._check_size(end)  # refused before any byte moves: the version stays whole
        try:
            self._check_room(end)
            n = self.writer.pwrite(data, HEADER_SIZE + offset)
        except Exception as exc:
            self.failed = exc
            raise
        self.crc.update(data, offset)
        if end > self.size:
            self.size = end
        self.dirty = True
        return n

    def read(self, size: int, offset: int) -> bytes:
        size = max(0, min(size, self.size - offset))
        if size == 0:
            return b""
        return self.writer.pread(size, HEADER_SIZE + offset)

    def truncate(self, size: int) -> None:
        self._check_room(size)
        self.writer.truncate(HEADER_SIZE + size)
        self.crc.truncated(size)
        self.size = size
        self.dirty = True

    def checksum(self) -> tuple[str, list[int]]:
        """(file checksum, per-block CRC32Cs) of the staged bytes."""
        sums = self.crc.result(self.size)
        if sums is None:
            sums = sums_of(lambda n, off: self.writer.pread(n, HEADER_SIZE + off), self.size)
        return block_checksum(sums), sums

    def commit_object(self, header: bytes) -> None:
        """Write the header and make the object durable and visible in the store."""
        if self.writer.size() < HEADER_SIZE + self.size:
            self.writer.truncate(HEADER_SIZE + self.size)
        self.writer.pwrite(header, 0)
        self.writer.commit()
        self.closed = True

    def forget_intent(self) -> None:
        """etcd has the entry (or never will): the store may drop its intent record."""
        self.writer.forget_intent()

    def abort(self) -> None:
        if not self.closed:
            self.writer.abort()
            self.closed = True

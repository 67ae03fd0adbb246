"""A version being written: a staged data object, its bytes at offset 0.

Bytes arrive either through the daemon (`write`, `truncate`) or straight
from the kernel into the staged file (FUSE passthrough: `passthrough()`);
in the second case size, changes and checksums are read from the staged
file itself. The commit that publishes a version is `Namespace.commit`.
"""

import errno
import os
from typing import NamedTuple

from .errors import Corrupt, KvfsError, NoSpace
from .objects import (
    BlockSums,
    block_checksum,
    check_blocks,
    data_offset,
    header_key,
    new_object_key,
    sums_of,
)
from .store import Store

COPY_CHUNK = 8 << 20
FALLOC_FL_KEEP_SIZE = 1
# threads for a commit's checksum pass over a file the kernel wrote
CHECKSUM_THREADS = min(8, os.cpu_count() or 1)


class ChecksumPlan(NamedTuple):
    """How a commit gets its block sums (see PendingFile.checksum_plan)."""

    sums: list[int] | None  # known already: the daemon saw every byte written
    later: bool  # computed after publishing, from the object
    reads: int  # bytes read back now to compute them


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
        self.atime_ns = 0
        self.version, self.key = new_object_key()
        self.writer = store.writer(self.key)
        self.crc = BlockSums()
        self._size = 0
        self._dirty = False
        self._stamp = None  # (size, mtime) of the staged file when the kernel took over
        self.closed = False
        # a failed write (ENOSPC, EIO) leaves a hole: such a version never commits
        self.failed: Exception | None = None

    # -- the kernel writes it (passthrough) ------------------------------------------

    def passthrough(self) -> int | None:
        """The staged file's descriptor, for the kernel to write directly; None if none.

        From then on the daemon sees no bytes: the running checksum is given
        up, and size and changes are read from the file.
        """
        fd = self.writer.fileno()
        if fd is not None and self._stamp is None:
            self.crc.valid = False
            # any write moves the mtime to now; from a mark no clock gives, a
            # write in the same clock tick as the copy above is still seen
            os.utime(fd, ns=(0, 0))
            self._stamp = self._file_stamp()
        return fd

    def _file_stamp(self):
        st = os.fstat(self.writer.fileno())
        return st.st_size, st.st_mtime_ns

    @property
    def size(self) -> int:
        if self._stamp is not None and not self.closed:
            try:
                return self.writer.size()
            except OSError as exc:
                if exc.errno != errno.EBADF:
                    raise
                # being committed or dropped by another request: its last size
        return self._size

    @property
    def dirty(self) -> bool:
        if self.closed:
            return False  # committed or dropped: nothing more to commit
        if self._dirty or self._stamp is None:
            return self._dirty
        try:
            return self._file_stamp() != self._stamp
        except OSError as exc:
            if self.closed or exc.errno == errno.EBADF:
                return False  # being committed or dropped by another request
            raise

    @dirty.setter
    def dirty(self, value: bool) -> None:
        self._dirty = value

    # -- the daemon writes it ----------------------------------------------------------

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

    def copy_from(self, reader, key: str, size: int, sums: list[int] | None = None) -> None:
        """Start from data object KEY's bytes (copy-on-write of a committed file).

        With SUMS (the version's per-block CRC32Cs) every block is checked as
        it is copied: a new version must never turn corrupt bytes into valid
        ones by checksumming them afresh.
        """
        self._check_room(size)
        base = data_offset(key)
        off = 0
        while off < size:
            want = min(COPY_CHUNK, size - off)
            chunk = reader.pread(want, base + off)
            if len(chunk) < want:
                raise Corrupt(f"object truncated: {size - off - len(chunk)} bytes missing")
            if sums:
                check_blocks(chunk, off, sums)
            self.writer.pwrite(chunk, off)
            self.crc.update(chunk, off)
            off += len(chunk)
        self._size = off

    def write(self, data, offset: int) -> int:
        end = offset + len(data)
        self._check_size(end)  # refused before any byte moves: the version stays whole
        try:
            self._check_room(end)
            n = self.writer.pwrite(data, offset)
        except Exception as exc:
            self.failed = exc
            raise
        self.crc.update(data, offset)
        if end > self._size:
            self._size = end
        self._dirty = True
        return n

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """fallocate(2): mode 0 (may grow the file) and FALLOC_FL_KEEP_SIZE only."""
        if mode not in (0, FALLOC_FL_KEEP_SIZE):
            # punching or zeroing would need the running checksum redone:
            # POSIX lets a file system refuse (posix_fallocate falls back)
            raise KvfsError("only fallocate modes 0 and KEEP_SIZE", errno.EOPNOTSUPP)
        end = offset + length
        if mode == 0:
            self._check_room(end)
        try:
            self.writer.fallocate(mode, offset, length)
        except OSError as exc:
            raise KvfsError(f"fallocate: {exc.strerror}", exc.errno) from None
        if mode == 0 and end > self._size:
            # zeros past the old end: the commit sums the file (skipping holes)
            self.crc.valid = False
            self._size = end
            self._dirty = True

    def read(self, size: int, offset: int) -> bytes:
        size = max(0, min(size, self.size - offset))
        if size == 0:
            return b""
        return self.writer.pread(size, offset)

    def truncate(self, size: int) -> None:
        self._check_room(size)
        self.writer.truncate(size)
        self.crc.truncated(size)
        self._size = size
        self._dirty = True

    # -- the commit ----------------------------------------------------------------------

    def check_final_size(self) -> None:
        """Bytes the kernel wrote past the limits are refused at the commit."""
        self._check_room(self.size)

    def checksum_plan(self, defer_from: int | None = None) -> ChecksumPlan:
        """What `checksum(defer_from)` will do; one look at the staged file's
        extents (on tmpfs a SEEK_HOLE walks every page: ~0.3 ms for 28 MiB)."""
        size = self.size
        sums = self.crc.result(size)
        if sums is not None:
            return ChecksumPlan(sums, False, 0)
        stored = self._stored(size)
        # the job after publishing reads holes too: sparse files are summed now
        later = defer_from is not None and size >= defer_from and stored == size
        return ChecksumPlan(None, later, 0 if later else stored)

    def checksum(
        self, defer_from: int | None = None, plan: ChecksumPlan | None = None
    ) -> tuple[str, list[int]] | None:
        """(file checksum, per-block CRC32Cs) of the staged bytes.

        None, when the sums would need a pass over DEFER_FROM bytes or more
        (the kernel wrote them, by passthrough): the caller computes them
        from the committed object later. PLAN is checksum_plan(defer_from),
        when the caller has it.
        """
        sums, later, _ = plan if plan is not None else self.checksum_plan(defer_from)
        if later:
            return None
        if sums is None:
            sums = sums_of(
                self.writer.pread,
                self.size,
                getattr(self.writer, "data_ranges", None),
                workers=CHECKSUM_THREADS,
            )
        return block_checksum(sums), sums

    def _stored(self, size: int) -> int:
        """Bytes of the staged file that hold data, not holes."""
        ranges = getattr(self.writer, "data_ranges", None)
        if ranges is None:
            return size
        return sum(end - start for start, end in ranges(size))

    def commit_object(self, header: bytes) -> None:
        """Make the header, then the data, durable and visible in the store."""
        size = self.size
        if self._stamp is not None:
            self._size = size
        if self.writer.size() < size:
            self.writer.truncate(size)
        self.store.put(header_key(self.key), header)
        self.writer.commit()
        self.closed = True

    def forget_intent(self) -> None:
        """etcd has the entry (or never will): the store may drop its intent record."""
        self.writer.forget_intent()

    def abort(self) -> None:
        if not self.closed:
            if self._stamp is not None:
                self._size = self.size
            self.writer.abort()
            self.closed = True

"""The store interface: where the bytes of committed files live.

A store holds immutable objects under relative keys. Objects are written
through a staged writer (invisible until commit, durable once committed) and
read with ranged gets. kvfs decides the keys and the object layout; a store
only moves bytes.
"""

import errno
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ObjectStat:
    size: int
    mtime: float


@dataclass(frozen=True)
class Usage:
    total: int  # bytes the medium holds in all
    free: int  # bytes still available to the store


class StoreWriter(ABC):
    """A staged object: random-access writes, then commit or abort."""

    @abstractmethod
    def pwrite(self, data, offset: int) -> int: ...

    @abstractmethod
    def pread(self, size: int, offset: int) -> bytes: ...

    @abstractmethod
    def truncate(self, size: int) -> None: ...

    @abstractmethod
    def size(self) -> int: ...

    @abstractmethod
    def commit(self) -> None:
        """Make the object durable and visible under its key."""

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on the staged object: mode 0 or FALLOC_FL_KEEP_SIZE.

        Raises OSError(EOPNOTSUPP) where the store cannot.
        """
        raise OSError(errno.EOPNOTSUPP, "fallocate is not supported by this store")

    def fileno(self) -> int | None:
        """A descriptor of the staged file the kernel may write directly (FUSE
        passthrough); None where the store stages elsewhere than a local file."""
        return None

    def forget_intent(self) -> None:  # noqa: B027 - a store without intent records has nothing to do
        """The commit is final (etcd has it): forget the intent record; never raises."""

    @abstractmethod
    def abort(self) -> None:
        """Drop the staged bytes; never raises."""


class LocallyStagedWriter(StoreWriter):
    """A writer whose bytes are staged in a local file (`self._local`, a local
    store's writer) until `commit` sends them on: stores in front of or
    beside a remote medium, so the kernel can write the staged file itself."""

    _local: StoreWriter

    def pwrite(self, data, offset: int) -> int:
        return self._local.pwrite(data, offset)

    def pread(self, size: int, offset: int) -> bytes:
        return self._local.pread(size, offset)

    def truncate(self, size: int) -> None:
        self._local.truncate(size)

    def size(self) -> int:
        return self._local.size()

    def fileno(self) -> int:
        return self._local.fileno()

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        self._local.fallocate(mode, offset, length)

    def data_ranges(self, size: int):
        return self._local.data_ranges(size)


class StoreReader(ABC):
    """An object opened for repeated ranged reads."""

    @abstractmethod
    def pread(self, size: int, offset: int) -> bytes: ...

    def pread_nowait(self, size: int, offset: int) -> bytes:
        """pread if it cannot block (cached or RAM-backed), else BlockingIOError.

        Lets the daemon serve a read on its event loop without a thread hop.
        """
        raise BlockingIOError

    def readinto(self, buf, offset: int) -> int:
        data = self.pread(len(buf), offset)
        buf[: len(data)] = data
        return len(data)

    @abstractmethod
    def close(self) -> None: ...


class Store(ABC):
    """A backing store. Methods block; kvfs calls them from worker threads."""

    #: short description shown in xattrs and status, e.g. "local:/var/lib/kvfs"
    url: str
    #: reading a committed object back costs no more than reading the staged
    #: file would (local files, RAM): a large commit may leave its block sums
    #: to a job after publishing (Namespace.commit)
    rereads_cheaply: bool = False
    #: open_fd gives the object itself, which stays until it is deleted: the
    #: kernel may keep it registered after the last close for the next open.
    #: Not so for a cache's copy, which may be evicted while the kernel holds
    #: it (and would then keep its space, unseen by the cache's accounting).
    fds_of_objects: bool = False

    @abstractmethod
    def put(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get(self, key: str, offset: int = 0, size: int = -1) -> bytes:
        """Bytes [offset, offset+size) of KEY (to the end when size < 0)."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove KEY; a missing key is not an error."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]: ...

    @abstractmethod
    def stat(self, key: str) -> ObjectStat: ...

    @abstractmethod
    def writer(self, key: str) -> StoreWriter: ...

    def reader(self, key: str) -> StoreReader:
        return _GetReader(self, key)

    def open_fd(self, key: str) -> int | None:
        """A read-only descriptor of object KEY for the kernel to read directly
        (FUSE passthrough), which the caller closes; None where objects are not
        local files."""
        return None

    def rewrite_header(self, key: str, data: bytes) -> None:
        """Overwrite the first len(DATA) bytes of KEY in place (kvfs's header).

        Optional: a store that cannot patch objects keeps the header written at
        commit, and recovery then restores the attributes of that moment.
        """
        raise NotImplementedError

    def usage(self) -> Usage | None:
        """Capacity of the medium, when the store can tell."""
        return None

    def clean_staging(self, is_live=None) -> int:
        """Settle this node's interrupted commits; returns how many were found.

        IS_LIVE(key) tells whether etcd references an object: such objects
        stay, any other leftover of this node is removed.
        """
        return 0

    def close(self) -> None:  # noqa: B027 - most stores hold nothing to release
        pass


class _GetReader(StoreReader):
    def __init__(self, store: Store, key: str):
        self._store = store
        self._key = key

    def pread(self, size: int, offset: int) -> bytes:
        return self._store.get(self._key, offset, size)

    def close(self) -> None:
        pass

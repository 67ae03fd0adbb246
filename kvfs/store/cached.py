"""The SSD cache: a bounded local directory in front of a remote store.

The original's `enable_ssd_caching` + `ssd_cache_dir`. Objects are immutable
once committed (a new version is a new key), so a cached copy never goes stale;
the one exception, a header rewritten in place, is patched here too.

- Write-through: a file being written is staged in the cache directory (a
  local file, so the kernel can write it directly: FUSE passthrough); its
  commit uploads the bytes to the remote store, then keeps the staged file as
  the cached copy.
- Filled on read: opening an object for reading (`reader`, `open_fd`) copies
  it whole into the cache first, so a cached object is a local file and its
  reads take the passthrough path. Ranged `get`s (headers, `kvfs recover`)
  are served from a cached copy when there is one but never fill the cache.
  (A scrub opens readers, so a scrub pass does fill it.)
- Bounded, least recently used out: the cache holds at most CAPACITY bytes; a
  fill or write-through past it drops the least recently used copies. An
  object larger than the whole cache is not cached (read from the store).
- Prefetch (`prefetch`): background fills on a small thread pool, bounded,
  errors logged; `kvfs.store.prefetch` decides what to fetch.

Reads of cached objects keep working while the remote store is down.
"""

import errno
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from ..errors import KvfsError, NotFound, StoreError
from .base import LocallyStagedWriter, ObjectStat, Store, StoreReader, StoreWriter
from .local import LocalReader, LocalStore

log = logging.getLogger(__name__)

CHUNK = 4 << 20  # bytes moved per call between the store and the cache
PREFETCH_THREADS = 2  # parallel background fills: the remote link, not the CPU, is the limit
PREFETCH_QUEUE = 64  # fills waiting at most; beyond it a hint is dropped (it is only a hint)


class _FdReader(LocalReader):
    """A reader over an already opened cached copy (opened under the cache's
    lock, so an eviction cannot unlink it between the check and the open)."""

    def __init__(self, fd: int, key: str, store: "CachedStore"):
        self._fd = fd
        self._key = key
        self._store = store


class CachedWriter(LocallyStagedWriter):
    """Staged as a local file in the cache; the commit uploads it, then keeps it."""

    def __init__(self, cache: "CachedStore", key: str):
        self._cache = cache
        self._key = key
        self._local = cache.local.writer(key)
        self._remote: StoreWriter | None = None

    def commit(self) -> None:
        size = self._local.size()
        try:
            remote = self._remote = self._cache.inner.writer(self._key)
            # holes stay holes: only the extents holding data travel
            remote.truncate(size)
            buf = bytearray(CHUNK)
            for start, end in self._local.data_ranges(size):
                off = start
                while off < end:
                    view = memoryview(buf)[: min(CHUNK, end - off)]
                    n = os.preadv(self._local.fileno(), [view], off)
                    if n <= 0:
                        raise StoreError(f"commit {self._key}: staged file shrank")
                    remote.pwrite(view[:n], off)
                    off += n
            remote.commit()
        except BaseException:
            self.abort()
            raise
        # the remote store has it: the staged file becomes the cached copy
        try:
            self._local.commit()
        except KvfsError as exc:
            log.warning(
                "ssd cache: keeping %s failed (%s); it is read from the store", self._key, exc
            )
            return
        self._cache._admit(self._key, size)

    def forget_intent(self) -> None:
        if self._remote is not None:
            self._remote.forget_intent()
        self._local.forget_intent()

    def abort(self) -> None:
        if self._remote is not None:
            self._remote.abort()
        self._local.abort()
        self._cache._forget(self._key)


class CachedStore(Store):
    """INNER (the remote store) behind a cache of at most CAPACITY bytes in CACHE_DIR."""

    def __init__(self, inner: Store, cache_dir: str, capacity: int, node: str = "default"):
        self.inner = inner
        # the spec stays the remote store's: `kvfs recover` opens it from status
        self.url = inner.url
        # where a private etcd lives (the daemon asks the store for its root)
        root = getattr(inner, "root", None)
        if root is not None:
            self.root = root
        self.cache_dir = os.path.abspath(cache_dir)
        self.capacity = capacity
        # a copy on disk is nothing to be trusted across a crash: not durable
        self.local = LocalStore(self.cache_dir, node=node, durable=False)
        self.memory_backed = False  # reads of a cached copy may still hit the disk
        self.nowait_ok = hasattr(os, "RWF_NOWAIT")
        self._lock = threading.Lock()
        self._lru: OrderedDict[str, int] = OrderedDict()  # key -> size, oldest first
        self._used = 0
        self._filling: dict[str, threading.Lock] = {}
        self._queued: set[str] = set()
        self._pool: ThreadPoolExecutor | None = None
        self.stats = {"hits": 0, "misses": 0, "fills": 0, "evictions": 0, "prefetched": 0}
        self.stats.update(prefetch_errors=0, uncacheable=0)
        self.last_error: str | None = None
        self._load()

    # -- the cache's own bookkeeping -----------------------------------------------

    def _load(self) -> None:
        """Rebuild the LRU order from the copies a previous run left (oldest
        modification first: the best order a restart still knows)."""
        found = []
        for key in self.local.list():
            try:
                st = os.stat(self.local.path(key))
            except OSError:
                continue
            found.append((st.st_mtime, key, st.st_size))
        for _, key, size in sorted(found):
            self._lru[key] = size
            self._used += size
        self._evict(0)
        if found:
            log.info(
                "ssd cache %s: %d objects, %d bytes kept from before",
                self.cache_dir,
                len(self._lru),
                self._used,
            )

    def _evict(self, room: int) -> None:
        """Drop least recently used copies until ROOM more bytes fit (lock held)."""
        while self._lru and self._used + room > self.capacity:
            key = next(iter(self._lru))
            size = self._lru.pop(key)
            self._used -= size
            self.stats["evictions"] += 1
            # an open descriptor (the kernel's, a reader's) keeps its bytes
            self.local.delete(key)

    def _admit(self, key: str, size: int) -> None:
        """KEY's copy (SIZE bytes) is in the cache: account for it, make room."""
        with self._lock:
            old = self._lru.pop(key, None)
            if old is not None:
                self._used -= old
            if size > self.capacity:
                self.stats["uncacheable"] += 1
                self.local.delete(key)
                return
            self._evict(size)
            self._lru[key] = size
            self._used += size

    def _forget(self, key: str) -> None:
        with self._lock:
            size = self._lru.pop(key, None)
            if size is not None:
                self._used -= size
        self.local.delete(key)

    def _open_cached(self, key: str) -> int | None:
        """A descriptor of KEY's cached copy, marked recently used; None if not cached."""
        with self._lock:
            if key not in self._lru:
                return None
            try:
                fd = os.open(self.local.path(key), os.O_RDONLY)
            except FileNotFoundError:
                # removed behind our back (an operator cleaning the directory)
                self._used -= self._lru.pop(key)
                return None
            self._lru.move_to_end(key)
            return fd

    def _fill(self, key: str) -> bool:
        """Copy KEY whole from the remote store into the cache; False when it
        cannot be cached (larger than the cache). Raises what the store raises."""
        with self._lock:
            lock = self._filling.setdefault(key, threading.Lock())
        with lock:  # one fill per key; a second asker waits for the first
            try:
                with self._lock:
                    if key in self._lru:
                        return True
                size = self.inner.stat(key).size
                if size > self.capacity:
                    with self._lock:
                        self.stats["uncacheable"] += 1
                    return False
                # room first, so the cache never holds more than its bound
                with self._lock:
                    self._evict(size)
                w = self.local.writer(key)
                try:
                    self._copy_in(key, size, w)
                    w.commit()
                    w.forget_intent()
                except BaseException:
                    w.abort()
                    raise
                with self._lock:
                    self.stats["fills"] += 1
                self._admit(key, size)
                return True
            finally:
                with self._lock:
                    if self._filling.get(key) is lock:
                        del self._filling[key]

    def _copy_in(self, key: str, size: int, w) -> None:
        """KEY's SIZE bytes from the remote store into staged writer W."""
        src = self.inner.open_fd(key)
        if src is not None:
            # the store's objects are files (NFS, CephFS through `local:`): the
            # kernel copies, no trip through Python buffers
            try:
                off = 0
                while off < size:
                    n = os.copy_file_range(src, w.fileno(), size - off, off, off)
                    if n <= 0:
                        raise StoreError(f"fill {key}: object shorter than its size")
                    off += n
            except OSError as exc:
                raise StoreError(f"fill {key}: {exc}") from exc
            finally:
                os.close(src)
            return
        reader = self.inner.reader(key)
        try:
            buf = bytearray(min(CHUNK, max(size, 1)))
            off = 0
            while off < size:
                view = memoryview(buf)[: min(len(buf), size - off)]
                n = reader.readinto(view, off)
                if n <= 0:
                    raise StoreError(f"fill {key}: object shorter than its size")
                w.pwrite(view[:n], off)
                off += n
        finally:
            reader.close()

    def _open_filled(self, key: str) -> int | None:
        """A descriptor of KEY's cached copy, filled first if need be; None
        when it cannot be cached: the caller then reads the store itself."""
        fd = self._open_cached(key)
        with self._lock:
            self.stats["hits" if fd is not None else "misses"] += 1
        if fd is not None:
            return fd
        try:
            if not self._fill(key):
                return None
        except NotFound:
            raise
        except (KvfsError, OSError) as exc:
            # the store failing or the cache's own disk (full, broken): either
            # way the store is asked directly, and says which it was
            self._note_error(f"fill {key}: {exc}")
            log.error(
                "ssd cache: cannot fill %s (%s); reading it from %s", key, exc, self.inner.url
            )
            return None
        return self._open_cached(key)  # None if a concurrent fill pushed it out already

    def _note_error(self, what: str) -> None:
        self.last_error = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {what}"

    # -- prefetch -------------------------------------------------------------------

    def prefetch(self, keys) -> int:
        """Fill KEYS in the background; returns how many were queued. Never blocks."""
        n = 0
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="prefetch")
            for key in keys:
                if key in self._lru or key in self._queued or key in self._filling:
                    continue
                if len(self._queued) >= PREFETCH_QUEUE:
                    break
                self._queued.add(key)
                self._pool.submit(self._prefetch_one, key)
                n += 1
        return n

    def _prefetch_one(self, key: str) -> None:
        try:
            if self._fill(key):
                with self._lock:
                    self.stats["prefetched"] += 1
        except Exception as exc:
            # a hint that failed: the read that needs it fetches it (and fails loudly)
            with self._lock:
                self.stats["prefetch_errors"] += 1
            self._note_error(f"prefetch {key}: {exc}")
            log.warning("ssd cache: prefetch of %s failed: %s", key, exc)
        finally:
            with self._lock:
                self._queued.discard(key)

    def prefetch_idle(self) -> bool:
        with self._lock:
            return not self._queued

    def statistics(self) -> dict:
        with self._lock:
            return {
                "dir": self.cache_dir,
                "capacity": self.capacity,
                "used": self._used,
                "objects": len(self._lru),
                "prefetch_queued": len(self._queued),
                "last_error": self.last_error,
                **self.stats,
            }

    # -- the Store interface ----------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        self.inner.put(key, data)
        try:
            self.local.put(key, data)
        except KvfsError as exc:
            log.warning("ssd cache: keeping %s failed (%s)", key, exc)
            return
        self._admit(key, len(data))

    def get(self, key: str, offset: int = 0, size: int = -1) -> bytes:
        fd = self._open_cached(key)
        if fd is None:
            return self.inner.get(key, offset, size)
        try:
            if size < 0:
                size = os.fstat(fd).st_size - offset
            return os.pread(fd, max(size, 0), offset)
        finally:
            os.close(fd)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def delete(self, key: str) -> None:
        self.inner.delete(key)
        self._forget(key)

    def list(self, prefix: str = "") -> Iterator[str]:
        return self.inner.list(prefix)

    def stat(self, key: str) -> ObjectStat:
        return self.inner.stat(key)

    def writer(self, key: str) -> StoreWriter:
        return CachedWriter(self, key)

    def reader(self, key: str) -> StoreReader:
        fd = self._open_filled(key)
        if fd is None:
            return self.inner.reader(key)  # larger than the whole cache
        return _FdReader(fd, key, self)

    def open_fd(self, key: str) -> int | None:
        fd = self._open_filled(key)
        if fd is None:
            return self.inner.open_fd(key)
        return fd

    def rewrite_header(self, key: str, data: bytes) -> None:
        self.inner.rewrite_header(key, data)
        with self._lock:
            if key in self._lru:
                try:
                    self.local.rewrite_header(key, data)
                except (KvfsError, OSError):
                    pass  # dropped below instead
                else:
                    return
        self._forget(key)

    def usage(self):
        return self.inner.usage()

    def clean_staging(self, is_live=None) -> int:
        # the cache's staged files are copies of writes a crash cut short: the
        # remote store's own intent records decide what was committed
        for f in os.listdir(self.local.staging_dir):
            try:
                os.unlink(os.path.join(self.local.staging_dir, f))
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    log.warning("ssd cache: cannot remove %s: %s", f, exc)
        return self.inner.clean_staging(is_live)

    def close(self) -> None:
        """Stop the prefetch threads; INNER is closed by whoever opened it."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def cache_in_front(inner: Store, cache_dir: str, capacity: int, node: str) -> CachedStore:
    if not cache_dir:
        raise KvfsError("enable_ssd_caching needs ssd_cache_dir")
    try:
        return CachedStore(inner, cache_dir, capacity, node=node)
    except OSError as exc:
        raise KvfsError(f"ssd_cache_dir {cache_dir}: {exc.strerror}") from None

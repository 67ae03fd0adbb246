"""The tree of sessions and layers: etcd, the metadata cache and the store, async.

Every blocking call (etcd, store) leaves the trio loop through a named
CapacityLimiter. Callers get Entry/SessionInfo records or KvfsError.

The commit of a written file (`commit`), in this order:
  1. checksum the staged bytes (kept up to date while writes arrive in order),
  2. write the self-describing header, make the object durable and visible
     in the store under a fresh key (a new object per version),
  3. publish the entry in etcd in one transaction,
  4. delete the object of the version it replaced, after a grace period.
A crash before 3 leaves only an unreferenced object (settled at the next
start); after 3 the new version is whole. Readers only see objects etcd names.
"""

import collections
import functools
import heapq
import logging
import operator
import os
import time
from collections import Counter
from collections.abc import Callable

import trio

from .errors import (
    Conflict,
    Corrupt,
    Exists,
    KvfsError,
    MetaUnavailable,
    NoSpace,
    NotEmpty,
    NotFound,
)
from .meta import Meta
from .metacache import MetaCache
from .objects import (
    BLOCK,
    HEADER_SIZE,
    block_checksum,
    check_blocks,
    data_offset,
    decode_blocks,
    encode_blocks,
    encode_header,
    encode_xattrs,
    header_key,
    is_legacy,
    sums_of,
)
from .pending import PendingFile
from .records import Entry, SessionInfo, WatchEvent
from .store import Store

log = logging.getLogger(__name__)
_by_name = operator.attrgetter("name")
_NO_NAMES: dict = {}


def _parsed(session: str, name: str, rec) -> Entry:
    """A record kept by Namespace: an Entry, or a watch event's (JSON, revision)."""
    return rec if isinstance(rec, Entry) else Entry.from_json(session, name, rec[0], rec[1])


XATTR_TOTAL_MAX = 2048  # bytes of names + values per file, like one ext4 block
USAGE_MAX_AGE = 1.0  # seconds statfs may show the store medium's usage as it was
DELETE_GRACE = 2.0  # seconds a replaced or removed object stays readable
# Jobs due now wait this long for company: under a stream of commits each
# leaves one (its intent record), and one worker-thread trip per job cost
# more daemon CPU than the job (on 2 cores, ~0.4 ms a trip)
LATER_GATHER = 0.02
# A commit to a store in RAM is sealed in the loop, not a worker thread, when
# it checksums at most this many bytes: a few file operations on tmpfs and
# at most ~0.1 ms of CRC32C, less than the thread trip
INLINE_SEAL_MAX = 1 << 20
LATER_MAX = 100_000  # background jobs waiting; beyond it one is skipped (and logged)
CAS_ATTEMPTS = 20  # compare-and-swap rounds before a hot entry is reported as a conflict
# A commit of this many bytes or more that the kernel wrote (passthrough)
# publishes first and computes its block sums after (see commit)
SUMS_LATER_MIN = 8 << 20
# That pass over the bytes waits until commits pause this long (a burst of
# saves keeps the cores and memory bandwidth it would take), but no version
# waits longer than SUMS_WAIT_MAX for it, however busy the daemon is.
SUMS_QUIET = 0.3
SUMS_WAIT_MAX = 5.0
GROUP_MAX = 60  # commits in one etcd transaction (etcd allows 128 operations)
# transactions in flight at once: commits go straight to etcd (which batches
# concurrent ones itself) until this many are out; later ones wait and share
# the next transaction. One at a time loses that pipelining: 11 % of the save
# throughput on the H200 (docs/BENCHMARKS.md). But where etcd and the daemon
# share two cores, CPU is the limit and fewer, larger transactions spend less
# of it: one at a time there is 14 % more new files per second.
GROUP_PARALLEL = 1 if (os.cpu_count() or 1) <= 2 else 4


class _CommitSlot:
    """One commit waiting for (or in) a group transaction."""

    __slots__ = ("entry", "done", "prev", "error", "wake")

    def __init__(self, entry: Entry):
        self.entry = entry
        self.done = False
        self.prev: Entry | None = None
        self.error: BaseException | None = None
        self.wake = trio.Event()


class Namespace:
    def __init__(
        self,
        meta: Meta,
        store: Store,
        cache: MetaCache,
        *,
        capacity: int | None,
        ttl: float,
        node: str,
        max_file_size: int = 64 << 30,
        sums_at_commit: bool = False,
    ):
        self.meta = meta
        self.store = store
        self.cache = cache
        self.capacity = capacity
        self.max_file_size = max_file_size
        self.ttl = ttl
        self.node = node
        self.meta_limiter = trio.CapacityLimiter(16)
        self.io_limiter = trio.CapacityLimiter(8)
        self.counters = Counter()
        # (session, name) -> (size, last use) of every entry: capacity and LRU eviction
        self.index: dict[tuple, tuple[int, int]] = {}
        # the object behind each name, and how many names each object has: a
        # file with several names (hard links) counts once in `used`
        self._name_object: dict[tuple, str] = {}
        self._object_names: Counter = Counter()
        self.used = 0
        self.last_corrupt: str | None = None
        self.scrub_state: dict = {"running": False, "done": 0, "total": 0, "quarantined": 0}
        # True while `index` mirrors etcd (loaded, and the watch is up)
        self.index_complete = False
        # ... and with it every record itself, so that with the watch up no
        # lookup, getattr or listing asks etcd: each entry by session and name
        # (the Entry, or the raw JSON and revision a watch event brought,
        # parsed when asked for), each session with its mtime. Kept as the
        # index is: the load at mount, this daemon's changes, the watch.
        self._records: dict[str, dict[str, Entry | tuple[bytes, int]]] = {}
        self._sessions: dict[str, SessionInfo] = {}
        self._sessions_changed: dict | None = None  # set while load_index reads etcd
        self._usage = (None, float("-inf"))  # (the store's usage, when asked)
        self._index_changed: dict | None = None  # set while load_index reads etcd
        self._later: list[tuple] = []  # heap of (due, seq, fn, what)
        # group commit: commits that arrive while a transaction is in flight
        # wait and go together in the next one
        self._commit_queue: list[_CommitSlot] = []
        self._rounds = 0  # transactions in flight
        self._later_seq = 0
        self._later_wake = trio.Event()
        # versions published before their block sums: (queued at, entry)
        self._sums_due: collections.deque[tuple[float, Entry]] = collections.deque()
        self._sums_wake = trio.Event()
        self._last_commit = float("-inf")  # time.monotonic() of the last commit
        self.memory_backed = bool(getattr(store, "memory_backed", False))
        # readers that check every block (--verify-reads) need the sums at once;
        # a store far away would be read back over the network for them
        self.sums_later = store.rereads_cheaply and not sums_at_commit

    # -- plumbing -----------------------------------------------------------------

    async def call_meta(self, fn: Callable, *args, **kwargs):
        return await trio.to_thread.run_sync(
            lambda: fn(*args, **kwargs), limiter=self.meta_limiter, abandon_on_cancel=True
        )

    async def call_io(self, fn: Callable, *args):
        return await trio.to_thread.run_sync(fn, *args, limiter=self.io_limiter)

    def delete_object_later(self, key: str) -> None:
        """Drop a replaced or removed version: its header now, its bytes after a grace.

        Without its header an object is never recovered, so a deleted file
        stays deleted even if its bytes outlive a crash.
        """
        hkey = header_key(key)
        if hkey != key:
            self.later(functools.partial(self.store.delete, hkey), 0.0, f"delete {hkey}")
        self.later(functools.partial(self.store.delete, key), DELETE_GRACE, f"delete {key}")

    def _drop_version_objects(self, key: str) -> None:
        """Blocking: remove an unpublished version's header and bytes, now."""
        self.store.delete(header_key(key))
        self.store.delete(key)

    def later(self, fn, delay: float = 0.0, what: str = "") -> None:
        """Run blocking FN in a worker thread after DELAY seconds (earliest due first)."""
        if len(self._later) >= LATER_MAX:
            log.warning("background queue full; %s skipped", what or fn)
            return
        heapq.heappush(self._later, (time.monotonic() + delay, self._later_seq, fn, what))
        self._later_seq += 1
        self._later_wake.set()

    def later_pending(self) -> int:
        return len(self._later) + len(self._sums_due)

    def sums_later_for(self, entry: Entry) -> None:
        """Queue the block sums of ENTRY, published without them (_run_sums)."""
        if len(self._sums_due) >= LATER_MAX:
            log.warning("background queue full; sums of %s left to a scrub", entry.object)
            return
        self._sums_due.append((time.monotonic(), entry))
        self._sums_wake.set()

    async def run_later(self, task_status=trio.TASK_STATUS_IGNORED):
        """Run the jobs `later` queued, each at its time, earliest first, and
        the block sums of versions published without them (_run_sums).

        Replaced and removed objects go after a grace period this way: a
        reader on another node that resolved the name just before can still
        read the version it resolved. Jobs due now (an intent record, a
        deleted file's header) never wait behind a grace period.
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._run_sums)
            task_status.started()
            await self._run_jobs_in_turn()

    async def _run_sums(self) -> None:
        """Block sums, one version at a time, once commits pause (SUMS_QUIET)
        or the oldest has waited SUMS_WAIT_MAX."""
        while True:
            if not self._sums_due:
                await self._sums_wake.wait()
                self._sums_wake = trio.Event()
                continue
            queued, entry = self._sums_due[0]
            due = min(self._last_commit + SUMS_QUIET, queued + SUMS_WAIT_MAX)
            wait = due - time.monotonic()
            if wait > 0:
                await trio.sleep(wait)
                continue
            self._sums_due.popleft()
            try:
                await self.call_io(self._fill_sums, entry)
            except (KvfsError, OSError) as exc:  # a scrub computes them later
                log.warning("background sums of %s failed: %s", entry.object, exc)

    async def _run_jobs_in_turn(self) -> None:
        while True:
            if not self._later:
                await self._later_wake.wait()
                self._later_wake = trio.Event()
                continue
            wait = self._later[0][0] - time.monotonic()
            if wait > 0:
                with trio.move_on_after(wait):
                    await self._later_wake.wait()
                self._later_wake = trio.Event()
                continue
            # every job due now in one worker-thread trip: under a stream of
            # commits, each leaves one (its intent record) and the trips add up
            await trio.sleep(LATER_GATHER)
            now, due = time.monotonic(), []
            while self._later and self._later[0][0] <= now and len(due) < 256:
                due.append(heapq.heappop(self._later)[2:])
            for what, exc in await self.call_io(_run_jobs, due):
                log.warning("background %s failed: %s", what, exc)

    # -- for the filesystem: the store and the counters ---------------------------

    @property
    def store_url(self) -> str:
        return self.store.url

    @property
    def keeps_backing(self) -> bool:
        """May a version's passthrough backing file outlive its last close?"""
        return self.store.fds_of_objects

    def count(self, counter: str, n: int = 1) -> None:
        self.counters[counter] += n

    def note_corrupt(self, entry: Entry, exc: Exception) -> None:
        self.counters["corrupt"] += 1
        self.last_corrupt = f"{entry.session}/{entry.name}"
        log.error(
            "%s/%s (object %s): %s; read refused", entry.session, entry.name, entry.object, exc
        )

    # Opening a file in RAM cannot block, and a thread trip costs more than
    # the open: a cold load of a prompt opens every chunk file (64 cold opens
    # through 8 threads: 26-30 -> 17-20 ms on the 2-core guest).

    async def open_reader(self, key: str):
        if self.memory_backed:
            return self.store.reader(key)
        return await self.call_io(self.store.reader, key)

    async def open_fd(self, key: str) -> int | None:
        """A descriptor of data object KEY for the kernel (passthrough); None if not local."""
        if self.memory_backed:
            return self.store.open_fd(key)
        return await self.call_io(self.store.open_fd, key)

    async def copy_version(self, p: PendingFile, base: Entry) -> None:
        """Fill P with BASE's bytes, every block checked (a copy never launders corruption)."""
        if base.bad:
            raise Corrupt(f"quarantined by scrub: {base.bad}")
        sums = decode_blocks(base.blocks) if base.blocks else None

        def copy():
            try:
                reader = self.store.reader(base.object)
            except NotFound:
                # etcd names it, the store lost it: EIO, as a read of it gives
                raise Corrupt(f"object {base.object} is missing from the store") from None
            try:
                p.copy_from(reader, base.object, base.size, sums)
            finally:
                reader.close()

        try:
            await self.call_io(copy)
        except Corrupt as exc:
            self.note_corrupt(base, exc)
            raise

    async def space(self) -> tuple[int, int, int]:
        """(total bytes, free bytes, files) as statfs should show them."""
        # the medium's own usage, at most a second old: statfs arrives often
        # (a connector asks before each load and store that the mount is
        # still kvfs), and a thread trip to the store each time costs ~1 ms
        usage, at = self._usage
        if time.monotonic() - at > USAGE_MAX_AGE:
            usage = None
            try:
                usage = await self.call_io(self.store.usage)
            except KvfsError:
                pass
            self._usage = (usage, time.monotonic())
        if self.capacity is not None:
            total = self.capacity
            free = max(0, total - self.used)
            if usage is not None:
                free = min(free, usage.free)
        elif usage is not None:
            total, free = usage.total, usage.free
        else:
            total = free = 1 << 40
        return total, free, len(self.index)

    # -- index of sizes ---------------------------------------------------------

    async def load_index(self) -> None:
        # changes this daemon makes while etcd is read may be missing from
        # what it returns: they are noted and laid over it
        self._index_changed = changed = {}
        self._sessions_changed = changed_sessions = {}
        try:
            sessions = await self.call_meta(self.meta.list_sessions)
            entries = await self.call_meta(lambda: list(self.meta.iter_all_entries()))
        finally:
            self._index_changed = self._sessions_changed = None
        self.index, self._name_object, self._object_names = {}, {}, Counter()
        self._records, self._sessions = {}, {}
        self.used = 0
        for info in sessions:
            self._session_set(info.name, info)
        for name, info in changed_sessions.items():
            self._session_set(name, info)
        for e in entries:
            self._index_set(e.session, e.name, e)
        for (session, name), entry in changed.items():
            self._index_set(session, name, entry)
        self.index_complete = True

    def _index_set(
        self,
        session: str,
        name: str,
        entry: Entry | None,
        raw: tuple[bytes, int] | None = None,
        rev: int = 0,
    ) -> None:
        """SESSION/NAME is ENTRY now (None: gone); RAW, when given, is the
        record as etcd holds it (JSON, revision), kept instead of ENTRY; REV
        the revision of a watch event (an older one than the record's is late)."""
        if self._index_changed is not None:
            self._index_changed[(session, name)] = entry
        self._record_set(session, name, None if entry is None else (raw or entry), rev)
        key = (session, name)
        old = self.index.pop(key, None)
        obj = self._name_object.pop(key, None)
        if old is not None:
            self._object_names[obj] -= 1
            if self._object_names[obj] <= 0:
                del self._object_names[obj]
                self.used -= old[0]
        if entry is not None:
            self.index[key] = (entry.size, entry.last_use_ns)
            self._name_object[key] = entry.object
            if self._object_names[entry.object] == 0:
                self.used += entry.size
            self._object_names[entry.object] += 1

    def _record_set(self, session: str, name: str, rec: Entry | tuple | None, rev: int) -> None:
        names = self._records.get(session)
        old = names.get(name) if names is not None else None
        if rev and old is not None and (old.rev if isinstance(old, Entry) else old[1]) > rev:
            return  # a watch event older than what this daemon did since
        if rec is None:
            if names is not None:
                names.pop(name, None)
                if not names:
                    del self._records[session]
            return
        if names is None:
            names = self._records[session] = {}
        names[name] = rec

    def _record(self, session: str, name: str) -> Entry | None:
        """The entry the records hold for SESSION/NAME (only while index_complete)."""
        rec = self._records.get(session, _NO_NAMES).get(name)
        return None if rec is None else _parsed(session, name, rec)

    def _session_set(self, name: str, info: SessionInfo | None) -> None:
        if self._sessions_changed is not None:
            self._sessions_changed[name] = info
        if info is None:
            self._sessions.pop(name, None)
        else:
            self._sessions[name] = info

    def _put_session(self, info: SessionInfo) -> None:
        self.cache.put_session(info)
        self._session_set(info.name, info)

    def _drop_session(self, name: str) -> None:
        self.cache.drop_session(name)
        self._session_set(name, None)

    def apply_event(self, ev: WatchEvent) -> None:
        if ev.kind != "entry":
            self.cache.apply(ev)
            if ev.kind == "session":
                info = None
                if ev.value is not None:
                    info = SessionInfo.from_json(ev.session, ev.value, ev.revision)
                    old = self._sessions.get(ev.session)
                    if old is not None:
                        info.mtime_ns = old.mtime_ns
                self._session_set(ev.session, info)
            elif ev.kind == "mtime" and ev.session in self._sessions:
                self._sessions[ev.session].mtime_ns = int(ev.value)
            return
        entry = self.cache.event_entry(ev)
        self.cache.apply(ev, entry)
        raw = (ev.value, ev.revision) if ev.value is not None else None
        self._index_set(ev.session, ev.name, entry, raw, ev.revision)

    # -- lookups ------------------------------------------------------------------

    async def get_session(self, name: str) -> SessionInfo | None:
        known, info = self.cache.lookup_session(name)
        if known:
            return info
        epoch = self.cache.epoch
        if self.index_complete:
            info = self._sessions.get(name)
            self.cache.fill_session(name, info, epoch)
            return info
        info = await self.call_meta(self.meta.get_session, name)
        self.cache.fill_session(name, info, epoch)
        return info

    async def get_entry_uncached(self, session: str, name: str) -> Entry | None:
        """What etcd says now, past the cache."""
        return await self.call_meta(self.meta.get_entry, session, name)

    async def get_entry(self, session: str, name: str) -> Entry | None:
        known, entry = self.cache.lookup_entry(session, name)
        if known:
            return entry
        epoch = self.cache.epoch
        if self.index_complete:
            # the watch-fed records know every name: no etcd trip
            entry = self._record(session, name)
            if entry is None:
                self.counters["index_negatives"] += 1
                return None
            self.counters["index_hits"] += 1
            self.cache.fill_entry(session, name, entry, epoch)
            return entry
        entry = await self.call_meta(self.meta.get_entry, session, name)
        self.cache.fill_entry(session, name, entry, epoch)
        return entry

    async def list_sessions(self) -> list[SessionInfo]:
        epoch = self.cache.epoch
        if self.index_complete:
            infos = sorted(self._sessions.values(), key=_by_name)
        else:
            infos = await self.call_meta(self.meta.list_sessions)
        for info in infos:
            self.cache.fill_session(info.name, info, epoch)
        return infos

    async def list_entries(self, session: str) -> list[Entry]:
        cached = self.cache.listing(session)
        if cached is not None:
            return sorted(cached, key=_by_name)
        info = await self.get_session(session)
        if info is None:
            raise NotFound(f"no session {session}")
        epoch = self.cache.epoch
        if self.index_complete:
            entries = await self._records_of(session)
        else:
            entries = await self.call_meta(self.meta.list_entries, session)
        self.cache.fill_listing(session, info, entries, epoch)
        return sorted(entries, key=_by_name)

    async def _records_of(self, session: str) -> list[Entry]:
        """Every entry of SESSION from the records: what etcd would list. Many
        records to parse are parsed on a thread (10,000: ~90 ms), from a copy
        taken here, so the loop keeps serving and the watch keeps changing
        the records meanwhile (a listing made while it does is not cached)."""
        items = list(self._records.get(session, _NO_NAMES).items())

        def parse() -> list[Entry]:
            return [_parsed(session, n, r) for n, r in items]

        if sum(1 for _, r in items if not isinstance(r, Entry)) < 64:
            return parse()
        return await trio.to_thread.run_sync(parse)

    # -- sessions -------------------------------------------------------------------

    async def mkdir(self, name: str, mode: int, uid: int, gid: int) -> SessionInfo:
        now = time.time_ns()
        info = SessionInfo(name, ctime_ns=now, mtime_ns=now, mode=mode, uid=uid, gid=gid)
        await self.call_meta(self.meta.create_session, info)
        self._put_session(info)
        return info

    async def rmdir(self, name: str) -> None:
        await self.call_meta(self.meta.delete_session, name)
        self._drop_session(name)

    async def retrying(self, what: str, attempt):
        """Run ATTEMPT (read, change, compare-and-swap) until no Conflict interrupts it."""
        for _ in range(CAS_ATTEMPTS):
            try:
                return await attempt()
            except Conflict:
                continue
        raise Conflict(f"{what} kept changing")

    async def update_session(self, name: str, mutate: Callable[[SessionInfo], None]):
        async def attempt():
            info = await self.call_meta(self.meta.get_session, name)
            if info is None:
                raise NotFound(f"no session {name}")
            mutate(info)
            await self.call_meta(self.meta.update_session, info)
            self._put_session(info)
            return info

        return await self.retrying(f"session {name}", attempt)

    # -- entries ----------------------------------------------------------------------

    async def update_entry(self, session: str, name: str, mutate: Callable[[Entry], None]) -> Entry:
        """Read-modify-write an entry's metadata (times, mode, xattrs)."""

        async def attempt():
            entry = await self.call_meta(self.meta.get_entry, session, name)
            if entry is None:
                raise NotFound(f"{session}/{name}")
            if entry.links:
                # times, mode, owner and xattrs belong to the file: every name
                files = await self._file_names(entry)
                for e in files:
                    mutate(e)
                    e.links = _links_of(files)
                check_xattr_room(entry.xattrs)
                await self._publish([(e, e.rev) for e in files], [])
                return entry
            mutate(entry)
            check_xattr_room(entry.xattrs)
            check_header_room(entry)
            await self.call_meta(self.meta.commit, entry, entry.rev)
            self.cache.put_entry(entry)
            self._index_set(session, name, entry)
            return entry

        entry = await self.retrying(f"{session}/{name}", attempt)
        await self._refresh_header(entry)
        return entry

    def _write_header(self, entry: Entry) -> None:
        """Blocking: the header of ENTRY's object as etcd has it now (a background job)."""
        try:
            current = self.meta.get_entry(entry.session, entry.name)
        except KvfsError:
            current = entry
        if current is None or current.version != entry.version or is_legacy(entry.object):
            return  # changed since: whatever changed it wrote the header
        self.store.put(
            header_key(current.object), encode_header(header_meta(current), current.size)
        )

    async def _refresh_header(self, entry: Entry) -> None:
        """Keep the object's own header in step with etcd, for `kvfs recover`."""
        try:
            if is_legacy(entry.object):
                header = encode_header(header_meta(entry), entry.size, HEADER_SIZE)
                await self.call_io(self.store.rewrite_header, entry.object, header)
            else:
                header = encode_header(header_meta(entry), entry.size)
                await self.call_io(self.store.put, header_key(entry.object), header)
        except (NotImplementedError, ValueError):
            pass  # checked before the etcd change where it matters (update_entry)
        except KvfsError as exc:
            log.warning("header of %s/%s not refreshed: %s", entry.session, entry.name, exc)

    async def unlink(self, session: str, name: str) -> Entry:
        known, cached = self.cache.lookup_entry(session, name)
        if known and cached is not None and cached.links:
            # one of several names: removed with the others rewritten, at once
            old, alive = await self._drop_name(session, name)
        else:
            old = await self.call_meta(self.meta.delete_entry, session, name)
            if old is None:
                raise NotFound(f"{session}/{name}")
            self.cache.drop_entry(session, name)
            self._index_set(session, name, None)
            alive = False
            if old.links:  # linked by another node since this one looked
                _, alive = await self._drop_name(session, name, gone=old)
        if not alive:
            self.delete_object_later(old.object)
        self.counters["deletes"] += 1
        return old

    # -- hard links -------------------------------------------------------------------

    async def _file_names(self, entry: Entry) -> list[Entry]:
        """ENTRY's file under each of its names, as etcd has them now.

        A listed name that holds another version no longer belongs to the file
        (it was replaced, or a change was cut short) and is left out.
        """
        out = []
        for s, n in entry.names:
            if (s, n) == (entry.session, entry.name):
                out.append(entry)
                continue
            e = await self.call_meta(self.meta.get_entry, s, n)
            if e is not None and e.version == entry.version:
                out.append(e)
        return out

    async def _only_index_names(self, entries: list[Entry]) -> bool:
        for e in entries:
            info = await self.get_session(e.session)
            if info is None or not info.index:
                return False
        return True

    async def _publish(self, puts: list, deletes: list) -> None:
        """One transaction over several names, then the caches."""
        await self.call_meta(self.meta.change_entries, puts, deletes)
        for s, n, _ in deletes:
            self.cache.drop_entry(s, n)
            self._index_set(s, n, None)
        for e, _ in puts:
            self.cache.put_entry(e)
            self._index_set(e.session, e.name, e)

    async def link(
        self, session: str, name: str, new_session: str, new_name: str, version: str = ""
    ) -> Entry:
        """Give SESSION/NAME's file another name (link(2)), in one transaction.

        With VERSION, only if the name still holds that version.
        """

        tries = 0

        async def attempt():
            # The first try reads the watch-fed cache (one etcd round trip in
            # all, the transaction, whose compares catch a stale read); a try
            # after a conflict reads etcd itself.
            nonlocal tries
            tries += 1
            get = self.get_entry if tries == 1 else self.get_entry_uncached
            entry = await get(session, name)
            # what the cache says against the link is asked of etcd again
            if entry is None or (version and entry.version != version):
                raise Conflict("") if tries == 1 else NotFound(f"{session}/{name}")
            if await get(new_session, new_name) is not None:
                raise Conflict("") if tries == 1 else Exists(f"{new_session}/{new_name}")
            files = await self._file_names(entry)
            names = [(e.session, e.name) for e in files] + [(new_session, new_name)]
            now = time.time_ns()
            puts = [(e.renamed(e.session, e.name, links=names, ctime_ns=now), e.rev) for e in files]
            new = entry.renamed(new_session, new_name, links=names, ctime_ns=now)
            puts.append((new, 0))
            await self._publish(puts, [])
            return new

        new = await self.retrying(f"{session}/{name}", attempt)
        self.counters["links"] += 1
        # every name in the object's header, for `kvfs recover`: off the
        # link's path (etcd has the link; only a recover after losing etcd
        # within that moment would miss it)
        self.later(functools.partial(self._write_header, new), 0.0, "header of a link")
        return new

    async def link_file(self, entry: Entry, new_session: str, new_name: str) -> Entry:
        """link(2) of the file ENTRY is a version of, through any name it still has."""
        for s, n in entry.names:
            current = await self.get_entry(s, n)
            if current is not None and current.version == entry.version:
                try:
                    return await self.link(s, n, new_session, new_name, version=entry.version)
                except NotFound:
                    continue  # that name went meanwhile: another may hold it
        # every name is gone (an open file, unlinked): as link(2) says
        raise NotFound(f"{entry.session}/{entry.name} has no name left")

    async def _drop_name(self, session: str, name: str, gone: Entry | None = None):
        """Take SESSION/NAME out of its file, with the file's other names in one step.

        GONE is the name's record when a change already removed or replaced
        it (then only the other names are rewritten). A file left with names
        in index directories only goes with them. Returns (the name's record,
        whether the file lives on under another name).
        """

        async def attempt():
            if gone is None:
                me = await self.call_meta(self.meta.get_entry, session, name)
                if me is None:
                    raise NotFound(f"{session}/{name}")
                deletes = [(session, name, me.rev)]
            else:
                me, deletes = gone, []
            rest = [e for e in await self._file_names(me) if (e.session, e.name) != (session, name)]
            if rest and await self._only_index_names(rest):
                deletes += [(e.session, e.name, e.rev) for e in rest]
                rest = []
            now = time.time_ns()
            links = _links_of(rest)
            puts = [(e.renamed(e.session, e.name, links=links, ctime_ns=now), e.rev) for e in rest]
            if puts or deletes:
                await self._publish(puts, deletes)
            return me, [e for e, _ in puts]

        me, rest = await self.retrying(f"{session}/{name}", attempt)
        if rest:
            await self._refresh_header(rest[0])
        return me, bool(rest)

    async def _release_object(self, old: Entry, session: str, name: str) -> None:
        """SESSION/NAME no longer holds OLD's file: free it unless another name does."""
        if old.links:
            _, alive = await self._drop_name(session, name, gone=old)
            if alive:
                return
        self.delete_object_later(old.object)

    async def _release_object_safely(self, old: Entry, session: str, name: str) -> None:
        # after a change that already happened: a failure here must not fail
        # it. The object is kept (a leak the scrub reports, never a loss) and
        # the other names keep listing this one until their next change.
        try:
            await self._release_object(old, session, name)
        except KvfsError as exc:
            log.warning(
                "%s/%s: the other names of its old file not updated: %s", session, name, exc
            )

    async def rename(
        self, session: str, name: str, new_session: str, new_name: str, noreplace: bool = False
    ) -> Entry:
        async def attempt():
            entry = await self.call_meta(self.meta.get_entry, session, name)
            if entry is None:
                raise NotFound(f"{session}/{name}")
            if noreplace and await self.call_meta(self.meta.get_entry, new_session, new_name):
                raise Exists(f"{new_session}/{new_name}")
            if not entry.links:
                replaced = await self.call_meta(
                    self.meta.rename_entry, entry, new_session, new_name
                )
                moved = entry.renamed(new_session, new_name)
                self.cache.drop_entry(session, name)
                self._index_set(session, name, None)
                self.cache.put_entry(moved)
                self._index_set(new_session, new_name, moved)
                return entry, replaced, moved
            # one name of several: the others learn the new one in the same step
            target = await self.call_meta(self.meta.get_entry, new_session, new_name)
            if target is not None and target.version == entry.version:
                return entry, None, entry  # two names of one file: rename(2) does nothing
            files = await self._file_names(entry)
            names = [
                (new_session, new_name)
                if (e.session, e.name) == (session, name)
                else (e.session, e.name)
                for e in files
            ]
            puts = [
                (e.renamed(e.session, e.name, links=names), e.rev)
                for e in files
                if (e.session, e.name) != (session, name)
            ]
            moved = entry.renamed(new_session, new_name, links=names)
            puts.append((moved, target.rev if target else 0))
            await self._publish(puts, [(session, name, entry.rev)])
            return entry, target, moved

        entry, replaced, moved = await self.retrying(f"{session}/{name}", attempt)
        if replaced is not None and replaced.object != entry.object:
            await self._release_object_safely(replaced, new_session, new_name)
        # the header names the file: after a lost etcd, recover must find it here
        await self._refresh_header(moved)
        return moved

    # -- the commit ---------------------------------------------------------------------

    async def new_pending(
        self, session: str, name: str, *, mode: int, uid: int, gid: int, xattrs: dict | None = None
    ) -> PendingFile:
        def make():
            return PendingFile(
                self.store,
                session,
                name,
                mode=mode,
                uid=uid,
                gid=gid,
                xattrs=xattrs,
                capacity=self.capacity,
                max_size=self.max_file_size,
            )

        if getattr(self.store, "memory_backed", False):
            return make()  # creating a file in RAM cannot block
        return await self.call_io(make)

    async def check_commit(self, p: PendingFile) -> None:
        """Fail now, with the errno close(2) should return, if P could not commit."""
        check_xattr_room(p.xattrs)
        if self.capacity is not None and p.size > self.capacity:
            raise NoSpace(f"{p.size} bytes exceed the store capacity {self.capacity}")
        # asks etcd itself, not the cache: a dead etcd must show here
        info = await self.call_meta(self.meta.get_session, p.session)
        if info is None:
            raise NotFound(f"session {p.session} was removed")

    async def commit(self, p: PendingFile, through: Entry | None = None) -> Entry:
        """Publish a pending file as the current version of its name.

        THROUGH is the version the writer opened, when it had other names
        (hard links): a file written through one name changes under all of
        them, as on any filesystem, if the name still holds that version.
        """
        now = time.time_ns()
        check_xattr_room(p.xattrs)
        await self.make_room(Entry(session=p.session, name=p.name, size=p.size))
        defer = SUMS_LATER_MIN if self.sums_later else None

        def seal() -> Entry:
            # one worker-thread trip: checksum, header, durable in the store
            p.check_final_size()
            # large files the kernel wrote are summed after publishing: close(2)
            # does not wait for a pass over every byte (_fill_sums)
            summed = p.checksum(defer, plan)
            digest, sums = summed if summed is not None else ("", None)
            entry = Entry(
                session=p.session,
                name=p.name,
                size=p.size,
                mtime_ns=p.mtime_ns or now,
                atime_ns=p.atime_ns,
                ctime_ns=now,
                object=p.key,
                version=p.version,
                checksum=digest,
                blocks=encode_blocks(sums) if sums is not None else "",
                store=self.store.url,
                mode=p.mode,
                uid=p.uid,
                gid=p.gid,
                xattrs=dict(p.xattrs),
            )
            p.commit_object(encode_header(header_meta(entry), entry.size))
            return entry

        # (another store: the look at the staged file's extents is I/O too)
        plan = p.checksum_plan(defer) if self.memory_backed else None
        if plan is not None and plan.reads <= INLINE_SEAL_MAX:
            await trio.lowlevel.checkpoint()
            entry = seal()
        else:
            entry = await self.call_io(seal)
        moved: list[Entry] = []
        try:
            if through is not None and through.links:
                prev, moved = await self._publish_through_links(entry, through)
            if not moved:
                prev = await self._publish_version(entry)
        except MetaUnavailable:
            # etcd may or may not have applied it: leave the intent record, the
            # next start of this node settles it against etcd
            raise
        except BaseException:
            # the object is durable but unpublished: drop it, the old version stands
            with trio.CancelScope(shield=True):
                await self.call_io(self._drop_version_objects, p.key)
                await self.call_io(p.forget_intent)
            raise
        self.later(p.forget_intent)  # the intent record can go at leisure
        if moved:
            # every name holds the new version: the old file has none left
            entry = next(e for e in moved if (e.session, e.name) == (entry.session, entry.name))
            self.delete_object_later(prev.object)
            self.later(functools.partial(self._write_header, entry), 0.0, "header of links")
        else:
            self.cache.put_entry(entry)
            self._index_set(entry.session, entry.name, entry)
            if prev is not None and prev.object != entry.object:
                await self._release_object_safely(prev, entry.session, entry.name)
        self._last_commit = time.monotonic()
        if not entry.checksum:
            self.sums_later_for(entry)
        self.counters["commits"] += 1
        self.counters["files_written"] += 1
        self.counters["bytes_written"] += entry.size
        return entry

    def _fill_sums(self, entry: Entry) -> None:
        """Blocking (a background job): the block sums of a version published
        without them, recorded under every name that holds it and in its
        header. Until then readers are not checked against them (as for a
        file an older kvfs wrote); a version replaced meanwhile is skipped.
        """
        try:
            reader = self.store.reader(entry.object)
        except NotFound:
            return  # replaced and deleted meanwhile
        try:
            base = data_offset(entry.object)
            # one thread: nobody waits for it, and the writer of the next file
            # should keep the other core
            sums = sums_of(lambda n, off: reader.pread(n, base + off), entry.size, workers=1)
        except OSError as exc:
            log.warning("%s/%s: block sums not computed: %s", entry.session, entry.name, exc)
            return
        finally:
            reader.close()
        digest, blocks = block_checksum(sums), encode_blocks(sums)
        for _ in range(CAS_ATTEMPTS):
            current = self.meta.get_entry(entry.session, entry.name)
            if current is None or current.version != entry.version or current.checksum:
                return
            files = [current]
            for s, n in current.names:
                if (s, n) != (current.session, current.name):
                    e = self.meta.get_entry(s, n)
                    if e is not None and e.version == current.version:
                        files.append(e)
            for e in files:
                e.checksum, e.blocks = digest, blocks
            try:
                self.meta.change_entries([(e, e.rev) for e in files], [])
            except Conflict:
                continue
            self.store.put(
                header_key(current.object), encode_header(header_meta(current), current.size)
            )
            self.counters["sums_after_publish"] += 1
            return
        log.warning("%s/%s: block sums not recorded (kept changing)", entry.session, entry.name)

    async def _publish_through_links(self, entry: Entry, through: Entry):
        """(previous version, the new one under every name), or (None, []) when
        the name no longer holds THROUGH's file: then the commit replaces this
        name only, as a replace by rename(2) would."""

        async def attempt():
            current = await self.call_meta(self.meta.get_entry, entry.session, entry.name)
            if current is None or current.version != through.version or not current.links:
                return None, []
            files = await self._file_names(current)
            links = _links_of(files)
            news = [entry.renamed(e.session, e.name, links=links) for e in files]
            await self._publish(list(zip(news, [e.rev for e in files], strict=True)), [])
            return current, news

        return await self.retrying(f"{entry.session}/{entry.name}", attempt)

    async def _publish_version(self, entry: Entry) -> Entry | None:
        """Publish a sealed version; commits arriving meanwhile share a transaction.

        A commit that finds fewer than GROUP_PARALLEL transactions in flight
        leads a round: it publishes everything queued (itself included) in one
        etcd transaction. Otherwise it waits; when a round ends, the first
        waiting commit leads the next, taking all that queued meanwhile. One
        writer pays one round trip as before; many writers share them.
        """
        slot = _CommitSlot(entry)
        self._commit_queue.append(slot)
        while not slot.done:
            if self._rounds >= GROUP_PARALLEL or slot not in self._commit_queue:
                await slot.wake.wait()
                slot.wake = trio.Event()
                continue
            self._rounds += 1
            try:
                with trio.CancelScope(shield=True):  # others' commits ride on this round
                    await self._commit_round()
            finally:
                self._rounds -= 1
                if self._commit_queue:
                    self._commit_queue[0].wake.set()  # the next round's leader
        if slot.error is not None:
            raise slot.error
        return slot.prev

    async def _commit_round(self) -> None:
        batch, names, rest = [], set(), []
        for slot in self._commit_queue:
            key = (slot.entry.session, slot.entry.name)
            # one name twice in a transaction is refused: the later waits a round
            if len(batch) < GROUP_MAX and key not in names:
                batch.append(slot)
                names.add(key)
            else:
                rest.append(slot)
        self._commit_queue = rest
        if len(batch) > 1:
            self.counters["group_commits"] += 1
            self.counters["group_commit_files"] += len(batch)
        try:
            try:
                await self._commit_group(batch)
            except NotFound:
                # a session of one of them is gone: those fail, the rest go again
                gone = set()
                for session in {slot.entry.session for slot in batch}:
                    if await self.call_meta(self.meta.get_session, session) is None:
                        gone.add(session)
                for slot in batch:
                    if slot.entry.session in gone:
                        slot.error = NotFound(f"no session {slot.entry.session}")
                await self._commit_group([s for s in batch if s.entry.session not in gone])
        except BaseException as exc:
            for slot in batch:
                if slot.error is None:
                    slot.error = exc
        for slot in batch:
            slot.done = True
            slot.wake.set()

    async def _commit_group(self, batch: list[_CommitSlot]) -> None:
        if not batch:
            return
        if len(batch) == 1:
            prevs = [await self.call_meta(self.meta.commit, batch[0].entry)]
        else:
            prevs = await self.call_meta(self.meta.commit_many, [s.entry for s in batch])
        for slot, prev in zip(batch, prevs, strict=True):
            slot.prev = prev

    # -- scrub: stored bytes checked at rest -------------------------------------------

    async def scrub(self, rate: int | None = None) -> int:
        """Check every version's bytes against its block checksums; quarantine the bad.

        RATE (bytes/s) paces a background pass; None runs flat out. Returns
        how many versions were quarantined. Progress is in `scrub_state`.
        """
        entries = await self.call_meta(lambda: list(self.meta.iter_all_entries()))
        state = self.scrub_state = {
            "running": True,
            "done": 0,
            "total": len(entries),
            "quarantined": 0,
            "started": time.time(),
        }
        t0, read = trio.current_time(), 0
        seen = set()
        try:
            for e in entries:
                if e.object in seen:  # another name of a file already checked
                    state["done"] += 1
                    continue
                seen.add(e.object)
                if not e.checksum:
                    # published before its sums, and the daemon stopped before
                    # the job that computes them: nothing to check yet, so seal
                    await self.call_io(self._fill_sums, e)
                elif not e.bad:
                    reason = await self.call_io(self._check_stored, e)
                    if reason is not None and await self._quarantine(e, reason):
                        state["quarantined"] += 1
                if not e.bad:
                    read += e.size
                    if rate:
                        ahead = read / rate - (trio.current_time() - t0)
                        if ahead > 0:
                            await trio.sleep(ahead)
                state["done"] += 1
        finally:
            state["running"] = False
            state["finished"] = time.time()
        self.counters["scrubbed"] += state["done"]
        return state["quarantined"]

    def _check_stored(self, e: Entry) -> str | None:
        """Blocking: why E's stored bytes are bad, or None if they check out."""
        if not e.blocks:
            return None  # written by a kvfs that kept no block sums
        sums = decode_blocks(e.blocks)
        base = data_offset(e.object)
        try:
            reader = self.store.reader(e.object)
        except NotFound:
            return "object missing from the store"
        try:
            for off in range(0, e.size, BLOCK):
                n = min(BLOCK, e.size - off)
                chunk = reader.pread(n, base + off)
                if len(chunk) < n:
                    return f"object truncated at {off + len(chunk)}"
                try:
                    check_blocks(chunk, off, sums)
                except Corrupt as exc:
                    return str(exc)
        except NotFound:
            return "object missing from the store"
        finally:
            reader.close()
        return None

    async def _quarantine(self, e: Entry, reason: str) -> bool:
        current = await self.call_meta(self.meta.get_entry, e.session, e.name)
        if current is None or current.version != e.version:
            return False  # replaced or removed meanwhile: nothing to quarantine
        files = await self._file_names(current)  # every name of the file
        for f in files:
            f.bad = reason
        try:
            await self._publish([(f, f.rev) for f in files], [])
        except Conflict:
            return False  # changed meanwhile: the next pass looks again
        self.counters["quarantined"] += 1
        self.last_corrupt = f"{e.session}/{e.name}"
        log.error(
            "scrub: %s/%s (object %s): %s; quarantined (reads get EIO until it is rewritten)",
            e.session,
            e.name,
            e.object,
            reason,
        )
        return True

    # -- capacity and expiry --------------------------------------------------------------

    async def make_room(self, entry: Entry) -> None:
        """Evict least recently used entries until ENTRY fits in the capacity."""
        if self.capacity is None:
            return
        if entry.size > self.capacity:
            raise NoSpace(f"{entry.size} bytes exceed the store capacity {self.capacity}")
        key = (entry.session, entry.name)
        current = self.index.get(key, (0, 0))[0]
        if self._object_names.get(self._name_object.get(key), 0) > 1:
            current = 0  # replacing one name of a linked file frees nothing
        need = self.used - current + entry.size - self.capacity
        if need <= 0:
            return
        # least recently used files first; a file with several names goes whole
        files: dict[str, list] = {}
        for k, (size, mt) in self.index.items():
            if k != key:
                files.setdefault(self._name_object.get(k), [mt, size, []])[2].append(k)
        victims = sorted(files.values(), key=lambda v: v[0])
        for _mt, size, names in victims:
            if need <= 0:
                break
            gone = 0
            for session, name in names:
                try:
                    await self.unlink(session, name)
                    gone += 1
                except NotFound:
                    self._index_set(session, name, None)
            if not gone:
                continue
            log.info("evicted %s (%d bytes) to make room", ", ".join(map("/".join, names)), size)
            self.counters["evictions"] += 1
            self.counters["deletes"] -= gone
            need -= size
        if need > 0:
            raise NoSpace("store capacity exhausted")

    async def expire(self, now_ns: int | None = None, progress=None) -> int:
        """Delete every entry and empty session idle for longer than the ttl."""
        now_ns = now_ns or time.time_ns()
        limit = int(self.ttl * 1e9)
        entries = await self.call_meta(lambda: list(self.meta.iter_all_entries()))
        expired = [e for e in entries if now_ns - e.last_use_ns > limit]
        by_name = {(e.session, e.name): e for e in entries}
        done_files = set()
        n = 0
        for i, e in enumerate(expired):
            if e.links:
                # a file with several names expires whole: every name at once
                if e.version in done_files:
                    continue
                done_files.add(e.version)
                names = [by_name[k] for k in e.names if k in by_name]
                names = [x for x in names if x.version == e.version]
                try:
                    await self._publish([], [(x.session, x.name, x.rev) for x in names])
                except (Conflict, NotFound):
                    continue  # touched or changed meanwhile: it lives on
                self.delete_object_later(e.object)
                n += len(names)
            else:
                try:
                    old = await self.call_meta(self.meta.delete_entry, e.session, e.name, e.rev)
                except Conflict:
                    continue  # touched or replaced meanwhile: it lives on
                if old is not None:
                    self.cache.drop_entry(e.session, e.name)
                    self._index_set(e.session, e.name, None)
                    self.delete_object_later(old.object)
                    n += 1
            if progress:
                progress(i + 1, len(expired))
        live = {e.session for e in entries if now_ns - e.last_use_ns <= limit}
        for s in await self.call_meta(self.meta.list_sessions):
            if s.name in live or now_ns - max(s.mtime_ns, s.ctime_ns) <= limit:
                continue
            try:
                await self.call_meta(self.meta.delete_session, s.name)
                self._drop_session(s.name)
                n += 1
            except (NotEmpty, NotFound, Conflict):
                pass
        self.counters["expiries"] += n
        if n:
            log.info("expired %d entries idle for more than %ss", n, self.ttl)
        return n


def _run_jobs(jobs) -> list:
    """Blocking: run (fn, what) jobs in turn; the (what, error) of each that failed."""
    failed = []
    for fn, what in jobs:
        try:
            fn()
        except KvfsError as exc:
            failed.append((what or fn, exc))
    return failed


def _links_of(entries: list[Entry]) -> list:
    """The links list of a file with these names (empty: one name only)."""
    return [(e.session, e.name) for e in entries] if len(entries) > 1 else []


def header_meta(entry: Entry) -> dict:
    return {
        "session": entry.session,
        "name": entry.name,
        "size": entry.size,
        "mtime_ns": entry.mtime_ns,
        "atime_ns": entry.atime_ns,
        "ctime_ns": entry.ctime_ns,
        "checksum": entry.checksum,
        "version": entry.version,
        "mode": entry.mode,
        "uid": entry.uid,
        "gid": entry.gid,
        "xattrs": encode_xattrs(entry.xattrs),
        # every name of the file: `kvfs recover` restores them all
        **({"links": [list(x) for x in entry.links]} if entry.links else {}),
    }


def check_header_room(entry: Entry) -> None:
    """A legacy object's header is inline and fixed in size: refuse what would not fit."""
    if is_legacy(entry.object):
        try:
            encode_header(header_meta(entry), entry.size, HEADER_SIZE)
        except ValueError:
            raise NoSpace(
                f"{entry.session}/{entry.name}: its attributes no longer fit the header "
                "of an object written by an older kvfs"
            ) from None


def check_xattr_room(xattrs: dict) -> None:
    total = sum(len(k.encode()) + len(v) for k, v in xattrs.items())
    if total > XATTR_TOTAL_MAX:
        raise NoSpace(f"user xattrs take {total} bytes, at most {XATTR_TOTAL_MAX} fit")


__all__ = ["Namespace"]

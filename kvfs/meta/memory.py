"""An in-memory `Meta`: the same contract as etcd's, for kernel-free tests of the layers above.

Revisions, compare-and-swap and watch events behave as etcd's do; there is
no persistence and no network. Thread-safe, as the daemon calls from threads.
"""

import threading
import time
from collections.abc import Callable, Iterator

from ..errors import Conflict, Exists, NotEmpty, NotFound
from ..records import Entry, SessionInfo, WatchEvent
from .base import Meta


class MemoryMeta(Meta):
    def __init__(self):
        super().__init__()
        self.endpoints = [("memory", 0)]
        self._lock = threading.RLock()
        self._rev = 1
        self._sessions: dict[str, tuple[bytes, int]] = {}  # name -> (json, mod rev)
        self._mtimes: dict[str, tuple[int, int]] = {}  # name -> (mtime_ns, mod rev)
        self._entries: dict[tuple[str, str], tuple[bytes, int]] = {}
        self._locks: dict[str, int] = {}  # name -> lease id
        self._watches: dict[int, Callable] = {}
        self._next_id = 1

    # -- plumbing ---------------------------------------------------------------

    def _bump(self) -> int:
        self._rev += 1
        return self._rev

    def _emit(self, events: list[WatchEvent]) -> None:
        for cb in list(self._watches.values()):
            cb(events)

    def _session(self, name: str) -> SessionInfo | None:
        hit = self._sessions.get(name)
        if hit is None:
            return None
        info = SessionInfo.from_json(name, hit[0], hit[1])
        if name in self._mtimes:
            info.mtime_ns = self._mtimes[name][0]
        return info

    def _entry(self, session: str, name: str) -> Entry | None:
        hit = self._entries.get((session, name))
        return Entry.from_json(session, name, hit[0], hit[1]) if hit else None

    def _touch_session(self, session: str, mtime_ns: int, rev: int, events: list) -> None:
        self._mtimes[session] = (mtime_ns, rev)
        events.append(WatchEvent("mtime", session, None, str(mtime_ns).encode(), rev))

    # -- sessions ---------------------------------------------------------------

    def get_session(self, name: str) -> SessionInfo | None:
        with self._lock:
            return self._session(name)

    def list_sessions(self) -> list[SessionInfo]:
        with self._lock:
            return [self._session(n) for n in sorted(self._sessions)]

    def create_session(self, info: SessionInfo) -> SessionInfo:
        with self._lock:
            if info.name in self._sessions:
                raise Exists(f"session {info.name} exists")
            return self._put_session(info)

    def update_session(self, info: SessionInfo) -> SessionInfo:
        with self._lock:
            hit = self._sessions.get(info.name)
            if hit is None or hit[1] != info.rev:
                raise Conflict(f"session {info.name} changed")
            return self._put_session(info)

    def _put_session(self, info: SessionInfo) -> SessionInfo:
        rev = self._bump()
        raw = info.to_json()
        self._sessions[info.name] = (raw, rev)
        events = [WatchEvent("session", info.name, None, raw, rev)]
        self._touch_session(info.name, info.mtime_ns, rev, events)
        info.rev = rev
        self._emit(events)
        return info

    def delete_session(self, name: str) -> None:
        with self._lock:
            if name not in self._sessions:
                raise NotFound(f"no session {name}")
            if any(s == name for s, _ in self._entries):
                raise NotEmpty(f"session {name} is not empty")
            rev = self._bump()
            del self._sessions[name]
            self._mtimes.pop(name, None)
            self._emit([WatchEvent("session", name, None, None, rev)])

    # -- entries ----------------------------------------------------------------

    def get_entry(self, session: str, name: str) -> Entry | None:
        with self._lock:
            return self._entry(session, name)

    def list_entries(self, session: str) -> list[Entry]:
        with self._lock:
            return [self._entry(s, n) for s, n in sorted(self._entries) if s == session]

    def iter_all_entries(self) -> Iterator[Entry]:
        with self._lock:
            items = [self._entry(s, n) for s, n in sorted(self._entries)]
        yield from items

    def commit(self, entry: Entry, expect_rev: int | None = None) -> Entry | None:
        with self._lock:
            if entry.session not in self._sessions:
                raise NotFound(f"no session {entry.session}")
            key = (entry.session, entry.name)
            prev = self._entries.get(key)
            if expect_rev is not None and (prev[1] if prev else 0) != expect_rev:
                raise Conflict(f"{entry.session}/{entry.name} changed")
            rev = self._bump()
            raw = entry.to_json()
            self._entries[key] = (raw, rev)
            entry.rev = rev
            events = [WatchEvent("entry", entry.session, entry.name, raw, rev)]
            self._touch_session(entry.session, entry.mtime_ns, rev, events)
            self._emit(events)
            return Entry.from_json(entry.session, entry.name, prev[0]) if prev else None

    def commit_many(self, entries: list[Entry]) -> list[Entry | None]:
        with self._lock:  # all or nothing, as etcd's one transaction
            for e in entries:
                if e.session not in self._sessions:
                    raise NotFound(f"no session {e.session}")
            return [MemoryMeta.commit(self, e) for e in entries]

    def delete_entry(self, session: str, name: str, expect_rev: int | None = None) -> Entry | None:
        with self._lock:
            prev = self._entries.get((session, name))
            if expect_rev is not None and (prev[1] if prev else 0) != expect_rev:
                raise Conflict(f"{session}/{name} changed")
            rev = self._bump()
            events = []
            if prev is not None:
                del self._entries[(session, name)]
                events.append(WatchEvent("entry", session, name, None, rev))
            self._touch_session(session, time.time_ns(), rev, events)
            self._emit(events)
            return Entry.from_json(session, name, prev[0]) if prev else None

    def rename_entry(self, entry: Entry, new_session: str, new_name: str) -> Entry | None:
        with self._lock:
            old_key, new_key = (entry.session, entry.name), (new_session, new_name)
            cur = self._entries.get(old_key)
            if cur is None or cur[1] != entry.rev or new_session not in self._sessions:
                raise Conflict(f"{entry.session}/{entry.name} changed")
            prev = self._entries.get(new_key)
            rev = self._bump()
            moved = Entry(**{**entry.__dict__, "session": new_session, "name": new_name})
            raw = moved.to_json()
            del self._entries[old_key]
            self._entries[new_key] = (raw, rev)
            moved.rev = rev
            now = time.time_ns()
            events = [
                WatchEvent("entry", new_session, new_name, raw, rev),
                WatchEvent("entry", entry.session, entry.name, None, rev),
            ]
            for s in dict.fromkeys([entry.session, new_session]):
                self._touch_session(s, now, rev, events)
            self._emit(events)
            if prev is None or old_key == new_key:
                return None
            return Entry.from_json(new_session, new_name, prev[0])

    def change_entries(self, puts, deletes):
        with self._lock:
            for entry, _ in puts:
                if entry.session not in self._sessions:
                    raise NotFound(f"no session {entry.session}")
            for session, name, expect in [(e.session, e.name, r) for e, r in puts] + deletes:
                cur = self._entries.get((session, name))
                if (cur[1] if cur else 0) != expect:
                    raise Conflict(f"{session}/{name} changed")
            rev = self._bump()
            events = []
            for session, name, _ in deletes:
                del self._entries[(session, name)]
                events.append(WatchEvent("entry", session, name, None, rev))
            for entry, _ in puts:
                raw = entry.to_json()
                self._entries[(entry.session, entry.name)] = (raw, rev)
                entry.rev = rev
                events.append(WatchEvent("entry", entry.session, entry.name, raw, rev))
            now = time.time_ns()
            touched = [e.session for e, _ in puts] + [s for s, _, _ in deletes]
            for s in dict.fromkeys(touched):
                self._touch_session(s, now, rev, events)
            self._emit(events)

    # -- the cluster ------------------------------------------------------------

    def revision(self) -> int:
        with self._lock:
            return self._rev

    def health(self) -> list[dict]:
        return [{"endpoint": "memory", "healthy": True, "in_use": True}]

    def try_lock(self, name: str, ttl: int, holder: str):
        with self._lock:
            if name in self._locks:
                return None
            lease = self._next_id
            self._next_id += 1
            self._locks[name] = lease
            return lease

    def unlock(self, lease_id) -> None:
        with self._lock:
            for name, lease in list(self._locks.items()):
                if lease == lease_id:
                    del self._locks[name]

    def watch(self, callback: Callable, start_revision: int | None = None):
        # no history is kept: a watch sees changes from now on
        with self._lock:
            wid = self._next_id
            self._next_id += 1
            self._watches[wid] = callback
            return wid

    def cancel_watch(self, watch_id) -> None:
        with self._lock:
            self._watches.pop(watch_id, None)

    def close(self) -> None:
        with self._lock:
            self._watches.clear()

"""The daemon's three-level metadata cache, kept coherent by etcd watch events.

    L1 sessions  per-session records and, once listed, the session's whole listing
    L2 layers    per-layer entries (and known-absent names), bounded LRU
    L3 recent    a small LRU of the entries used most recently

A lookup tries L3, then L2, then a complete L1 listing, then etcd. Every item
carries the etcd revision it reflects; watch events replace older items, and a
fetch that raced with any watch event is returned but not cached.
"""

from collections import OrderedDict
from dataclasses import dataclass, field

from .records import Entry, SessionInfo, WatchEvent

_ABSENT = object()
_PARSE = object()  # apply(): the event's entry is not parsed yet


@dataclass
class _Listing:
    entries: dict = field(default_factory=dict)  # name -> Entry


@dataclass
class _SessionItem:
    info: SessionInfo | None  # None = known absent
    rev: int
    listing: _Listing | None = None


class LevelStats:
    __slots__ = ("hits", "misses")

    def __init__(self):
        self.hits = 0
        self.misses = 0

    def as_dict(self):
        return {"hits": self.hits, "misses": self.misses}


class MetaCache:
    def __init__(self, max_sessions: int = 1024, max_layers: int = 65536, max_recent: int = 1024):
        self.max_sessions = max_sessions
        self.max_layers = max_layers
        self.max_recent = max_recent
        self._sessions: OrderedDict[str, _SessionItem] = OrderedDict()
        self._layers: OrderedDict[tuple, object] = OrderedDict()  # key -> Entry | (_ABSENT, rev)
        self._recent: OrderedDict[tuple, Entry] = OrderedDict()
        self.epoch = 0  # bumped by every watch event and invalidation
        self._stats = {"session": LevelStats(), "layer": LevelStats(), "recent": LevelStats()}

    # -- reads -------------------------------------------------------------------

    def lookup_entry(self, session: str, name: str):
        """(True, Entry|None) when the cache knows, else (False, None)."""
        key = (session, name)
        e = self._recent.get(key)
        if e is not None:
            self._recent.move_to_end(key)
            self._stats["recent"].hits += 1
            return True, e
        self._stats["recent"].misses += 1
        item = self._layers.get(key)
        if item is not None:
            self._layers.move_to_end(key)
            self._stats["layer"].hits += 1
            if isinstance(item, tuple):
                return True, None
            self._remember_recent(item)
            return True, item
        self._stats["layer"].misses += 1
        s = self._sessions.get(session)
        if s is not None and (s.info is None or s.listing is not None):
            self._stats["session"].hits += 1
            if s.info is None:
                return True, None
            e = s.listing.entries.get(name)
            if e is not None:
                self._remember_recent(e)
            return True, e
        self._stats["session"].misses += 1
        return False, None

    def lookup_session(self, session: str):
        s = self._sessions.get(session)
        if s is None:
            self._stats["session"].misses += 1
            return False, None
        self._sessions.move_to_end(session)
        self._stats["session"].hits += 1
        return True, s.info

    def listing(self, session: str) -> list[Entry] | None:
        s = self._sessions.get(session)
        if s is None or s.listing is None:
            self._stats["session"].misses += 1
            return None
        self._stats["session"].hits += 1
        return list(s.listing.entries.values())

    # -- fills from etcd -----------------------------------------------------------

    def fill_entry(self, session: str, name: str, entry: Entry | None, epoch: int) -> None:
        if epoch != self.epoch:
            return
        self._set_entry(session, name, entry, entry.rev if entry else 0)

    def fill_session(self, name: str, info: SessionInfo | None, epoch: int) -> None:
        if epoch != self.epoch:
            return
        self._set_session(name, info, info.rev if info else 0)

    def fill_listing(self, session: str, info: SessionInfo, entries: list[Entry], epoch: int):
        if epoch != self.epoch:
            return
        item = self._set_session(session, info, info.rev)
        item.listing = _Listing({e.name: e for e in entries})

    # -- updates -------------------------------------------------------------------

    # A change this daemon made bumps the epoch as a watch event does: a fetch
    # sent before it may return the state before it, and must not be cached
    # over it (a lookup racing a commit would otherwise hide the new file).

    def put_entry(self, entry: Entry) -> None:
        """Record an entry this daemon just committed (authoritative at entry.rev)."""
        self.epoch += 1
        self._set_entry(entry.session, entry.name, entry, entry.rev)

    def drop_entry(self, session: str, name: str, rev: int = 0) -> None:
        self.epoch += 1
        self._set_entry(session, name, None, rev)

    def put_session(self, info: SessionInfo) -> None:
        self.epoch += 1
        self._set_session(info.name, info, info.rev)

    def drop_session(self, name: str, rev: int = 0) -> None:
        self.epoch += 1
        self._set_session(name, None, rev)

    def event_entry(self, ev: WatchEvent) -> Entry | None:
        """The entry an "entry" event carries (None: a delete). An event for a
        commit of this daemon's own finds it cached at that revision already
        (put_entry): not parsed again, as that is every commit's event."""
        if ev.value is None:
            return None
        cur = self._layers.get((ev.session, ev.name))
        if isinstance(cur, Entry) and ev.revision and cur.rev == ev.revision:
            return cur
        return Entry.from_json(ev.session, ev.name, ev.value, ev.revision)

    def apply(self, ev: WatchEvent, entry: Entry | None | object = _PARSE) -> None:
        """Apply a watch event; ENTRY, when given, is event_entry(ev)."""
        if ev.kind == "entry":
            if entry is _PARSE:
                entry = self.event_entry(ev)
            self.epoch += 1
            self._set_entry(ev.session, ev.name, entry, ev.revision)
            return
        self.epoch += 1
        if ev.kind == "session":
            info = None
            if ev.value is not None:
                info = SessionInfo.from_json(ev.session, ev.value, ev.revision)
                old = self._sessions.get(ev.session)
                if old is not None and old.info is not None:
                    info.mtime_ns = old.info.mtime_ns
            self._set_session(ev.session, info, ev.revision)
        elif ev.kind == "mtime":
            s = self._sessions.get(ev.session)
            if s is not None and s.info is not None:
                s.info.mtime_ns = int(ev.value)

    def invalidate_all(self) -> None:
        """Forget everything (the watch broke, so events may have been missed)."""
        self.epoch += 1
        self._sessions.clear()
        self._layers.clear()
        self._recent.clear()

    # -- internals -------------------------------------------------------------------

    def _remember_recent(self, e: Entry) -> None:
        key = (e.session, e.name)
        self._recent[key] = e
        self._recent.move_to_end(key)
        while len(self._recent) > self.max_recent:
            self._recent.popitem(last=False)

    def _set_entry(self, session: str, name: str, entry: Entry | None, rev: int) -> None:
        key = (session, name)
        cur = self._layers.get(key)
        cur_rev = (cur[1] if isinstance(cur, tuple) else cur.rev) if cur is not None else -1
        if rev and cur_rev > rev:
            return  # an older event arriving late
        if entry is None:
            self._recent.pop(key, None)
            self._layers[key] = (_ABSENT, rev)
        else:
            self._layers[key] = entry
            if key in self._recent:
                self._recent[key] = entry
        self._layers.move_to_end(key)
        while len(self._layers) > self.max_layers:
            self._layers.popitem(last=False)
        s = self._sessions.get(session)
        if s is not None and s.listing is not None:
            old = s.listing.entries.get(name)
            if old is not None and rev and old.rev > rev:
                return
            if entry is None:
                s.listing.entries.pop(name, None)
            else:
                s.listing.entries[name] = entry

    def _set_session(self, name: str, info: SessionInfo | None, rev: int) -> _SessionItem:
        cur = self._sessions.get(name)
        if cur is not None and rev and cur.rev > rev:
            return cur
        if info is None:
            item = _SessionItem(None, rev)
            # a session's entries go with it
            for key in [k for k in self._layers if k[0] == name]:
                del self._layers[key]
            for key in [k for k in self._recent if k[0] == name]:
                del self._recent[key]
        else:
            listing = cur.listing if (cur is not None and cur.info is not None) else None
            item = _SessionItem(info, rev, listing)
        self._sessions[name] = item
        self._sessions.move_to_end(name)
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
        return item

    def statistics(self) -> dict:
        """Hits and misses per level, and each level's size, for `kvfs status`."""
        out = {level: s.as_dict() for level, s in self._stats.items()}
        out["sizes"] = {
            "session": len(self._sessions),
            "layer": len(self._layers),
            "recent": len(self._recent),
        }
        return out

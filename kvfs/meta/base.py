"""The metadata interface: what the namespace asks of etcd (or of its in-memory fake).

Implementations block; the daemon calls them from worker threads. Every
method either does what it says or raises a `KvfsError`: `NotFound`,
`Exists`, `NotEmpty`, `Conflict` (a compare-and-swap lost a race: re-read
and retry) or `MetaUnavailable` (the store of metadata did not answer in
time; a change may or may not have been applied). `tests/test_t2_meta_contract.py`
holds every implementation to the same behaviour.

Counters are read through `statistics()`, spelled as trio spells it and as every
inspectable kvfs object does (`Operations`, `MetaCache`); the dict behind it is private.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

from ..records import Entry, SessionInfo


class Meta(ABC):
    #: (host, port) of each member, for status lines
    endpoints: list

    def __init__(self):
        self._stats = {"calls": 0, "errors": 0, "failovers": 0}

    def statistics(self) -> dict:
        """Counters shown in `kvfs status`: calls, errors, failovers."""
        return dict(self._stats)

    # -- sessions ------------------------------------------------------------------

    @abstractmethod
    def get_session(self, name: str) -> SessionInfo | None: ...

    @abstractmethod
    def list_sessions(self) -> list[SessionInfo]:
        """Every session, sorted by name, with its mtime."""

    @abstractmethod
    def create_session(self, info: SessionInfo) -> SessionInfo:
        """Create INFO.name (Exists if it is there); sets INFO.rev."""

    @abstractmethod
    def update_session(self, info: SessionInfo) -> SessionInfo:
        """Write INFO back if nobody changed it since it was read (else Conflict)."""

    @abstractmethod
    def delete_session(self, name: str) -> None:
        """Delete an empty session (NotEmpty, NotFound); atomic against a commit into it."""

    # -- entries -------------------------------------------------------------------

    @abstractmethod
    def get_entry(self, session: str, name: str) -> Entry | None: ...

    @abstractmethod
    def list_entries(self, session: str) -> list[Entry]: ...

    @abstractmethod
    def iter_all_entries(self) -> Iterator[Entry]: ...

    @abstractmethod
    def commit(self, entry: Entry, expect_rev: int | None = None) -> Entry | None:
        """Publish ENTRY in one step; returns the entry it replaced.

        NotFound if the session is gone; Conflict if EXPECT_REV is given and
        the current entry's revision differs (0 = absent). Sets ENTRY.rev.
        """

    def commit_many(self, entries: list[Entry]) -> list[Entry | None]:
        """Publish several new versions of distinct names at once (group commit).

        Returns the entry each replaced. If any session is gone nothing is
        published and NotFound is raised: the caller commits one by one to
        learn which. This default is one commit each; etcd does one transaction.
        """
        return [self.commit(e) for e in entries]

    @abstractmethod
    def delete_entry(self, session: str, name: str, expect_rev: int | None = None) -> Entry | None:
        """Remove an entry; returns it (None if absent). Conflict as for commit."""

    @abstractmethod
    def rename_entry(self, entry: Entry, new_session: str, new_name: str) -> Entry | None:
        """Move ENTRY (at ENTRY.rev) to a new name in one step; returns the entry replaced."""

    @abstractmethod
    def change_entries(self, puts: list[tuple[Entry, int]], deletes: list[tuple[str, str, int]]):
        """Put and delete entries in one step: the change of a file with several names.

        Each (ENTRY, REV) of PUTS and (SESSION, NAME, REV) of DELETES applies
        only if that name's revision is still REV (0 = absent); otherwise
        nothing applies and Conflict is raised. NotFound if the session of a
        put is gone. Sets each put entry's rev.
        """

    # -- the cluster ---------------------------------------------------------------

    @abstractmethod
    def revision(self) -> int:
        """The current revision: a watch started at revision()+1 misses nothing after now."""

    @abstractmethod
    def health(self) -> list[dict]:
        """One dict per member (endpoint, healthy, ...); never raises."""

    @abstractmethod
    def try_lock(self, name: str, ttl: int, holder: str):
        """Take lock NAME for TTL seconds; a lease id, or None if another holds it."""

    @abstractmethod
    def unlock(self, lease_id) -> None: ...

    @abstractmethod
    def watch(self, callback: Callable, start_revision: int | None = None):
        """Call CALLBACK(list[WatchEvent] | Exception) for every change; returns a watch id."""

    @abstractmethod
    def cancel_watch(self, watch_id) -> None:
        """Stop a watch; never raises."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; never raises."""

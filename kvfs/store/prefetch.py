"""Prefetch: reading one layer of a session fetches the following ones into the SSD cache.

A KV cache is read layer after layer, so when layer N of a session is opened,
layers N+1.. (by name, as `ls` orders them) are likely next. `opened` only
queues a hint (bounded; a full queue drops it), and one task turns hints into
background fills on the cache's own threads: the event loop never waits for
the remote store, and a failed prefetch is logged, never seen by a reader.
"""

import logging

import trio

from ..errors import KvfsError
from ..records import Entry
from .cached import CachedStore

log = logging.getLogger(__name__)

HINTS = 256  # opens waiting to be looked at; beyond, a hint is dropped


class Prefetcher:
    def __init__(self, ns, store: CachedStore, depth: int):
        self.ns = ns
        self.store = store
        self.depth = depth
        self._send, self._recv = trio.open_memory_channel(HINTS)
        self.dropped = 0

    def opened(self, entry: Entry) -> None:
        """ENTRY was opened for reading (called on the loop; never blocks)."""
        try:
            self._send.send_nowait((entry.session, entry.name))
        except trio.WouldBlock:
            self.dropped += 1

    def statistics(self) -> dict:
        return {"layers_ahead": self.depth, "hints_dropped": self.dropped}

    async def run(self, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        async for session, name in self._recv:
            try:
                # the metadata cache answers this without etcd most of the time
                entries = await self.ns.list_entries(session)
            except KvfsError as exc:
                log.warning("prefetch after %s/%s: cannot list the session: %s", session, name, exc)
                continue
            following = [e.object for e in entries if e.name > name and e.object and not e.bad]
            if following:
                # skips what is cached or queued already; returns at once
                self.store.prefetch(following[: self.depth])

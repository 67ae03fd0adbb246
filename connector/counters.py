"""Counters of hits, misses, loads and saves, kept without vLLM; the facade reports them."""

from __future__ import annotations

import threading

# Every counter the connector keeps; all add up across steps and workers.
FIELDS = (
    "requests",  # requests looked up in the cache (scheduler)
    "hit_tokens",  # prompt tokens found in the cache and scheduled for loading
    "miss_tokens",  # prompt tokens that had to be computed (neither cached nor local)
    "lookups_deferred",  # lookups that answered vLLM "ask again" while files were checked
    "loaded_tokens",  # tokens whose KV was read and checked (worker)
    "loaded_bytes",
    "load_errors",  # chunk files that failed validation or vanished
    "load_seconds",  # time from start_load_kv to the last layer loaded
    "saved_tokens",  # tokens written as new chunk files
    "saved_bytes",
    "save_skipped",  # chunks not written because the file already existed
    "save_dropped",  # chunks not written because the writer was too far behind
    "save_discarded",  # chunks not written because they were computed on a failed load
    "save_errors",
    "save_stall_seconds",  # time the forward pass spent copying KV out for saving
    "save_write_seconds",  # time the background writer spent writing files
    "mount_errors",  # lookups, loads and saves refused: the mount path was not a live kvfs
)


class Counters:
    """Thread-safe counters: threads add, the engine takes intervals."""

    def __init__(self):
        self._lock = threading.Lock()
        self._interval: dict[str, float] = {}
        self._total: dict[str, float] = {}

    def add(self, name: str, value: float) -> None:
        with self._lock:
            self._interval[name] = self._interval.get(name, 0) + value
            self._total[name] = self._total.get(name, 0) + value

    def take(self) -> dict[str, float]:
        """This interval's non-zero counts, and a new interval begun."""
        with self._lock:
            data, self._interval = self._interval, {}
        return {k: v for k, v in data.items() if v}

    def totals(self) -> dict[str, float]:
        """Counts since start."""
        with self._lock:
            return dict(self._total)

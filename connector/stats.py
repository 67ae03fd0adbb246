"""Counters of hits, misses, loads and saves, as vLLM's KVConnectorStats."""

from __future__ import annotations

import threading
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

# Every counter the connector keeps; all add up across steps and workers.
FIELDS = (
    "requests",  # requests looked up in the cache (scheduler)
    "hit_tokens",  # prompt tokens found in the cache and scheduled for loading
    "miss_tokens",  # prompt tokens that had to be computed (neither cached nor local)
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
)


class KVFSStats(KVConnectorStats):
    """Sums of the counters in FIELDS over an interval."""

    def __init__(self, data: dict[str, Any] | None = None):
        super().__init__(data=dict(data or {}))

    def reset(self) -> None:
        self.data = {}

    def add(self, name: str, value: float) -> None:
        self.data[name] = self.data.get(name, 0) + value

    def aggregate(self, other: KVConnectorStats) -> KVFSStats:
        for k, v in (other.data or {}).items():
            if isinstance(v, int | float):
                self.add(k, v)
        return self

    def reduce(self) -> dict[str, int | float]:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in self.data.items()}

    def is_empty(self) -> bool:
        return not any(self.data.values())


class Counters:
    """Thread-safe counters behind KVFSStats: threads add, vLLM takes intervals."""

    def __init__(self):
        self._lock = threading.Lock()
        self._interval: dict[str, float] = {}
        self._total: dict[str, float] = {}

    def add(self, name: str, value: float) -> None:
        with self._lock:
            self._interval[name] = self._interval.get(name, 0) + value
            self._total[name] = self._total.get(name, 0) + value

    def take(self) -> KVFSStats | None:
        """This interval's counts as KVFSStats (None if nothing happened)."""
        with self._lock:
            data, self._interval = self._interval, {}
        stats = KVFSStats(data)
        return None if stats.is_empty() else stats

    def totals(self) -> dict[str, float]:
        """Counts since start."""
        with self._lock:
            return dict(self._total)

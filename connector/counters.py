"""Counters of hits, misses, loads and saves, kept without vLLM; the facade reports them."""

from __future__ import annotations

import threading

# Every counter the connector keeps, with what it counts; all add up across
# steps and workers. vLLM logs them per interval and exports them to Prometheus
# as vllm:kvfs_<name>_total (vllm_connector.KVFSPromMetrics).
FIELDS = {
    "requests": "Requests looked up in the cache (scheduler).",
    "hits": "Requests that found at least one chunk of their prompt in the cache.",
    "hit_tokens": "Prompt tokens found in the cache and scheduled for loading.",
    "revoked_tokens": "Hit tokens recomputed after all, because their chunk failed to load.",
    "miss_tokens": "Prompt tokens that had to be computed (neither cached nor local).",
    "lookups_deferred": "Lookups that answered vLLM 'ask again' while files were checked.",
    "loads": "Steps that loaded chunks (worker).",
    "loaded_files": "Chunk files read and checked.",
    "loaded_tokens": "Tokens whose KV was read and checked.",
    "loaded_bytes": "Bytes of the chunk files loaded.",
    "reused_opens": "Chunk files loaded through a descriptor kept from an earlier load "
    "(no open through the mount, no header read).",
    "load_errors": "Chunk files that failed validation or vanished (failed loads).",
    "load_seconds": "Time from start_load_kv to the last layer loaded.",
    "saved_files": "Chunk files written.",
    "saved_tokens": "Tokens written as new chunk files.",
    "saved_bytes": "Bytes of the chunk files written.",
    "save_skipped": "Chunks not written because the file already existed.",
    "save_dropped": "Chunks not written because the writer was too far behind.",
    "save_discarded": "Chunks not written because they were computed on a failed load.",
    "save_errors": "Chunks not written because of an error.",
    "linked_files": "Chunk files a session took from the index (stored by another "
    "session or request): linked, one copy of the bytes, not written again.",
    "link_errors": "Links into a session or the index that failed (the chunk is then not shared).",
    "save_stall_seconds": "Time the forward pass spent copying KV out for saving.",
    "save_write_seconds": "Time the background writer spent writing files.",
    "mount_errors": "Lookups, loads and saves refused: the mount path was not a live kvfs.",
}


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

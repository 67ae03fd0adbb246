"""Prometheus metrics for `kvfs mount --metrics HOST:PORT`, and per-session use.

The exporter keeps no counters of its own: at each scrape a collector asks
the trio loop for the daemon's `status()` (the same numbers `kvfs status
--json` shows), then turns it into `kvfs_*` metric families in the HTTP
server's thread. Only the FUSE operation latencies are kept here, as real
histograms, because `kvfs status` keeps means and peaks, from which no
quantile can be had.

The HTTP server (prometheus_client's, a thread per request) runs beside the
loop: a slow or stuck scraper never blocks a FUSE request. A scrape the
daemon cannot answer (its loop stuck for SCRAPE_TIMEOUT, or gone) still
succeeds, with `kvfs_up 0`, so a hung mount shows on a dashboard.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable

import trio
from prometheus_client import (
    CollectorRegistry,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from .errors import KvfsError

log = logging.getLogger(__name__)

# Seconds a scrape waits for the daemon's loop before it reports kvfs_up 0;
# Prometheus's own scrape timeout is 10 s by default.
SCRAPE_TIMEOUT = 5.0

# Sessions reported by name (in `kvfs status` and as labelled series): the
# largest ones, so a scrape stays small however many sessions there are.
TOP_SESSIONS = 10

# FUSE requests take from tens of microseconds (a cached lookup) to seconds
# (a commit that waits for etcd, or an eviction).
LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

# status()["counters"] key -> (metric name without _total, help); the two
# opens counters become one metric with a `path` label, below
COUNTERS = {
    "files_read": ("kvfs_files_read", "Opens of committed files for reading."),
    "bytes_read": (
        "kvfs_read_bytes",
        "Bytes read through the daemon (passthrough reads and page-cache hits are not seen).",
    ),
    "files_written": ("kvfs_files_written", "Files committed by this daemon."),
    "bytes_written": ("kvfs_written_bytes", "Bytes of the files this daemon committed."),
    "commits": ("kvfs_commits", "Versions this daemon published in etcd."),
    "failed_commits": ("kvfs_failed_commits", "Commits that failed (the old version stands)."),
    "deletes": ("kvfs_deletes", "Files removed by rm."),
    "expiries": ("kvfs_expiries", "Files and empty sessions removed by expiry."),
    "evictions": ("kvfs_evictions", "Files evicted to stay within the capacity."),
    "corrupt": ("kvfs_corrupt_reads", "Reads that failed a checksum or found a short object."),
    "quarantined": ("kvfs_quarantined", "Versions quarantined by a scrub."),
    "scrubbed": ("kvfs_scrubbed_files", "Files whose stored bytes a scrub checked."),
    "inline_reads": ("kvfs_inline_reads", "Daemon reads served on the event loop."),
    "sums_after_publish": (
        "kvfs_sums_after_publish",
        "Large commits whose block checksums were computed after publishing.",
    ),
    "index_negatives": (
        "kvfs_index_negatives",
        "Lookups of absent names answered from the index without etcd.",
    ),
    "index_hits": (
        "kvfs_index_hits",
        "Lookups the cache missed answered from the watch-fed records without etcd.",
    ),
}


def parse_address(value: str, where: str = "metrics") -> tuple[str, int]:
    """HOST:PORT, [V6]:PORT or a bare PORT (loopback) -> (host, port)."""
    text = str(value).strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        host = "127.0.0.1"  # a bare port: never exposed beyond this host by accident
    host = host.removeprefix("[").removesuffix("]")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not host or not 0 < number < 65536:
        raise KvfsError(f"{where}: bad value {value!r}: expected HOST:PORT or PORT")
    return host, number


def session_usage(index: dict, top: int = TOP_SESSIONS) -> dict:
    """Files, bytes and last use of the TOP largest sessions, from the size index.

    INDEX maps (session, name) -> (size, last use in ns), as
    `Namespace.index` does.
    """
    per: dict[str, list] = {}
    for (session, _name), (size, last_ns) in index.items():
        s = per.get(session)
        if s is None:
            per[session] = [1, size, last_ns]
        else:
            s[0] += 1
            s[1] += size
            if last_ns > s[2]:
                s[2] = last_ns
    largest = sorted(per.items(), key=lambda kv: (-kv[1][1], kv[0]))[:top]
    return {
        "count": len(per),
        "largest": [
            {"session": name, "files": n, "bytes": size, "last_use": round(last / 1e9, 3)}
            for name, (n, size, last) in largest
        ],
    }


class OpLatency:
    """A histogram of FUSE request latency per operation; `observe` runs on the loop."""

    def __init__(self, registry: CollectorRegistry):
        self.histogram = Histogram(
            "kvfs_fuse_operation_seconds",
            "Time the daemon took to answer a FUSE request, by operation.",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._children: dict[str, object] = {}

    def observe(self, op: str, seconds: float) -> None:
        # one labels() lookup per operation name, not per request
        child = self._children.get(op)
        if child is None:
            child = self._children[op] = self.histogram.labels(op)
        child.observe(seconds)


class StatusCollector:
    """Turns a status snapshot into metric families at scrape time."""

    def __init__(self, snapshot: Callable[[], dict | None]):
        # SNAPSHOT is called from the scrape thread; it returns the status, or
        # None while the mount is not up yet
        self.snapshot = snapshot

    def describe(self):
        return []  # the families depend on the daemon's state; nothing to check up front

    def collect(self):
        up = GaugeMetricFamily("kvfs_up", "1 when the daemon answered this scrape.")
        try:
            snap = self.snapshot()
        except Exception as exc:  # the loop is gone or stuck in shutdown: say so, don't 500
            log.warning("metrics: no status for this scrape: %r", exc)
            snap = None
        if snap is None:
            up.add_metric([], 0)
            yield up
            return
        try:
            out = list(families(snap))
        except Exception:  # a bug: say where, and still answer the scrape
            log.exception("metrics: could not turn the status into metrics")
            out = []
        up.add_metric([], 1 if out else 0)
        yield up
        yield from out


def families(st: dict):
    """Every number of a `kvfs status --json` document, as metric families."""
    info = InfoMetricFamily("kvfs", "The daemon: version, node, mountpoint, store, data path.")
    info.add_metric(
        [],
        {
            "version": str(st["version"]),
            "node": st["node"],
            "mountpoint": st["mountpoint"],
            "store": st["store"]["url"],
            "passthrough": st["passthrough"],
        },
    )
    yield info
    yield GaugeMetricFamily(
        "kvfs_start_time_seconds",
        "Unix time the daemon started.",
        value=round(time.time() - st["uptime_s"], 1),
    )
    yield GaugeMetricFamily(
        "kvfs_passthrough_enabled",
        "1 when the kernel serves open files itself (FUSE passthrough).",
        value=1 if st["passthrough"] == "on" else 0,
    )

    store = st["store"]
    url = [store["url"]]
    for key, name, doc in (
        ("capacity", "kvfs_store_capacity_bytes", "Bytes of file data the store may hold."),
        ("used", "kvfs_store_used_bytes", "Bytes of file data in the whole tree."),
        ("entries", "kvfs_store_files", "Files in the whole tree."),
        ("medium_total", "kvfs_store_medium_size_bytes", "Size of the store's medium."),
        ("medium_free", "kvfs_store_medium_free_bytes", "Free bytes on the store's medium."),
        ("max_file_size", "kvfs_store_max_file_size_bytes", "The largest file allowed."),
    ):
        if store.get(key) is not None:  # unset capacity, unknown medium: no sample
            m = GaugeMetricFamily(name, doc, labels=["store"])
            m.add_metric(url, store[key])
            yield m

    counters = st["counters"]
    for key, (name, doc) in COUNTERS.items():
        if key in counters:
            yield CounterMetricFamily(name, doc, value=counters[key])
    opens = CounterMetricFamily(
        "kvfs_opens",
        "Opens of committed files by the path their bytes take: passthrough (the kernel) or"
        " daemon.",
        labels=["path"],
    )
    opens.add_metric(["passthrough"], counters.get("opens_passthrough", 0))
    opens.add_metric(["daemon"], counters.get("opens_daemon", 0))
    yield opens

    errors = CounterMetricFamily(
        "kvfs_fuse_errors", "FUSE requests answered with an error.", labels=["operation", "errno"]
    )
    peak = GaugeMetricFamily(
        "kvfs_fuse_operation_max_seconds",
        "The slowest request of each operation since the daemon started.",
        labels=["operation"],
    )
    for op, s in st["operations"].items():
        peak.add_metric([op], s["max_ms"] / 1000)
        for name, n in s["errnos"].items():
            errors.add_metric([op, name], n)
    yield errors
    yield peak

    cache = st["cache"]
    hits = CounterMetricFamily(
        "kvfs_metacache_hits", "Metadata-cache hits by level.", labels=["level"]
    )
    misses = CounterMetricFamily(
        "kvfs_metacache_misses", "Metadata-cache misses by level.", labels=["level"]
    )
    sizes = GaugeMetricFamily(
        "kvfs_metacache_entries", "Entries the metadata cache holds, by level.", labels=["level"]
    )
    for level, v in cache.items():
        if level == "sizes":
            for lv, n in v.items():
                sizes.add_metric([lv], n)
        else:
            hits.add_metric([level], v["hits"])
            misses.add_metric([level], v["misses"])
    yield hits
    yield misses
    yield sizes

    etcd = st["etcd"]
    healthy = GaugeMetricFamily(
        "kvfs_etcd_endpoint_healthy",
        "1 when the endpoint answered the last probe.",
        labels=["endpoint"],
    )
    in_use = GaugeMetricFamily(
        "kvfs_etcd_endpoint_in_use",
        "1 for the endpoint the daemon talks to.",
        labels=["endpoint"],
    )
    for ep in etcd["endpoints"]:
        healthy.add_metric([ep["endpoint"]], 1 if ep.get("healthy") else 0)
        in_use.add_metric([ep["endpoint"]], 1 if ep.get("in_use") else 0)
    yield healthy
    yield in_use
    yield GaugeMetricFamily(
        "kvfs_etcd_watch_up",
        "1 while the etcd watch is up (otherwise other nodes' changes arrive late).",
        value=1 if etcd["watch"] == "up" else 0,
    )
    for key, name, doc in (
        ("calls", "kvfs_etcd_calls", "etcd request attempts."),
        ("errors", "kvfs_etcd_errors", "Failed etcd request attempts."),
        ("failovers", "kvfs_etcd_failovers", "Switches to another etcd endpoint."),
    ):
        yield CounterMetricFamily(name, doc, value=etcd.get(key, 0))

    yield from ssd_cache_families(st.get("ssd_cache"))

    scrub = st["scrub"]
    yield GaugeMetricFamily(
        "kvfs_scrub_running", "1 while a scrub pass runs.", value=1 if scrub["running"] else 0
    )
    yield GaugeMetricFamily(
        "kvfs_scrub_checked_files", "Files checked by the current (or last) pass.", scrub["done"]
    )
    yield GaugeMetricFamily(
        "kvfs_scrub_pass_files", "Files the current (or last) pass checks.", scrub["total"]
    )
    if scrub.get("finished"):
        yield GaugeMetricFamily(
            "kvfs_scrub_last_finished_timestamp_seconds",
            "Unix time the last scrub pass ended.",
            scrub["finished"],
        )

    expiry = st["expiry"]
    yield GaugeMetricFamily(
        "kvfs_ttl_seconds", "Seconds a file lives after its last use.", expiry["ttl_s"]
    )
    if expiry.get("last_gc"):
        yield GaugeMetricFamily(
            "kvfs_last_gc_timestamp_seconds",
            "Unix time of this daemon's last expiry pass.",
            expiry["last_gc"],
        )

    gc = st.get("gc") or {}
    yield GaugeMetricFamily(
        "kvfs_gc_running", "1 while an expiry pass runs.", value=1 if gc.get("running") else 0
    )
    if "removed_files" in gc:
        yield GaugeMetricFamily(
            "kvfs_gc_last_removed_files",
            "Files the last expiry pass removed.",
            gc["removed_files"],
        )
        yield GaugeMetricFamily(
            "kvfs_gc_last_removed_bytes",
            "Bytes of the files the last expiry pass removed.",
            gc["removed_bytes"],
        )

    sessions = st.get("sessions")
    if sessions is None:
        return  # not counted yet (the first pass runs as the mount comes up)
    yield GaugeMetricFamily("kvfs_sessions", "Sessions holding files.", sessions["count"])
    files = GaugeMetricFamily(
        "kvfs_session_files", f"Files of the {TOP_SESSIONS} largest sessions.", labels=["session"]
    )
    size = GaugeMetricFamily(
        "kvfs_session_bytes", f"Bytes of the {TOP_SESSIONS} largest sessions.", labels=["session"]
    )
    last = GaugeMetricFamily(
        "kvfs_session_last_use_timestamp_seconds",
        f"Unix time of the last use of the {TOP_SESSIONS} largest sessions.",
        labels=["session"],
    )
    for s in sessions["largest"]:
        files.add_metric([s["session"]], s["files"])
        size.add_metric([s["session"]], s["bytes"])
        last.add_metric([s["session"]], s["last_use"])
    yield files
    yield size
    yield last


# Counts of the SSD cache's status (kvfs/store/cached.py); its other numbers
# (used, capacity, objects, queued prefetches) are levels, exported as gauges.
SSD_CACHE_COUNTERS = {
    "hits": "Reads of objects the SSD cache held.",
    "misses": "Reads of objects it did not hold.",
    "fills": "Objects copied into it from the store.",
    "evictions": "Objects evicted to stay within its size.",
    "prefetched": "Objects fetched ahead of their first read.",
    "prefetch_errors": "Prefetches that failed.",
    "uncacheable": "Objects too large for it, read from the store directly.",
}


def ssd_cache_families(ssd: dict | None):
    """The SSD cache in front of a remote store, labelled by its directory."""
    if not ssd:
        return  # no SSD cache on this mount
    label = [str(ssd.get("dir"))]
    for key, v in ssd.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue  # the directory, the last error, the prefetcher's own dict
        if key in SSD_CACHE_COUNTERS:
            m = CounterMetricFamily(
                f"kvfs_ssd_cache_{key}", SSD_CACHE_COUNTERS[key], labels=["cache_dir"]
            )
        else:
            unit = "_bytes" if key in ("used", "capacity") else ""
            m = GaugeMetricFamily(
                f"kvfs_ssd_cache_{key}{unit}", f"The SSD cache's {key}.", labels=["cache_dir"]
            )
        m.add_metric(label, v)
        yield m
    prefetch = ssd.get("prefetch") or {}
    if "hints_dropped" in prefetch:
        yield CounterMetricFamily(
            "kvfs_prefetch_hints_dropped",
            "Opens whose following layers were not prefetched: the queue was full.",
            value=prefetch["hints_dropped"],
        )
    if "layers_ahead" in prefetch:
        yield GaugeMetricFamily(
            "kvfs_prefetch_layers_ahead",
            "Layers fetched ahead of an open.",
            value=prefetch["layers_ahead"],
        )


class Exporter:
    """The `/metrics` endpoint of one daemon: its own registry, server and histogram."""

    def __init__(self, address: str):
        self.host, self.port = parse_address(address)
        # no `_created` series beside every histogram: kvfs_start_time_seconds
        # says when the counters began (a process-wide switch; this process is the daemon)
        disable_created_metrics()
        self.registry = CollectorRegistry()
        self.latency = OpLatency(self.registry)
        ProcessCollector(registry=self.registry)  # CPU, memory, open descriptors
        self.server = None

    def start(self, snapshot: Callable[[], dict | None]) -> None:
        """Listen now (so a bad address fails the mount), serving SNAPSHOT's numbers."""
        self.registry.register(StatusCollector(snapshot))
        try:
            self.server, _thread = start_http_server(self.port, self.host, self.registry)
        except (OSError, socket.gaierror) as exc:
            raise KvfsError(
                f"metrics: cannot serve on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from None
        log.info("metrics at http://%s/metrics", self.url_host())

    def url_host(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.server.server_port}"

    def stop(self) -> None:
        """Blocking: stop accepting scrapes (a scrape in progress finishes by itself)."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def loop_snapshot(token, fn: Callable[[], dict | None], timeout: float = SCRAPE_TIMEOUT):
    """A snapshot function for the scrape thread: FN runs on the trio loop, between
    two requests, so it sees no half-done change and needs no locks.

    Not trio.from_thread.run_sync, which would wait forever on a stuck loop:
    the scrape gives up after TIMEOUT seconds (the callback, when the loop
    runs it at last, finds nobody waiting, which is harmless).
    """

    def snapshot():
        done = threading.Event()
        box: dict = {}

        def call():  # on the loop: it must not raise, or trio itself would fail
            try:
                box["value"] = fn()
            except Exception as exc:
                box["error"] = exc
            done.set()

        token.run_sync_soon(call)  # trio.RunFinishedError once the loop is gone
        if not done.wait(timeout):
            raise TimeoutError(f"the daemon's event loop did not answer in {timeout:g} s")
        if "error" in box:
            raise box["error"]
        return box["value"]

    return snapshot


@contextlib.asynccontextmanager
async def serving(address: str, fn: Callable[[], dict | None], timeout: float = SCRAPE_TIMEOUT):
    """Serve `/metrics` at ADDRESS while the block runs; FN gives the numbers (on the loop)."""
    exporter = Exporter(address)
    await trio.to_thread.run_sync(
        exporter.start, loop_snapshot(trio.lowlevel.current_trio_token(), fn, timeout)
    )
    try:
        yield exporter
    finally:
        with trio.CancelScope(shield=True):
            # shutdown() waits for the server's poll loop (up to half a second): off the loop
            await trio.to_thread.run_sync(exporter.stop)

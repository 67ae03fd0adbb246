"""The mount: wires store, etcd, cache and FUSE together and runs the services.

One `AsyncExitStack` (in `Daemon.run`) owns the whole life of a mount: each
resource puts its clean-up on the stack as soon as it exists, and the
nursery of background services (delayed jobs, kernel cache invalidator,
opener toucher, etcd watch, expiry collector, health probe, signals) is the
last thing on it. Leaving it undoes everything in reverse order: services
cancelled, FUSE closed and unmounted, etcd client closed, private etcd
stopped, store closed.
"""

import contextlib
import errno
import functools
import hashlib
import json
import logging
import math
import os
import signal
import socket
import subprocess
import time

import pyfuse3
import trio

from . import __version__, metrics
from .config import Config, ssd_cache_dir
from .errors import Conflict, KvfsError, MetaUnavailable
from .etcd_server import PrivateEtcd
from .fs import ROOT, Kernel, Operations
from .meta import EtcdMeta, WatchCompacted
from .metacache import MetaCache
from .namespace import Namespace
from .objects import HEADER_SUFFIX, data_key
from .store import open_store
from .store.cached import CachedStore, cache_in_front
from .store.prefetch import Prefetcher

log = logging.getLogger(__name__)


def node_id(mountpoint: str) -> str:
    h = hashlib.sha1(f"{socket.gethostname()}:{os.path.abspath(mountpoint)}".encode())
    return f"{socket.gethostname()}-{h.hexdigest()[:10]}"


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(path)
        s.sendall(state.encode())


class Daemon:
    def __init__(self, cfg: Config, mountpoint: str):
        self.cfg = cfg
        self.mountpoint = os.path.abspath(mountpoint)
        self.node = node_id(mountpoint)
        self.etcd: PrivateEtcd | None = None
        self.meta: EtcdMeta | None = None
        self.store = None
        self.ns: Namespace | None = None
        self.ops: Operations | None = None
        self.health: list = []
        self.started = time.time()
        self.last_gc: float | None = None
        # the current or last expiry pass: progress, and what it removed
        self.gc_state: dict = {"running": False, "done": 0, "total": 0}
        self.watch_state = "starting"
        self.usage = None
        # per-session use (metrics.session_usage), refreshed by run_health
        self.sessions: dict | None = None
        self.prefetcher: Prefetcher | None = None

    # -- setup -----------------------------------------------------------------------

    async def open_backends(self, stack: contextlib.AsyncExitStack) -> None:
        """Open the store, a private etcd when no endpoints are given, and the
        etcd client; each one's clean-up goes on STACK as soon as it exists."""
        cfg = self.cfg
        # every step blocks (disk, a child process, the network): off the loop
        run = trio.to_thread.run_sync
        self.store = await run(
            functools.partial(
                open_store,
                cfg.store_spec(),
                node=self.node,
                durable=cfg.durable,
                state_dir=cfg.state_dir,  # where a remote store stages writes
            )
        )
        stack.callback(self.store.close)
        if cfg.enable_ssd_caching:
            self.store = await run(
                cache_in_front, self.store, ssd_cache_dir(cfg), cfg.ssd_cache_size, self.node
            )
            stack.callback(self.store.close)  # its prefetch threads, before the store goes
        endpoints = list(cfg.etcd)
        if not endpoints:
            root = getattr(self.store, "root", None) or os.path.join(cfg.state_dir, "store")
            self.etcd = PrivateEtcd(os.path.join(root, "etcd"))
            stack.callback(self.etcd.stop)  # a no-op if it never started
            endpoints = [await run(self.etcd.start)]
        try:
            self.meta = await run(EtcdMeta.from_config, cfg, endpoints)
            stack.callback(self.meta.close)
            self.start_revision = await run(self.meta.revision) + 1
        except MetaUnavailable as exc:
            raise MetaUnavailable(
                f"cannot reach etcd at {','.join(endpoints)} ({exc}); check that it runs, the "
                "endpoints, and for TLS --etcd-ca-cert/--etcd-cert/--etcd-key"
            ) from None
        self._live_objects = None
        n = await run(self.store.clean_staging, self._is_live)
        self._live_objects = None
        if n:
            log.info("settled %d writes an earlier run left unfinished", n)

    def _is_live(self, key: str) -> bool:
        """Does etcd reference object KEY (or, for a header, its data object)?

        Asked by object, never by the name in a header: a rename moves the
        name, and a committed object must never be taken for a leftover.
        """
        if self._live_objects is None:
            self._live_objects = {e.object for e in self.meta.iter_all_entries()}
        if key.endswith(HEADER_SUFFIX):
            key = data_key(key)
        return key in self._live_objects

    # -- status -------------------------------------------------------------------------

    def status(self) -> dict:
        ns = self.ns
        usage = self.usage  # refreshed by run_health: statvfs may block
        return {
            "version": __version__,
            "pid": os.getpid(),
            "mountpoint": self.mountpoint,
            "node": self.node,
            "uptime_s": round(time.time() - self.started, 1),
            "store": {
                "url": self.store.url,
                "capacity": ns.capacity,
                "max_file_size": ns.max_file_size,
                "used": ns.used,
                "entries": len(ns.index),
                "medium_total": usage.total if usage else None,
                "medium_free": usage.free if usage else None,
                # a remote store's (or the SSD cache's) last failure, timestamped
                "last_error": _last_store_error(self.store),
            },
            "counters": {
                k: ns.counters.get(k, 0)
                for k in (
                    "files_read",
                    "bytes_read",
                    "files_written",
                    "bytes_written",
                    "commits",
                    # commits that shared an etcd transaction, and those transactions
                    "group_commit_files",
                    "group_commits",
                    "links",
                    "deletes",
                    "expiries",
                    "evictions",
                    "corrupt",
                    "failed_commits",
                    "inline_reads",
                    "index_negatives",
                    "index_hits",
                    "opens_passthrough",
                    "opens_daemon",
                    "scrubbed",
                    "quarantined",
                    # large commits whose block sums were computed after publishing
                    "sums_after_publish",
                )
            },
            # how open files are served: the kernel itself, or the daemon
            "passthrough": self.ops.passthrough.state(),
            "verify_reads": self.cfg.verify_reads,
            "last_corrupt": ns.last_corrupt,
            "operations": self.ops.statistics(),
            "cache": ns.cache.statistics(),
            "etcd": {
                "endpoints": self.health,
                "private": self.etcd is not None,
                "prefix": self.cfg.etcd_prefix,
                "watch": self.watch_state,
                **self.meta.statistics(),
            },
            # the SSD cache in front of the store (None: none); last_error says
            # why the remote store last failed a fill
            "ssd_cache": (
                {
                    **self.store.statistics(),
                    "prefetch": self.prefetcher.statistics() if self.prefetcher else None,
                }
                if isinstance(self.store, CachedStore)
                else None
            ),
            "scrub": {
                **ns.scrub_state,
                "interval_s": self.cfg.scrub_interval,
                "rate": self.cfg.scrub_rate,
            },
            "expiry": {
                "ttl_s": self.cfg.ttl,
                "cleanup_interval_s": self.cfg.cleanup_interval,
                "touch_on_read": self.cfg.touch_on_read,
                "last_gc": self.last_gc,
            },
            # this daemon's current or last expiry pass: progress, what it removed
            "gc": self.gc_state,
            # up to 5 s old (run_health); None until first computed
            "sessions": self.sessions,
        }

    def metrics_snapshot(self) -> dict | None:
        """The status, for a scrape (called on the loop); None until mounted."""
        return None if self.ops is None else self.status()

    async def control(self, verb: str, value: bytes) -> None:
        if verb == "gc":
            await self.collect(force=True)
        elif verb == "scrub":
            await self.scrub(force=True)
        elif verb == "invalidate":
            self.ns.cache.invalidate_all()
            self.ops.forget_all_names()  # the kernel's copies too
        else:
            raise KvfsError(f"unknown control {verb!r}", errno.EINVAL)

    # -- services ----------------------------------------------------------------------

    async def collect(self, force: bool = False) -> int:
        """One expiry pass, by whichever daemon holds the etcd lock."""
        ns = self.ns
        ttl = max(30, int(self.cfg.cleanup_interval) + 30)
        lease = await ns.call_meta(self.meta.try_lock, "gc", ttl, self.node)
        if lease is None:
            if force:
                raise Conflict("another node's collector is running; try again")
            return 0
        try:
            return await self._expire_pass()
        finally:
            self.last_gc = time.time()
            with trio.CancelScope(shield=True):
                try:
                    await ns.call_meta(self.meta.unlock, lease)
                except KvfsError:
                    pass  # the lease runs out by itself

    async def _expire_pass(self) -> int:
        """`Namespace.expire`, its progress and what it removed kept in `gc_state`
        for `kvfs gc` and `kvfs status` (per session: file names would be too many)."""
        ns = self.ns
        cutoff = time.time_ns() - int(self.cfg.ttl * 1e9)
        # what the pass may take: the files idle past the ttl when it starts
        stale = {k: size for k, (size, last) in ns.index.items() if last < cutoff}
        state = self.gc_state = {"running": True, "done": 0, "total": 0, "started": time.time()}

        def progress(done: int, total: int) -> None:
            state["done"], state["total"] = done, total

        n = 0
        try:
            n = await ns.expire(progress=progress)
        finally:
            gone = {k: (size, 0) for k, size in stale.items() if k not in ns.index}
            usage = metrics.session_usage(gone)
            state.update(
                running=False,
                finished=time.time(),
                removed_files=len(gone),
                removed_bytes=sum(size for size, _ in gone.values()),
                # expire() counts the empty sessions it removed with the files
                removed_sessions=max(0, n - len(gone)),
                from_sessions=usage["count"],
                largest=[
                    {"session": u["session"], "files": u["files"], "bytes": u["bytes"]}
                    for u in usage["largest"]
                ],
            )
        return n

    async def scrub(self, force: bool = False) -> int:
        """One scrub pass (see Namespace.scrub), by whichever daemon holds the etcd lock.

        FORCE (`kvfs scrub`) runs flat out; the background pass is paced by
        `scrub_rate` so it never competes with serving.
        """
        ns = self.ns
        lease = await ns.call_meta(self.meta.try_lock, "scrub", 3600, self.node)
        if lease is None:
            if force:
                raise Conflict("another node's scrub is running; try again")
            return 0
        try:
            return await ns.scrub(rate=None if force else self.cfg.scrub_rate)
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await ns.call_meta(self.meta.unlock, lease)
                except KvfsError:
                    pass  # the lease runs out by itself

    async def run_scrubber(self, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        if not self.cfg.scrub_interval:
            return
        while True:
            await trio.sleep(self.cfg.scrub_interval)
            try:
                await self.scrub()
            except KvfsError as exc:
                log.warning("scrub pass failed: %s", exc)

    async def run_collector(self, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        interval = max(0.05, self.cfg.cleanup_interval)
        while True:
            await trio.sleep(interval)
            try:
                await self.collect()
            except KvfsError as exc:
                log.warning("expiry pass failed: %s", exc)

    async def run_health(self, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        while True:
            try:
                self.health = await trio.to_thread.run_sync(
                    self.meta.health, abandon_on_cancel=True
                )
            except Exception as exc:  # a report only: it must never stop the mount
                log.warning("etcd health probe failed: %r", exc)
            try:
                self.usage = await trio.to_thread.run_sync(self.store.usage)
            except KvfsError as exc:
                log.warning("store usage unknown: %s", exc)
            # one pass over every file (0.4 s for a million): in a thread, over a
            # copy taken on the loop (a C-level copy, 40 ms for a million), so
            # neither `kvfs status` nor a scrape ever stalls requests for it
            index = self.ns.index.copy()
            try:
                self.sessions = await trio.to_thread.run_sync(metrics.session_usage, index)
            except Exception as exc:  # a report only: it must never stop the mount
                log.error("per-session use not counted", exc_info=exc)
            await trio.sleep(5)

    async def run_watch(self, task_status=trio.TASK_STATUS_IGNORED):
        """Keep the cache and the kernel coherent with every change in etcd.

        etcd may fail at any moment: while the watch is made, while it runs,
        while the index is read again. Each failure ends one round here, and
        the next round starts where the last event left off; nothing escapes
        to the nursery, which would take the mount down with it.
        """
        ns = self.ns
        rev = self.start_revision
        started = False

        def ready():
            # the mount is ready once the first watch is up, or has failed
            nonlocal started
            if not started:
                started = True
                task_status.started()

        while True:
            try:
                rev, up = await self._watch_round(rev, ready)
            except Exception as exc:
                # a bug, not an etcd failure (those come as KvfsError): say where,
                # and keep watching rather than unmounting
                log.error("etcd watch failed unexpectedly; restarting it", exc_info=exc)
                up = False
            ready()
            if up:
                self.watch_state = "reconnecting"
                ns.index_complete = False
                # events may have been missed while the stream was down
                ns.cache.invalidate_all()
            # a watch that could not be made at all backs off longer
            await trio.sleep(0.2 if up else 0.5)

    async def _watch_round(self, rev, ready):
        """Make one watch and follow it until it breaks: returns (revision to
        resume at, whether the watch was up at all)."""
        ns = self.ns
        token = trio.lowlevel.current_trio_token()
        send, recv = trio.open_memory_channel(math.inf)

        def put(item):
            try:
                send.send_nowait(item)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass  # a stream from an earlier round

        def deliver(item):
            # handed over without waiting for the loop (the channel is
            # unbounded and keeps the order): the watch thread never stalls
            # on a busy daemon, and the loop pays no wake-up per reply
            try:
                token.run_sync_soon(put, item)
            except trio.RunFinishedError:
                pass  # we are shutting down

        with recv:  # closed on the way out: late items of this stream are dropped
            try:
                handle = await ns.call_meta(self.meta.watch, deliver, rev)
            except WatchCompacted as exc:
                log.warning("etcd watch: %s; reading every entry again", exc)
                return None, False
            except KvfsError as exc:
                if not self.watch_state.startswith("down"):  # once per outage
                    log.warning("etcd watch down: %s", exc)
                self.watch_state = f"down: {exc}"
                self.ops.coherent = False
                return rev, False
            try:
                if self.watch_state != "starting":
                    log.info("etcd watch up again at revision %s", rev or "now")
                self.watch_state = "up"
                if not ns.index_complete:
                    # events were missed while the watch was down: read etcd again
                    try:
                        await ns.load_index()
                    except Exception as exc:  # etcd down again, or a bad record
                        log.warning("could not reload the entry index: %s", exc)
                    self.ops.forget_all_names()  # the kernel's names may be as stale
                self.ops.coherent = True
                ready()
                async for item in recv:
                    if isinstance(item, Exception):
                        log.warning("etcd watch broke (%s); resuming at revision %s", item, rev)
                        if "Compacted" in type(item).__name__:
                            rev = None
                        break
                    for ev in item:
                        rev = ev.revision + 1
                        self._apply_event(ev)
            finally:
                self.ops.coherent = False  # until the next round is up
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(
                        self.meta.cancel_watch, handle, abandon_on_cancel=True
                    )
        return rev, True

    def _apply_event(self, ev) -> None:
        ns, ops = self.ns, self.ops
        try:
            ns.apply_event(ev)
            if ev.kind == "entry":
                entry = ns.cache.lookup_entry(ev.session, ev.name)[1]
                ops.on_entry_changed(ev.session, ev.name, entry if ev.value else None)
            elif ev.kind == "session" and ev.value is None:
                ops.on_session_changed(ev.session, None)
        except Exception as exc:
            # a record we cannot read (written by something else, or damaged):
            # skip it rather than die or stall on it; forget what we cached
            log.warning(
                "etcd watch: skipped a %s event for %s/%s at revision %d: %r",
                ev.kind,
                ev.session,
                ev.name,
                ev.revision,
                exc,
            )
            ns.cache.invalidate_all()
            ops.forget_all_names()

    async def run_signals(self, task_status=trio.TASK_STATUS_IGNORED):
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            task_status.started()
            async for sig in sigs:
                log.info("got %s: unmounting", signal.Signals(sig).name)
                sd_notify("STOPPING=1")
                await trio.to_thread.run_sync(unmount, self.mountpoint, True)
                return

    async def _make_ready(self, on_ready) -> None:
        # stat the mountpoint from a thread: the kernel answers through us, so
        # success means the mount is live
        def probe():
            st = os.stat(self.mountpoint)
            bdi = f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb"
            try:
                with open(bdi, "w") as f:
                    f.write(str(self.cfg.read_ahead_kb))
            except OSError as exc:
                log.info("could not raise read-ahead (%s): %s", bdi, exc)

        await trio.to_thread.run_sync(probe)
        log.info(
            "kvfs %s mounted at %s (store %s, etcd %s)",
            __version__,
            self.mountpoint,
            self.store.url,
            ",".join(f"{h}:{p}" for h, p in self.meta.endpoints),
        )
        sd_notify("READY=1")
        if on_ready is not None:
            on_ready()

    async def run(self, on_ready=None) -> None:
        """Mount, serve until unmounted (a signal or `kvfs umount`), clean up.

        ON_READY is called once the mount answers.
        """
        async with contextlib.AsyncExitStack() as stack:
            await self.serve(stack, on_ready)

    async def serve(self, stack: contextlib.AsyncExitStack, on_ready=None) -> None:
        cfg = self.cfg
        exporter = None
        if cfg.metrics:
            # first: a bad address fails the mount before anything is set up
            exporter = await stack.enter_async_context(
                metrics.serving(cfg.metrics, self.metrics_snapshot)
            )
        await self.open_backends(stack)
        cache = MetaCache(cfg.cache_sessions, cfg.cache_layers, cfg.cache_recent)
        self.ns = ns = Namespace(
            self.meta,
            self.store,
            cache,
            capacity=cfg.capacity,
            ttl=cfg.ttl,
            node=self.node,
            max_file_size=cfg.max_file_size,
            sums_at_commit=cfg.verify_reads,
        )
        await ns.load_index()
        kernel = Kernel()
        self.ops = ops = Operations(
            ns,
            kernel=kernel,
            touch_on_read=cfg.touch_on_read,
            touch_interval=cfg.touch_every(),
            status_fn=lambda: json.dumps(self.status(), separators=(",", ":")),
            control_fn=self.control,
            mountpoint=self.mountpoint,
            passthrough=cfg.passthrough,
            verify_reads=cfg.verify_reads,
        )
        if exporter is not None:
            ops.op_stats.observe = exporter.latency.observe
        if cfg.enable_prefetch:
            self.prefetcher = Prefetcher(ns, self.store, cfg.prefetch_layers)
            ops.reads.on_open = self.prefetcher.opened
        opts = set(pyfuse3.default_options)
        opts |= {"fsname=kvfs", "subtype=kvfs"}
        if cfg.allow_other:
            opts.add("allow_other")
        pyfuse3.init(ops, self.mountpoint, opts)
        stack.callback(pyfuse3.close, unmount=True)
        nursery = await stack.enter_async_context(trio.open_nursery())
        await nursery.start(ns.run_later)
        await nursery.start(kernel.run)
        await nursery.start(ops.toucher.run)
        if self.prefetcher is not None:
            await nursery.start(self.prefetcher.run)
        await nursery.start(self.run_watch)
        await nursery.start(self.run_collector)
        await nursery.start(self.run_scrubber)
        await nursery.start(self.run_health)
        await nursery.start(self.run_signals)
        nursery.start_soon(self._make_ready, on_ready)
        # returns once the kernel has let go of the mount (fusermount3 -u)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def _last_store_error(store) -> str | None:
    """The latest `last_error` of STORE or the store behind its SSD cache."""
    errors = [getattr(s, "last_error", None) for s in (store, getattr(store, "inner", None))]
    errors = [e for e in errors if e]
    return max(errors) if errors else None  # each starts with its time


def mount(cfg: Config, mountpoint: str, on_ready=None) -> None:
    """Run a daemon for MOUNTPOINT until it is unmounted; ON_READY once it answers."""
    trio.run(Daemon(cfg, mountpoint).run, on_ready)


def unmount(mountpoint: str, lazy: bool = False) -> None:
    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [mountpoint]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise KvfsError(r.stderr.strip() or f"fusermount3 failed ({r.returncode})")


__all__ = ["Daemon", "ROOT", "mount", "sd_notify", "unmount", "MetaUnavailable"]

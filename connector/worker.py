"""Worker side: move KV between vLLM's paged cache and chunk files on the mount.

Loads run in a background thread, layer by layer: the attention of layer i
waits only until layer i of every chunk is in place. Saves copy the finished
chunks' blocks out of the paged cache as each layer completes (the only cost
the forward pass pays), and a background writer turns them into files.
"""

from __future__ import annotations

import atexit
import math
import os
import queue
import sys
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .cachedir import CacheDir, NotMounted, shared_index
from .chunkfile import ChunkError, ChunkFile, chunk_metadata, tensor_bytes
from .counters import Counters
from .keys import KeySpace
from .plan import ChunkOp, StepPlan
from .settings import Settings
from .transfer import Mover

XATTR_PREFIX = "user.connector."


class StagingPool:
    """Reusable host buffers for chunks on their way to the writer. Fresh
    memory costs a page fault per 4 KiB on first touch, which made copying
    out several times slower than copying into warm buffers."""

    def __init__(self, max_bytes: int):
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._lock = threading.Lock()
        self._bytes = 0
        self._max = max_bytes
        # Pinned when the KV is on a GPU: the copy out is then an asynchronous
        # DMA at full speed (a pageable GPU->host copy ran at 1.5 GB/s on the H200).
        self.pin = False

    def get(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        with self._lock:
            free = self._free.get((shape, dtype))
            if free:
                t = free.pop()
                self._bytes -= t.numel() * t.element_size()
                return t
        return torch.empty(shape, dtype=dtype, pin_memory=self.pin)

    def put(self, tensors) -> None:
        with self._lock:
            for t in tensors:
                n = t.numel() * t.element_size()
                if self._bytes + n > self._max:
                    return
                self._free.setdefault((tuple(t.shape), t.dtype), []).append(t)
                self._bytes += n


@dataclass
class _SaveJob:
    op: ChunkOp
    tensors: dict[str, torch.Tensor]
    nbytes: int
    ready: object = None  # a CUDA event: the GPU->host copies into `tensors` have landed


@dataclass
class _LinkJob:
    """A chunk loaded from the index into a request of a named session: the
    session takes a name for it, so that it keeps what it uses."""

    session: str
    name: str
    nbytes: int = 0


class ChunkWriter:
    """A background thread that writes chunk files; bounded by bytes in flight."""

    def __init__(
        self,
        cache: CacheDir,
        space: KeySpace,
        settings: Settings,
        stats: Counters,
        log,
        pool: StagingPool,
        index: str | None = None,
    ):
        self._cache = cache
        self._index = index  # the shared index directory, None if not sharing
        self._pool = pool
        self._space = space
        self._settings = settings
        self._stats = stats
        self._log = log
        self._queue: queue.Queue[_SaveJob | _LinkJob | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0
        self._thread = threading.Thread(target=self._run, name="kvfs-writer", daemon=True)
        self._thread.start()

    def submit(self, job: _SaveJob) -> bool:
        with self._lock:
            if self._pending + job.nbytes > self._settings.max_pending_save_bytes:
                return False
            self._pending += job.nbytes
        self._queue.put(job)
        return True

    def link_later(self, session: str, name: str) -> None:
        """Link the index's chunk `name` into `session`, on the writer thread
        (a link is an etcd transaction: not for the loading thread)."""
        self._queue.put(_LinkJob(session, name))

    def flush(self) -> None:
        """Wait until every submitted chunk is written (and linked)."""
        self._queue.join()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if isinstance(job, _LinkJob):
                    if self._cache.link(self._index, job.name, job.session):
                        self._stats.add("linked_files", 1)
                else:
                    self._write(job)
            except NotMounted:
                pass  # counted and logged by the cache directory
            except Exception:  # never let one bad write end the writer
                self._stats.add("save_errors", 1)
                self._log.exception("kvfs: writing a chunk failed")
            finally:
                if isinstance(job, _SaveJob):
                    self._pool.put(job.tensors.values())
                    with self._lock:
                        self._pending -= job.nbytes
                self._queue.task_done()

    def _write(self, job: _SaveJob) -> None:
        op, space = job.op, self._space
        link = bytes.fromhex(op.link)
        name = space.file_name(op.index, link, op.num_tokens)
        t0 = time.perf_counter()
        index = self._index if self._index != op.session else None
        if (
            index is not None
            and not op.repair
            and not self._cache.exists(op.session, name)
            and self._cache.exists(index, name)
            and self._cache.link(index, name, op.session)
        ):
            # Stored meanwhile by another session (or by this one's local
            # prefix cache's earlier request): a name for it, not a second copy.
            self._stats.add("linked_files", 1)
            return
        if job.ready is not None:
            job.ready.synchronize()
        meta = chunk_metadata(
            space,
            op.session,
            op.index,
            link,
            bytes.fromhex(op.parent),
            op.tokens,
            list(job.tensors),
        )
        n = self._cache.write(op.session, name, job.tensors, meta, replace=op.repair)
        if n is None:
            self._stats.add("save_skipped", 1)
        else:
            if self._settings.set_xattrs:  # before linking: one name to update, not two
                start = op.index * space.chunk_size
                _label(self._cache.path(op.session, name), space, start, start + len(op.tokens))
            self._stats.add("save_write_seconds", time.perf_counter() - t0)
            self._stats.add("saved_files", 1)
            self._stats.add("saved_tokens", len(op.tokens))
            self._stats.add("saved_bytes", n)
        if index is not None:
            # Found by every other session through the index. A repair replaces
            # the index's name too: it may name the damaged file.
            self._cache.link(op.session, name, index, replace=op.repair)


def _label(path: str, space: KeySpace, start: int, end: int) -> None:
    """Attributes that `getfattr -d` shows a person looking at a chunk."""
    labels = {
        "model": space.model,
        "tokens": f"{start}-{end}",
        "rank": space.rank_tag(),
        "dtype": space.dtype,
    }
    for k, v in labels.items():
        try:
            os.setxattr(path, XATTR_PREFIX + k, v.encode())
        except OSError:
            return  # a store without user xattrs: labels are a convenience only


@torch.inference_mode()  # thread-local: buffers made during the forward are inference tensors
def _copy_out(kv_layer: torch.Tensor, jobs: list[tuple[list[int], torch.Tensor]]) -> None:
    for block_ids, staged in jobs:
        idx = torch.tensor(block_ids, device=kv_layer.device)
        if kv_layer.device.type == "cpu":
            torch.index_select(kv_layer, 0, idx, out=staged)
        else:
            staged.copy_(kv_layer.index_select(0, idx))


class OpenChunks:
    """Chunk files kept open between loads, by path.

    A prefix in demand is loaded again and again (a shared system prompt),
    and each load of a chunk file was an open and a close through the mount
    (two daemon round trips) and a header read and parse: a fifth of a
    1k-token hit's load on a 2-core machine, and most of the forward pass's
    wait for its first layer. A kept file is used again only while its
    path still leads to it: a `stat` of the path (answered from the kernel's
    cache right after the scheduler's lookup) must show the same file, so a
    chunk rewritten or removed since is never read from the old descriptor.
    Kept at most MAX_AGE seconds, so the daemon still sees an open of a file
    in use that often (its read-extends-life), and a removed file's space is
    not held for long; at most MAX_OPEN files.
    """

    MAX_AGE = 5.0
    MAX_OPEN = 256

    def __init__(self):
        self._lock = threading.Lock()
        self._files: dict[str, ChunkFile] = {}
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    def take(self, path: str) -> ChunkFile | None:
        """The kept file for PATH if it still is what PATH names (it is the
        caller's until given back); None otherwise. Raises ChunkError
        "missing" if PATH is gone."""
        with self._lock:
            f = self._files.pop(path, None)
        if f is None:
            return None
        try:
            if time.monotonic() - f.opened > self.MAX_AGE:
                f.close()
                return None
            st = os.stat(path)
        except FileNotFoundError:
            f.close()
            raise ChunkError(path, "missing") from None
        except OSError:
            f.close()
            return None
        if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != f.ident:
            f.close()
            return None
        return f

    def give(self, f: ChunkFile) -> None:
        """Keep F (read and checked good) for the next load of its path."""
        if f.fd < 0:
            return
        with self._lock:
            old = self._files.pop(f.path, None)
            self._files[f.path] = f
            drop = [old] if old is not None and old is not f else []
            while len(self._files) > self.MAX_OPEN:  # the longest kept go first
                drop.append(self._files.pop(next(iter(self._files))))
            if self._sweeper is None and not self._stop.is_set():
                self._sweeper = threading.Thread(
                    target=self._sweep, name="kvfs-keep-open", daemon=True
                )
                self._sweeper.start()
        for g in drop:
            g.close()

    def _sweep(self) -> None:
        # closes what no load asked for again: an idle engine holds no file
        # (nor, for a removed one, its space) for longer than about 2 x MAX_AGE
        while not self._stop.wait(self.MAX_AGE):
            now = time.monotonic()
            with self._lock:
                old = [p for p, f in self._files.items() if now - f.opened > self.MAX_AGE]
                drop = [self._files.pop(p) for p in old]
            for f in drop:
                f.close()

    def __len__(self) -> int:
        return len(self._files)

    def clear(self) -> None:
        self._stop.set()
        with self._lock:
            files, self._files = self._files, {}
        for f in files.values():
            f.close()


class WorkerSide:
    """Per-worker state: the paged cache, the loads of this step, the writer."""

    def __init__(self, settings: Settings, space: KeySpace, log, cache: CacheDir | None = None):
        self.settings = settings
        self.space = space
        self.log = log
        self.stats = Counters()
        self.kv_caches: dict[str, torch.Tensor] = {}
        self._errors: set[int] = set()
        self._errors_lock = threading.Lock()
        # Requests whose load failed: whatever the forward pass computed on top
        # of their loaded blocks is wrong, so none of it may be saved until the
        # scheduler, told of the failure, plans the recomputed chunks as repairs.
        self._poisoned: set[str] = set()
        self._loader: threading.Thread | None = None
        self._layer_ready: dict[str, threading.Event] = {}
        self._staged: dict[int, dict[str, torch.Tensor]] = {}
        self._copier = ThreadPoolExecutor(1, thread_name_prefix="kvfs-copy")
        self._copies: list[Future] = []
        # GPU: loads read into pinned buffers on I/O threads and copy on a side
        # stream; a layer's CUDA event is what the forward pass's stream waits on.
        self.mover = Mover(settings.io_threads, settings.load_buffer_bytes)
        self._layer_copied: dict[str, object] = {}
        self._layer_bytes: dict[str, tuple] = {}  # see _cpu_bytes
        self.open_files = OpenChunks()
        self._save_idx: tuple[int, list[torch.Tensor]] | None = None
        self._save_event = None
        self._stall = 0.0
        self.cache = cache or CacheDir(
            settings.mount,
            require_kvfs=settings.require_kvfs,
            file_mode=settings.file_mode,
            dir_mode=settings.dir_mode,
            counters=self.stats,
            log=log,
        )
        self.pool = StagingPool(settings.staging_bytes)
        self.index = shared_index(self.cache, space, log)
        self.writer = ChunkWriter(
            self.cache, space, settings, self.stats, log, self.pool, self.index
        )
        # Daemon threads die at exit: finish writing first.
        ref = weakref.ref(self)
        atexit.register(lambda: ref() is not None and ref().shutdown())

    # -- setup ---------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.kv_caches = dict(kv_caches)
        if len(self.kv_caches) != self.space.num_layers:
            self.log.warning(
                "kvfs: %d KV layers registered, the model config says %d",
                len(self.kv_caches),
                self.space.num_layers,
            )
        shapes = {tuple(t.shape[1:]) for t in self.kv_caches.values()}
        # Warm staging buffers, faulted in now rather than during the forward
        # passes that save: up to staging_bytes, at most 64 chunks.
        chunk_bytes = sum(
            self.space.chunk_size // max(1, kv.shape[2]) * kv[0].numel() * kv.element_size()
            for kv in self.kv_caches.values()
        )
        n_warm = min(64, self.settings.staging_bytes // max(1, chunk_bytes))
        warm = []
        self.pool.pin = self.on_gpu
        for kv in self.kv_caches.values():
            per_chunk = self.space.chunk_size // max(1, kv.shape[2])
            for _ in range(n_warm):
                shape = (per_chunk, *kv.shape[1:])
                warm.append(torch.zeros(shape, dtype=kv.dtype, pin_memory=self.on_gpu))
        self.pool.put(warm)
        self.log.info(
            "kvfs: %d layers, block shape %s, dtype %s, %s, chunks of %d tokens under %s",
            len(self.kv_caches),
            sorted(shapes),
            self.space.dtype,
            self.space.rank_tag(),
            self.space.chunk_size,
            self.settings.mount,
        )

    def _ensure_layers(self, forward_context) -> None:
        if self.kv_caches or forward_context is None:
            return
        for name, layer in forward_context.no_compile_layers.items():
            kv = getattr(layer, "kv_cache", None)
            if isinstance(kv, torch.Tensor):
                self.kv_caches[name] = kv
        self.pool.pin = self.on_gpu

    @property
    def on_gpu(self) -> bool:
        kv = next(iter(self.kv_caches.values()), None)
        return kv is not None and kv.device.type == "cuda"

    @property
    def device(self) -> torch.device:
        return next(iter(self.kv_caches.values())).device

    # -- loading -------------------------------------------------------------

    def start_load(self, plan: StepPlan, forward_context) -> None:
        if not plan.loads:
            return
        if self._loader is not None:
            # the step before's loader, should vLLM not have asked for its
            # errors yet, ends first (it restores the switch interval)
            self.finish_load()
        self._ensure_layers(forward_context)
        self._layer_ready = {name: threading.Event() for name in self.kv_caches}
        self._layer_copied = {}
        if self.on_gpu:
            # The blocks being filled may still be read by the previous step's
            # kernels on the forward pass's stream: copy in after them.
            self.mover.stream(self.device).wait_stream(torch.cuda.current_stream(self.device))
        ops = list(plan.loads)
        if self.settings.layerwise_load:
            switch = None
            if not self.on_gpu and self.settings.load_switch_interval > 0:
                switch = sys.getswitchinterval()
                sys.setswitchinterval(min(switch, self.settings.load_switch_interval))
            self._loader = threading.Thread(
                target=self._load, args=(ops, switch), name="kvfs-loader", daemon=True
            )
            self._loader.start()
        else:
            self._load(ops)

    def layer_loaded(self, layer: str) -> None:
        self._layer_ready[layer].set()

    def all_layers_loaded(self) -> None:
        for ev in self._layer_ready.values():
            ev.set()

    def wait_for_layer(self, layer_name: str) -> None:
        ev = self._layer_ready.get(layer_name)
        if ev is not None:
            ev.wait()
        copied = self._layer_copied.get(layer_name)
        if copied is not None:  # the GPU waits for the copies, the CPU does not
            torch.cuda.current_stream(self.device).wait_event(copied)

    def finish_load(self) -> None:
        if self._loader is not None:
            self._loader.join()
            self._loader = None
        if self._layer_copied:  # a layer vLLM did not wait for is waited for now
            cur = torch.cuda.current_stream(self.device)
            for ev in self._layer_copied.values():
                cur.wait_event(ev)
        self._layer_ready = {}
        self._layer_copied = {}

    def take_load_errors(self) -> set[int]:
        self.finish_load()
        with self._errors_lock:
            out, self._errors = self._errors, set()
        return out

    def report_failure(self, op: ChunkOp, why: str) -> None:
        """A chunk not loaded: its blocks go back to vLLM to recompute, and
        nothing this request computes on top of them may be saved."""
        self.log.warning(
            "kvfs: chunk %d of request %s (session %s) not loaded, will recompute: %s",
            op.index,
            op.req_id,
            op.session,
            why,
        )
        self.stats.add("load_errors", 1)
        with self._errors_lock:
            self._errors.update(op.block_ids[op.skip_blocks :])
            self._poisoned.add(op.req_id)

    def _load(self, ops: list[ChunkOp], switch: float | None = None) -> None:
        try:
            _StepLoad(self, ops).run()
        finally:
            if switch is not None:  # the load is done: Python's own again
                sys.setswitchinterval(switch)

    def read_layer(self, f: ChunkFile, op: ChunkOp, layer: str) -> list[memoryview] | None:
        """Read one layer of a chunk into its blocks; returns the bytes still
        to be checked, or None if they were checked already."""
        kv = self.kv_caches[layer]
        blocks = op.block_ids
        whole = self._cpu_bytes(layer, kv)
        if (
            whole is None
            and kv.device.type == "cpu"
            and all(kv[b].is_contiguous() for b in blocks[:1])
        ):
            per = kv[0].numel() * kv.element_size()
            whole = (None, per)  # blocks contiguous, the layer not: a view a block
        if whole is not None:
            # Straight from the file into the paged blocks (from one byte view
            # of the layer: no torch call a block). Blocks computed locally get
            # their (identical) bytes read into a scratch buffer.
            mv, per = whole
            dests = []
            for j, b in enumerate(blocks):
                if j < op.skip_blocks:
                    dests.append(memoryview(bytearray(per)))
                elif mv is not None:
                    dests.append(mv[b * per : (b + 1) * per])
                else:
                    dests.append(tensor_bytes(kv[b]))
            f.read_into(layer, dests, verify=False)
            return dests
        staged = f.read_tensor(layer, self.settings.verify_checksum)
        idx = torch.tensor(blocks[op.skip_blocks :], device=kv.device)
        kv.index_copy_(0, idx, staged[op.skip_blocks :].to(kv.device))
        return None

    def _cpu_bytes(self, layer: str, kv: torch.Tensor) -> tuple[memoryview, int] | None:
        """(a byte view of a contiguous CPU layer, bytes a block), made once a
        tensor; None for a GPU layer or one laid out otherwise."""
        got = self._layer_bytes.get(layer)
        if got is not None and got[0] is kv:
            return got[1]
        whole = None
        if kv.device.type == "cpu" and kv.is_contiguous() and kv.dim() > 1:
            whole = (tensor_bytes(kv), kv[0].numel() * kv.element_size())
        self._layer_bytes[layer] = (kv, whole)
        return whole

    def open_chunk(self, op: ChunkOp) -> tuple[ChunkFile, bool]:
        """Open a chunk file and check its header against what `op` expects:
        the request's session's, else the index's (stored by another session
        or request). The flag says it came from the index."""
        name = self.space.file_name(op.index, bytes.fromhex(op.link), op.num_tokens)
        from_index = False
        try:
            f = self._open(op.session, name)
        except ChunkError as e:
            if e.reason != "missing" or self.index is None or op.session == self.index:
                raise
            f = self._open(self.index, name)
            from_index = True
        try:
            f.expect(self.space.header(bytes.fromhex(op.link), bytes.fromhex(op.parent)))
            for layer, kv in self.kv_caches.items():
                f.expect_tensor(layer, kv.dtype, [len(op.block_ids), *kv.shape[1:]])
        except BaseException:
            f.close()
            raise
        return f, from_index

    def _open(self, session: str, name: str) -> ChunkFile:
        f = self.open_files.take(self.cache.path(session, name))
        if f is not None:
            self.stats.add("reused_opens", 1)
            return f
        return self.cache.open(session, name)

    # -- saving --------------------------------------------------------------

    def save_layer(self, plan: StepPlan, layer_name: str, kv_layer: torch.Tensor) -> None:
        """Copy this layer's finished chunks out, on the copier thread: the
        forward pass goes on with the next layer meanwhile (this layer's
        blocks are not written again in this step)."""
        if not plan.saves:
            return
        t0 = time.perf_counter()
        jobs = []
        for i, op in enumerate(plan.saves):
            staged = self.pool.get((len(op.block_ids), *kv_layer.shape[1:]), kv_layer.dtype)
            self._staged.setdefault(i, {})[layer_name] = staged
            jobs.append((op.block_ids, staged))
        if kv_layer.device.type == "cuda":
            self._copy_out_gpu(plan, kv_layer, jobs)
        else:
            self._copies.append(self._copier.submit(_copy_out, kv_layer, jobs))
        self._stall += time.perf_counter() - t0

    @torch.inference_mode()
    def _copy_out_gpu(self, plan: StepPlan, kv_layer: torch.Tensor, jobs) -> None:
        """Gather the blocks on the GPU and copy them to pinned buffers, both
        queued on the side stream behind this layer's compute: a few launches
        here, no wait; the writer waits for the copy's event."""
        device = kv_layer.device
        stream = self.mover.stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            if self._save_idx is None or self._save_idx[0] != id(plan):
                # once per step; from pinned memory so that it does not wait
                # for earlier copies queued on the stream
                idx = [
                    torch.tensor(b, dtype=torch.long).pin_memory().to(device, non_blocking=True)
                    for b, _ in jobs
                ]
                self._save_idx = (id(plan), idx)
            for (_, staged), idx in zip(jobs, self._save_idx[1], strict=True):
                staged.copy_(kv_layer.index_select(0, idx), non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(stream)
        self._save_event = ev

    def submit_saves(self, plan: StepPlan) -> None:
        if not plan.saves:
            self._forget(plan.finished)
            return
        t0 = time.perf_counter()
        # A load's checksums may still be running: wait, so that a failure is
        # known before anything computed on top of it is handed to the writer.
        self.finish_load()
        failed = None
        for fut in self._copies:  # the step's blocks may be reused once we return
            try:
                fut.result()
            except Exception as e:
                failed = e
        self._copies.clear()
        ready, self._save_event, self._save_idx = self._save_event, None, None
        if ready is not None:
            # The GPU copies out may still run: the next step's kernels, which
            # may overwrite these blocks, queue behind them (no CPU wait here).
            torch.cuda.current_stream(self.device).wait_event(ready)
        if failed is not None:
            self.log.warning(
                "kvfs: copying KV out failed, this step's chunks not saved: %r", failed
            )
            self.stats.add("save_errors", len(plan.saves))
            self._staged.clear()
            self._stall = 0.0
            return
        layers = list(self.kv_caches)
        for i, op in enumerate(plan.saves):
            tensors = self._staged.pop(i, {})
            if op.req_id in self._poisoned and not op.repair:
                self.stats.add("save_discarded", 1)
                self.pool.put(tensors.values())
                continue
            if set(tensors) != set(layers):
                self.log.warning(
                    "kvfs: chunk %d of %s saw %d of %d layers, not saved",
                    op.index,
                    op.req_id,
                    len(tensors),
                    len(layers),
                )
                self.stats.add("save_errors", 1)
                continue
            ordered = {name: tensors[name] for name in layers}
            nbytes = sum(t.numel() * t.element_size() for t in ordered.values())
            if not self.writer.submit(_SaveJob(op, ordered, nbytes, ready)):
                self.stats.add("save_dropped", 1)
                self.log.warning("kvfs: writer behind, chunk %d of %s dropped", op.index, op.req_id)
        self._staged.clear()
        self._forget(plan.finished)
        self._stall += time.perf_counter() - t0
        self.stats.add("save_stall_seconds", self._stall)
        self._stall = 0.0

    def _forget(self, finished: list[str]) -> None:
        if finished and self._poisoned:
            with self._errors_lock:
                self._poisoned.difference_update(finished)

    # -- reporting and shutdown ----------------------------------------------

    def shutdown(self) -> None:
        self.finish_load()
        self._copier.shutdown(wait=True)
        self.writer.flush()
        self.writer.close()
        self.mover.close()
        self.open_files.clear()


class _StepLoad:
    """One step's loads, in three passes: open and check every chunk's header,
    read layer by layer (layer i is released to the forward pass as soon as
    every chunk's layer i is in place), then verify the checksums while the
    forward pass runs. A request's first failed chunk ends its loads: vLLM
    recomputes from there, so later chunks need not load; earlier ones must."""

    def __init__(self, worker: WorkerSide, ops: list[ChunkOp]):
        self.worker = worker
        self.ops = ops
        self.files: dict[int, ChunkFile] = {}  # by position in ops, while usable
        self.from_index: set[int] = set()  # positions whose file was the index's
        self.failed_at: dict[str, int] = {}  # request -> index of its first failed chunk
        self.checks: list[tuple[int, str, list[memoryview]]] = []

    def usable(self, i: int) -> bool:
        op = self.ops[i]
        return op.index < self.failed_at.get(op.req_id, math.inf)

    def fail(self, i: int, why: str) -> None:
        op = self.ops[i]
        if self.usable(i):  # later chunks of a failed request are not reported
            self.worker.report_failure(op, why)
            self.failed_at[op.req_id] = op.index
        self.drop(i)

    def drop(self, i: int, keep: bool = False) -> None:
        f = self.files.pop(i, None)
        if f is None:
            pass
        elif keep and self.worker.settings.keep_open:
            # read and checked good: the next load of it needs no open
            self.worker.open_files.give(f)
        else:
            f.close()

    @torch.inference_mode()
    def run(self) -> None:
        w = self.worker
        t0 = time.perf_counter()
        try:
            if not w.cache.live():
                for i in range(len(self.ops)):
                    self.fail(i, "the mount is not a live kvfs mount")
            else:
                self.open_all()
                gpu = w.on_gpu
                if gpu:
                    self.index_gpu()
                if not gpu and not w.settings.layerwise_load:
                    self.read_chunks()
                else:
                    for layer in w.kv_caches:
                        if gpu:
                            self.read_gpu(layer)
                        else:
                            self.read(layer)
                        w.layer_loaded(layer)
                    self.verify()
                self.count()
        except Exception as e:  # a bug or an I/O error: a miss, never a crash
            w.log.exception("kvfs: loading failed")
            for i in range(len(self.ops)):  # nothing loaded this step can be trusted
                self.fail(i, f"unexpected error: {e!r}")
            if w.on_gpu:  # copies still queued must not land in recomputed blocks
                w.mover.stream(w.device).synchronize()
        finally:
            for i in list(self.files):  # what is left loaded (a failure dropped its own)
                self.drop(i, keep=self.usable(i))
            w.all_layers_loaded()
            w.stats.add("load_seconds", time.perf_counter() - t0)
            w.stats.add("loads", 1)

    def open_all(self) -> None:
        for i, op in enumerate(self.ops):
            if self.usable(i):
                try:
                    self.files[i], borrowed = self.worker.open_chunk(op)
                    if borrowed:
                        self.from_index.add(i)
                except ChunkError as e:
                    self.fail(i, e.reason)

    def read(self, layer: str) -> None:
        for i in sorted(self.files):
            if not self.usable(i):
                self.drop(i)
                continue
            try:
                dests = self.worker.read_layer(self.files[i], self.ops[i], layer)
            except ChunkError as e:
                self.fail(i, e.reason)
                continue
            if dests is not None and self.worker.settings.verify_checksum:
                self.checks.append((i, layer, dests))

    def read_chunks(self) -> None:
        """Every layer of every chunk, the chunks spread over the I/O threads
        and each layer checked right after its read (its bytes still in the
        core's cache): a load that ends before the forward pass starts, with
        every core to itself."""
        w = self.worker
        verify = w.settings.verify_checksum
        todo = sorted((i for i in self.files if self.usable(i)), key=lambda i: self.ops[i].index)

        def one(i: int) -> None:
            f, op = self.files[i], self.ops[i]
            for layer in w.kv_caches:
                dests = w.read_layer(f, op, layer)
                if dests is not None and verify:
                    f.check(layer, dests)

        futs = [(i, w.mover.pool.submit(one, i)) for i in todo]
        for i, fut in futs:  # a request's first failed chunk is the one reported
            try:
                fut.result()
            except ChunkError as e:
                self.fail(i, e.reason)

    def index_gpu(self) -> None:
        """Each chunk's destination blocks as a GPU index, once for all layers
        (from pinned memory: no wait behind copies already queued)."""
        w = self.worker
        self.idx: dict[int, torch.Tensor] = {}
        with torch.cuda.stream(w.mover.stream(w.device)):
            for i in self.files:
                op = self.ops[i]
                ids = torch.tensor(op.block_ids[op.skip_blocks :], dtype=torch.long)
                self.idx[i] = ids.pin_memory().to(w.device, non_blocking=True)

    def read_gpu(self, layer: str) -> None:
        """One layer of every chunk: read in parallel straight into one pinned
        buffer (checksums on the reading threads, while the bytes are in
        cache), then one host->GPU copy and one scatter per chunk into the
        paged blocks, queued on the side stream; the layer's event is what
        the forward pass waits on. The next layer's reads overlap this one's
        copies."""
        w = self.worker
        kv = w.kv_caches[layer]
        block_bytes = kv[0].numel() * kv.element_size()
        todo = []
        for i in sorted(self.files):
            if not self.usable(i):
                self.drop(i)
            else:
                todo.append(i)
        if not todo:
            return
        offsets, total = {}, 0
        for i in todo:
            offsets[i] = total
            total += len(self.ops[i].block_ids) * block_bytes
        buffers = w.mover.buffers(kv.device)
        buf = buffers.get(total)
        event = None
        try:
            mv = tensor_bytes(buf)
            verify = w.settings.verify_checksum
            futs = {}
            for i in todo:
                dest = mv[offsets[i] : offsets[i] + len(self.ops[i].block_ids) * block_bytes]
                futs[i] = w.mover.pool.submit(self.files[i].read_into, layer, [dest], verify)
            ok = []
            for i in todo:
                try:
                    futs[i].result()
                    ok.append(i)
                except ChunkError as e:
                    self.fail(i, e.reason)
            stream = w.mover.stream(kv.device)
            with torch.cuda.stream(stream):
                dev = torch.empty(total, dtype=torch.uint8, device=kv.device)
                dev.copy_(buf, non_blocking=True)
                for i in ok:
                    op = self.ops[i]
                    n = len(op.block_ids)
                    blocks = dev[offsets[i] : offsets[i] + n * block_bytes]
                    blocks = blocks.view(kv.dtype).view(n, *kv.shape[1:])[op.skip_blocks :]
                    kv.index_copy_(0, self.idx[i], blocks)
                event = torch.cuda.Event()
                event.record(stream)
                del dev  # freed in stream order
            w._layer_copied[layer] = event
        finally:
            buffers.put(buf, event)

    def verify(self) -> None:
        # In chunk order, so that a request's first bad chunk is the one reported.
        for i, layer, dests in sorted(self.checks, key=lambda c: self.ops[c[0]].index):
            if i in self.files and self.usable(i):
                try:
                    self.files[i].check(layer, dests)
                except ChunkError as e:
                    self.fail(i, e.reason)

    def count(self) -> None:
        w = self.worker
        block_tokens = next(iter(w.kv_caches.values())).shape[2] if w.kv_caches else 0
        for i, f in self.files.items():
            if self.usable(i):
                op = self.ops[i]
                w.stats.add("loaded_files", 1)
                w.stats.add("loaded_tokens", (len(op.block_ids) - op.skip_blocks) * block_tokens)
                w.stats.add("loaded_bytes", f.size)
                if i in self.from_index:  # checked good: the session keeps it too
                    w.writer.link_later(op.session, os.path.basename(f.path))

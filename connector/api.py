"""The engine-neutral API: store and retrieve KV by token ids and per-layer tensors.

Names follow the original project (`init_engine`, `should_store`, `store_kv`,
`should_retrieve`, `retrieve_kv`, `destroy_engine`), but the arguments are
plain token ids and a list with one tensor per layer, so any engine (a
Hugging Face `generate` loop, say) can share the cache. The files are the
same chunk files the vLLM connector writes, under keys of their own.

    engine = init_engine({"mount": "/kvcache", "model_id": "my-model",
                          "dtype": "float32", "num_layers": 2, "token_dim": 2})
    if should_store(ids) is StoreStatus.STORED:
        store_kv(ids, kv_per_layer)
    r = retrieve_kv(ids[:-1])          # RetrieveResult(status, num_tokens, kv_caches)
    destroy_engine()
"""

from __future__ import annotations

import enum
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from .cachedir import CacheDir, NotMounted, shared_index
from .chunkfile import (
    DTYPES,
    ChunkError,
    ChunkFile,
    RawTensor,
    chunk_metadata,
    tensor_bytes,
)
from .counters import Counters
from .keys import KeySpace, chain_root, derived_session, token_chain, valid_session
from .settings import as_flag, as_mode
from .transfer import Mover

# Reads are issued in pieces of whole layers of about this size: small enough
# that a few chunks keep every I/O thread busy, large enough that a piece is
# one long copy per layer.
PIECE_BYTES = 8 << 20
# GPU scratch for gathering a group of chunks out of the per-layer tensors
GATHER_BYTES = 256 << 20


class StoreStatus(enum.Enum):
    STORED = "stored"  # some whole chunk of the tokens is not in the cache yet
    SKIPPED = "skipped"  # every whole chunk is cached already (or there is none)


class RetrieveStatus(enum.Enum):
    HIT = "hit"  # at least the first chunk is cached
    MISS = "miss"


@dataclass
class RetrieveResult:
    status: RetrieveStatus
    num_tokens: int  # KV returned for token_ids[:num_tokens], a multiple of the chunk size
    kv_caches: list[torch.Tensor]  # one per layer; empty on a miss
    errors: list[str]  # chunks that were present but failed validation


@dataclass(frozen=True)
class EngineConfig:
    mount: str = "/kvcache"
    model_id: str = ""  # required: what makes two models' KV different
    dtype: str = "float32"
    num_layers: int = 0  # required
    token_dim: int = 0  # axis of the token positions in each layer's tensor
    layout: str = "tokens"  # free text describing the per-layer tensor; part of the key
    chunk_size: int = 256
    tp_rank: int = 0
    tp_size: int = 1
    verify_checksum: bool = True
    require_kvfs: bool = True  # refuse a mount path that is not a live kvfs mount
    file_mode: int = 0o600  # chunk files hold prompts: private unless shared on purpose
    dir_mode: int = 0o700
    device: str = "cpu"  # where retrieve_kv puts the KV unless told otherwise
    io_threads: int = 0  # parallel file reads and writes; 0: up to 8, by cores
    host_buffer_bytes: int = 512 << 20  # reusable (pinned on a GPU) host buffers

    @classmethod
    def from_any(cls, config: Any = None, **overrides) -> EngineConfig:
        if config is None:
            data = {}
        elif isinstance(config, dict):
            data = dict(config.get("kv_transfer_config", config))
        else:  # an object with attributes, like the original's SimpleNamespace
            data = {k: getattr(config, k) for k in cls.__dataclass_fields__ if hasattr(config, k)}
        data.update(overrides)
        if "storage_dir" in data and "mount" not in data:  # the original's key
            data["mount"] = data["storage_dir"]
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for k in ("verify_checksum", "require_kvfs"):
            if k in known:
                known[k] = as_flag(known[k], k)
        for k in ("file_mode", "dir_mode"):
            if k in known:
                known[k] = as_mode(known[k], k)
        for k in ("io_threads", "host_buffer_bytes", "num_layers", "token_dim", "chunk_size"):
            if k in known:
                known[k] = int(known[k])
        if "device" in known:
            known["device"] = str(known["device"])
        cfg = cls(**known)
        if not cfg.model_id or cfg.num_layers <= 0:
            raise ValueError("init_engine needs model_id and num_layers")
        if cfg.dtype not in {str(d).removeprefix("torch.") for d in DTYPES.values()}:
            raise ValueError(f"unsupported dtype {cfg.dtype}")
        return cfg


class KVEngine:
    """A cache of per-layer KV tensors keyed by chained chunks of token ids."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.space = KeySpace(
            model=config.model_id,
            dtype=config.dtype,
            layout=f"api:{config.layout}:tokendim{config.token_dim}",
            chunk_size=config.chunk_size,
            num_layers=config.num_layers,
            tp_rank=config.tp_rank,
            tp_size=config.tp_size,
        )
        self.layer_names = [f"layer.{i}" for i in range(config.num_layers)]
        self.counters = Counters()
        self.cache = CacheDir(
            config.mount,
            require_kvfs=config.require_kvfs,
            file_mode=config.file_mode,
            dir_mode=config.dir_mode,
            counters=self.counters,
        )
        # As the vLLM connector: sessions find each other's chunks through the
        # index directory of this key space (on a checked kvfs mount).
        self.index = shared_index(self.cache, self.space, self.cache.log)
        self.mover = Mover(config.io_threads, config.host_buffer_bytes)
        # New chunks are linked into the index off the store's path: a link
        # is one more FUSE request and etcd transaction per chunk, which cost
        # the H200 save a quarter of its speed (docs/BENCHMARKS.md). Until
        # it lands another session misses that chunk; this engine's own
        # lookups wait for it.
        self._linker = ThreadPoolExecutor(1, thread_name_prefix="kvfs-link")
        self._links: list[Future] = []
        # closer threads add links while a lookup takes the list
        self._links_lock = threading.Lock()

    def close(self) -> None:
        self._links_landed()
        self._linker.shutdown(wait=True)
        self.mover.close()

    def _links_landed(self) -> None:
        with self._links_lock:
            links, self._links = self._links, []
        for fut in links:
            try:
                fut.result()  # cache.link counts and logs its own failures
            except NotMounted:
                pass  # counted; nothing is linked outside a live mount

    # -- names -------------------------------------------------------------------

    def _session(self, links: list[bytes], session: str | None) -> str | None:
        if session is not None:
            if not valid_session(session):
                raise ValueError(f"bad session name {session!r}")
            return session
        if not links:
            return None
        return self.index or derived_session(self.config.model_id, links[0])

    def _where(self, name: str, i: int, link: bytes) -> str | None:
        """Where chunk i's file is: the session's, else the index's, else None."""
        file = self._file(i, link)
        if self.cache.exists(name, file):
            return name
        if self.index is not None and name != self.index and self.cache.exists(self.index, file):
            return self.index
        return None

    def _take(self, name: str, i: int, link: bytes) -> bool:
        """Give session `name` its own name for the index's chunk i (a
        cross-session hit it keeps); False if that failed."""
        if self.index is None or name == self.index:
            return False
        if self.cache.link(self.index, self._file(i, link), name):
            self.counters.add("linked_files", 1)
            return True
        return False

    def cached_tokens(self, token_ids: Sequence[int], session: str | None = None) -> int:
        """How many leading tokens have chunk files (not yet validated)."""
        self._links_landed()
        links = token_chain(list(token_ids), self.config.chunk_size)
        name = self._session(links, session)
        if name is None or not self.cache.live():
            return 0
        n = 0
        while n < len(links) and self._where(name, n, links[n]) is not None:
            n += 1
        return n * self.config.chunk_size

    # -- the original's verbs ----------------------------------------------------

    def should_store(self, token_ids: Sequence[int], session: str | None = None) -> StoreStatus:
        whole = len(token_ids) // self.config.chunk_size * self.config.chunk_size
        # Off a live mount nothing would be written: not worth preparing KV for.
        if whole and self.cache.live() and self.cached_tokens(token_ids, session) < whole:
            return StoreStatus.STORED
        return StoreStatus.SKIPPED

    def store_kv(
        self,
        token_ids: Sequence[int],
        kv_caches: Sequence[torch.Tensor],
        store_status: StoreStatus | None = None,
        session: str | None = None,
    ) -> int:
        """Write every whole chunk of `token_ids` that is not cached yet.

        `kv_caches[i]` is layer i's KV with the token positions on `token_dim`
        (at least as many as the tokens stored), on the CPU or a GPU. Returns
        tokens written.

        On a GPU: chunks are gathered on the GPU (one strided copy per layer
        for a group of chunks), copied to pinned host buffers asynchronously
        on a side stream, and each chunk file is checksummed and written by an
        I/O thread as soon as its copy lands, while later chunks are still
        being copied. Chunk files may appear out of order; a reader only ever
        takes the longest present prefix."""
        if store_status is StoreStatus.SKIPPED:
            return 0
        cfg = self.config
        if len(kv_caches) != cfg.num_layers:
            raise ValueError(f"{len(kv_caches)} layers given, engine has {cfg.num_layers}")
        for t in kv_caches:
            if str(t.dtype).removeprefix("torch.") != cfg.dtype:
                raise ValueError(f"tensor dtype {t.dtype}, engine dtype {cfg.dtype}")
        ids = [int(t) for t in token_ids]
        links = token_chain(ids, cfg.chunk_size)
        name = self._session(links, session)
        if name is None or not self.cache.live():
            return 0
        todo = []
        for i, link in enumerate(links):
            if todo:
                # Chunks are keyed by the whole prefix before them, so after the
                # first one nobody stored the rest are new too; asking anyway
                # cost two lookups a chunk (through kvfs, a daemon round trip
                # each). Should one exist after all (a hole left by a failed
                # save), its write finds it and writes nothing (write_chunk_open
                # creates exclusively).
                todo.append(i)
                continue
            where = self._where(name, i, link)
            # stored by another session: this one takes a name, not a copy
            if where is None or (where != name and not self._take(name, i, link)):
                todo.append(i)
        if not todo:
            return 0
        kvs = [kv.detach() for kv in kv_caches]
        device = kvs[0].device
        if any(kv.device != device for kv in kvs):
            raise ValueError("all layers must be on one device")
        td, C = cfg.token_dim, cfg.chunk_size
        chunk_shape = list(kvs[0].shape)
        chunk_shape[td] = C
        dtype = kvs[0].dtype
        layer_bytes = _numel(chunk_shape) * dtype.itemsize
        for kv in kvs:
            if (
                list(kv.shape[:td]) + list(kv.shape[td + 1 :])
                != chunk_shape[:td] + chunk_shape[td + 1 :]
            ):
                raise ValueError("all layers must have the same shape")
        L = len(kvs)
        chunk_bytes = L * layer_bytes
        shape = tuple(chunk_shape)
        buffers = self.mover.buffers(device)
        pool = self.mover.pool
        cuda = device.type == "cuda"
        futures: list[Future] = []
        root = chain_root()

        def write(i: int, buf: torch.Tensor, event) -> int | Future:
            try:
                if event is not None:
                    event.synchronize()  # the chunk's GPU->host copy has landed
                else:  # the CPU: gather here, in parallel with other chunks' writes
                    _gather_cpu(kvs, td, i * C, C, buf, chunk_shape)
                whole = tensor_bytes(buf)  # one torch call; the slices are plain Python
                tensors = {
                    layer: RawTensor(dtype, shape, whole[j * layer_bytes : (j + 1) * layer_bytes])
                    for j, layer in enumerate(self.layer_names)
                }
                tokens = ids[i * C : (i + 1) * C]
                parent = links[i - 1] if i else root
                meta = chunk_metadata(
                    self.space, name, i, links[i], parent, tokens, self.layer_names
                )
                out = self.cache.write(name, self._file(i, links[i]), tensors, meta, keep_open=True)
            finally:
                buffers.put(buf)
            if out is None:
                return 0
            # The close is kvfs's commit (milliseconds): on another thread,
            # while this one goes on to the next chunk's bytes.
            return self.mover.closer.submit(close, i, out[1])

        def close(i: int, fd: int) -> int:
            os.close(fd)  # an error here: the chunk was not stored
            if self.index is not None and name != self.index:
                with self._links_lock:
                    self._links.append(
                        self._linker.submit(
                            self.cache.link, name, self._file(i, links[i]), self.index
                        )
                    )
            return C

        try:
            with torch.no_grad():
                if cuda:
                    stream = self.mover.stream(device)
                    # The KV was computed on the caller's stream: copy after it.
                    stream.wait_stream(torch.cuda.current_stream(device))
                group = max(1, GATHER_BYTES // chunk_bytes)
                pos = 0
                while pos < len(todo):
                    first = todo[pos]
                    members = [i for i in todo[pos:] if i < first + group]
                    pos += len(members)
                    span = members[-1] - first + 1
                    if not cuda:
                        for i in members:
                            buf = buffers.get(chunk_bytes)  # waits while all are being written
                            futures.append(pool.submit(write, i, buf, None))
                        continue
                    # Few torch calls a chunk here: each one gives up the GIL
                    # that eight I/O threads want too, and waits to get it back.
                    with torch.cuda.stream(stream):
                        gathered = _gather_gpu(kvs, td, first, span, C, chunk_shape)
                        rows = gathered.view(-1).view(torch.uint8).view(span, chunk_bytes)
                        for i in members:
                            buf = buffers.get(chunk_bytes)  # waits while all are being written
                            buf.copy_(rows[i - first], non_blocking=True)
                            event = torch.cuda.Event()
                            event.record(stream)
                            futures.append(pool.submit(write, i, buf, event))
                    del gathered, rows  # freed in stream order: safe to reuse on `stream`
        finally:
            written, failure = 0, None
            for fut in futures:
                try:
                    done = fut.result()
                    written += done.result() if isinstance(done, Future) else done
                except NotMounted:
                    pass  # counted; nothing is written outside a live mount
                except BaseException as e:  # noqa: BLE001 - re-raised below
                    failure = failure or e
        if failure is not None:
            raise failure
        return written

    def _file(self, i: int, link: bytes) -> str:
        return self.space.file_name(i, link)

    def should_retrieve(self, token_ids: Sequence[int], session: str | None = None):
        if self.cached_tokens(token_ids, session) > 0:
            return RetrieveStatus.HIT
        return RetrieveStatus.MISS

    def retrieve_kv(
        self,
        token_ids: Sequence[int],
        retrieve_status: RetrieveStatus | None = None,
        session: str | None = None,
        device: str | torch.device | None = None,
    ) -> RetrieveResult:
        """KV of the longest cached prefix of `token_ids`, in whole chunks, on
        `device` (the engine's `device` by default).

        Chunks are opened and validated, then read in parallel, layer groups
        straight into host buffers (pinned on a GPU) and copied to the device
        asynchronously while later pieces are read. The first missing or
        invalid chunk ends the prefix (an invalid one is listed in `errors`).
        On a GPU the result is ready for work queued on the caller's current
        stream (which waits for the copies) without the CPU waiting for them.
        The per-layer tensors are views of one tensor with the layers first."""
        self._links_landed()
        miss = RetrieveResult(RetrieveStatus.MISS, 0, [], [])
        if retrieve_status is RetrieveStatus.MISS:
            return miss
        cfg = self.config
        device = torch.device(device if device is not None else cfg.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        ids = [int(t) for t in token_ids]
        links = token_chain(ids, cfg.chunk_size)
        name = self._session(links, session)
        if name is None or not self.cache.live():
            return miss
        files, shape, errors, borrowed = self._open_prefix(name, links)
        if not files:
            miss.errors = errors
            return miss
        try:
            n_ok, kv = self._read_prefix(files, shape, device, errors)
        finally:
            for f in files:
                f.close()
        if n_ok == 0:
            miss.errors = errors
            return miss
        for i in sorted(borrowed):
            if i < n_ok:  # read and checked: the session keeps what it used
                self._take(name, i, links[i])
        return RetrieveResult(RetrieveStatus.HIT, n_ok * cfg.chunk_size, kv, errors)

    def _open_prefix(self, name: str, links: list[bytes]):
        """Open and check the chunk files of the longest present prefix: the
        first synchronously (a miss costs one lookup), the rest in parallel
        (through FUSE an open and a header read are a few round trips each)."""
        cfg = self.config
        root = chain_root()
        dtype = DTYPES_BY_NAME[cfg.dtype]

        borrowed: set[int] = set()  # chunks opened from the index

        def open_one(i: int) -> tuple[ChunkFile, tuple[int, ...]]:
            try:
                f = self.cache.open(name, self._file(i, links[i]))
            except ChunkError as e:
                if e.reason != "missing" or self.index is None or name == self.index:
                    raise
                f = self.cache.open(self.index, self._file(i, links[i]))
                borrowed.add(i)
            try:
                f.expect(self.space.header(links[i], links[i - 1] if i else root))
                specs = []
                for layer in self.layer_names:
                    t = f.tensors.get(layer)
                    if t is None:
                        raise ChunkError(f.path, f"no tensor {layer}")
                    specs.append((t[0], tuple(t[1])))
                shapes = {s for _, s in specs}
                if len(shapes) != 1:
                    raise ChunkError(f.path, f"inconsistent shapes {sorted(shapes)}")
                shape = specs[0][1]
                if len(shape) <= cfg.token_dim or shape[cfg.token_dim] != cfg.chunk_size:
                    raise ChunkError(f.path, f"{shape} does not hold {cfg.chunk_size} tokens")
                for layer in self.layer_names:
                    f.expect_tensor(layer, dtype, shape)
                return f, shape
            except BaseException:
                f.close()
                raise

        files: list[ChunkFile] = []
        errors: list[str] = []
        shape = None
        if not links:
            return files, shape, errors, borrowed
        results: list[Future] = []
        first = Future()
        try:
            first.set_result(open_one(0))
        except BaseException as e:  # noqa: BLE001 - sorted out below, in order
            first.set_exception(e)
        results.append(first)
        if first.exception() is None:
            results += [self.mover.pool.submit(open_one, i) for i in range(1, len(links))]
        done = False
        for fut in results:
            try:
                f, s = fut.result()
            except ChunkError as e:
                if not done and e.reason != "missing":
                    errors.append(str(e))
                done = True
                continue
            except OSError as e:
                if not done:
                    errors.append(f"{e}")
                done = True
                continue
            if done or (shape is not None and s != shape):
                if not done:
                    errors.append(f"{f.path}: shape {list(s)}, earlier chunks {list(shape)}")
                done = True
                f.close()
                continue
            shape = s
            files.append(f)
        return files, shape, errors, borrowed

    def _read_prefix(self, files: list[ChunkFile], shape, device: torch.device, errors):
        """Read every opened chunk into one [layers, ...] tensor on `device`;
        returns how many leading chunks are valid and their per-layer views."""
        cfg = self.config
        td, C, L = cfg.token_dim, cfg.chunk_size, len(self.layer_names)
        dtype = DTYPES_BY_NAME[cfg.dtype]
        layer_bytes = _numel(shape) * dtype.itemsize
        chunk_bytes = L * layer_bytes
        full = list(shape)
        full[td] = C * len(files)
        cuda = device.type == "cuda"
        out = torch.empty([L, *full], dtype=dtype, device=device)
        buffers = self.mover.buffers(device)
        pool = self.mover.pool
        verify = cfg.verify_checksum
        per_piece = max(1, PIECE_BYTES // max(1, layer_bytes))
        pieces = [(a, min(L, a + per_piece)) for a in range(0, L, per_piece)]
        failed: dict[int, str] = {}
        lock = threading.Lock()
        stream = self.mover.stream(device) if cuda else None
        if cuda:
            # `out` was made on the caller's stream; the copies go on ours.
            stream.wait_stream(torch.cuda.current_stream(device))

        class Chunk:
            def __init__(self, c: int, buf: torch.Tensor, scratch):
                self.c, self.buf, self.scratch = c, buf, scratch
                self.left = len(pieces)
                # made here, on the submitting thread, so that the I/O threads
                # make as few torch calls as they can (each gives up the GIL)
                self.mv = tensor_bytes(buf)
                self.copies = None
                if scratch is not None:  # each piece's host -> GPU copy
                    self.copies = [
                        (
                            scratch[a * layer_bytes : b * layer_bytes],
                            buf[a * layer_bytes : b * layer_bytes],
                        )
                        for a, b in pieces
                    ]

        def land(ch: Chunk) -> None:
            """All pieces of a chunk are in: place it (one strided copy)."""
            dst = out.narrow(td + 1, ch.c * C, C)
            if cuda:
                with torch.cuda.stream(stream):
                    if ch.c not in failed:
                        dst.copy_(ch.scratch.view(dtype).view(dst.shape))
                    event = torch.cuda.Event()
                    event.record(stream)
                ch.scratch = ch.copies = None  # freed in stream order
                buffers.put(ch.buf, event)
            else:
                if ch.c not in failed:
                    dst.copy_(ch.buf.view(dtype).view(dst.shape))
                buffers.put(ch.buf)

        def read(ch: Chunk, a: int, b: int) -> None:
            f = files[ch.c]
            try:
                if ch.c not in failed:
                    mv = ch.mv
                    for j in range(a, b):
                        dest = mv[j * layer_bytes : (j + 1) * layer_bytes]
                        f.read_into(self.layer_names[j], [dest], verify)
                    if cuda:
                        dst, src = ch.copies[a // per_piece]
                        with torch.cuda.stream(stream):
                            dst.copy_(src, non_blocking=True)
            except ChunkError as e:
                with lock:
                    failed.setdefault(ch.c, str(e))
            except BaseException as e:  # noqa: BLE001 - a bug or I/O error: a miss
                with lock:
                    failed.setdefault(ch.c, f"{f.path}: {e!r}")
            finally:
                with lock:
                    ch.left -= 1
                    last = ch.left == 0
                if last:
                    land(ch)

        futures: list[Future] = []
        try:
            with torch.no_grad():
                for c in range(len(files)):
                    if failed and min(failed) < c:
                        break  # the prefix already ends earlier
                    buf = buffers.get(chunk_bytes)  # waits while all are in flight
                    scratch = None
                    if cuda:
                        with torch.cuda.stream(stream):
                            scratch = torch.empty(chunk_bytes, dtype=torch.uint8, device=device)
                    ch = Chunk(c, buf, scratch)
                    futures += [pool.submit(read, ch, a, b) for a, b in pieces]
        finally:
            for fut in futures:
                fut.result()
        if cuda:
            torch.cuda.current_stream(device).wait_stream(stream)
        n_ok = min(failed) if failed else len(files)
        if failed:
            errors.append(failed[n_ok])
        return n_ok, [out[j].narrow(td, 0, n_ok * C) for j in range(L)]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


DTYPES_BY_NAME = {str(d).removeprefix("torch."): d for d in DTYPES.values()}


def _gather_gpu(kvs, td: int, first: int, span: int, C: int, chunk_shape) -> torch.Tensor:
    """Chunks first..first+span-1 of every layer as one contiguous
    [span, layers, *chunk_shape] tensor: one strided copy per layer."""
    g = torch.empty([span, len(kvs), *chunk_shape], dtype=kvs[0].dtype, device=kvs[0].device)
    for j, kv in enumerate(kvs):
        src = kv.narrow(td, first * C, span * C).unflatten(td, (span, C)).movedim(td, 0)
        g[:, j].copy_(src)
    return g


def _gather_cpu(kvs, td: int, start: int, C: int, buf: torch.Tensor, chunk_shape) -> None:
    """Chunk [start, start+C) of every layer into `buf`, layer after layer."""
    layer_bytes = buf.numel() // len(kvs)
    for j, kv in enumerate(kvs):
        dst = buf[j * layer_bytes : (j + 1) * layer_bytes].view(kv.dtype).view(chunk_shape)
        dst.copy_(kv.narrow(td, start, C))


_engine: KVEngine | None = None


def init_engine(config: Any = None, **overrides) -> KVEngine:
    """Create the process-wide engine (a dict, an object with attributes, or keywords)."""
    global _engine
    _engine = KVEngine(EngineConfig.from_any(config, **overrides))
    return _engine


def destroy_engine() -> None:
    global _engine
    if _engine is not None:
        _engine.close()
    _engine = None


def _get() -> KVEngine:
    if _engine is None:
        raise RuntimeError("call init_engine() first")
    return _engine


def should_store(token_ids: Sequence[int], session: str | None = None) -> StoreStatus:
    return _get().should_store(token_ids, session)


def store_kv(token_ids, kv_caches, store_status=None, session=None) -> int:
    return _get().store_kv(token_ids, kv_caches, store_status, session)


def should_retrieve(token_ids: Sequence[int], session: str | None = None) -> RetrieveStatus:
    return _get().should_retrieve(token_ids, session)


def retrieve_kv(token_ids, retrieve_status=None, session=None, device=None) -> RetrieveResult:
    return _get().retrieve_kv(token_ids, retrieve_status, session, device)

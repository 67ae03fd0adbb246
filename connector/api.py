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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .cachedir import CacheDir, NotMounted
from .chunkfile import DTYPES, ChunkError, chunk_metadata
from .counters import Counters
from .keys import KeySpace, chain_root, derived_session, token_chain, valid_session
from .settings import as_flag, as_mode


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

    # -- names -------------------------------------------------------------------

    def _session(self, links: list[bytes], session: str | None) -> str | None:
        if session is not None:
            if not valid_session(session):
                raise ValueError(f"bad session name {session!r}")
            return session
        return derived_session(self.config.model_id, links[0]) if links else None

    def cached_tokens(self, token_ids: Sequence[int], session: str | None = None) -> int:
        """How many leading tokens have chunk files (not yet validated)."""
        links = token_chain(list(token_ids), self.config.chunk_size)
        name = self._session(links, session)
        if name is None or not self.cache.live():
            return 0
        n = 0
        while n < len(links) and self.cache.exists(name, self.space.file_name(n, links[n])):
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
        (at least as many as the tokens stored). Returns tokens written."""
        if store_status is StoreStatus.SKIPPED:
            return 0
        cfg = self.config
        if len(kv_caches) != cfg.num_layers:
            raise ValueError(f"{len(kv_caches)} layers given, engine has {cfg.num_layers}")
        ids = [int(t) for t in token_ids]
        links = token_chain(ids, cfg.chunk_size)
        name = self._session(links, session)
        if name is None:
            return 0
        root = chain_root()
        written = 0
        for i, link in enumerate(links):
            file_name = self.space.file_name(i, link)
            if self.cache.exists(name, file_name):
                continue
            start = i * cfg.chunk_size
            tensors = {
                layer: kv.narrow(cfg.token_dim, start, cfg.chunk_size).detach().cpu().contiguous()
                for layer, kv in zip(self.layer_names, kv_caches, strict=True)
            }
            for t in tensors.values():
                if str(t.dtype).removeprefix("torch.") != cfg.dtype:
                    raise ValueError(f"tensor dtype {t.dtype}, engine dtype {cfg.dtype}")
            parent = links[i - 1] if i else root
            tokens = ids[start : start + cfg.chunk_size]
            meta = chunk_metadata(self.space, name, i, link, parent, tokens, self.layer_names)
            try:
                n = self.cache.write(name, file_name, tensors, meta)
            except NotMounted:
                break  # counted; nothing is written outside a live mount
            if n is not None:
                written += cfg.chunk_size
        return written

    def should_retrieve(self, token_ids: Sequence[int], session: str | None = None):
        if self.cached_tokens(token_ids, session) > 0:
            return RetrieveStatus.HIT
        return RetrieveStatus.MISS

    def retrieve_kv(
        self,
        token_ids: Sequence[int],
        retrieve_status: RetrieveStatus | None = None,
        session: str | None = None,
    ) -> RetrieveResult:
        """KV of the longest cached prefix of `token_ids`, in whole chunks.

        Chunks are read and validated in order; the first missing or invalid
        one ends the prefix (an invalid one is listed in `errors`)."""
        miss = RetrieveResult(RetrieveStatus.MISS, 0, [], [])
        if retrieve_status is RetrieveStatus.MISS:
            return miss
        cfg = self.config
        ids = [int(t) for t in token_ids]
        links = token_chain(ids, cfg.chunk_size)
        name = self._session(links, session)
        root = chain_root()
        if name is None or not self.cache.live():
            return miss
        per_layer: list[list[torch.Tensor]] = [[] for _ in self.layer_names]
        errors: list[str] = []
        shape = None
        for i, link in enumerate(links):
            try:
                with self.cache.open(name, self.space.file_name(i, link)) as f:
                    f.expect(self.space.header(link, links[i - 1] if i else root))
                    layers = [f.read_tensor(n, cfg.verify_checksum) for n in self.layer_names]
            except ChunkError as e:
                if e.reason != "missing":
                    errors.append(str(e))
                break
            except KeyError as e:
                errors.append(f"chunk {i}: no tensor {e}")
                break
            shapes = {tuple(t.shape) for t in layers}
            if len(shapes) != 1 or (shape is not None and shapes != {shape}):
                errors.append(f"chunk {i}: inconsistent shapes {sorted(shapes)}")
                break
            shape = next(iter(shapes))
            if shape[cfg.token_dim] != cfg.chunk_size:
                errors.append(f"chunk {i}: {shape[cfg.token_dim]} tokens, not {cfg.chunk_size}")
                break
            for acc, t in zip(per_layer, layers, strict=True):
                acc.append(t)
        n = len(per_layer[0]) if per_layer else 0
        if n == 0:
            miss.errors = errors
            return miss
        kv = [torch.cat(chunks, dim=cfg.token_dim) for chunks in per_layer]
        return RetrieveResult(RetrieveStatus.HIT, n * cfg.chunk_size, kv, errors)


_engine: KVEngine | None = None


def init_engine(config: Any = None, **overrides) -> KVEngine:
    """Create the process-wide engine (a dict, an object with attributes, or keywords)."""
    global _engine
    _engine = KVEngine(EngineConfig.from_any(config, **overrides))
    return _engine


def destroy_engine() -> None:
    global _engine
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


def retrieve_kv(token_ids, retrieve_status=None, session=None) -> RetrieveResult:
    return _get().retrieve_kv(token_ids, retrieve_status, session)

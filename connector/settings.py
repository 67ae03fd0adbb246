"""The connector's settings (`kv_connector_extra_config`) and the key spaces they imply."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .keys import KeySpace

DEFAULT_CHUNK_TOKENS = 64


@dataclass(frozen=True)
class Settings:
    mount: str = "/kvcache"
    chunk_size: int = 0  # tokens per chunk file; 0: 64, or one block if blocks are larger
    model_id: str | None = None  # overrides the model name in keys (same model, other path)
    verify_checksum: bool = True  # CRC-32 every layer on load
    layerwise_load: bool = True  # load in a background thread, layer by layer
    set_xattrs: bool = True  # label chunk files with user.* attributes for getfattr
    max_pending_save_bytes: int = 1 << 30  # beyond this, new saves are dropped, not waited for
    staging_bytes: int = 128 << 20  # warm host buffers kept for copying chunks out
    load_failure_policy: str = "recompute"  # what vLLM does after a failed load

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any]) -> Settings:
        known = {k: v for k, v in extra.items() if k in cls.__dataclass_fields__}
        s = cls(**known)
        if s.load_failure_policy not in ("recompute", "fail"):
            raise ValueError("load_failure_policy must be 'recompute' or 'fail'")
        return s


def chunk_tokens(settings: Settings, block_size: int) -> int:
    """Tokens per chunk: a whole number of vLLM blocks."""
    want = settings.chunk_size or DEFAULT_CHUNK_TOKENS
    if settings.chunk_size and settings.chunk_size % block_size:
        raise ValueError(f"chunk_size {settings.chunk_size} is not a multiple of {block_size}")
    return max(block_size, want // block_size * block_size)


def vllm_key_space(vllm_config, settings: Settings, tp_rank: int, pp_rank: int) -> KeySpace:
    """The key space of one rank, computed from the configuration alone, so the
    scheduler (which never sees the tensors) and the workers agree on names."""
    from vllm.platforms import current_platform

    mc = vllm_config.model_config
    pc = vllm_config.parallel_config
    cc = vllm_config.cache_config
    if cc.cache_dtype in (None, "auto"):
        dtype = str(mc.dtype).removeprefix("torch.")
    else:
        dtype = str(cc.cache_dtype)
    block_size = cc.block_size
    layout = (
        f"vllm:{current_platform.device_type}:BHNC:block{block_size}"
        f":kvheads{mc.get_num_kv_heads(pc)}:head{mc.get_head_size()}"
    )
    model = settings.model_id or mc.model
    extra = []
    if getattr(mc, "revision", None):
        extra.append(("revision", str(mc.revision)))
    if getattr(mc, "quantization", None):
        extra.append(("quantization", str(mc.quantization)))
    return KeySpace(
        model=model,
        dtype=dtype,
        layout=layout,
        chunk_size=chunk_tokens(settings, block_size),
        num_layers=mc.get_num_layers(pc),
        tp_rank=tp_rank,
        tp_size=pc.tensor_parallel_size,
        pp_rank=pp_rank,
        pp_size=pc.pipeline_parallel_size,
        extra=tuple(extra),
    )

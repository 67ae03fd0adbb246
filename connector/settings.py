"""The connector's settings (`kv_connector_extra_config`) and per-request options."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

DEFAULT_CHUNK_TOKENS = 64
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def as_flag(value: Any, name: str) -> bool:
    """A boolean from JSON, a form or an environment: the string "false" is
    false (Python's bool() says true for any non-empty string)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value != 0
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{name} must be true or false, not {value!r}")


def as_mode(value: Any, name: str) -> int:
    """Permission bits given as an int (416) or an octal string ("0640")."""
    try:
        mode = int(value, 8) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise ValueError(f'{name} must be permission bits like "0600", not {value!r}') from None
    if not 0 <= mode <= 0o777:
        raise ValueError(f'{name} must be permission bits like "0600", not {value!r}')
    return mode


@dataclass(frozen=True)
class Settings:
    mount: str = "/kvcache"
    chunk_size: int = 0  # tokens per chunk file; 0: 64, or one block if blocks are larger
    model_id: str | None = None  # overrides the model name in keys (same model, other path)
    verify_checksum: bool = True  # CRC-32 every layer on load
    layerwise_load: bool = True  # load in a background thread, layer by layer
    keep_open: bool = True  # keep chunk files open between loads (worker.OpenChunks)
    # Python's GIL switch interval (seconds) while a CPU load runs beside the
    # forward pass: vLLM's CPU kernels hold the GIL, and the loader, which needs
    # it between reads, otherwise waits up to 5 ms (Python's default) each
    # time. 0 leaves it alone. Restored when the load ends.
    load_switch_interval: float = 0.0005
    set_xattrs: bool = True  # label chunk files with user.* attributes for getfattr
    max_pending_save_bytes: int = 1 << 30  # beyond this, new saves are dropped, not waited for
    staging_bytes: int = 128 << 20  # warm host buffers kept for copying chunks out
    io_threads: int = 0  # parallel chunk reads on a GPU worker; 0: up to 8, by cores
    load_buffer_bytes: int = 256 << 20  # pinned host buffers that GPU loads read into
    load_failure_policy: str = "recompute"  # what vLLM does after a failed load
    # Refuse a mount path that is not a live kvfs mount: after the daemon dies
    # it is a bare directory on the root filesystem. Off only for benchmarks
    # and tests that use a plain directory on purpose.
    require_kvfs: bool = True
    # Chunk files hold token ids and KV that can be inverted to text: private
    # to the serving user unless an operator shares them.
    file_mode: int = 0o600
    dir_mode: int = 0o700

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any]) -> Settings:
        known = {}
        for f in fields(cls):
            if f.name not in extra:
                continue
            value = extra[f.name]
            if f.type == "bool":
                value = as_flag(value, f.name)
            elif f.name.endswith("_mode"):
                value = as_mode(value, f.name)
            elif f.type == "float":
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    raise ValueError(f"{f.name} must be a number, not {value!r}") from None
            known[f.name] = value
        s = cls(**known)
        if s.load_failure_policy not in ("recompute", "fail"):
            raise ValueError("load_failure_policy must be 'recompute' or 'fail'")
        if not 0 <= s.load_switch_interval <= 0.1:
            raise ValueError("load_switch_interval must be between 0 and 0.1 seconds")
        return s


def chunk_tokens(settings: Settings, block_size: int) -> int:
    """Tokens per chunk: a whole number of vLLM blocks."""
    want = settings.chunk_size or DEFAULT_CHUNK_TOKENS
    if settings.chunk_size and settings.chunk_size % block_size:
        raise ValueError(f"chunk_size {settings.chunk_size} is not a multiple of {block_size}")
    return max(block_size, want // block_size * block_size)


@dataclass(frozen=True)
class RequestOptions:
    """A request's `kv_transfer_params` as the connector reads them."""

    session: str | None = None
    load: bool = True
    store: bool = True

    @classmethod
    def parse(cls, params: dict | None) -> tuple[RequestOptions, list[str]]:
        """The options, and what was wrong with them: a request's bad value
        falls back to the default, never an error inside the engine."""
        params = params or {}
        problems = []
        flags = {}
        for key, name in (("kvfs_load", "load"), ("kvfs_store", "store")):
            try:
                flags[name] = as_flag(params.get(key, True), key)
            except ValueError as e:
                problems.append(str(e))
        return cls(session=params.get("kvfs_session"), **flags), problems

"""kvfs_connector: KV caches as safetensors chunk files on a kvfs mount.

`KVFSConnector` is the vLLM V1 connector (imported lazily, so the
engine-neutral API below works without vLLM installed).
"""

from .api import (
    KVEngine,
    RetrieveResult,
    RetrieveStatus,
    StoreStatus,
    destroy_engine,
    init_engine,
    retrieve_kv,
    should_retrieve,
    should_store,
    store_kv,
)

__all__ = [
    "KVEngine",
    "KVFSConnector",
    "RetrieveResult",
    "RetrieveStatus",
    "StoreStatus",
    "destroy_engine",
    "init_engine",
    "retrieve_kv",
    "should_retrieve",
    "should_store",
    "store_kv",
]


def __getattr__(name: str):
    if name == "KVFSConnector":
        from .vllm_connector import KVFSConnector

        return KVFSConnector
    raise AttributeError(name)

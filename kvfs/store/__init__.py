"""Backing stores and their registry.

Built-in stores are `local`, `memory` and `crail`; others register under the
`kvfs.stores` entry-point group (name = "module:Class"), so a third-party
package can add `s3`, `nfs` or anything else without touching kvfs.
"""

from importlib.metadata import entry_points

from ..errors import KvfsError
from .base import ObjectStat, Store, StoreReader, StoreWriter, Usage

__all__ = ["ObjectStat", "Store", "StoreReader", "StoreWriter", "Usage", "open_store"]


def _builtin(kind: str):
    if kind == "local":
        from .local import LocalStore

        return LocalStore
    if kind == "memory":
        from .memory import MemoryStore

        return MemoryStore
    if kind == "crail":
        from .crail import CrailStore

        return CrailStore
    return None


def store_class(kind: str):
    for ep in entry_points(group="kvfs.stores"):
        if ep.name == kind:
            return ep.load()
    cls = _builtin(kind)
    if cls is None:
        names = sorted({ep.name for ep in entry_points(group="kvfs.stores")} | {"local"})
        raise KvfsError(f"unknown store type {kind!r} (known: {', '.join(names)})")
    return cls


def open_store(spec: str, **options) -> Store:
    """Open a store from a spec "KIND:ARG", e.g. "local:/var/lib/kvfs/store"."""
    kind, _, arg = spec.partition(":")
    return store_class(kind)(arg, **options)

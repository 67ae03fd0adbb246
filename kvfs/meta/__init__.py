"""Metadata: the `Meta` interface, etcd's implementation and an in-memory fake.

`base.Meta` is what the namespace asks for; `etcd.EtcdMeta` is the source of
truth in a mount; `memory.MemoryMeta` is held to the same contract tests.
"""

from .base import Meta
from .etcd import EtcdMeta, WatchCompacted, parse_endpoints
from .memory import MemoryMeta

__all__ = ["EtcdMeta", "Meta", "MemoryMeta", "WatchCompacted", "parse_endpoints"]

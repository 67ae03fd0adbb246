"""The `memory` store: objects in a dict. For fast tests; held to the same contract."""

import threading
import time
from collections.abc import Iterator

from ..errors import NotFound
from .base import ObjectStat, Store, StoreWriter, Usage


class MemoryWriter(StoreWriter):
    def __init__(self, store: "MemoryStore", key: str):
        self._store = store
        self._key = key
        self._buf = bytearray()

    def pwrite(self, data, offset: int) -> int:
        end = offset + len(data)
        if end > len(self._buf):
            self._buf.extend(b"\0" * (end - len(self._buf)))
        self._buf[offset:end] = data
        return len(data)

    def pread(self, size: int, offset: int) -> bytes:
        return bytes(self._buf[offset : offset + size])

    def truncate(self, size: int) -> None:
        if size < len(self._buf):
            del self._buf[size:]
        else:
            self._buf.extend(b"\0" * (size - len(self._buf)))

    def size(self) -> int:
        return len(self._buf)

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        # RAM has nothing to reserve; mode 0 grows the file
        if mode == 0 and offset + length > len(self._buf):
            self._buf.extend(b"\0" * (offset + length - len(self._buf)))

    def commit(self) -> None:
        with self._store._lock:
            self._store._objects[self._key] = (bytes(self._buf), time.time())
        self._buf = bytearray()

    def abort(self) -> None:
        self._buf = bytearray()


class MemoryStore(Store):
    rereads_cheaply = True

    def __init__(self, root: str = "", capacity: int = 1 << 30, **_):
        self.url = "memory:"
        self._capacity = capacity
        self._objects: dict[str, tuple[bytes, float]] = {}
        self._lock = threading.Lock()

    def _obj(self, key: str) -> bytes:
        try:
            return self._objects[key][0]
        except KeyError:
            raise NotFound(key) from None

    def put(self, key: str, data: bytes) -> None:
        with self._lock:
            self._objects[key] = (bytes(data), time.time())

    def get(self, key: str, offset: int = 0, size: int = -1) -> bytes:
        data = self._obj(key)
        return data[offset:] if size < 0 else data[offset : offset + size]

    def exists(self, key: str) -> bool:
        return key in self._objects

    def delete(self, key: str) -> None:
        with self._lock:
            self._objects.pop(key, None)

    def list(self, prefix: str = "") -> Iterator[str]:
        with self._lock:
            keys = [k for k in self._objects if k.startswith(prefix)]
        return iter(keys)

    def stat(self, key: str) -> ObjectStat:
        try:
            data, mtime = self._objects[key]
        except KeyError:
            raise NotFound(key) from None
        return ObjectStat(len(data), mtime)

    def writer(self, key: str) -> StoreWriter:
        return MemoryWriter(self, key)

    def rewrite_header(self, key: str, data: bytes) -> None:
        with self._lock:
            obj, mtime = self._objects[key]
            self._objects[key] = (bytes(data) + obj[len(data) :], mtime)

    def usage(self) -> Usage:
        used = sum(len(d) for d, _ in self._objects.values())
        return Usage(total=self._capacity, free=max(0, self._capacity - used))

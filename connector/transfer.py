"""What moves KV between tensors and files fast: reusable host buffers, an I/O
thread pool and a CUDA side stream.

On a GPU the bytes go file -> pinned host buffer -> GPU (and back) with no
other copy: reads land in the pinned buffer that the GPU copy reads from, and
the GPU copies are asynchronous on a side stream, so the next read (or write)
overlaps them. One thread reading a file tops out near 3.5 GB/s (a page-cache
copy per byte), so large reads and writes are spread over a thread pool;
`os.preadv`, `os.writev` and `zlib.crc32` release the GIL. On the CPU the same
code runs with ordinary buffers and the "GPU copy" is a memory copy.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch


def default_io_threads() -> int:
    # Eight readers reach 12-16 GB/s from tmpfs on the H200 machine (16 cores);
    # more add little and take cores from the engine.
    return max(2, min(8, os.cpu_count() or 2))


class HostBuffers:
    """Host buffers of whole chunks, kept across requests.

    Pinning memory (cudaHostAlloc) costs about as much as copying it several
    times over, and fresh pageable memory costs a page fault per 4 KiB on first
    touch, so buffers are made once and reused. At most `max_bytes` exist;
    `get` waits for one to come back when they are all in use (which is the
    back-pressure that keeps reads or GPU copies from running far ahead), but
    always lets one buffer exist, whatever its size. A buffer may be returned
    with a CUDA event: it is handed out again only once the copy that still
    reads or writes it has finished.
    """

    def __init__(self, max_bytes: int, pin: bool):
        self.max_bytes = max_bytes
        self.pin = pin
        self._cond = threading.Condition()
        self._free: dict[int, list[tuple[torch.Tensor, object]]] = {}
        self._total = 0  # bytes of all buffers, in use or idle
        self._in_use = 0  # buffers handed out

    def get(self, nbytes: int) -> torch.Tensor:
        with self._cond:
            while True:
                free = self._free.get(nbytes)
                if free:
                    buf, event = free.pop()
                    break
                if self._total + nbytes > self.max_bytes:
                    self._evict(nbytes)
                if self._total + nbytes <= self.max_bytes or self._in_use == 0:
                    buf, event = None, None
                    self._total += nbytes
                    break
                self._cond.wait()
            self._in_use += 1
        if buf is None:
            try:
                buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
            except BaseException:
                with self._cond:
                    self._total -= nbytes
                    self._in_use -= 1
                    self._cond.notify_all()
                raise
        if event is not None:
            event.synchronize()  # releases the GIL while the GPU finishes with it
        return buf

    def put(self, buf: torch.Tensor, event=None) -> None:
        with self._cond:
            self._free.setdefault(buf.numel(), []).append((buf, event))
            self._in_use -= 1
            self._cond.notify_all()

    def _evict(self, nbytes: int) -> None:
        """Drop idle buffers of other sizes (a different model or chunk size)
        to make room; caller holds the lock."""
        for size in list(self._free):
            if size == nbytes:
                continue
            while self._free[size] and self._total + nbytes > self.max_bytes:
                buf, event = self._free[size].pop()
                if event is not None:
                    event.synchronize()
                self._total -= size
                del buf
            if not self._free[size]:
                del self._free[size]


class Mover:
    """A thread pool for file I/O, host buffers and, on a GPU, a side stream."""

    def __init__(self, io_threads: int = 0, host_buffer_bytes: int = 512 << 20):
        self.io_threads = io_threads or default_io_threads()
        self.host_buffer_bytes = host_buffer_bytes
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._closer: ThreadPoolExecutor | None = None
        self._buffers: dict[bool, HostBuffers] = {}
        self._streams: dict[int, torch.cuda.Stream] = {}

    @property
    def pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.io_threads, thread_name_prefix="kvfs-io")
            return self._pool

    @property
    def closer(self) -> ThreadPoolExecutor:
        """Threads that close written chunk files: on kvfs a close waits for
        the commit, which need not hold up the next chunk's I/O."""
        with self._lock:
            if self._closer is None:
                self._closer = ThreadPoolExecutor(self.io_threads, thread_name_prefix="kvfs-close")
            return self._closer

    def buffers(self, device: torch.device) -> HostBuffers:
        """Pinned buffers for a GPU (so copies are asynchronous DMA), plain ones
        for the CPU (pinning would only cost)."""
        pin = device.type == "cuda"
        with self._lock:
            if pin not in self._buffers:
                self._buffers[pin] = HostBuffers(self.host_buffer_bytes, pin)
            return self._buffers[pin]

    def stream(self, device: torch.device) -> torch.cuda.Stream:
        """One side stream per GPU: host<->GPU copies queue there, behind or
        beside the engine's own work on its current stream."""
        idx = device.index if device.index is not None else torch.cuda.current_device()
        with self._lock:
            if idx not in self._streams:
                self._streams[idx] = torch.cuda.Stream(device=idx)
            return self._streams[idx]

    def close(self) -> None:
        with self._lock:
            pools = [self._pool, self._closer]
            self._pool = self._closer = None
        for pool in pools:
            if pool is not None:
                pool.shutdown(wait=True)

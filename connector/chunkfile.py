"""One chunk of KV as a safetensors file: written in one pass, read layer by layer, validated.

The file is plain safetensors (any safetensors reader opens it): one tensor per
layer, and a `__metadata__` header that makes it self-describing: format,
model, dtype, layout, rank, the chunk's token ids and chain link, and a
CRC-32C of every tensor's bytes (`crc32.<layer>`; older files: zlib's CRC-32). We write and read the format ourselves rather than
through `safetensors.torch` so that bytes move straight between the paged KV
cache and the file (no intermediate copies) and so one layer can be read and
checked before the next.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import time
import zlib
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch

from .keys import KeySpace, token_bytes

try:  # CRC-32C in hardware: 12 GB/s a core against zlib's 3, which capped GPU loads
    from crc32c import crc32c as _crc32c
except ImportError:  # pragma: no cover - a dependency of the package
    _crc32c = None

DTYPE_NAMES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
DTYPES = {v: k for k, v in DTYPE_NAMES.items()}
MAX_HEADER = 16 << 20
# Tensor data starts on a 4 KiB boundary (the JSON header is padded with
# spaces, which safetensors allows), so a read of a layer is page-aligned in
# the file and lands page-aligned in a (pinned) host buffer; the tensors follow
# each other with no gaps, as safetensors requires.
ALIGN = 4096


class RawTensor(NamedTuple):
    """A tensor to write given as its bytes: `write_chunk` takes these or
    torch tensors. The GPU path's I/O threads use them: every torch call lets
    go of the GIL and waits to take it back, and with eight threads a few
    hundred such calls a chunk cost ~10 ms each (docs/BENCHMARKS.md)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    data: memoryview  # C order, contiguous


class ChunkError(Exception):
    """A chunk file that cannot be used: missing, truncated, foreign or corrupt."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def checksum(data: Iterable) -> str:
    """The checksum a new file carries for one tensor's bytes (given in
    pieces): `crc32c:<hex>`; files written before carry zlib's CRC-32 as bare
    hex, and `ChunkFile.check` accepts both."""
    if _crc32c is None:
        crc = 0
        for d in data:
            crc = zlib.crc32(d, crc)
        return f"{crc:08x}"
    crc = 0
    for d in data:
        crc = _crc32c(d, crc)
    return f"crc32c:{crc:08x}"


def _verify(data: list, want: str | None) -> bool:
    if want is None:
        return False
    if want.startswith("crc32c:"):
        if _crc32c is None:
            return False
        crc = 0
        for d in data:
            crc = _crc32c(d, crc)
        return want == f"crc32c:{crc:08x}"
    crc = 0
    for d in data:
        crc = zlib.crc32(d, crc)
    return want == f"{crc:08x}"


def tensor_bytes(t: torch.Tensor | RawTensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor."""
    if isinstance(t, RawTensor):
        return t.data
    if not t.is_contiguous():
        raise ValueError("tensor must be contiguous")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def encode_tokens(token_ids) -> str:
    return base64.b64encode(token_bytes(token_ids)).decode()


def decode_tokens(s: str) -> list[int]:
    raw = base64.b64decode(s)
    return list(struct.unpack(f"<{len(raw) // 8}q", raw))


def chunk_metadata(
    space: KeySpace,
    session: str,
    index: int,
    link: bytes,
    parent: bytes,
    tokens: list[int],
    layers: list[str],
) -> dict[str, str]:
    """The whole header of a new chunk file: what a load expects (the key
    space's fields) plus what makes the file self-describing for a person and
    for `kvfs recover`."""
    start = index * space.chunk_size
    meta = space.header(link, parent)
    meta.update(
        session=session,
        chunk_index=str(index),
        start=str(start),
        end=str(start + len(tokens)),
        layers=",".join(layers),
        tokens=encode_tokens(tokens),
    )
    return meta


def build_header(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], align: int = ALIGN
) -> bytes:
    """The safetensors prefix: 8-byte little-endian length, then JSON, space-padded
    so that the data starts at a multiple of `align` (a multiple of 8)."""
    head: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, t in tensors.items():
        n = t.data.nbytes if isinstance(t, RawTensor) else t.numel() * t.element_size()
        head[name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    blob = json.dumps(head, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % align)
    return struct.pack("<Q", len(blob)) + blob


def write_chunk(
    path: str,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    mode: int = 0o600,
    exclusive: bool = False,
) -> int:
    """Write `tensors` (contiguous, on the CPU) and `metadata` to `path`.

    Adds `crc32.<name>` (a CRC-32C, `crc32c:<hex>`) for every tensor. The file is written with one open and
    one close: on kvfs it appears whole at close, never half-written. A new
    file gets `mode`: private by default, as it holds the prompt.
    Returns the number of bytes written.
    """
    total, fd = write_chunk_open(path, tensors, metadata, mode, exclusive)
    os.close(fd)
    return total


def write_chunk_open(
    path: str,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    mode: int = 0o600,
    exclusive: bool = False,
) -> tuple[int, int]:
    """`write_chunk` up to its close: (bytes written, the still open descriptor).

    On kvfs the close is the commit and takes a few milliseconds; a caller
    with more to write closes the descriptor elsewhere meanwhile. Until it is
    closed the file is not there for readers. With `exclusive`, a file that
    exists raises FileExistsError before any byte is summed or written."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
    flags |= os.O_EXCL if exclusive else os.O_TRUNC
    fd = os.open(path, flags, mode)
    try:
        if mode & 0o077:  # shared on purpose: the umask must not undo it
            os.fchmod(fd, mode)
        meta = dict(metadata)
        views = []
        for name, t in tensors.items():
            mv = tensor_bytes(t)
            meta[f"crc32.{name}"] = checksum([mv])
            views.append(mv)
        header = build_header(tensors, meta)
        total = len(header) + sum(v.nbytes for v in views)
        done = os.writev(fd, [header, *views])
        if done != total:  # short write: finish with plain writes
            _write_rest(fd, [header, *views], done)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    return total, fd


def _write_rest(fd: int, bufs: list, done: int) -> None:
    for b in bufs:
        b = memoryview(b).cast("B")
        if done >= b.nbytes:
            done -= b.nbytes
            continue
        b = b[done:]
        done = 0
        while b.nbytes:
            b = b[os.write(fd, b) :]


class ChunkFile:
    """An open chunk file whose header has been parsed and size checked."""

    def __init__(self, path: str, willneed: bool = True):
        self.path = path
        self.opened = time.monotonic()
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ChunkError(path, "missing") from None
        except OSError as e:
            raise ChunkError(path, f"open failed: {e.strerror}") from None
        try:
            self._parse()
        except OSError as e:  # EIO from a store that caught corruption, say
            os.close(self.fd)
            raise ChunkError(path, f"read failed: {e.strerror}") from None
        except BaseException:
            os.close(self.fd)
            raise
        if not willneed:
            return
        try:
            # Ask for the whole file now: through FUSE the kernel then fetches
            # it in large read-ahead requests while we consume it layer by
            # layer (cold loads of 75 MB through kvfs took 0.25 s instead of 0.4 s).
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass

    def _parse(self) -> None:
        st = os.fstat(self.fd)
        # which file this is: a name later found to lead elsewhere (rewritten,
        # removed) must not be served from this descriptor (see worker.OpenChunks)
        self.ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        self.size = size = st.st_size
        if size < 8:
            raise ChunkError(self.path, "truncated header")
        (n,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
        if n > MAX_HEADER or 8 + n > size:
            raise ChunkError(self.path, "truncated header")
        raw = os.pread(self.fd, n, 8)
        if len(raw) != n:
            raise ChunkError(self.path, "truncated header")
        try:
            head = json.loads(raw)
            self.metadata: dict[str, str] = head.pop("__metadata__", None) or {}
            self.tensors: dict[str, tuple[str, list[int], int, int]] = {
                name: (d["dtype"], list(d["shape"]), *d["data_offsets"]) for name, d in head.items()
            }
        except (ValueError, KeyError, TypeError):
            raise ChunkError(self.path, "unreadable header") from None
        self.data_start = 8 + n
        end = max((t[3] for t in self.tensors.values()), default=0)
        if self.data_start + end > size:
            raise ChunkError(self.path, "truncated data")
        if self.data_start + end < size:
            raise ChunkError(self.path, "trailing bytes")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> ChunkFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def expect(self, expected: Mapping[str, str]) -> None:
        """Fail unless every expected metadata field has the expected value."""
        for k, v in expected.items():
            got = self.metadata.get(k)
            if got != v:
                raise ChunkError(self.path, f"{k} is {got!r}, expected {v!r}")

    def expect_tensor(self, name: str, dtype: torch.dtype, shape: Iterable[int]) -> None:
        t = self.tensors.get(name)
        if t is None:
            raise ChunkError(self.path, f"no tensor {name}")
        want = (DTYPE_NAMES.get(dtype), list(shape))
        if (t[0], t[1]) != want:
            raise ChunkError(self.path, f"{name} is {t[0]}{t[1]}, expected {want[0]}{want[1]}")
        if t[3] - t[2] != _numel(t[1]) * dtype.itemsize:
            raise ChunkError(self.path, f"{name} has a wrong byte length")

    def read_into(self, name: str, dests: list[memoryview], verify: bool = True) -> None:
        """Read tensor `name` into `dests` (writable byte views, in order, whose
        sizes add up to the tensor's) and check its CRC-32."""
        _, _, begin, end = self.tensors[name]
        want = end - begin
        if sum(d.nbytes for d in dests) != want:
            raise ValueError("destination size does not match the tensor")
        got = 0
        pos = self.data_start + begin
        todo = list(dests)
        while todo:
            try:
                n = os.preadv(self.fd, todo, pos)
            except OSError as e:  # EIO from a store that caught corruption, say
                raise ChunkError(self.path, f"read failed: {e.strerror}") from None
            if n <= 0:
                raise ChunkError(self.path, "truncated data")
            got += n
            pos += n
            todo = _advance(todo, n)
        if verify:
            self.check(name, dests)

    def check(self, name: str, data: list[memoryview]) -> None:
        """Fail unless `data` (the tensor's bytes, in pieces) matches its checksum."""
        if not _verify(data, self.metadata.get(f"crc32.{name}")):
            raise ChunkError(self.path, f"checksum mismatch in {name}")

    def read_tensor(self, name: str, verify: bool = True) -> torch.Tensor:
        dtype_name, shape, _, _ = self.tensors[name]
        t = torch.empty(shape, dtype=DTYPES[dtype_name])
        self.read_into(name, [tensor_bytes(t)], verify)
        return t


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    out = []
    for v in views:
        if n >= v.nbytes:
            n -= v.nbytes
            continue
        out.append(v[n:] if n else v)
        n = 0
    return out

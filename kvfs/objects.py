"""The layout of stored objects: the file's bytes, and a header describing them.

A version of a file is stored as two objects:
    xx/VERSION.kvd   the file's bytes, exactly (offset 0 is the file's offset
                     0, so the kernel can read and write it directly: FUSE
                     passthrough)
    xx/VERSION.kvh   its header: a safetensors header whose `__metadata__`
                     names the session, layer, times, checksum and user xattrs,
                     so `kvfs recover` can rebuild etcd from the store alone
The header goes in first and out first: a data object without its header is
never restored (a deleted file stays deleted).

Stores written by kvfs before this layout hold one object per version,
xx/VERSION.kv: the header padded to HEADER_SIZE, then the bytes. Those are
still read (through the daemon, at offset HEADER_SIZE) and recovered.
"""

import base64
import json
import struct
import uuid
from concurrent.futures import ThreadPoolExecutor

import crc32c

from .errors import Corrupt

HEADER_SIZE = 4096
FORMAT = "kvfs/1"


DATA_SUFFIX = ".kvd"
HEADER_SUFFIX = ".kvh"
LEGACY_SUFFIX = ".kv"  # header and bytes in one object (kvfs before the split)


def new_object_key() -> tuple[str, str]:
    """A fresh (version, data object key): every committed version is its own object."""
    version = uuid.uuid4().hex
    return version, f"{version[:2]}/{version}{DATA_SUFFIX}"


def is_legacy(key: str) -> bool:
    return key.endswith(LEGACY_SUFFIX)


def header_key(key: str) -> str:
    """The key of data object KEY's header (KEY itself for a legacy object)."""
    if key.endswith(DATA_SUFFIX):
        return key[: -len(DATA_SUFFIX)] + HEADER_SUFFIX
    return key


def data_key(hkey: str) -> str:
    return hkey[: -len(HEADER_SUFFIX)] + DATA_SUFFIX


def data_offset(key: str) -> int:
    """Where the file's bytes start inside data object KEY."""
    return HEADER_SIZE if is_legacy(key) else 0


def encode_xattrs(xattrs: dict[str, bytes]) -> dict[str, str]:
    return {k: base64.b64encode(v).decode() for k, v in xattrs.items()}


def decode_xattrs(xattrs: dict[str, str]) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in xattrs.items()}


def encode_header(meta: dict, size: int, header_size: int | None = None) -> bytes:
    """Header bytes for an object of SIZE data bytes.

    With HEADER_SIZE (legacy objects, header inline) the header is padded to
    it and ValueError says it does not fit; without, it is as long as it needs.
    """
    md = {"format": FORMAT}
    for k, v in meta.items():
        if isinstance(v, str):
            md[k] = v
        elif type(v) is int:  # what json.dumps would give, at a tenth of the cost
            md[k] = str(v)
        else:
            md[k] = json.dumps(v, separators=(",", ":"), ensure_ascii=False)
    doc = {
        "__metadata__": md,
        "data": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]},
    }
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    if header_size is None:
        return struct.pack("<Q", len(body)) + body
    room = header_size - 8
    if len(body) > room:
        raise ValueError(f"object header needs {len(body)} bytes, {room} reserved")
    return struct.pack("<Q", room) + body + b" " * (room - len(body))


def decode_header(head: bytes) -> tuple[dict, int, int]:
    """Parse the first bytes of an object: (meta, data offset, data size)."""
    if len(head) < 8:
        raise Corrupt("object shorter than its header")
    (n,) = struct.unpack_from("<Q", head)
    if n > len(head) - 8 or n > 1 << 20:
        raise Corrupt("object header truncated or oversized")
    try:
        doc = json.loads(head[8 : 8 + n])
        md = doc["__metadata__"]
        start, end = doc["data"]["data_offsets"]
    except (ValueError, KeyError, TypeError) as exc:
        raise Corrupt(f"object header unreadable: {exc}") from None
    if md.get("format") != FORMAT:
        raise Corrupt(f"not a kvfs object (format {md.get('format')!r})")
    meta = {}
    for k, v in md.items():
        if k == "format":
            continue
        try:
            meta[k] = json.loads(v) if k != "session" and k != "name" else v
        except ValueError:
            meta[k] = v
    return meta, 8 + n + start, end - start


BLOCK = 1 << 20  # bytes covered by one stored CRC32C


def block_checksum(sums: list[int]) -> str:
    """The file's checksum: CRC32C over its per-block CRC32Cs."""
    return f"crc32c:{crc32c.crc32c(struct.pack(f'<{len(sums)}I', *sums)):08x}"


def encode_blocks(sums: list[int]) -> str:
    return base64.b64encode(struct.pack(f"<{len(sums)}I", *sums)).decode()


def decode_blocks(text: str) -> list[int]:
    raw = base64.b64decode(text)
    return list(struct.unpack(f"<{len(raw) // 4}I", raw))


def check_blocks(buf, offset: int, sums: list[int]) -> None:
    """Raise Corrupt unless BUF (starting at block-aligned OFFSET) matches SUMS."""
    mv = memoryview(buf)
    first = offset // BLOCK
    for i in range(first, first + (len(mv) + BLOCK - 1) // BLOCK):
        lo = (i - first) * BLOCK
        if i >= len(sums) or crc32c.crc32c(mv[lo : lo + BLOCK]) != sums[i]:
            raise Corrupt(f"checksum mismatch in block {i} (bytes {i * BLOCK}...)")


class BlockSums:
    """CRC32C of every BLOCK-sized block, kept while bytes arrive in order.

    Out-of-order writes make it give up; the commit then sums the staged
    bytes in one pass instead.
    """

    def __init__(self):
        self.sums: list[int] = []
        self.crc = 0  # of the block in progress
        self.upto = 0
        self.valid = True

    def update(self, data, offset: int) -> None:
        if not self.valid:
            return
        if offset != self.upto:
            self.valid = False
            return
        mv = memoryview(data)
        while len(mv):
            room = BLOCK - self.upto % BLOCK
            piece = mv[:room]
            self.crc = crc32c.crc32c(piece, self.crc)
            self.upto += len(piece)
            mv = mv[len(piece) :]
            if self.upto % BLOCK == 0:
                self.sums.append(self.crc)
                self.crc = 0

    def truncated(self, size: int) -> None:
        if size != self.upto:
            self.valid = False

    def result(self, size: int) -> list[int] | None:
        if not self.valid or self.upto != size:
            return None
        return self.sums + ([self.crc] if size % BLOCK else [])


_ZERO_CRC: dict[int, int] = {}


def _zero_crc(n: int) -> int:
    if n not in _ZERO_CRC:
        _ZERO_CRC[n] = crc32c.crc32c(bytes(n))
    return _ZERO_CRC[n]


def sums_of(read, size: int, data_ranges=None, workers: int = 1) -> list[int]:
    """Block CRCs of SIZE bytes read through READ(size, offset).

    DATA_RANGES(size), when given, lists the (start, end) extents that hold
    data; blocks wholly in a hole are zeros and are not read, so a sparse
    file costs what it stores. WORKERS threads share the blocks (CRC32C and
    pread release the GIL): a commit's checksum pass on a large file.
    """
    extents = list(data_ranges(size)) if data_ranges is not None else None
    nblocks = (size + BLOCK - 1) // BLOCK
    out = [0] * nblocks

    def span(first: int, last: int) -> None:
        i = 0
        for b in range(first, last):
            off = b * BLOCK
            n = min(BLOCK, size - off)
            if extents is not None:
                while i < len(extents) and extents[i][1] <= off:
                    i += 1
                if i == len(extents) or extents[i][0] >= off + n:
                    out[b] = _zero_crc(n)
                    continue
            chunk = read(n, off)
            if len(chunk) < n:  # a sparse tail reads short: zeros
                chunk = bytes(chunk) + bytes(n - len(chunk))
            out[b] = crc32c.crc32c(chunk)

    workers = max(1, min(workers, nblocks // 8))  # small files: not worth a thread
    if workers == 1:
        span(0, nblocks)
        return out
    step = (nblocks + workers - 1) // workers
    with ThreadPoolExecutor(workers) as pool:
        for f in [pool.submit(span, b, min(b + step, nblocks)) for b in range(0, nblocks, step)]:
            f.result()
    return out

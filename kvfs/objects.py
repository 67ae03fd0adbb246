"""The layout of a stored object: a valid safetensors file describing itself.

An object is one uint8 tensor named "data" holding the file's bytes, and a
safetensors header whose `__metadata__` names the session, layer, times,
checksum and user xattrs. The header is padded with spaces to HEADER_SIZE so
the bytes start page-aligned, and so `kvfs recover` can rebuild etcd from the
store alone by reading the first page of every object.
"""

import base64
import json
import struct
import uuid

import crc32c

from .errors import Corrupt

HEADER_SIZE = 4096
FORMAT = "kvfs/1"


def new_object_key() -> tuple[str, str]:
    """A fresh (version, store key): every committed version is its own object."""
    version = uuid.uuid4().hex
    return version, f"{version[:2]}/{version}.kv"


def encode_xattrs(xattrs: dict[str, bytes]) -> dict[str, str]:
    return {k: base64.b64encode(v).decode() for k, v in xattrs.items()}


def decode_xattrs(xattrs: dict[str, str]) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in xattrs.items()}


def encode_header(meta: dict, size: int, header_size: int = HEADER_SIZE) -> bytes:
    """Header bytes for an object of SIZE data bytes; raises ValueError when too big."""
    md = {"format": FORMAT}
    for k, v in meta.items():
        md[k] = (
            v if isinstance(v, str) else json.dumps(v, separators=(",", ":"), ensure_ascii=False)
        )
    doc = {
        "__metadata__": md,
        "data": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]},
    }
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
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


def sums_of(read, size: int) -> list[int]:
    """Block CRCs of SIZE bytes read through READ(size, offset)."""
    out = []
    off = 0
    while off < size:
        n = min(BLOCK, size - off)
        chunk = read(n, off)
        if len(chunk) < n:  # a sparse tail reads short: zeros
            chunk = bytes(chunk) + bytes(n - len(chunk))
        out.append(crc32c.crc32c(chunk))
        off += n
    return out

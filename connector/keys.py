"""Cache keys: chained chunk hashes, the key space of a model and rank, file and session names.

A chunk's file name is derived from two hashes. The *token chain* hashes the
prompt chunk by chunk (each link covers the previous link and this chunk's
token ids), so a link identifies the whole prefix up to the chunk's end. The
*key space* hashes everything that decides the bytes of a KV tensor besides the
tokens: model identity, dtype, KV layout and shape, and the parallel rank. The
file key is the hash of both, so two models, two dtypes or two ranks never
share a file, while two prompts with a common prefix share its chunks.
"""

from __future__ import annotations

import hashlib
import re
from array import array
from dataclasses import dataclass, field

from kvfs.errors import InvalidName
from kvfs.names import check_name

# Bumped when the file format or the key derivation changes, so old files miss.
FORMAT = "kvfs-kv/1"
KEY_HEX = 32  # 128 bits of the key in a file name: collisions are not a concern.


def _h(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.digest()


def token_bytes(token_ids) -> bytes:
    """Token ids as little-endian int64 bytes (the hashed and stored form)."""
    a = array("q", (int(t) for t in token_ids))
    if a.itemsize != 8:  # pragma: no cover - every platform we run on
        raise RuntimeError("int64 array expected")
    return a.tobytes()


def chain_root(extra: list[str] | None = None) -> bytes:
    """First link of the token chain; `extra` mixes in what else shapes the KV
    of the same tokens (a LoRA adapter, multimodal inputs, a cache salt)."""
    return _h(FORMAT.encode(), "\0".join(extra or []).encode())


def chain(parent: bytes, chunk_tokens) -> bytes:
    """The link after `parent` for one chunk of token ids."""
    return _h(parent, token_bytes(chunk_tokens))


def token_chain(token_ids, chunk_size: int, extra: list[str] | None = None) -> list[bytes]:
    """Links for every whole chunk of `token_ids` (a partial tail has none)."""
    links = []
    parent = chain_root(extra)
    for start in range(0, len(token_ids) - chunk_size + 1, chunk_size):
        parent = chain(parent, token_ids[start : start + chunk_size])
        links.append(parent)
    return links


@dataclass(frozen=True)
class KeySpace:
    """Everything besides the tokens that decides the bytes of a stored chunk."""

    model: str  # model identity: a hub name, a path, or an operator-given id
    dtype: str  # torch dtype name of the stored KV, e.g. "bfloat16"
    layout: str  # how a layer's tensor is laid out, e.g. "vllm:cpu:BHNC:32x2x32x64"
    chunk_size: int  # tokens per chunk
    num_layers: int  # layers held by this rank
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    extra: tuple[tuple[str, str], ...] = field(default=())

    def digest(self) -> bytes:
        parts = [
            FORMAT,
            self.model,
            self.dtype,
            self.layout,
            str(self.chunk_size),
            f"layers{self.num_layers}",
            f"tp{self.tp_rank}/{self.tp_size}",
            f"pp{self.pp_rank}/{self.pp_size}",
            *(f"{k}={v}" for k, v in self.extra),
        ]
        return _h(*(p.encode() for p in parts))

    def header(self, link: bytes, parent: bytes) -> dict[str, str]:
        """Header fields a chunk file must carry to be loaded as the chunk
        `link` (following `parent`) of this key space."""
        return {
            "format": FORMAT,
            "key": self.file_key(link),
            "model": self.model,
            "dtype": self.dtype,
            "layout": self.layout,
            "chunk_tokens": str(self.chunk_size),
            "tp_rank": str(self.tp_rank),
            "tp_size": str(self.tp_size),
            "pp_rank": str(self.pp_rank),
            "pp_size": str(self.pp_size),
            "link": link.hex(),
            "parent": parent.hex(),
        }

    def index_session(self) -> str:
        """The index directory shared by every session of this configuration:
        `<model>-index-<hash>`. The hash covers what the key space does except
        the rank and its layers, so all ranks of one deployment (whose files
        differ by rank tag and key) use one index, and another model, dtype,
        layout, chunk size or parallel layout another."""
        parts = [
            FORMAT,
            self.model,
            self.dtype,
            self.layout,
            str(self.chunk_size),
            f"tp{self.tp_size}",
            f"pp{self.pp_size}",
            *(f"{k}={v}" for k, v in self.extra if k != "layers"),
        ]
        digest = _h(*(p.encode() for p in parts)).hex()[:12]
        return f"{model_slug(self.model)}-index-{digest}"

    def rank_tag(self) -> str:
        tag = f"tp{self.tp_rank}"
        if self.pp_size > 1:
            tag += f"pp{self.pp_rank}"
        return tag

    def file_key(self, link: bytes) -> str:
        return _h(self.digest(), link).hex()[:KEY_HEX]

    def file_name(self, index: int, link: bytes, num_tokens: int = 0) -> str:
        """`<first token>-<end token>.<rank>.<key>.safetensors`: `ls` sorts a
        session's chunks by position, and the key keeps models and ranks apart.
        `num_tokens` is less than the chunk size only for a prompt's tail."""
        start = index * self.chunk_size
        end = start + (num_tokens or self.chunk_size)
        return f"{start:06d}-{end:06d}.{self.rank_tag()}.{self.file_key(link)}.safetensors"


_SLUG_BAD = re.compile(r"[^A-Za-z0-9._-]+")


def model_slug(model: str) -> str:
    """A short readable form of a model name for session names."""
    base = model.rstrip("/").rsplit("/", 1)[-1] or "model"
    slug = _SLUG_BAD.sub("-", base).strip("-.") or "model"
    return slug[:64]


def derived_session(model: str, first_link: bytes) -> str:
    """Session of a request that names none: the model and its first chunk, so
    prompts that share a first chunk share a directory (and partial hits)."""
    return f"{model_slug(model)}-{first_link.hex()[:12]}"


def valid_session(name: object) -> bool:
    """A name kvfs accepts as a session directory: kvfs's own rule, not a copy."""
    if not isinstance(name, str):
        return False
    try:
        check_name(name.encode("utf-8"))  # strict: kvfs refuses names that are not UTF-8
    except (InvalidName, UnicodeEncodeError):
        return False
    return True

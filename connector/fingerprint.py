"""Fingerprints of weights on disk, so a key changes when the weights do, not only the name."""

from __future__ import annotations

import hashlib
import os
import threading

# Files that decide an adapter's effect: its tensors and its config (rank, alpha,
# target modules). Tokenizer files and READMEs are left out.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json")
_READ = 1 << 20

_cache: dict[tuple, str] = {}
_lock = threading.Lock()


def _files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    return sorted(
        os.path.join(path, n)
        for n in os.listdir(path)
        if n.endswith(WEIGHT_SUFFIXES)
        and not n.startswith(".")
        and os.path.isfile(os.path.join(path, n))
    )


def weights_fingerprint(path: str) -> str | None:
    """BLAKE2b of the names and bytes of the weight and config files at `path`
    (a file, or a directory's top level); None if there are none or `path` is
    not on this machine. Hashed once per version of the files: a result is
    reused while every file's size, mtime, ctime and inode are unchanged
    (ctime cannot be set back, so an in-place rewrite is always seen)."""
    try:
        files = _files(path)
        stamp = tuple(
            (f, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
            for f in files
            for st in [os.stat(f)]
        )
    except OSError:
        return None
    if not stamp:
        return None
    with _lock:
        hit = _cache.get(stamp)
    if hit is not None:
        return hit
    h = hashlib.blake2b(digest_size=16)
    try:
        for f in files:
            h.update(os.path.basename(f).encode() + b"\0")
            with open(f, "rb") as fh:
                while chunk := fh.read(_READ):
                    h.update(chunk)
            h.update(b"\0")
    except OSError:
        return None
    digest = h.hexdigest()
    with _lock:
        _cache[stamp] = digest
    return digest

#!/usr/bin/env python3
"""A session's read throughput through the SSD cache: cold and warm, prefetch off and on.

One node writes a session of LAYERS files into a shared `local:` store (the
"remote" store; on a cluster that is NFS, CephFS or another remote store);
a second node reads the session layer by layer, as a KV cache loader does:

  direct            the store's object files read straight from the medium
  no cache          a mount without the SSD cache (the store's own files back it)
  cache cold        --ssd-cache, empty: every layer is fetched into the cache on open
  cache cold+pf     the same with --prefetch: opening a layer fetches the next ones
  cache warm        a second pass: every layer is a local file in the cache

"Cold" evicts the files' pages first (posix_fadvise DONTNEED on the store's
and the cache's files), so every byte comes from the medium. --compute-ms
sleeps between layers, as a model's forward pass does between loads: the time
prefetch can hide. Throughput counts the time spent reading only.
Run as root (FUSE).

  .venv/bin/python tools/bench_ssd_cache.py --medium /var/tmp --layers 16 --size 16M
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

MiB = 1 << 20
KVFS = [sys.executable, "-m", "kvfs.cli"]


def parse_size(text: str) -> int:
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(s[:-1]) * mult[s[-1]]) if s and s[-1] in mult else int(s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def evict(paths) -> None:
    """Drop the page cache of PATHS (their next read comes from the medium)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def files_under(d: str) -> list[str]:
    return [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs]


class Node:
    def __init__(self, base: str, name: str, store: str, etcd: str, args=()):
        self.mnt = os.path.join(base, f"mnt-{name}")
        self.state = os.path.join(base, f"state-{name}")
        os.makedirs(self.mnt, exist_ok=True)
        cmd = KVFS + ["mount", self.mnt, "--store", f"local:{store}", "--etcd", etcd]
        cmd += ["--state-dir", self.state, "--etcd-prefix", "/bench/", *args]
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)

    def status(self) -> dict:
        out = subprocess.run(
            KVFS + ["status", "--json", self.mnt], check=True, capture_output=True, text=True
        ).stdout
        return json.loads(out)

    def close(self) -> None:
        subprocess.run(KVFS + ["umount", self.mnt], capture_output=True, timeout=60)


def read_session(paths, compute_s: float) -> float:
    """Seconds spent reading PATHS one after the other (compute time excluded)."""
    buf = bytearray(8 * MiB)
    spent = 0.0
    for p in paths:
        t = time.perf_counter()
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
        spent += time.perf_counter() - t
        time.sleep(compute_s)
    return spent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--medium", default="/var/tmp", help="where the store and caches live")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--size", default="16M", help="bytes a layer")
    ap.add_argument("--compute-ms", type=float, default=0.0, help="pause between layers")
    ap.add_argument("--prefetch-layers", type=int, default=4)
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    size = parse_size(args.size)
    compute = args.compute_ms / 1000
    base = tempfile.mkdtemp(prefix="kvfs-bench-cache-", dir=args.medium)
    store = os.path.join(base, "store")
    port, peer = free_port(), free_port()
    etcd_log = open(os.path.join(base, "etcd.log"), "wb")
    etcd = subprocess.Popen(
        ["etcd", "--data-dir", os.path.join(base, "etcd"), "--listen-client-urls",
         f"http://127.0.0.1:{port}", "--advertise-client-urls", f"http://127.0.0.1:{port}",
         "--listen-peer-urls", f"http://127.0.0.1:{peer}"],
        stdout=etcd_log, stderr=etcd_log,
    )  # fmt: skip
    endpoint = f"127.0.0.1:{port}"
    nodes = []
    results = {}
    try:
        time.sleep(1.5)
        writer = Node(base, "w", store, endpoint)
        nodes.append(writer)
        os.makedirs(os.path.join(writer.mnt, "s"))
        names = [f"layer{i:03d}" for i in range(args.layers)]
        for n in names:
            with open(os.path.join(writer.mnt, "s", n), "wb") as f:
                f.write(os.urandom(size))
        keys = [
            os.getxattr(os.path.join(writer.mnt, "s", n), "user.kvfs.object").decode()
            for n in names
        ]
        objects = [os.path.join(store, "objects", k) for k in keys]
        total = size * len(names)

        def record(label, seconds, extra=None):
            results[label] = {"GB/s": round(total / seconds / 1e9, 3), "s": round(seconds, 3)}
            results[label].update(extra or {})
            print(f"{label:16} {total / seconds / 1e9:7.3f} GB/s  ({seconds:.3f} s reading)")

        evict(objects)
        record("direct", read_session(objects, compute))

        plain = Node(base, "plain", store, endpoint)
        nodes.append(plain)
        evict(objects)
        record("no cache", read_session([os.path.join(plain.mnt, "s", n) for n in names], compute))
        plain.close()
        nodes.remove(plain)

        pf = ["--prefetch", "--prefetch-layers", str(args.prefetch_layers)]
        for label, extra in (("cache cold", []), ("cache cold+pf", pf)):
            cache = os.path.join(base, f"cache-{len(results)}")
            node = Node(base, f"c{len(results)}", store, endpoint, ["--ssd-cache", cache, *extra])
            nodes.append(node)
            paths = [os.path.join(node.mnt, "s", n) for n in names]
            evict(objects)
            record(label, read_session(paths, compute), {"cache": node.status()["ssd_cache"]})
            if not extra:
                evict(files_under(cache))
                evict(objects)
                record(
                    "cache warm",
                    read_session(paths, compute),
                    {"cache": node.status()["ssd_cache"]},
                )
            node.close()
            nodes.remove(node)
    finally:
        for n in nodes:
            n.close()
        etcd.terminate()
        etcd.wait()
        shutil.rmtree(base, ignore_errors=True)
    print(
        f"{args.layers} layers x {size // MiB} MiB on {args.medium}, "
        f"compute {args.compute_ms} ms a layer"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

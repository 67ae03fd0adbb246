#!/usr/bin/env python3
"""A session's read throughput over a remote store: the SSD cache cold and warm,
prefetch off and on, against reading the store directly, in one run.

One node writes a session of LAYERS files into the store; a second node reads
the session layer by layer, as a KV cache loader does:

  direct            the store read without kvfs: Crail through its Java client
                    in this process (--store crail), or the object files (local)
  no cache          a mount without the SSD cache
  cache cold        --ssd-cache, empty: every layer is fetched into the cache on open
  cache warm        a second pass: every layer is a local file in the cache
  cache cold+pf     --ssd-cache --prefetch: opening a layer fetches the next ones

--store crail starts a Crail (tests/crailtest.py: kvfs's NameNode, Crail's TCP
DataNode; run tools/setup.sh first); --store local uses a directory on
--medium. "Cold" evicts the local files' pages first (posix_fadvise
DONTNEED). --compute-ms sleeps between layers, as a model's forward pass
does: the time prefetch can hide. Throughput counts the time spent reading
only. Run as root (FUSE).

  .venv/bin/python tools/bench_crail.py --store crail --layers 16 --size 16M --compute-ms 50
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import KVFS, start_etcd, stop_etcd

from kvfs.config import parse_size

MiB = 1 << 20
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


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
        cmd = KVFS + ["mount", self.mnt, "--store", store, "--etcd", etcd]
        cmd += ["--state-dir", self.state, "--etcd-prefix", "/bench/", *args]
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)

    def status(self) -> dict:
        out = subprocess.run(
            KVFS + ["status", "--json", self.mnt], check=True, capture_output=True, text=True
        ).stdout
        return json.loads(out)

    def close(self) -> None:
        subprocess.run(KVFS + ["umount", self.mnt], capture_output=True, timeout=60)


def timed_layers(read_one, items, compute_s: float) -> float:
    """Seconds spent in READ_ONE over ITEMS, one after the other (compute excluded)."""
    spent = 0.0
    for item in items:
        t = time.perf_counter()
        read_one(item)
        spent += time.perf_counter() - t
        time.sleep(compute_s)
    return spent


READ_BUF = bytearray(8 * MiB)


def read_file(path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.readinto(READ_BUF):
            pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", choices=("crail", "local"), default="crail")
    ap.add_argument("--medium", default="/var/tmp", help="where local files and caches live")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--size", default="16M", help="bytes a layer")
    ap.add_argument("--compute-ms", type=float, default=0.0, help="pause between layers")
    ap.add_argument("--prefetch-layers", type=int, default=4)
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    size = parse_size(args.size)
    compute = args.compute_ms / 1000
    base = tempfile.mkdtemp(prefix="kvfs-bench-crail-", dir=args.medium)
    etcd, endpoint = start_etcd(base)
    nodes, results, cluster, direct_store = [], {}, None, None
    try:
        if args.store == "crail":
            from kvfs.store.crail import CrailStore

            from crailtest import CrailCluster

            # room for the session, its headers and Crail's directories
            storage = ((size * args.layers * 5 // 4) // (64 * MiB) + 2) * 64 * MiB
            cluster = CrailCluster(Path(base) / "crail", storage=storage).start()
            spec = cluster.spec("bench")
            direct_store = CrailStore(spec.removeprefix("crail:"), node="bench", state_dir=base)
        else:
            store_dir = os.path.join(base, "store")
            spec = f"local:{store_dir}"
        writer = Node(base, "w", spec, endpoint)
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
        total = size * len(names)

        def record(label, seconds, extra=None):
            results[label] = {"GB/s": round(total / seconds / 1e9, 3), "s": round(seconds, 3)}
            results[label].update(extra or {})
            print(f"{label:16} {total / seconds / 1e9:7.3f} GB/s  ({seconds:.3f} s reading)")

        if direct_store is not None:
            buf = bytearray(size)
            reader = lambda k: direct_store.reader(k).readinto(buf, 0)  # noqa: E731
            record("direct", timed_layers(reader, keys, compute))
        else:
            objects = [os.path.join(store_dir, "objects", k) for k in keys]
            evict(objects)
            record("direct", timed_layers(read_file, objects, compute))

        def cold():
            if args.store == "local":
                evict(objects)

        plain = Node(base, "plain", spec, endpoint)
        nodes.append(plain)
        cold()
        record("no cache", timed_layers(read_file, [f"{plain.mnt}/s/{n}" for n in names], compute))
        plain.close()
        nodes.remove(plain)

        pf = ["--prefetch", "--prefetch-layers", str(args.prefetch_layers)]
        for label, extra in (("cache cold", []), ("cache cold+pf", pf)):
            cache = os.path.join(base, f"cache-{len(results)}")
            node = Node(base, f"c{len(results)}", spec, endpoint, ["--ssd-cache", cache, *extra])
            nodes.append(node)
            paths = [os.path.join(node.mnt, "s", n) for n in names]
            cold()
            record(label, timed_layers(read_file, paths, compute), node.status()["ssd_cache"])
            if not extra:
                evict(files_under(cache))
                cold()
                record(
                    "cache warm",
                    timed_layers(read_file, paths, compute),
                    node.status()["ssd_cache"],
                )
            node.close()
            nodes.remove(node)
    finally:
        for n in nodes:
            n.close()
        if direct_store is not None:
            direct_store.close()
        if cluster is not None:
            cluster.stop()
        stop_etcd(etcd)
        shutil.rmtree(base, ignore_errors=True)
    print(
        f"{args.store}: {args.layers} layers x {size // MiB} MiB, "
        f"compute {args.compute_ms} ms a layer, caches on {args.medium}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

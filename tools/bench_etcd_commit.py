#!/usr/bin/env python3
"""What one kvfs commit costs etcd: latency, revisions (watch events), bytes, database growth.

Mounts kvfs over a store on --medium with a real etcd of its own, writes
--files files of --size bytes into --sessions sessions, and reads etcd's own
counters before and after (revision, database size, the values under the
prefix), so docs/SCALING.md can scale measured numbers, not guesses. Root (FUSE).

  .venv/bin/python tools/bench_etcd_commit.py --files 300 --size 1M
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchlib import KVFS, start_etcd, stop_etcd

from kvfs.config import parse_size

ENV = {**os.environ, "ETCDCTL_API": "3"}


def etcd_status(ep: str) -> dict:
    out = subprocess.run(
        ["etcdctl", "--endpoints", ep, "endpoint", "status", "-w", "json"],
        check=True,
        capture_output=True,
        text=True,
        env=ENV,
    ).stdout
    st = json.loads(out)[0]["Status"]
    return {"revision": st["header"]["revision"], "db_size": st["dbSize"]}


def value_bytes(ep: str, prefix: str) -> tuple[int, int, int]:
    """(keys, key bytes, value bytes) under PREFIX."""
    out = subprocess.run(
        ["etcdctl", "--endpoints", ep, "get", "--prefix", prefix, "-w", "json"],
        check=True,
        capture_output=True,
        text=True,
        env=ENV,
    ).stdout
    kvs = json.loads(out).get("kvs", [])
    # etcdctl's JSON carries keys and values base64-encoded: 4 chars per 3 bytes
    return (
        len(kvs),
        sum(len(kv["key"]) * 3 // 4 for kv in kvs),
        sum(len(kv.get("value", "")) * 3 // 4 for kv in kvs),
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--medium", default="/dev/shm")
    ap.add_argument("--files", type=int, default=300)
    ap.add_argument("--size", default="1M")
    ap.add_argument("--sessions", type=int, default=10)
    args = ap.parse_args()
    size = parse_size(args.size)
    base = tempfile.mkdtemp(prefix="kvfs-bench-etcd-", dir=args.medium)
    etcd, ep = start_etcd(base)
    mnt = os.path.join(base, "mnt")
    os.makedirs(mnt)
    mounted = False
    try:
        subprocess.run(
            KVFS + ["mount", mnt, "--store", f"local:{base}/store", "--etcd", ep]
            + ["--state-dir", f"{base}/state", "--etcd-prefix", "/b/"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        mounted = True
        for s in range(args.sessions):
            os.mkdir(os.path.join(mnt, f"s{s}"))
        before = etcd_status(ep)
        payload = os.urandom(size)
        lat = []
        t0 = time.perf_counter()
        for i in range(args.files):
            t = time.perf_counter()
            with open(os.path.join(mnt, f"s{i % args.sessions}", f"layer{i:05d}"), "wb") as f:
                f.write(payload)
            lat.append(time.perf_counter() - t)
        wall = time.perf_counter() - t0
        after = etcd_status(ep)
        keys, kbytes, vbytes = value_bytes(ep, "/b/")
        lat.sort()
        n = args.files
        res = {
            "files": n,
            "size": size,
            "creates_per_s_one_writer": round(n / wall, 1),
            "create_latency_ms_p50": round(lat[n // 2] * 1000, 2),
            "create_latency_ms_p99": round(lat[min(n - 1, n * 99 // 100)] * 1000, 2),
            "etcd_revisions_per_file": round((after["revision"] - before["revision"]) / n, 2),
            "etcd_db_growth_per_file": round((after["db_size"] - before["db_size"]) / n),
            "keys_under_prefix": keys,
            "key_plus_value_bytes_per_key": round((kbytes + vbytes) / max(keys, 1)),
        }
        print(json.dumps(res, indent=1))
    finally:
        if mounted:
            subprocess.run(KVFS + ["umount", mnt], capture_output=True, timeout=60)
        stop_etcd(etcd)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

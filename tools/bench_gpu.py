"""The connector's GPU path against its anchors, in one run (issue 11.3).

A Qwen3-0.6B-shaped KV (28 layers, 8 KV heads, head 128, bf16, 8192 tokens:
0.94 GB), one [key|value, kv_heads, tokens, head_dim] tensor per layer on the
GPU, is moved between GPU memory and files by:

  pinned-copy      host pinned buffer <-> GPU, one copy each way (the ceiling)
  naive-st         per-layer `safetensors.torch` save_file (through .cpu()) and
                   load_file(device="cuda") to and from tmpfs (the peer)
  api-tmpfs        the connector's store_kv / retrieve_kv on a plain tmpfs dir
  api-kvfs         the same through a kvfs mount whose store is on /dev/shm
                   (started here: `python3 -m kvfs.cli mount MNT --store local:DIR`)

Loads are timed cold (after `echo 3 > /proc/sys/vm/drop_caches`, where that is
allowed) and warm; each is the median of --reps runs (min and max beside it),
from the call to the data being on the GPU (a device synchronize). A
profile follows: file -> pinned reads alone with the connector's thread count,
retrieves without checksums and without the connector's posix_fadvise(WILLNEED),
one core's CRC-32 speed, thread-count sweeps. Through the mount it prints the
daemon's `kvfs status` (passthrough on or not, opens per path), and it records
the page cache before and after each drop (is "cold" real?).
Prints a table and writes JSON (--json, default $OUT/bench_gpu.json).

    source .gpu-bundle/env.sh && python3 tools/bench_gpu.py --commit <HEAD here>   # on the device
    .venv/bin/python tools/bench_gpu.py --device cpu --tokens 1024 --no-mount   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
try:
    import kvfs_connector  # noqa: F401 - installed, or linked by .gpu-bundle/env.sh
except ImportError:  # a plain checkout
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "kvfs_connector", ROOT / "connector" / "__init__.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kvfs_connector"] = mod
    spec.loader.exec_module(mod)
from kvfs_connector.api import EngineConfig, KVEngine, RetrieveStatus  # noqa: E402
from kvfs_connector.chunkfile import tensor_bytes  # noqa: E402

GB = 1e9


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


DROPS = []  # (page cache kB before, after) of each drop: is "cold" real?


def cached_kb() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("Cached:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def drop_caches() -> bool:
    os.sync()
    before = cached_kb()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    DROPS.append((before, cached_kb()))
    return True


def timed(fn, device, reps, before=None):
    """Median, min and max seconds of `reps` calls, each fenced by synchronizes."""
    times = []
    out = None
    for r in range(reps):
        if before is not None:
            before(r)
        sync(device)
        t0 = time.perf_counter()
        out = fn(r)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times), out


class Results:
    def __init__(self, nbytes):
        self.nbytes = nbytes
        self.rows = []

    def add(self, name, op, stats, note=""):
        med, lo, hi, _ = stats
        row = {
            "name": name,
            "op": op,
            "seconds": med,
            "gbps": self.nbytes / med / GB,
            "gbps_min": self.nbytes / hi / GB,
            "gbps_max": self.nbytes / lo / GB,
            "note": note,
        }
        self.rows.append(row)
        print(
            f"{name:<34} {op:<12} {row['gbps']:7.2f} GB/s  "
            f"({row['gbps_min']:.2f}-{row['gbps_max']:.2f})  {med * 1e3:8.1f} ms  {note}",
            flush=True,
        )
        return row


def make_kv(args, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    kv = []
    for _ in range(args.layers):
        t = torch.randn((2, args.heads, args.tokens, args.head_dim), generator=g)
        kv.append(t.to(torch.bfloat16).to(device))
    return kv


def engine(args, mount, require_kvfs, **kw):
    cfg = dict(
        mount=str(mount),
        model_id="Qwen3-0.6B-shaped",
        dtype="bfloat16",
        num_layers=args.layers,
        token_dim=2,
        layout="hf:[key|value,kv_heads,tokens,head_dim]",
        chunk_size=args.chunk,
        require_kvfs=require_kvfs,
        device=args.device,
        io_threads=args.io_threads,
        host_buffer_bytes=args.host_buffer_mib << 20,
    )
    cfg.update(kw)
    return KVEngine(EngineConfig.from_any(cfg))


def fresh(ids, tag):
    """IDS as a prompt nobody stored yet: sessions share chunks through the
    connector's index, so storing a stored prompt again writes nothing."""
    return [zlib.crc32(tag.encode()) % 151_000, *ids[1:]]


def bench_api(res, args, device, kv, ids, where, mount, require_kvfs, label):
    """store_kv of new prompts into fresh sessions, then retrieve_kv cold and warm."""
    eng = engine(args, mount, require_kvfs)
    n_tokens = len(ids) // args.chunk * args.chunk
    base, ids = ids, fresh(ids, f"{label}-s0")  # what session s0 holds, retrieved below

    def clear(r):
        shutil.rmtree(Path(mount) / f"{label}-s{r}", ignore_errors=True)

    # Warm-up: the pinned buffers, the thread pool, the GPU stream (not timed).
    warm_ids = fresh(base, f"{label}-warmup")
    eng.store_kv(warm_ids, kv, session=f"{label}-warmup")
    eng.retrieve_kv(warm_ids, session=f"{label}-warmup", device=device)
    stats = timed(
        lambda r: eng.store_kv(fresh(base, f"{label}-s{r}"), kv, session=f"{label}-s{r}"),
        device,
        args.reps,
        before=clear,
    )
    assert stats[3] == n_tokens, f"stored {stats[3]} of {n_tokens} tokens"
    res.add(label, "store", stats)

    r0 = eng.retrieve_kv(ids, session=f"{label}-s0", device=device)
    assert r0.status is RetrieveStatus.HIT and r0.num_tokens == n_tokens, r0.errors
    ok = all(torch.equal(a, b[:, :, :n_tokens]) for a, b in zip(r0.kv_caches, kv, strict=True))
    assert ok, "retrieved KV differs from what was stored"
    del r0
    dropped = drop_caches()
    cold = timed(
        lambda r: eng.retrieve_kv(ids, session=f"{label}-s0", device=device),
        device,
        args.reps,
        before=lambda r: drop_caches(),
    )
    res.add(label, "load cold", cold, "" if dropped else "drop_caches refused: = warm")
    warm = timed(
        lambda r: eng.retrieve_kv(ids, session=f"{label}-s0", device=device), device, args.reps
    )
    res.add(label, "load warm", warm)

    # Profile: the same without checksums, and other thread counts.
    nock = engine(args, mount, require_kvfs, verify_checksum=False)
    nock.retrieve_kv(ids, session=f"{label}-s0", device=device)
    res.add(
        label + " no-crc",
        "load warm",
        timed(lambda r: nock.retrieve_kv(ids, session=f"{label}-s0", device=device), device, 3),
    )
    nock.close()
    # Profile: the connector's posix_fadvise(WILLNEED) on each chunk file left out
    # (through a passthrough mount it sends FUSE reads to the daemon; os is patched
    # here, in this process only, the connector is unchanged).
    real_fadvise = os.posix_fadvise
    os.posix_fadvise = lambda *a: None
    try:
        nofa = engine(args, mount, require_kvfs)
        nofa.retrieve_kv(ids, session=f"{label}-s0", device=device)
        res.add(
            label + " no-fadvise",
            "load warm",
            timed(lambda r: nofa.retrieve_kv(ids, session=f"{label}-s0", device=device), device, 3),
        )
        res.add(
            label + " no-fadvise",
            "load cold",
            timed(
                lambda r: nofa.retrieve_kv(ids, session=f"{label}-s0", device=device),
                device,
                3,
                before=lambda r: drop_caches(),
            ),
        )
        nofa.close()
    finally:
        os.posix_fadvise = real_fadvise
    for n in args.sweep:
        sweep(res, args, device, kv, ids, mount, require_kvfs, label, n)
    raw_reads(res, args, device, Path(mount) / f"{label}-s0", label)
    for p in Path(mount).iterdir():
        if p.name.startswith(label):
            shutil.rmtree(p, ignore_errors=True)
    eng.close()


def sweep(res, args, device, kv, ids, mount, require_kvfs, label, n):
    e = engine(args, mount, require_kvfs, io_threads=n)
    e.retrieve_kv(ids, session=f"{label}-s0", device=device)
    res.add(
        f"{label} {n} threads",
        "load warm",
        timed(lambda r: e.retrieve_kv(ids, session=f"{label}-s0", device=device), device, 3),
    )

    def clear(r):
        shutil.rmtree(Path(mount) / f"{label}-t{n}-{r}", ignore_errors=True)

    stats = timed(
        lambda r: e.store_kv(fresh(ids, f"{label}-t{n}-{r}"), kv, session=f"{label}-t{n}-{r}"),
        device,
        3,
        clear,
    )
    res.add(f"{label} {n} threads", "store", stats)
    e.close()


def raw_reads(res, args, device, session_dir, label):
    """The files of one stored prompt read into pinned buffers with the
    connector's thread count and nothing else: what the file system gives."""
    files = sorted(session_dir.iterdir())
    sizes = [f.stat().st_size for f in files]
    pin = device.type == "cuda"
    bufs = [torch.empty(s, dtype=torch.uint8, pin_memory=pin) for s in sizes]
    threads = args.io_threads or max(2, min(8, os.cpu_count() or 2))
    pool = ThreadPoolExecutor(threads)

    def read_one(i):
        fd = os.open(files[i], os.O_RDONLY)
        try:
            mv, pos = tensor_bytes(bufs[i]), 0
            while pos < len(mv):
                n = os.preadv(fd, [mv[pos : pos + (8 << 20)]], pos)
                if n <= 0:
                    break
                pos += n
        finally:
            os.close(fd)

    def run(r):
        list(pool.map(read_one, range(len(files))))

    run(0)
    res.add(f"{label} raw file->pinned", "read warm", timed(run, torch.device("cpu"), 3))
    pool.shutdown()


def bench_pinned(res, args, device, kv):
    n = sum(t.numel() for t in kv) * 2
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device=device)
    dev.copy_(host)
    res.add(
        "pinned-copy", "host->gpu", timed(lambda r: dev.copy_(host, non_blocking=True), device, 5)
    )
    res.add(
        "pinned-copy", "gpu->host", timed(lambda r: host.copy_(dev, non_blocking=True), device, 5)
    )


def bench_naive(res, args, device, kv, where):
    from safetensors.torch import load_file, save_file

    d = Path(where) / "naive"
    d.mkdir(parents=True, exist_ok=True)

    def save(r):
        for i, t in enumerate(kv):
            save_file({"kv": t.cpu()}, str(d / f"layer{i}.safetensors"))

    def load(r):
        return [
            load_file(str(d / f"layer{i}.safetensors"), device=str(device))["kv"]
            for i in range(len(kv))
        ]

    res.add("naive-st tmpfs", "store", timed(save, device, args.reps))
    load(0)
    dropped = drop_caches()
    res.add(
        "naive-st tmpfs",
        "load cold",
        timed(load, device, args.reps, before=lambda r: drop_caches()),
        "" if dropped else "drop_caches refused: = warm",
    )
    res.add("naive-st tmpfs", "load warm", timed(load, device, args.reps))
    shutil.rmtree(d, ignore_errors=True)


def crc_speed(res):
    b = os.urandom(64 << 20)
    zlib.crc32(b)
    t0 = time.perf_counter()
    zlib.crc32(b)
    s = time.perf_counter() - t0
    print(f"{'one core zlib.crc32':<34} {'':<12} {len(b) / s / GB:7.2f} GB/s", flush=True)
    return len(b) / s / GB


KVFS_SRC = None  # --kvfs-src: run the daemon from this copy of kvfs (e.g. a commit's)


def kvfs_cli(*argv, **kw):
    env = dict(os.environ)
    if KVFS_SRC:
        env["PYTHONPATH"] = KVFS_SRC + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "kvfs.cli", *argv]
    return subprocess.run(cmd, cwd=KVFS_SRC, env=env, capture_output=True, text=True, **kw)


def mount_kvfs(mnt: Path, store: Path, state_dir: str | None = None):
    mnt.mkdir(parents=True, exist_ok=True)
    store.mkdir(parents=True, exist_ok=True)
    cmd = ["mount", str(mnt), "--store", f"local:{store}"]
    if state_dir:
        cmd += ["--state-dir", state_dir]
    p = kvfs_cli(*cmd, timeout=120)
    if p.returncode != 0:
        raise RuntimeError(f"kvfs mount failed: {p.stdout}{p.stderr}")
    return "python3 -m kvfs.cli " + " ".join(cmd)


def mount_huge(where: Path) -> Path:
    """A tmpfs at WHERE whose files take 2 MiB pages where they are that large
    (root only). On the H200 guest a new 4 KiB page costs more than the
    bytes written into it; 2 MiB pages write 2-3x faster (tools/profile_saves.py)."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "huge=within_size,size=32G", "kvbench-huge", str(where)],
        check=True,
    )
    return where


def kvfs_status(mnt: Path):
    p = kvfs_cli("status", str(mnt), "--json", timeout=60)
    try:
        return json.loads(p.stdout)
    except ValueError:
        return {"raw": p.stdout[-2000:], "stderr": p.stderr[-2000:]}


def kv_arguments(ap: argparse.ArgumentParser) -> None:
    """The KV's shape and the connector's engine settings (tools/profile_saves.py too)."""
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=256, help="tokens per chunk file")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--io-threads", type=int, default=0, help="0: the connector's default")
    ap.add_argument("--host-buffer-mib", type=int, default=512)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    kv_arguments(ap)
    ap.add_argument("--sweep", type=int, nargs="*", default=[4, 16], help="other thread counts")
    ap.add_argument("--tmpfs", default="/dev/shm/kvbench", help="plain directory on tmpfs")
    ap.add_argument("--mount", default="/mnt/kvbench")
    ap.add_argument("--store", default="/dev/shm/kvbench-store", help="the mount's store")
    ap.add_argument("--no-mount", action="store_true")
    ap.add_argument(
        "--huge",
        help="mount a tmpfs with huge=within_size here and put the plain dir and the store on it",
    )
    ap.add_argument(
        "--state-dir",
        help="the daemon's state directory, its private etcd's data in it (default: kvfs's own)",
    )
    ap.add_argument("--kvfs-src", help="directory holding the kvfs package the daemon runs from")
    ap.add_argument(
        "--commit",
        help="the commit measured, as given here (the device copy's git history is not the checkout's)",
    )
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_gpu.json"))
    args = ap.parse_args()
    global KVFS_SRC
    KVFS_SRC = args.kvfs_src
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    kv = make_kv(args, device)
    nbytes = sum(t.numel() * t.element_size() for t in kv)
    ids = [(i * 7919) % 151_000 for i in range(args.tokens)]
    res = Results(nbytes)
    info = {
        "argv": sys.argv,
        "kv_bytes": nbytes,
        "shape": [args.layers, 2, args.heads, args.tokens, args.head_dim],
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "kernel": os.uname().release,
        "kvfs_src": args.kvfs_src,
    }
    if args.kvfs_src and os.path.exists(os.path.join(args.kvfs_src, "COMMIT")):
        with open(os.path.join(args.kvfs_src, "COMMIT")) as f:
            info["kvfs_commit"] = f.read().strip()  # written where the copy was made
    try:
        info["commit"] = (
            args.commit
            or subprocess.run(
                ["git", "-C", str(ROOT), "log", "-1", "--format=%h %s"],
                capture_output=True,
                text=True,
            ).stdout.strip()
        )
    except OSError:
        pass
    print(f"KV {nbytes / GB:.3f} GB, {info['shape']}, on {info['device']}", flush=True)
    crc = crc_speed(res)
    if args.huge:
        mount_huge(Path(args.huge))
        args.tmpfs = os.path.join(args.huge, "kvbench")
        args.store = os.path.join(args.huge, "kvbench-store")
        info["medium"] = "tmpfs huge=within_size"
    if device.type == "cuda":
        bench_pinned(res, args, device, kv)
    tmp = Path(args.tmpfs)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    bench_naive(res, args, device, kv, tmp)
    bench_api(res, args, device, kv, ids, tmp, tmp, False, "api-tmpfs")
    status = None
    if not args.no_mount:
        mnt, store = Path(args.mount), Path(args.store)
        info["mount_command"] = mount_kvfs(mnt, store, args.state_dir)
        info["passthrough_at_mount"] = kvfs_status(mnt).get("passthrough")
        print(f"kvfs mounted, passthrough: {info['passthrough_at_mount']!r}", flush=True)
        try:
            bench_api(res, args, device, kv, ids, mnt, mnt, True, "api-kvfs")
            status = kvfs_status(mnt)
            c = status.get("counters", {})
            print(
                f"kvfs status: passthrough {status.get('passthrough')!r}, opens_passthrough "
                f"{c.get('opens_passthrough')}, opens_daemon {c.get('opens_daemon')}",
                flush=True,
            )
        finally:
            kvfs_cli("umount", str(mnt), timeout=60)
    shutil.rmtree(tmp, ignore_errors=True)
    if args.huge:
        subprocess.run(["umount", args.huge], check=False)
    targets = {}
    for row in res.rows:
        if row["name"] == "api-kvfs" and row["op"].startswith("load"):
            targets[row["op"]] = {"gbps": row["gbps"], "target": 10.0, "ratio": row["gbps"] / 10}
        if row["name"] == "api-kvfs" and row["op"] == "store":
            targets["store"] = {"gbps": row["gbps"], "target": 5.0, "ratio": row["gbps"] / 5}
    for op, t in targets.items():
        verdict = "met" if t["ratio"] >= 1 else f"missed by {(1 - t['ratio']) * 100:.0f}%"
        print(f"target through the mount, {op}: {t['gbps']:.2f} GB/s vs {t['target']} ({verdict})")
    out = {"info": info, "crc32_one_core_gbps": crc, "rows": res.rows, "targets": targets}
    out["kvfs_status"] = status
    if DROPS:  # page cache (kB) before and after each drop_caches, first and last
        out["drop_caches_cached_kb"] = DROPS
        print(f"drop_caches: {len(DROPS)} drops, Cached kB before/after: {DROPS[0]} .. {DROPS[-1]}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print("wrote", args.json)


if __name__ == "__main__":
    main()

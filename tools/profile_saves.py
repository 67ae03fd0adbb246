"""Where a save through the mount spends its time (issue 11, the H200 save target).

`bench_gpu.py` times `store_kv` whole; this times its parts. The same KV as
there (Qwen3-0.6B-shaped, 0.94 GB) is saved --reps times into fresh sessions:

  tmpfs          a plain directory on tmpfs (the baseline, in the same run)
  kvfs           through a kvfs mount whose store is on tmpfs
  kvfs no-share  the same with the connector's index links left out (each
                 chunk is otherwise also hard-linked into the model's index)
  kvfs sums-now  a daemon mounted with --verify-reads: block sums computed at
                 commit, no pass over the bytes after publishing

Each save's chunk files are timed in this process (os.open, the connector's
CRC-32C, os.writev, os.close: the close is kvfs's commit), and the daemon's and
its etcd's CPU per thread is read from /proc before and after. With --py-spy,
py-spy samples the daemon during extra saves (a raw flame file in $OUT).
Prints one table per variant and writes JSON ($OUT/profile_saves.json).

    source .gpu-bundle/env.sh && python3 tools/profile_saves.py --commit <HEAD here>   # on the device
    .venv/bin/python tools/profile_saves.py --device cpu --tokens 1024 --reps 2      # smoke test
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu as bg  # noqa: E402 - the KV, the engine and the mount as bench_gpu makes them
import torch  # noqa: E402

import kvfs_connector.chunkfile as chunkfile  # noqa: E402 - bench_gpu made it importable

GB = 1e9
HZ = os.sysconf("SC_CLK_TCK")


class Recorder:
    """os.open/os.writev/os.close and the connector's checksum, timed for files
    under one directory; patched in this process only."""

    def __init__(self):
        self.root = None
        self.events = []  # (op, t0, t1, nbytes, thread)
        self.fds = set()
        self.lock = threading.Lock()
        self._real = (os.open, os.writev, os.close, chunkfile.checksum)
        self._real_sync = torch.cuda.Event.synchronize

    def install(self):
        real_open, real_writev, real_close, real_sum = self._real

        def rec(op, t0, n=0):
            with self.lock:
                self.events.append((op, t0, time.perf_counter(), n, threading.get_ident()))

        self.rec = rec
        real_sync = self._real_sync

        def sync(event):  # an I/O thread waiting for its chunk's GPU->host copy
            t0 = time.perf_counter()
            real_sync(event)
            if self.root:
                rec("gpu-wait", t0)

        def open_(path, flags, mode=0o777, *, dir_fd=None):
            t0 = time.perf_counter()
            fd = real_open(path, flags, mode, dir_fd=dir_fd)
            if self.root and str(path).startswith(self.root) and flags & os.O_CREAT:
                rec("create", t0)
                with self.lock:
                    self.fds.add(fd)
            return fd

        def writev(fd, bufs):
            t0 = time.perf_counter()
            n = real_writev(fd, bufs)
            if fd in self.fds:
                rec("write", t0, n)
            return n

        def close(fd):
            # forgotten before the close: another thread's open may reuse the number
            with self.lock:
                mine = fd in self.fds
                self.fds.discard(fd)
            t0 = time.perf_counter()
            try:
                real_close(fd)
            finally:
                if mine:
                    rec("close", t0)

        def checksum(views):
            t0 = time.perf_counter()
            out = real_sum(views)
            rec("crc", t0, sum(memoryview(v).nbytes for v in views))
            return out

        os.open, os.writev, os.close = open_, writev, close
        chunkfile.checksum = checksum
        torch.cuda.Event.synchronize = sync

    def watch_pool(self, pool):
        """Time each submission to `pool` (the main thread handing a chunk over)."""
        real = pool.submit

        def submit(*a, **kw):
            if self.root:
                self.rec("submit", time.perf_counter())
            return real(*a, **kw)

        pool.submit = submit

    def uninstall(self):
        os.open, os.writev, os.close, chunkfile.checksum = self._real
        torch.cuda.Event.synchronize = self._real_sync

    def take(self):
        with self.lock:
            ev, self.events = self.events, []
        return ev


def summarize(events, t_start, t_end):
    """One save's parts, in ms (and GB/s for the bytes written)."""
    by = collections.defaultdict(list)
    for op, t0, t1, n, _ in events:
        by[op].append((t0, t1, n))
    out = {"total_ms": (t_end - t_start) * 1e3}
    for op, rows in by.items():
        d = [(t1 - t0) * 1e3 for t0, t1, _ in rows]
        out[f"{op}_n"] = len(d)
        out[f"{op}_mean_ms"] = statistics.mean(d)
        out[f"{op}_max_ms"] = max(d)
    writes = by.get("write", [])
    if writes:
        out["first_write_at_ms"] = (min(t0 for t0, _, _ in writes) - t_start) * 1e3
        out["last_write_end_ms"] = (max(t1 for _, t1, _ in writes) - t_start) * 1e3
        out["tail_after_writes_ms"] = out["total_ms"] - out["last_write_end_ms"]
        secs = sum(t1 - t0 for t0, t1, _ in writes)
        out["write_gbps_per_thread"] = sum(n for _, _, n in writes) / secs / GB
    return out


MARKS = {"gpu-wait": "g", "crc": "c", "create": "o", "write": "W", "close": "C", "submit": "|"}


def timeline(events, t_start, t_end, width=100):
    """One line per thread over the save: what it was doing when (`.` nothing
    timed: idle, or Python between the timed calls)."""
    span = max(t_end - t_start, 1e-9)
    lines = {}
    for op, t0, t1, _, tid in sorted(events, key=lambda e: e[1]):
        row = lines.setdefault(tid, ["."] * width)
        a = min(width - 1, int((t0 - t_start) / span * width))
        b = max(a + 1, min(width, int((t1 - t_start) / span * width + 0.999)))
        for k in range(a, b):
            if row[k] == "." or op in ("write", "close"):
                row[k] = MARKS.get(op, "?")
    return ["".join(r) for r in lines.values()]


def proc_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name of `pid` (threads of one name summed)."""
    out: dict[str, float] = collections.defaultdict(float)
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        out[name] += (int(fields[11]) + int(fields[12])) / HZ
    return dict(out)


def children(pid: int) -> list[int]:
    kids = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return kids


def cpu_of(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for label, pid in pids.items():
        for name, s in proc_cpu(pid).items():
            out[f"{label}:{name}"] = out.get(f"{label}:{name}", 0.0) + s
    return out


def run_saves(args, device, kv, ids, where: Path, label, rec, pids, share=True):
    eng = bg.engine(args, where, require_kvfs=bool(pids))
    rec.watch_pool(eng.mover.pool)
    rec.watch_pool(eng.mover.closer)
    if not share:
        eng.index = None  # no index links: what they cost the save
    tag = label.replace(" ", "-")  # session names
    warm = bg.fresh(ids, f"{tag}-warm")
    eng.store_kv(warm, kv, session=f"{tag}-warm")
    rec.root = str(where)
    rec.take()
    saves = []
    cpu0 = cpu_of(pids)
    w0 = time.perf_counter()
    for r in range(args.reps):
        session = f"{tag}-{r}"
        bg.sync(device)
        t0 = time.perf_counter()
        n = eng.store_kv(bg.fresh(ids, session), kv, session=session)
        bg.sync(device)
        t1 = time.perf_counter()
        assert n == len(ids) // args.chunk * args.chunk, f"stored {n} tokens"
        events = rec.take()
        s = summarize(events, t0, t1)
        s["gbps"] = args.nbytes / (t1 - t0) / GB
        saves.append(s)
        if r == args.reps // 2:
            s["timeline"] = timeline(events, t0, t1)
            s["events"] = [(op, a - t0, b - t0, n, tid) for op, a, b, n, tid in events]
    wall = time.perf_counter() - w0
    cpu1 = cpu_of(pids)
    rec.root = None
    eng.close()
    cpu = {k: (v - cpu0.get(k, 0.0)) / wall for k, v in cpu1.items() if v - cpu0.get(k, 0.0) > 0}
    med = {
        k: statistics.median(s[k] for s in saves)
        for k in saves[0]
        if isinstance(saves[0][k], float)
    }
    print(
        f"\n{label}: median of {len(saves)} saves: {med['gbps']:.2f} GB/s, {med['total_ms']:.1f} ms"
    )
    for k, v in med.items():
        if k not in ("gbps", "total_ms"):
            print(f"  {k:<26} {v:9.2f}")
    print(f"  one save ({saves[args.reps // 2]['total_ms']:.0f} ms) by thread: " + str(MARKS))
    for line in saves[args.reps // 2]["timeline"]:
        print("    " + line)
    if cpu:
        print(f"  cores busy during the saves ({wall:.2f} s), by thread:")
        for k, v in sorted(cpu.items(), key=lambda kv_: -kv_[1])[:12]:
            print(f"    {k:<40} {v:6.2f}")
    for p in where.iterdir():
        if p.name.startswith(tag):
            shutil.rmtree(p, ignore_errors=True)
    return {"label": label, "saves": saves, "median": med, "cores_busy": cpu, "wall_s": wall}


def daemon_pids(mnt: Path) -> dict[str, int]:
    pid = bg.kvfs_status(mnt).get("pid")
    if not pid:
        raise RuntimeError(f"no daemon pid in the status of {mnt}")
    pids = {"daemon": pid}
    for kid in children(pid):
        try:
            comm = Path(f"/proc/{kid}/comm").read_text().strip()
        except OSError:
            continue
        pids[comm] = kid
    return pids


def raw_writes(args, where: Path, threads: int, prealloc: bool, suffix: str):
    """The KV's bytes as chunk-sized files (32 by default) written by THREADS threads from
    one host buffer, into new files (kept, as a save's are) or files whose
    space was fallocated beforehand (untimed): the medium's own write speed,
    and how much of it is taking fresh pages."""
    files = len(range(0, args.tokens, args.chunk))
    size = args.nbytes // files
    buf = memoryview(bytearray(os.urandom(1 << 20)) * (size >> 20))
    times = []
    for r in range(3):
        d = where / f"r{r}"
        d.mkdir(parents=True, exist_ok=True)
        paths = [d / f"f{i}" for i in range(files)]
        if prealloc:
            for p in paths:
                fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o600)
                os.posix_fallocate(fd, 0, len(buf))
                os.close(fd)

        def one(p):
            fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.writev(fd, [buf])
            finally:
                os.close(fd)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, paths))
        times.append(time.perf_counter() - t0)
    shutil.rmtree(where, ignore_errors=True)
    label = f"raw {threads}t{' falloc' if prealloc else ''}{suffix}"
    gbps = len(buf) * files / statistics.median(times) / GB
    print(f"{label:<22} {gbps:6.2f} GB/s (median of 3)")
    return {"label": label, "raw": True, "files": files, "gbps": gbps, "seconds": times}


def mount(mnt: Path, store: Path, *extra):
    shutil.rmtree(store, ignore_errors=True)
    mnt.mkdir(parents=True, exist_ok=True)
    store.mkdir(parents=True)
    p = bg.kvfs_cli("mount", str(mnt), "--store", f"local:{store}", *extra, timeout=120)
    if p.returncode != 0:
        raise RuntimeError(f"kvfs mount failed: {p.stdout}{p.stderr}")


def py_spy(args, device, kv, ids, mnt, pids, out_dir):
    exe = shutil.which("py-spy")
    if exe is None:
        print("py-spy not found: no profile of the daemon")
        return None
    # the daemon, and this process's threads while they hold the GIL
    profs = {}
    for who, pid, extra in (("daemon", pids["daemon"], []), ("saver-gil", os.getpid(), ["--gil"])):
        path = out_dir / f"{who}-saves.raw"
        profs[path] = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--nonblocking", "--threads", *extra,
             "--rate", "250", "--duration", str(int(args.py_spy)), "--format", "raw",
             "-o", str(path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
    time.sleep(1.0)  # attached before the saves start
    eng = bg.engine(args, mnt, True)
    end = time.monotonic() + args.py_spy - 1.5
    r = 0
    while time.monotonic() < end:
        eng.store_kv(bg.fresh(ids, f"spy-{r}"), kv, session=f"spy-{r}")
        shutil.rmtree(mnt / f"spy-{r - 2}", ignore_errors=True)  # the medium stays small
        r += 1
    eng.close()
    for path, prof in profs.items():
        try:
            _, err = prof.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            prof.kill()
            err = "py-spy did not finish"
        print(f"py-spy: {r} saves sampled -> {path} {err.strip()[-300:]}")
    for p in mnt.iterdir():
        if p.name.startswith("spy-"):
            shutil.rmtree(p, ignore_errors=True)
    return [str(p) for p in profs if p.exists()]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    bg.kv_arguments(ap)
    ap.add_argument("--tmpfs", default="/dev/shm/kvprof", help="plain dir; the store beside it")
    ap.add_argument("--mount", default="/mnt/kvprof")
    ap.add_argument("--huge", help="also on a tmpfs mounted here with huge=within_size (root only)")
    ap.add_argument("--py-spy", type=float, default=0, help="seconds of py-spy on the daemon")
    ap.add_argument("--commit")
    ap.add_argument(
        "--json", default=os.path.join(os.environ.get("OUT", "."), "profile_saves.json")
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    kv = bg.make_kv(args, device)
    args.nbytes = sum(t.numel() * t.element_size() for t in kv)
    ids = [(i * 7919) % 151_000 for i in range(args.tokens)]
    print(f"KV {args.nbytes / GB:.3f} GB on {device}, {os.cpu_count()} cpus, commit {args.commit}")
    out_dir = Path(os.environ.get("OUT", "."))
    media = [("", Path(args.tmpfs).parent)]
    if args.huge:
        media.append((" huge", bg.mount_huge(Path(args.huge))))
    results = []
    for suffix, medium in media:
        for threads in (1, 8):
            for prealloc in (False, True):
                results.append(raw_writes(args, medium / "kvprof-raw", threads, prealloc, suffix))
    rec = Recorder()
    rec.install()
    mnt = Path(args.mount)
    try:
        for suffix, medium in media:
            tmp = medium / "kvprof"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            results.append(run_saves(args, device, kv, ids, tmp, "tmpfs" + suffix, rec, {}))
            shutil.rmtree(tmp, ignore_errors=True)
            plans = [((), ("kvfs", "kvfs no-share"))]
            if not suffix:
                plans.append((("--verify-reads",), ("kvfs sums-now",)))
            for extra, variants in plans:
                mount(mnt, medium / "kvprof-store", *extra)
                try:
                    pids = daemon_pids(mnt)
                    for v in variants:
                        label = v + suffix
                        share = "no-share" not in v
                        results.append(
                            run_saves(args, device, kv, ids, mnt, label, rec, pids, share)
                        )
                    if args.py_spy and not extra and medium == media[-1][1]:
                        spy = py_spy(args, device, kv, ids, mnt, pids, out_dir)
                        results.append({"py_spy": spy})
                    st = bg.kvfs_status(mnt)
                    results.append(
                        {"status_operations": st.get("operations"), "counters": st.get("counters")}
                    )
                finally:
                    bg.kvfs_cli("umount", str(mnt), timeout=60)
                    shutil.rmtree(medium / "kvprof-store", ignore_errors=True)
    finally:
        rec.uninstall()
        if args.huge:
            subprocess.run(["umount", args.huge], check=False)
    print(
        "\nvariant          GB/s   total  first-write  create  crc   write  close  tail (ms, medians)"
    )
    for r in results:
        m = r.get("median")
        if "raw" in r:
            print(
                f"{r['label']:<15} {r['gbps']:5.2f}  (the medium alone: {r['files']} files, no CRC, no GPU)"
            )
        elif m:
            print(
                f"{r['label']:<15} {m['gbps']:5.2f} {m['total_ms']:7.1f} {m.get('first_write_at_ms', 0):9.1f}"
                f" {m.get('create_mean_ms', 0):8.2f} {m.get('crc_mean_ms', 0):5.2f} {m.get('write_mean_ms', 0):6.2f}"
                f" {m.get('close_mean_ms', 0):6.2f} {m.get('tail_after_writes_ms', 0):6.1f}"
            )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps({"argv": sys.argv, "commit": args.commit, "results": results}, indent=1)
    )
    print("wrote", args.json)


if __name__ == "__main__":
    main()

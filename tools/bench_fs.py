#!/usr/bin/env python3
"""Throughput and metadata benchmark: a kvfs mount against direct I/O on the same medium.

One run mounts kvfs over a store directory on the chosen medium (tmpfs by
default), writes and reads the same workloads through the mount and directly
into a plain directory beside the store, and prints GB/s (10^9 bytes/s) or
ops/s with the ratio mount/direct. Run as root (FUSE and drop_caches need it).

  .venv/bin/python tools/bench_fs.py                # tmpfs under /dev/shm
  .venv/bin/python tools/bench_fs.py --quick        # well under a minute
  .venv/bin/python tools/bench_fs.py --medium /var/tmp --json out.json

"Cold" drops the page cache first (echo 3 > /proc/sys/vm/drop_caches). On
tmpfs that cannot evict the store's own pages, so a cold direct read equals a
warm one, while the mount's kernel page cache is dropped and the daemon has to
serve every byte: exactly the case a KV cache loader meets after eviction.
A mount write counts until its commit is published (the `commits` counter in
`kvfs status`), whether close(2) or the release FUSE sends after it commits.
"""

import argparse
import json
import mmap
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import tree_cpu

from kvfs.config import parse_size

GB = 1e9
MiB = 1 << 20


def human(n: int) -> str:
    for unit, m in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= m and n % m == 0:
            return f"{n // m} {unit}"
    return f"{n} B"


# -- progress -------------------------------------------------------------------------


class Progress:
    """A one-line counter on stderr for long phases; silent when --quiet."""

    def __init__(self, label: str, total: int, nbytes_each: int = 0, quiet: bool = False):
        self.label = label
        self.total = total
        self.each = nbytes_each
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.last = 0.0

    def step(self, done: int) -> None:
        if self.quiet or not self.tty:
            return
        now = time.perf_counter()
        if now - self.last < 0.2 and done != self.total:
            return
        self.last = now
        rate = ""
        if self.each and now > self.t0:
            rate = f" {done * self.each / (now - self.t0) / GB:.2f} GB/s"
        sys.stderr.write(f"\r  {self.label}: {done}/{self.total}{rate}\033[K")
        sys.stderr.flush()

    def done(self, result: str) -> None:
        if self.quiet:
            return
        if self.tty:
            sys.stderr.write("\r\033[K")
        sys.stderr.write(f"  {self.label}: {result}\n")
        sys.stderr.flush()


# -- the mount ------------------------------------------------------------------------


class Mount:
    """A kvfs daemon started with `kvfs mount`, always unmounted by close()."""

    def __init__(self, kvfs: str, mnt: str, store: str, state: str, etcd: str | None):
        self.kvfs = kvfs
        self.mnt = mnt
        self.store = store
        self.state = state
        self.etcd = etcd
        self.pid: int | None = None

    def open(self) -> None:
        cmd = [self.kvfs, "mount", self.mnt, "--store", f"local:{self.store}"]
        cmd += ["--state-dir", self.state]
        if self.etcd:
            cmd += ["--etcd", self.etcd]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"kvfs mount failed ({r.returncode}): {r.stderr.strip()}")
        self.pid = self.status()["pid"]

    def status(self) -> dict:
        return json.loads(os.getxattr(self.mnt, "user.kvfs.status"))

    def cpu(self) -> float:
        """CPU seconds (user + system) of the daemon and its children (a private etcd)."""
        return tree_cpu(self.pid) if self.pid else 0.0

    def commits(self) -> int:
        return self.status()["counters"]["commits"]

    def wait_commits(self, target: int, timeout: float = 120.0) -> None:
        """Until COMMITS reaches TARGET: a closed file is durable only once committed."""
        deadline = time.perf_counter() + timeout
        while self.commits() < target:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"commits stuck below {target}")
            time.sleep(0.0005)

    def read_ahead_kb(self) -> int | None:
        st = os.stat(self.mnt)
        try:
            with open(
                f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb"
            ) as f:
                return int(f.read())
        except OSError:
            return None

    def close(self) -> None:
        if os.path.ismount(self.mnt):
            r = subprocess.run(
                [self.kvfs, "umount", self.mnt], capture_output=True, text=True, timeout=90
            )
            if r.returncode != 0 and os.path.ismount(self.mnt):
                sys.stderr.write(f"kvfs umount failed: {r.stderr.strip()}; lazy unmount\n")
                subprocess.run(["fusermount3", "-u", "-z", self.mnt], capture_output=True)
        if self.pid is not None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and _alive(self.pid):
                time.sleep(0.05)
            if _alive(self.pid):
                os.kill(self.pid, signal.SIGTERM)
            self.pid = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


# -- I/O kernels ----------------------------------------------------------------------


def drop_caches() -> bool:
    os.sync()  # only clean pages can be dropped
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def prime_pages(directory: str, nbytes: int, buf) -> None:
    """Write NBYTES to a scratch file in DIRECTORY and delete it.

    A virtual machine's guest pages cost far more the first time they are
    touched after the host took them back (measured on the 2-core guest:
    512 MiB written to tmpfs in 0.22 s on pages freed a moment ago, 1.8 s on
    fresh ones; freed pages go back to the host within seconds). Without
    this, whichever write phase finds recently freed pages (direct I/O right
    after its own files are deleted) is measured against one that pays for
    fresh ones, and the ratio measures the VM. Each write phase, mount and
    direct alike, starts right after this.
    """
    path = os.path.join(directory, ".prime")
    mv = memoryview(buf)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        left = nbytes
        while left:
            left -= os.write(fd, mv[: min(len(buf), left)])
    finally:
        os.close(fd)
        os.unlink(path)


def write_files(paths, size, buf, fsync, progress, after=None) -> float:
    """Write SIZE bytes to each path from BUF in len(BUF) requests; seconds."""
    mv = memoryview(buf)
    bs = len(buf)
    t0 = time.perf_counter()
    for i, p in enumerate(paths):
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            left = size
            while left:
                n = os.write(fd, mv[: min(bs, left)])
                left -= n
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        progress.step(i + 1)
    if after is not None:
        after()
    return time.perf_counter() - t0


def read_files(paths, size, buf, progress) -> float:
    """Read each file whole (its size known, as a loader knows it) into BUF; seconds."""
    mv = memoryview(buf)
    bs = len(buf)
    t0 = time.perf_counter()
    for i, p in enumerate(paths):
        fd = os.open(p, os.O_RDONLY)
        try:
            got = 0
            while got < size:
                n = os.readv(fd, [mv[: min(bs, size - got)]])
                if n == 0:
                    raise RuntimeError(f"{p}: short file ({got} of {size} bytes)")
                got += n
        finally:
            os.close(fd)
        progress.step(i + 1)
    return time.perf_counter() - t0


def run_ops(items, fn, progress) -> float:
    """FN on every item; seconds."""
    t0 = time.perf_counter()
    for i, it in enumerate(items):
        fn(it)
        progress.step(i + 1)
    return time.perf_counter() - t0


# -- the benchmark --------------------------------------------------------------------


class Bench:
    def __init__(self, args, mount: Mount, direct_root: str):
        self.a = args
        self.m = mount
        self.direct_root = direct_root
        self.results: dict[str, dict[str, list[float]]] = {}
        self.cold_ok = True
        # page-aligned client buffers, as a loader with pinned or mmap'd buffers has
        self.wbuf = mmap.mmap(-1, args.bufsize)
        self.wbuf.write(os.urandom(args.bufsize))
        self.rbuf = mmap.mmap(-1, args.bufsize)

    def record(self, metric: str, kind: str, value: float) -> None:
        self.results.setdefault(metric, {}).setdefault(kind, []).append(value)

    def log(self, text: str) -> None:
        if not self.a.quiet:
            sys.stderr.write(text + "\n")

    def phase(self, metric, kind, label, count, each, fn) -> None:
        """Run FN(progress) -> seconds over COUNT items of EACH bytes (0: an op count).

        Records GB/s or ops/s, and for the mount the daemon's CPU per GB or per op.
        """
        pr = Progress(label, count, each, self.a.quiet)
        cpu0 = self.m.cpu() if kind == "mount" else 0.0
        seconds = fn(pr)
        if each:
            units = count * each / GB
            self.record(metric, kind, units / seconds)
            shown = f"{units / seconds:.2f} GB/s ({seconds:.2f} s)"
        else:
            units = count
            self.record(metric, kind, units / seconds)
            shown = f"{units / seconds:,.0f} ops/s"
        if kind == "mount":
            cpu = self.m.cpu() - cpu0
            self.record(metric, "daemon_cpu", cpu / units)
            shown += f", daemon CPU {cpu / units * (1 if each else 1e6):.2f}" + (
                " s/GB" if each else " us/op"
            )
        pr.done(shown)

    def throughput(self, tag: str, count: int, size: int, p: int) -> None:
        """Write, cold-read and warm-read COUNT files of SIZE, mount and direct."""
        session = f"{tag}{p}"
        mdir = os.path.join(self.m.mnt, session)
        ddir = os.path.join(self.direct_root, session)
        nsdir = os.path.join(self.direct_root, session + "-nofsync")
        for d in (mdir, ddir, nsdir):
            os.mkdir(d)
        names = [f"layer{i:05d}" for i in range(count)]
        mpaths = [os.path.join(mdir, n) for n in names]
        dpaths = [os.path.join(ddir, n) for n in names]
        npaths = [os.path.join(nsdir, n) for n in names]
        what = f"{count} x {human(size)}"
        wb, rb = self.wbuf, self.rbuf

        # writes: direct without fsync, direct with fsync, and the mount (to its
        # commit). The mount goes first in every other pass: a virtual disk
        # with burst credits gives its fast start to whichever runs first
        # (measured here: direct writes of 512 MiB went from 0.14 s to 2 s
        # within a minute), which would otherwise always be direct I/O.
        def direct_writes():
            prime_pages(self.direct_root, count * size, wb)
            self.phase(
                f"write {tag}",
                "nofsync",
                f"write {what} direct, no fsync",
                count,
                size,
                lambda pr: write_files(npaths, size, wb, False, pr),
            )
            shutil.rmtree(nsdir)
            prime_pages(self.direct_root, count * size, wb)
            self.phase(
                f"write {tag}",
                "direct",
                f"write {what} direct + fsync",
                count,
                size,
                lambda pr: write_files(dpaths, size, wb, True, pr),
            )

        def mount_writes():
            prime_pages(self.direct_root, count * size, wb)
            target = self.m.commits() + count
            self.phase(
                f"write {tag}",
                "mount",
                f"write {what} mount",
                count,
                size,
                lambda pr: write_files(
                    mpaths, size, wb, False, pr, lambda: self.m.wait_commits(target)
                ),
            )

        for run in (mount_writes, direct_writes) if p % 2 else (direct_writes, mount_writes):
            run()

        # cold: one drop, then direct and mount (in turn, as above); warm: straight after
        kinds = (("direct", dpaths), ("mount", mpaths))
        for temp in ("cold", "warm"):
            if temp == "cold" and not drop_caches():
                self.cold_ok = False
                self.log("  (could not drop caches: cold reads are not cold)")
            for kind, paths in reversed(kinds) if p % 2 else kinds:
                self.phase(
                    f"{temp} read {tag}",
                    kind,
                    f"{temp} read {what} {kind}",
                    count,
                    size,
                    lambda pr, paths=paths: read_files(paths, size, rb, pr),
                )

        shutil.rmtree(ddir)
        shutil.rmtree(mdir)

    def metadata(self, p: int) -> None:
        n = self.a.meta_count
        reps = self.a.listdir_reps
        for kind, root in (("direct", self.direct_root), ("mount", self.m.mnt)):
            d = os.path.join(root, f"meta{p}")
            os.mkdir(d)
            paths = [os.path.join(d, f"f{i:06d}") for i in range(n)]

            def create(path):
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))

            def creates(pr, paths=paths, kind=kind):
                target = self.m.commits() + len(paths) if kind == "mount" else 0
                t0 = time.perf_counter()
                run_ops(paths, create, pr)
                if kind == "mount":
                    self.m.wait_commits(target)  # empty files commit too
                return time.perf_counter() - t0

            self.phase("create+close", kind, f"create+close x{n} {kind}", n, 0, creates)
            self.phase(
                "stat",
                kind,
                f"stat x{n} {kind}",
                n,
                0,
                lambda pr, ps=paths: run_ops(ps, os.stat, pr),
            )
            counts = []

            def listdir(_, d=d, counts=counts):
                counts.append(len(os.listdir(d)))

            self.phase(
                f"listdir ({n} names)",
                kind,
                f"listdir of {n} x{reps} {kind}",
                reps,
                0,
                lambda pr, f=listdir: run_ops(range(reps), f, pr),
            )
            if any(c != n for c in counts):
                raise RuntimeError(f"listdir of {d} saw {counts[0]} names, expected {n}")
            self.phase(
                "unlink",
                kind,
                f"unlink x{n} {kind}",
                n,
                0,
                lambda pr, ps=paths: run_ops(ps, os.unlink, pr),
            )
            os.rmdir(d)

    def run(self) -> None:
        a = self.a
        for p in range(a.passes):
            self.log(f"pass {p + 1}/{a.passes}")
            if a.large_count:
                self.throughput("large", a.large_count, a.large_size, p)
            if a.small_count:
                self.throughput("small", a.small_count, a.small_size, p)
            if a.meta_count:
                self.metadata(p)


# -- report ---------------------------------------------------------------------------


def median(xs):
    return statistics.median(xs) if xs else None


def span(xs, fmt):
    if not xs:
        return "-"
    if len(xs) == 1:
        return fmt(xs[0])
    return f"{fmt(median(xs))} ({fmt(min(xs))}-{fmt(max(xs))})"


def report(args, results: dict, info: dict) -> tuple[str, dict]:
    """The table (medians over passes, min-max in brackets) and the JSON summary.

    Ratios are taken per pass, mount and direct measured minutes apart at
    most, then summarised: on a shared machine that cancels much of the noise.
    """
    rows = []
    summary = {}
    labels = {
        "large": f"{args.large_count} x {human(args.large_size)}",
        "small": f"{args.small_count} x {human(args.small_size)}",
    }
    for metric, kinds in results.items():
        is_bw = "write" in metric or "read" in metric
        unit = "GB/s" if is_bw else "ops/s"
        label = metric
        for tag, desc in labels.items():
            label = label.replace(tag, desc)
        m, d, nf = kinds.get("mount", []), kinds.get("direct", []), kinds.get("nofsync", [])
        cpu = kinds.get("daemon_cpu", [])
        ratios = [a / b for a, b in zip(m, d, strict=False)]
        ratios_nf = [a / b for a, b in zip(m, nf, strict=False)]
        summary[metric] = {
            "unit": unit,
            "mount": median(m),
            "direct": median(d),
            "ratio": median(ratios),
            "ratio_range": [min(ratios), max(ratios)] if ratios else None,
            "daemon_cpu": median(cpu),
            "daemon_cpu_unit": "s/GB" if is_bw else "s/op",
            "per_pass": kinds,
        }
        if nf:
            summary[metric]["direct_nofsync"] = median(nf)
            summary[metric]["ratio_nofsync"] = median(ratios_nf)

        def fmt(x, is_bw=is_bw):
            return f"{x:.2f}" if is_bw else f"{x:,.0f}"

        def fmt_ratio(x):
            return f"{x:.2f}" if x >= 0.1 else f"{x:.3f}"

        def fmt_cpu(x, is_bw=is_bw):
            return f"{x:.2f}" if is_bw else f"{x * 1e6:,.0f}"

        rows.append(
            [
                label,
                unit,
                span(m, fmt),
                span(d, fmt),
                span(ratios, fmt_ratio),
                span(nf, fmt) if nf else "",
                span(ratios_nf, fmt_ratio) if nf else "",
                (span(cpu, fmt_cpu) + (" s/GB" if is_bw else " us/op")) if cpu else "",
            ]
        )
    head = [
        "workload",
        "unit",
        "mount",
        "direct",
        "ratio",
        "direct no fsync",
        "ratio",
        "daemon CPU",
    ]
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    lines = [
        f"kvfs bench_fs on {info['medium']} ({info['fstype']}), {info['cpus']} CPUs, "
        f"kernel {info['kernel']}, read_ahead_kb {info['read_ahead_kb']}, "
        f"client buffer {human(args.bufsize)}, {args.passes} pass(es)",
        "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    if not info["cold_dropped"]:
        lines.append("note: the page cache could not be dropped; 'cold' reads were warm")
    return "\n".join(lines), summary


def fstype(path: str) -> str:
    best, kind = "", "?"
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            mp = parts[1]
            if (path == mp or path.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best):
                best, kind = mp, parts[2]
    return kind


def default_kvfs() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "kvfs")
    if os.path.exists(here):
        return here
    repo = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv/bin/kvfs"
    )
    return repo if os.path.exists(repo) else (shutil.which("kvfs") or "kvfs")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--medium",
        default="/dev/shm",
        help="directory on the store medium (default /dev/shm, tmpfs); a disk directory for a disk run",
    )
    p.add_argument("--large-count", type=int, help="large files (default 8)")
    p.add_argument("--large-size", type=parse_size, help="default 128M")
    p.add_argument(
        "--small-count",
        type=int,
        help="small files, like KV chunk files (default 2000)",
    )
    p.add_argument("--small-size", type=parse_size, help="default 256K")
    p.add_argument("--meta-count", type=int, help="files for metadata ops (default 2000)")
    p.add_argument("--listdir-reps", type=int, help="listdir repetitions (default 20)")
    p.add_argument("--bufsize", type=parse_size, default=MiB, help="client I/O buffer (default 1M)")
    p.add_argument(
        "--passes",
        type=int,
        default=1,
        help="repeat everything; the table shows the median (min-max)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="4 x 64M, 500 x 256K, 500 metadata files (explicit flags win)",
    )
    p.add_argument("--etcd", help="use this etcd (HOST:PORT) instead of the daemon's private one")
    p.add_argument("--kvfs", default=default_kvfs(), help="the kvfs command")
    p.add_argument(
        "--json",
        metavar="FILE",
        nargs="?",
        const="-",
        help="also write JSON to FILE (- for stdout)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directories and daemon log")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    args = p.parse_args(argv)
    sizes = {
        "large_count": (8, 4),
        "large_size": (128 * MiB, 64 * MiB),
        "small_count": (2000, 500),
        "small_size": (256 << 10, 256 << 10),
        "meta_count": (2000, 500),
        "listdir_reps": (20, 10),
    }
    for k, (full, quick) in sizes.items():  # explicit flags win over --quick
        if getattr(args, k) is None:
            setattr(args, k, quick if args.quick else full)
    if os.geteuid() != 0:
        p.error("run as root: FUSE mounts and drop_caches need it")

    medium = os.path.abspath(args.medium)
    need = 2 * (args.large_count * args.large_size + args.small_count * args.small_size)
    free = shutil.disk_usage(medium).free
    if need > free * 0.9:
        p.error(f"{medium} has {free / GB:.1f} GB free; this run needs about {need / GB:.1f} GB")

    work = tempfile.mkdtemp(prefix="kvfs-bench-", dir=medium)
    side = tempfile.mkdtemp(prefix="kvfs-bench-")  # mountpoint and daemon log, off the medium
    mnt = os.path.join(side, "mnt")
    os.mkdir(mnt)
    store, direct = os.path.join(work, "store"), os.path.join(work, "direct")
    os.mkdir(direct)
    mount = Mount(args.kvfs, mnt, store, os.path.join(side, "state"), args.etcd)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    ok = False
    try:
        t0 = time.perf_counter()
        mount.open()
        if not args.quiet:
            sys.stderr.write(
                f"mounted kvfs at {mnt} over {store} in {time.perf_counter() - t0:.1f} s\n"
            )
        bench = Bench(args, mount, direct)
        bench.run()
        info = {
            "medium": medium,
            "fstype": fstype(medium),
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "read_ahead_kb": mount.read_ahead_kb(),
            "cold_dropped": bench.cold_ok,
            "loadavg": os.getloadavg(),
            "daemon_counters": mount.status()["counters"],
        }
        text, summary = report(args, bench.results, info)
        print(text)
        if args.json:
            out = {
                "config": {
                    k: v for k, v in vars(args).items() if k not in ("json", "quiet", "keep")
                },
                "machine": info,
                "command": " ".join(sys.argv),
                "results": summary,
            }
            doc = json.dumps(out, indent=2)
            if args.json == "-":
                print(doc)
            else:
                with open(args.json, "w") as f:
                    f.write(doc + "\n")
        ok = True
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; cleaning up\n")
        return 130
    finally:
        try:
            mount.close()
        finally:
            if not ok:
                log = os.path.join(side, "state", "kvfs.log")
                if os.path.exists(log):
                    with open(log, "rb") as f:
                        tail = f.read()[-2000:].decode(errors="replace")
                    sys.stderr.write(f"--- daemon log tail ({log}) ---\n{tail}\n")
            if args.keep:
                sys.stderr.write(f"kept {work} and {side}\n")
            elif not os.path.ismount(mnt):
                shutil.rmtree(work, ignore_errors=True)
                shutil.rmtree(side, ignore_errors=True)
            else:
                sys.stderr.write(f"{mnt} is still mounted; left {work} and {side} in place\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

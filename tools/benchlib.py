"""What several benchmarks in tools/ share: a private etcd and a kvfs mount of their own.

Imported by the benchmarks run as scripts (tools/ is then on sys.path).
"""

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KVFS = [sys.executable, "-m", "kvfs.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_etcd(base: str) -> tuple[subprocess.Popen, str]:
    """A one-member etcd with its data and log under BASE: (process, endpoint).

    Returns once it answers, so the first mount does not race its start.
    """
    port, peer = free_port(), free_port()
    ep = f"127.0.0.1:{port}"
    log = open(os.path.join(base, "etcd.log"), "wb")
    proc = subprocess.Popen(
        ["etcd", "--data-dir", os.path.join(base, "etcd"), "--listen-client-urls",
         f"http://{ep}", "--advertise-client-urls", f"http://{ep}",
         "--listen-peer-urls", f"http://127.0.0.1:{peer}"],
        stdout=log, stderr=log,
    )  # fmt: skip
    log.close()  # the child keeps its own descriptor
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ok = subprocess.run(
            ["etcdctl", "--endpoints", ep, "--command-timeout=1s", "endpoint", "health"],
            capture_output=True,
            env={**os.environ, "ETCDCTL_API": "3"},
        )
        if ok.returncode == 0:
            return proc, ep
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"etcd did not start: see {base}/etcd.log")


def stop_etcd(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait()


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread) of PID and its descendants."""
    total, todo = 0.0, [pid]
    tick = os.sysconf("SC_CLK_TCK")
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError, IndexError):
            pass  # gone meanwhile
    return total


def self_mount(store: Path, state_parent: Path | None = None) -> tuple[Path, Path]:
    """Mount kvfs (its private etcd) over STORE: (mountpoint, state directory)."""
    mnt = Path(tempfile.mkdtemp(prefix="kvbench-mnt-"))
    state = Path(tempfile.mkdtemp(prefix="kvbench-state-", dir=state_parent))
    store.mkdir(parents=True, exist_ok=True)
    cmd = KVFS + ["mount", str(mnt), "--store", f"local:{store}", "--state-dir", str(state)]
    subprocess.run(cmd, check=True, timeout=120)
    return mnt, state


def self_umount(mnt: Path) -> None:
    subprocess.run(KVFS + ["umount", str(mnt)], timeout=60)
    if not os.path.ismount(mnt):
        mnt.rmdir()

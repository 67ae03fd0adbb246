"""Test helpers shared by every layer: etcd processes, kvfs mounts, waiting.

(A module of its own, not conftest: tests/connector has a conftest too, and
`from conftest import` would reach whichever Python imported first.)
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KVFS = [sys.executable, "-m", "kvfs.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout=10.0, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def lose_etcd_data(m, etcd) -> None:
    """etcd's data for this filesystem is lost (its key prefix deleted)."""
    subprocess.run(
        ["etcdctl", "--endpoints", etcd.endpoints, "del", "--prefix", m.prefix],
        check=True,
        capture_output=True,
        env={**os.environ, "ETCDCTL_API": "3"},
    )


def recover_after_losing_etcd(m, etcd) -> str:
    """Unmount M, lose etcd's data for it, mount it again (empty), and run
    `kvfs recover`; what recover printed."""
    m.umount()
    lose_etcd_data(m, etcd)
    m.mount()
    assert os.listdir(m.path) == []
    out = subprocess.run(
        KVFS + ["recover", str(m.path)], capture_output=True, text=True, check=True
    )
    return out.stdout + out.stderr


def wait_seen(paths, timeout=5.0):
    """Wait until this mount shows every one of paths another mount wrote."""
    paths = list(paths)
    wait_for(lambda: all(os.path.exists(p) for p in paths), timeout, what="names seen here")


def seen(path, timeout=5.0):
    """The bytes of a file another mount wrote. Another node learns of a new
    name through the etcd watch, within a second (README, "Inspecting"), not
    at the writer's close, so a reader there waits for it to appear."""
    wait_seen([path], timeout)
    with open(path, "rb") as f:
        return f.read()


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    cluster: str
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self, new: bool = True):
        cmd = [
            "etcd",
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            f"http://{self.endpoint}",
            "--advertise-client-urls",
            f"http://{self.endpoint}",
            "--listen-peer-urls",
            f"http://127.0.0.1:{self.peer_port}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{self.peer_port}",
            "--initial-cluster",
            self.cluster,
            "--initial-cluster-state",
            "new",
            "--heartbeat-interval",
            "10",
            "--election-timeout",
            "100",
        ]
        log = open(self.data_dir.parent / f"{self.name}.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        log.close()

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def healthy(self) -> bool:
        r = subprocess.run(
            ["etcdctl", "--endpoints", self.endpoint, "--command-timeout=1s", "endpoint", "health"],
            capture_output=True,
            env={**os.environ, "ETCDCTL_API": "3"},
        )
        return r.returncode == 0


class EtcdCluster:
    def __init__(self, base: Path, size: int):
        names = [f"m{i}" for i in range(size)]
        ports = [(free_port(), free_port()) for _ in names]
        cluster = ",".join(
            f"{n}=http://127.0.0.1:{p}" for n, (_, p) in zip(names, ports, strict=True)
        )
        self.members = [
            EtcdMember(n, c, p, base / n, cluster) for n, (c, p) in zip(names, ports, strict=True)
        ]

    @property
    def endpoints(self) -> str:
        return ",".join(m.endpoint for m in self.members)

    def start(self, attempts: int = 3):
        """Start every member and wait until all answer healthy.

        The ports were free when picked, not reserved: any outbound connection
        on this machine may take one before etcd binds it (it then exits with
        "address already in use"). So a member that exits, or a cluster not
        healthy in time, is started again from empty data directories on new
        ports; the last failure says what the members logged."""
        for attempt in range(attempts):
            if attempt:
                self._renew()
            for m in self.members:
                m.data_dir.mkdir(parents=True, exist_ok=True)
                m.start()
            try:
                wait_for(self._healthy_or_dead, 30, 0.1, "etcd healthy")
                return self
            except (AssertionError, RuntimeError) as e:
                self.stop()
                if attempt == attempts - 1:
                    raise AssertionError(f"{e}\n{self._log_tails()}") from None
        return self

    def _healthy_or_dead(self) -> bool:
        for m in self.members:
            if m.proc is not None and m.proc.poll() is not None:
                raise RuntimeError(f"etcd member {m.name} exited ({m.proc.returncode})")
        return all(m.healthy() for m in self.members)

    def _renew(self) -> None:
        """New ports and empty data directories for every member."""
        ports = [(free_port(), free_port()) for _ in self.members]
        cluster = ",".join(
            f"{m.name}=http://127.0.0.1:{p}" for m, (_, p) in zip(self.members, ports, strict=True)
        )
        for m, (c, p) in zip(self.members, ports, strict=True):
            shutil.rmtree(m.data_dir, ignore_errors=True)
            m.client_port, m.peer_port, m.cluster = c, p, cluster

    def _log_tails(self, lines: int = 15) -> str:
        out = []
        for m in self.members:
            log = m.data_dir.parent / f"{m.name}.log"
            tail = log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else []
            out.append(f"--- {log}\n" + "\n".join(tail))
        return "\n".join(out)

    def leader(self) -> EtcdMember:
        for m in self.members:
            if m.proc is None:
                continue
            r = subprocess.run(
                ["etcdctl", "--endpoints", m.endpoint, "endpoint", "status", "-w", "json"],
                capture_output=True,
                text=True,
                env={**os.environ, "ETCDCTL_API": "3"},
            )
            if r.returncode == 0:
                st = json.loads(r.stdout)[0]["Status"]
                if st["leader"] == st["header"]["member_id"]:
                    return m
        raise AssertionError("no etcd leader")

    def stop(self):
        for m in self.members:
            m.stop()


@dataclass
class Mount:
    """A mounted kvfs as a test sees it."""

    path: Path
    store: Path
    etcd: str
    prefix: str
    state_dir: Path
    args: list = field(default_factory=list)
    pid: int | None = None

    def status(self) -> dict:
        out = subprocess.run(
            KVFS + ["status", "--json", str(self.path)], check=True, capture_output=True, text=True
        ).stdout
        return json.loads(out)

    def log(self) -> str:
        p = self.state_dir / "kvfs.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def mount(self):
        self.path.mkdir(parents=True, exist_ok=True)
        cmd = KVFS + [
            "mount",
            str(self.path),
            "--store",
            f"local:{self.store}",
            "--state-dir",
            str(self.state_dir),
            "--etcd-prefix",
            self.prefix,
        ]
        if self.etcd:
            cmd += ["--etcd", self.etcd]
        r = subprocess.run(cmd + self.args, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise AssertionError(f"kvfs mount failed: {r.stdout}{r.stderr}\n{self.log()}")
        self.pid = self.status()["pid"]
        return self

    def umount(self, timeout: float = 20.0):
        """Unmount as a user would and wait for the daemon to exit by itself.

        A daemon still there TIMEOUT seconds later (hung on unmount) fails the
        caller with AssertionError, but only after it is cleared away (lazy
        unmount, SIGKILL), so that later tests start clean.
        """
        # the pid first: stat of a hung mount would hang too
        if self.pid is None and not os.path.ismount(self.path):
            return
        deadline = time.monotonic() + timeout
        problem = None
        try:
            r = subprocess.run(
                KVFS + ["umount", str(self.path)], capture_output=True, text=True, timeout=timeout
            )
            if r.returncode != 0:
                problem = f"kvfs umount failed ({r.returncode}): {r.stdout}{r.stderr}"
        except subprocess.TimeoutExpired:
            problem = f"kvfs umount did not return in {timeout}s"
        pid, self.pid = self.pid, None
        if pid is not None:
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                problem = problem or f"the daemon (pid {pid}) did not exit in {timeout}s"
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                wait_for(lambda: not _alive(pid), 10, what="the killed daemon's exit")
        if problem or os.path.ismount(self.path):
            subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)
            problem = problem or "the mount was still there after kvfs umount"
        if problem:
            raise AssertionError(f"{self.path}: {problem}\n{self.log()[-4000:]}")

    def kill(self):
        """SIGKILL the daemon and clear its dead mount, as an operator would."""
        os.kill(self.pid, signal.SIGKILL)
        wait_for(lambda: not _alive(self.pid), 10, what="daemon death")
        subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)
        self.pid = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False

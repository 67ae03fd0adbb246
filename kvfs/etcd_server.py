"""A private single-node etcd for a kvfs that was given no --etcd."""

import logging
import os
import shutil
import signal
import socket
import subprocess
import time

from .errors import KvfsError

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateEtcd:
    def __init__(self, data_dir: str, log_path: str | None = None):
        self.data_dir = data_dir
        self.log_path = log_path or os.path.join(os.path.dirname(data_dir), "etcd.log")
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""

    def start(self, timeout: float = 20.0) -> str:
        exe = shutil.which("etcd")
        if exe is None:
            raise KvfsError("no etcd binary on PATH (apt-get install etcd-server), or pass --etcd")
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        self._stop_orphan()
        client, peer = free_port(), free_port()
        self.endpoint = f"127.0.0.1:{client}"
        cmd = [
            exe,
            "--name",
            "kvfs",
            "--data-dir",
            self.data_dir,
            "--listen-client-urls",
            f"http://{self.endpoint}",
            "--advertise-client-urls",
            f"http://{self.endpoint}",
            "--listen-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-cluster",
            f"kvfs=http://127.0.0.1:{peer}",
            "--heartbeat-interval",
            "10",
            "--election-timeout",
            "100",
            # old revisions would otherwise pile up forever
            "--auto-compaction-mode",
            "periodic",
            "--auto-compaction-retention",
            "1h",
            # after a restart the member keeps its data but gets new ports
            "--force-new-cluster",
        ]
        logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            cmd, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL, start_new_session=True
        )
        logf.close()
        with open(self.pid_path, "w") as f:
            f.write(str(self.proc.pid))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise KvfsError(
                    f"private etcd exited with {self.proc.returncode}; see {self.log_path}"
                )
            try:
                with socket.create_connection(("127.0.0.1", client), timeout=0.2):
                    pass
                if _healthy(self.endpoint):
                    log.info("private etcd at %s (data in %s)", self.endpoint, self.data_dir)
                    return self.endpoint
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise KvfsError(f"private etcd did not become healthy in {timeout}s; see {self.log_path}")

    @property
    def pid_path(self) -> str:
        return self.data_dir.rstrip("/") + ".pid"

    def _stop_orphan(self) -> None:
        """A daemon killed outright leaves its private etcd running, holding the
        data directory: stop it, since it is ours and nobody else can use it."""
        try:
            with open(self.pid_path) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().split(b"\0")
        except (OSError, ValueError):
            return
        if self.data_dir.encode() not in cmdline or not cmdline[0].endswith(b"etcd"):
            return  # the pid was reused by something else
        log.warning("stopping the private etcd (pid %d) a killed daemon left behind", pid)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
            time.sleep(0.05)
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _healthy(endpoint: str) -> bool:
    import pyetcd

    host, _, port = endpoint.rpartition(":")
    c = pyetcd.MultiEndpointEtcd3Client(
        endpoints=[pyetcd.Endpoint(host, int(port), secure=False)], timeout=1.0
    )
    try:
        c.get(b"/kvfs-health")
        return True
    except Exception:
        return False
    finally:
        c.close()

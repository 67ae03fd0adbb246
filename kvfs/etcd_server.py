"""A private single-node etcd for a kvfs that was given no --etcd."""

import hashlib
import logging
import os
import shutil
import signal
import stat
import subprocess
import time

from .errors import KvfsError

log = logging.getLogger(__name__)


# A unix socket's path is limited to 107 bytes, so the sockets cannot sit beside
# a data directory of any depth; they go under a short directory of our own.
RUN_DIR = "/run/kvfs"


def socket_dir(data_dir: str) -> str:
    """A directory only this user can enter, for the private etcd's sockets."""
    if os.geteuid() == 0:
        base = RUN_DIR
    else:
        base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/kvfs-{os.geteuid()}"
    key = hashlib.sha1(os.path.abspath(data_dir).encode()).hexdigest()[:16]
    path = os.path.join(base, f"etcd-{key}")
    _private_dir(base, leaf=False)
    _private_dir(path, leaf=True)
    return path


def _private_dir(path: str, leaf: bool) -> None:
    """Make PATH (or accept it) only if it is ours and nobody else may change it.

    Whoever could enter the leaf could connect to etcd, and whoever could write
    it or a parent could swap the socket for one of their own."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if (
        not stat.S_ISDIR(st.st_mode)
        or st.st_uid != os.geteuid()
        or (not leaf and st.st_mode & 0o022)
    ):
        raise KvfsError(
            f"{path} is not a directory owned by uid {os.geteuid()} that only it may "
            "write: refusing to put the private etcd's socket there"
        )
    if leaf and st.st_mode & 0o077:
        os.chmod(path, 0o700)


class PrivateEtcd:
    """etcd for one mount, reachable only through unix sockets in a 0700 directory.

    It holds the permission table of the filesystem (owners, modes): a TCP port,
    even on loopback, would let any local user rewrite it. Connecting to a unix
    socket needs search permission on its directory, which only our user has.
    Both the client and the peer URL are sockets there, so etcd opens no port."""

    def __init__(self, data_dir: str, log_path: str | None = None):
        self.data_dir = data_dir
        self.log_path = log_path or os.path.join(os.path.dirname(data_dir), "etcd.log")
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""
        self.sock_dir = ""

    def start(self, timeout: float = 20.0) -> str:
        exe = shutil.which("etcd")
        if exe is None:
            raise KvfsError("no etcd binary on PATH (apt-get install etcd-server), or pass --etcd")
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        self._stop_orphan()
        self.sock_dir = socket_dir(self.data_dir)
        # etcd insists that every URL, a unix one too, has the form HOST:PORT, and
        # makes the socket file under that name in its working directory
        client, peer = "client.sock:0", "peer.sock:0"
        for name in (client, peer):
            try:
                os.unlink(os.path.join(self.sock_dir, name))
            except FileNotFoundError:
                pass
        client_path = os.path.join(self.sock_dir, client)
        # what gRPC (and etcdctl as unix://PATH) dials
        self.endpoint = f"unix:{client_path}"
        cmd = [
            exe,
            "--name",
            "kvfs",
            "--data-dir",
            os.path.abspath(self.data_dir),
            "--listen-client-urls",
            f"unix://{client}",
            "--advertise-client-urls",
            f"unix://{client}",
            "--listen-peer-urls",
            f"unix://{peer}",
            "--initial-advertise-peer-urls",
            f"unix://{peer}",
            "--initial-cluster",
            f"kvfs=unix://{peer}",
            "--heartbeat-interval",
            "10",
            "--election-timeout",
            "100",
            # old revisions would otherwise pile up forever
            "--auto-compaction-mode",
            "periodic",
            "--auto-compaction-retention",
            "1h",
            # a data directory from a version that used TCP ports remembers
            # other peer URLs: start it as a new one-member cluster anyway
            "--force-new-cluster",
        ]
        logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            cmd,
            stdout=logf,
            stderr=logf,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=self.sock_dir,
            umask=0o077,
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
            if os.path.exists(client_path) and _healthy(self.endpoint):
                log.info("private etcd at %s (data in %s)", self.endpoint, self.data_dir)
                return self.endpoint
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
        # the sockets go with the process; /run is a tmpfs, keep it tidy
        if self.sock_dir:
            for name in ("client.sock:0", "peer.sock:0"):
                try:
                    os.unlink(os.path.join(self.sock_dir, name))
                except OSError:
                    pass
            try:
                os.rmdir(self.sock_dir)
            except OSError:
                pass


def _healthy(endpoint: str) -> bool:
    import pyetcd

    host, _, port = endpoint.rpartition(":")  # "unix:PATH:0" dials PATH:0 as is
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

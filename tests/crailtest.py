"""A Crail cluster for tests: a NameNode and a TCP DataNode, each a JVM of its own.

The DataNode is Apache Crail's own (`org.apache.crail.storage.StorageServer`
with the TCP tier, from Maven Central); the NameNode is kvfs's stand-in
(tools/crail/KvfsNameNode.java, speaking Crail's protocol through Crail's TCP
RPC binding), as Crail never published its own. tools/setup.sh puts both in
.venv/crail.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

from kvfstest import free_port, wait_for

HOME = Path(os.environ.get("KVFS_CRAIL_HOME") or Path(sys.prefix) / "crail")
JAVA_OPTS = [
    "-Xmx256m",
    "-XX:+UseSerialGC",  # one GC thread: the machines running the tests are small
    "--add-exports=java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-opens=java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-opens=java.base/java.nio=ALL-UNNAMED",
]


def broadcast_interface() -> str:
    """An interface with an IPv4 broadcast address: Crail's TCP DataNode
    binds to one (loopback has none); traffic to it stays on this host."""
    out = subprocess.run(
        ["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout
    for line in out.splitlines():
        if " brd " in line:
            return line.split()[1]
    raise RuntimeError("no network interface with an IPv4 broadcast address for Crail's DataNode")


class CrailCluster:
    def __init__(self, base: Path, storage: int = 256 << 20):
        self.base = base
        self.storage = storage  # bytes the DataNode offers, in 64 MiB regions
        self.conf = base / "conf"
        self.data = base / "data"
        self.nn_port = free_port()
        self.dn_port = free_port()
        self.namenode: subprocess.Popen | None = None
        self.datanode: subprocess.Popen | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.nn_port}"

    def spec(self, path: str) -> str:
        return f"crail://{self.address}/{path}"

    def _write_conf(self) -> None:
        self.conf.mkdir(parents=True, exist_ok=True)
        self.data.mkdir(parents=True, exist_ok=True)
        (self.conf / "crail-site.conf").write_text(
            f"crail.namenode.address crail://{self.address}\n"
            "crail.namenode.rpctype org.apache.crail.namenode.rpc.tcp.TcpNameNode\n"
            "crail.storage.types org.apache.crail.storage.tcp.TcpStorageTier\n"
            "crail.blocksize 1048576\n"
            "crail.buffersize 1048576\n"
            "crail.regionsize 67108864\n"
            "crail.cachelimit 0\n"
            f"crail.cachepath {self.base}/cache\n"
            "crail.storage.keepalive 1\n"
            "crail.namenode.tcp.cores 1\n"
            f"crail.storage.tcp.interface {broadcast_interface()}\n"
            f"crail.storage.tcp.port {self.dn_port}\n"
            f"crail.storage.tcp.storagelimit {self.storage}\n"
            "crail.storage.tcp.allocationsize 67108864\n"
            "crail.storage.tcp.cores 1\n"
            f"crail.storage.tcp.datapath {self.data}\n"
        )
        (self.conf / "log4j.properties").write_text(
            "log4j.rootLogger=INFO, A1\n"
            "log4j.appender.A1=org.apache.log4j.ConsoleAppender\n"
            "log4j.appender.A1.layout=org.apache.log4j.PatternLayout\n"
            "log4j.appender.A1.layout.ConversionPattern=%d{HH:mm:ss.SSS} %p %c{1}: %m%n\n"
        )

    def _java(self, name: str, main: list[str]) -> subprocess.Popen:
        classpath = [str(HOME / "classes"), str(self.conf), str(HOME / "jars" / "*")]
        log = open(self.base / f"{name}.log", "ab")
        try:
            return subprocess.Popen(
                ["java", *JAVA_OPTS, "-cp", ":".join(classpath), *main],
                stdout=log,
                stderr=log,
                env={**os.environ, "CRAIL_HOME": str(self.base)},
                start_new_session=True,
            )
        finally:
            log.close()

    def log(self, name: str) -> str:
        p = self.base / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def start(self):
        if not (HOME / "classes" / "KvfsNameNode.class").exists():
            raise RuntimeError(f"no Crail in {HOME}: run tools/setup.sh")
        self._write_conf()
        self.namenode = self._java("namenode", ["KvfsNameNode"])
        # a DataNode that finds no NameNode gives up registering but lives on
        wait_for(self._namenode_listens, 60, 0.1, "the Crail NameNode to listen")
        self.start_datanode()
        return self

    def _namenode_listens(self) -> bool:
        if self.namenode.poll() is not None:
            raise RuntimeError(f"the Crail NameNode died:\n{self.log('namenode')[-3000:]}")
        # Asked of the kernel, not by connecting: Crail's TCP NameNode loses its
        # accept loop to a client that closes right after connecting
        # (ClosedChannelException in TcpNameNodeServer.run) and then serves no one.
        return _listening(self.nn_port)

    def start_datanode(self) -> None:
        """A DataNode, registered with the NameNode when this returns."""
        self.starts += 1
        registered = f"freeBlocks {self.storage >> 20}"
        mark = self.log("datanode").count(registered)
        self.datanode = self._java(
            "datanode",
            [
                "org.apache.crail.storage.StorageServer",
                "-t",
                "org.apache.crail.storage.tcp.TcpStorageTier",
            ],
        )
        failed = 'Exception in thread "main"'
        gone = self.log("datanode").count(failed)
        wait_for(
            lambda: (
                self.log("datanode").count(registered) > mark
                or self.log("datanode").count(failed) > gone
                or self.datanode.poll() is not None
            ),
            60,
            0.1,
            "the Crail DataNode to register",
        )
        if self.log("datanode").count(registered) <= mark:
            _stop(self.datanode, signal.SIGKILL)
            raise RuntimeError(
                f"the Crail DataNode did not register:\n{self.log('datanode')[-3000:]}"
            )

    def serving(self) -> bool:
        """Both JVMs alive and the NameNode answering a client (in this
        process, within the client's own time limit)."""
        if self.namenode is None or self.namenode.poll() is not None:
            return False
        if self.datanode is None or self.datanode.poll() is not None:
            return False
        from kvfs.errors import KvfsError
        from kvfs.store.crail import CrailStore

        try:
            s = CrailStore(f"//{self.address}/health", node="health", state_dir=str(self.base))
        except KvfsError:
            return False
        s.close()
        return True

    def ensure_serving(self) -> None:
        """A test that left Crail unusable (a JVM died, or a NameNode stopped
        answering after being frozen) must not fail the ones after it: start
        an empty Crail again, its logs kept and the reason printed."""
        if self.serving():
            return
        print(f"crail: not serving, started again; NameNode log:\n{self.log('namenode')[-2000:]}")
        for name in ("namenode", "datanode"):
            p = self.base / f"{name}.log"
            if p.exists():
                p.rename(self.base / f"{name}.{self.starts}.log")
        self.restart()

    def tails(self) -> str:
        """What each JVM last logged, and whether it is alive: for a failure message."""
        out = []
        for name, proc in (("namenode", self.namenode), ("datanode", self.datanode)):
            state = "absent" if proc is None else proc.poll()
            out.append(f"--- {name} (exit status {state}):\n{self.log(name)[-1500:]}")
        return "\n".join(out)

    def kill_datanode(self) -> None:
        _stop(self.datanode, signal.SIGKILL)
        self.datanode = None

    def restart(self) -> None:
        """A new Crail at the same addresses, empty (its DataNode's memory is new)."""
        self.stop()
        self.start()

    def pause(self, on: bool) -> None:
        """Freeze (SIGSTOP) or thaw both JVMs: Crail unreachable, then back."""
        for p in (self.namenode, self.datanode):
            if p is not None:
                p.send_signal(signal.SIGSTOP if on else signal.SIGCONT)

    def stop(self) -> None:
        self.pause(False)
        _stop(self.datanode)
        _stop(self.namenode)
        self.datanode = self.namenode = None


def _listening(port: int) -> bool:
    """Some socket of this host listens on TCP PORT (IPv4 or IPv6)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    local, state = line.split()[1], line.split()[3]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        return True
        except FileNotFoundError:
            continue
    return False


def _stop(p: subprocess.Popen | None, sig=signal.SIGTERM) -> None:
    if p is None or p.poll() is not None:
        return
    p.send_signal(sig)
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()

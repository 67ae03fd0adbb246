"""A Crail cluster for tests: a NameNode and a TCP DataNode, each a JVM of its own.

The DataNode is Apache Crail's own (`org.apache.crail.storage.StorageServer`
with the TCP tier, from Maven Central); the NameNode is kvfs's stand-in
(tools/crail/KvfsNameNode.java, speaking Crail's protocol through Crail's TCP
RPC binding), as Crail never published its own. tools/setup.sh puts both in
.venv/crail.
"""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from kvfstest import free_port, wait_for

HOME = Path(os.environ.get("KVFS_CRAIL_HOME") or Path(sys.prefix) / "crail")
JAVA_OPTS = [
    "-Xmx96m",
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
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.nn_port)) == 0

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


def _stop(p: subprocess.Popen | None, sig=signal.SIGTERM) -> None:
    if p is None or p.poll() is not None:
        return
    p.send_signal(sig)
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()

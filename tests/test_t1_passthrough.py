"""FUSE passthrough through the patched pyfuse3 that tools/setup.sh builds.

The platform under kvfs's fast data path, so the first layer: a tiny
passthrough filesystem (tests/ptfs.py) runs in its own process over a
temporary directory. With passthrough, read, write and mmap never reach the
daemon and the bytes land in the backing file; without it, or without
CAP_SYS_ADMIN, the same daemon serves them itself.
"""

import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvfstest import wait_for

PTFS = Path(__file__).with_name("ptfs.py")

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")


class PtMount:
    def __init__(self, base: Path, args):
        self.source, self.path, self.logfile = base / "source", base / "mnt", base / "ptfs.log"
        self.source.mkdir(parents=True)
        self.path.mkdir()
        with open(self.logfile, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, PTFS, self.source, self.path, *args], stdout=log, stderr=log
            )
        wait_for(
            lambda: os.path.ismount(self.path) or self.proc.poll() is not None, what="the mount"
        )
        assert self.proc.poll() is None, self.log()

    def log(self) -> str:
        return self.logfile.read_text()

    def stats(self) -> dict:
        return json.loads(os.getxattr(self.path, "user.ptfs.stats"))

    def umount(self) -> int:
        """Unmount as a user would; the daemon must then exit by itself."""
        subprocess.run(["fusermount3", "-u", self.path], check=True, capture_output=True)
        return self.proc.wait(timeout=10)

    def cleanup(self):
        """After a failed test: lazy unmount, then terminate, then kill."""
        if os.path.ismount(self.path):
            subprocess.run(["fusermount3", "-u", "-z", self.path], capture_output=True)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def ptfs(tmp_path):
    mounts = []

    def start(*args):
        mounts.append(PtMount(tmp_path / f"pt{len(mounts)}", args))
        return mounts[-1]

    yield start
    for m in mounts:
        m.cleanup()


def unmount_cleanly(m: PtMount):
    assert m.umount() == 0, m.log()
    assert not os.path.ismount(m.path)
    assert "Traceback" not in m.log(), m.log()


def test_read_write_and_mmap_pass_through(ptfs):
    m = ptfs()
    assert m.stats()["passthrough"] is True, "the kernel or pyfuse3 refused passthrough"
    data = os.urandom(4 << 20)
    (m.path / "f").write_bytes(data)  # create, then write
    assert (m.source / "f").read_bytes() == data
    assert (m.path / "f").read_bytes() == data
    assert os.stat(m.path / "f").st_size == len(data)

    # reads on a read-write descriptor see the file's bytes, and see writes
    with open(m.path / "f", "r+b") as f:
        f.seek(1 << 20)
        f.write(b"middle")
        f.seek(1 << 20)
        assert f.read(6) == b"middle"
        assert f.read(4) == data[(1 << 20) + 6 : (1 << 20) + 10]

    # shared writable mmap: stores reach the backing file, reads see them
    with open(m.path / "f", "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        mm[:5] = b"HELLO"
        mm[-5:] = b"WORLD"
        mm.flush()
        assert mm[1 << 20 : (1 << 20) + 6] == b"middle"
    want = b"HELLO" + data[5 : 1 << 20] + b"middle" + data[(1 << 20) + 6 : -5] + b"WORLD"
    assert (m.source / "f").read_bytes() == want
    assert (m.path / "f").read_bytes() == want

    stats = m.stats()
    assert stats.get("reads", 0) == 0 and stats.get("writes", 0) == 0, stats
    assert stats["passthrough_opens"] == 5, stats
    unmount_cleanly(m)


def test_without_passthrough_the_daemon_serves_bytes(ptfs):
    m = ptfs("--no-passthrough")
    assert m.stats()["passthrough"] is False
    data = os.urandom(1 << 20)
    (m.path / "f").write_bytes(data)
    assert (m.path / "f").read_bytes() == data
    assert (m.source / "f").read_bytes() == data
    stats = m.stats()
    assert stats["reads"] > 0 and stats["writes"] > 0 and "passthrough_opens" not in stats
    unmount_cleanly(m)


def test_without_cap_sys_admin_registering_fails_and_the_daemon_serves(ptfs):
    m = ptfs("--drop-sys-admin")
    assert m.stats()["passthrough"] is True  # granted at init: the ioctl is what needs it
    data = os.urandom(1 << 20)
    (m.path / "f").write_bytes(data)
    assert (m.path / "f").read_bytes() == data
    stats = m.stats()
    assert stats["passthrough_open_EPERM"] == 2 and stats["reads"] > 0, stats
    unmount_cleanly(m)

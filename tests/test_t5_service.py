"""kvfs run as a service: the systemd unit, mount(8) and fstab, the config file.

The unit test plays systemd's part: it reads the commands from
systemd/kvfs@.service, expands the specifiers for an instance, runs them in
systemd's order and listens on its own NOTIFY_SOCKET.
"""

import errno
import json
import os
import re
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from kvfstest import KVFS, ROOT, wait_for

UNIT = ROOT / "systemd" / "kvfs@.service"
BIN = Path(sys.executable).parent  # the venv's kvfs and mount.kvfs


def sh(*cmd, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)


def unmount_lazy(path):
    sh("fusermount3", "-u", "-z", path)


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def status(mnt) -> dict:
    return json.loads(os.getxattr(mnt, "user.kvfs.status"))


# -- the unit, as systemd would run it -------------------------------------------------


class Unit:
    """One instance of kvfs@.service, its commands expanded as systemd would."""

    def __init__(self, mountpoint: Path, etc: Path):
        self.mountpoint = mountpoint
        self.instance = sh("systemd-escape", "-p", mountpoint, check=True).stdout.strip()
        unescaped = sh("systemd-escape", "-u", self.instance, check=True).stdout.strip()
        self.spec = {"i": self.instance, "I": unescaped, "f": "/" + unescaped, "%": "%"}
        self.etc = etc
        self.commands = {}
        self.env = {}
        section = None
        for line in UNIT.read_text().splitlines():
            line = line.strip()
            if line.startswith("["):
                section = line
            elif section == "[Service]" and line.startswith("Exec"):
                key, _, value = line.partition("=")
                self.commands.setdefault(key, []).append(self._expand(value))
            elif section == "[Service]" and line.startswith("Environment="):
                for assignment in shlex.split(line.partition("=")[2]):
                    k, _, v = assignment.partition("=")
                    self.env[k] = v

    def _expand(self, value: str):
        def one(m):
            if m.group(1) not in self.spec:
                raise AssertionError(f"the test does not know the specifier %{m.group(1)}")
            return self.spec[m.group(1)]

        value = re.sub(r"%(.)", one, value).replace("$$", "$")
        # the installed paths, pointed at this checkout and this test's /etc/kvfs
        value = value.replace("/usr/local/bin/kvfs", str(BIN / "kvfs"))
        value = value.replace("/etc/kvfs/", f"{self.etc}/")
        ignore = value.startswith("-")
        return ignore, shlex.split(value.lstrip("-"))

    def config_path(self, shared=False) -> Path:
        return self.etc / ("kvfs.json" if shared else self.spec["I"] + ".json")

    def run_hooks(self, key):
        for ignore, argv in self.commands.get(key, []):
            r = sh(*argv)
            assert ignore or r.returncode == 0, f"{key} {argv}: {r.stderr}"

    def start(self, notify_path: str, log: Path) -> subprocess.Popen:
        self.run_hooks("ExecStartPre")
        [(_, argv)] = self.commands["ExecStart"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVFS_")}
        env.update(self.env, NOTIFY_SOCKET=notify_path)
        with open(log, "ab") as f:
            return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=f, stderr=f)


class NotifySocket:
    """systemd's end of sd_notify: datagrams with the sender's credentials."""

    def __init__(self, path: Path):
        assert len(str(path)) < 100, path
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def receive(self, proc, timeout, log: Path):
        """The next (pid, message); fails early if the daemon exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(0.1)
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                if proc.poll() is not None:
                    raise AssertionError(
                        f"daemon exited {proc.returncode} with nothing sent:\n{log.read_text()}"
                    ) from None
                continue
            pid = None
            for level, kind, value in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", value[:12])[0]
            return pid, data.decode()
        raise AssertionError(f"no notification in {timeout}s:\n{log.read_text()}")

    def close(self):
        self.sock.close()


def test_unit_verifies():
    """What CI checks (a template is verified as an instance: commands included)."""
    r = sh("systemd-analyze", "verify", UNIT, UNIT.with_name("kvfs@kvcache.service"))
    assert r.stdout + r.stderr == ""


def test_unit_ready_restart_and_clean_stop(tmp_path, etcd):
    mnt = tmp_path / "kvcache"
    etc = tmp_path / "etc" / "kvfs"
    unit = Unit(mnt, etc)
    log = tmp_path / "journal.log"
    prefix = f"/t5-{uuid.uuid4().hex[:8]}/"
    etc.mkdir(parents=True)
    # the shared file, in the original project's keys
    unit.config_path(shared=True).write_text(
        json.dumps(
            {
                "kv_transfer_config": {
                    "storage_type": "local",
                    "local_dir": str(tmp_path / "store"),
                    "etcd_endpoints": etcd.endpoints.split(","),
                    "kv_expire_time": 4321,
                    "cleanup_interval": 600,
                },
                "etcd_prefix": prefix,
                "state_dir": str(tmp_path / "state"),
            }
        )
    )
    notify = NotifySocket(tmp_path / "notify")
    proc = None
    try:
        assert not mnt.exists()  # ExecStartPre makes it
        proc = unit.start(notify.path, log)
        pid, msg = notify.receive(proc, 60, log)
        # READY=1 comes from the main process, once the mount answers
        assert (pid, msg) == (proc.pid, "READY=1")
        assert os.path.ismount(mnt) and os.listdir(mnt) == []
        st = status(mnt)
        assert st["pid"] == proc.pid
        assert st["store"]["url"] == f"local:{tmp_path / 'store'}"
        assert st["expiry"]["ttl_s"] == 4321 and st["etcd"]["prefix"] == prefix
        (mnt / "chat").mkdir()
        (mnt / "chat" / "layer0").write_bytes(b"kv" * 1000)
        # the commit happens on release, which the kernel sends after close()
        wait_for(lambda: status(mnt)["counters"]["commits"] == 1, 30, what="commit")

        # a crash leaves a dead mount; ExecStopPost clears it, the restart mounts
        # again, now from the instance's own config file
        proc.kill()
        assert proc.wait(15) == -signal.SIGKILL
        with pytest.raises(OSError) as e:
            os.listdir(mnt)
        assert e.value.errno == errno.ENOTCONN
        unit.run_hooks("ExecStopPost")
        assert not os.path.ismount(mnt) and os.listdir(mnt) == []
        cfg = json.loads(unit.config_path(shared=True).read_text())
        cfg["kv_transfer_config"]["kv_expire_time"] = 1234
        unit.config_path().parent.mkdir(parents=True, exist_ok=True)
        unit.config_path().write_text(json.dumps(cfg))
        proc = unit.start(notify.path, log)
        assert notify.receive(proc, 60, log) == (proc.pid, "READY=1")
        assert status(mnt)["expiry"]["ttl_s"] == 1234
        assert (mnt / "chat" / "layer0").read_bytes() == b"kv" * 1000

        # systemctl stop: SIGTERM to the main process
        proc.send_signal(signal.SIGTERM)
        assert notify.receive(proc, 30, log) == (proc.pid, "STOPPING=1")
        assert proc.wait(60) == 0
        assert not os.path.ismount(mnt)
        unit.run_hooks("ExecStopPost")  # finds nothing to do, and that is fine
        text = log.read_text()
        assert "unmounted" in text and "Traceback" not in text, text
    finally:
        if proc is not None:
            stop(proc)
        unmount_lazy(mnt)
        notify.close()


def test_unit_bad_config_fails_before_ready(tmp_path):
    mnt = tmp_path / "kvcache"
    etc = tmp_path / "etc" / "kvfs"
    unit = Unit(mnt, etc)
    etc.mkdir(parents=True)
    unit.config_path(shared=True).write_text('{"kv_transfer_config": {"kv_expire_tme": 60}}')
    log = tmp_path / "journal.log"
    notify = NotifySocket(tmp_path / "notify")
    proc = unit.start(notify.path, log)
    try:
        assert proc.wait(30) == 1
        text = log.read_text()
        assert "kv_expire_tme" in text and "Traceback" not in text, text
        notify.sock.settimeout(0)
        with pytest.raises(BlockingIOError):
            notify.sock.recv(4096)
        assert not os.path.ismount(mnt)
    finally:
        stop(proc)
        unmount_lazy(mnt)
        notify.close()


# -- mount(8), the helper and fstab ----------------------------------------------------


@pytest.fixture
def helpers_installed():
    """/sbin/mount.kvfs and /sbin/mount.fuse.kvfs, linked as docs/OPERATIONS.md says."""
    made = []
    for name in ("mount.kvfs", "mount.fuse.kvfs"):
        link = Path("/sbin") / name
        if not link.exists():
            link.symlink_to(BIN / "mount.kvfs")
            made.append(link)
    yield
    for link in made:
        link.unlink(missing_ok=True)


def _daemon_gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] == "Z"


def test_mount_helper_and_fstab(tmp_path, etcd, helpers_installed):
    prefix = f"/t5-{uuid.uuid4().hex[:8]}/"
    mnt = tmp_path / "kvcache"
    mnt.mkdir()
    opts = (
        f"store=local:{tmp_path / 'store'},etcd={etcd.endpoints},etcd_prefix={prefix},"
        f"state_dir={tmp_path / 'state'},ttl=60"
    )
    pids = []
    try:
        # the helper as mount(8) calls it, with the options mount adds
        r = sh(BIN / "mount.kvfs", "kvfs", mnt, "-o", "rw," + opts + ",_netdev,nofail")
        assert r.returncode == 0, r.stderr + (tmp_path / "state" / "kvfs.log").read_text()
        st = status(mnt)
        pids.append(st["pid"])
        assert st["expiry"]["ttl_s"] == 60 and st["etcd"]["prefix"] == prefix
        (mnt / "s").mkdir()
        (mnt / "s" / "l0").write_bytes(b"x" * 100)
        assert sh("umount", mnt).returncode == 0
        wait_for(lambda: _daemon_gone(pids[-1]), 30, what="daemon exit after umount")

        # mount -t fuse.kvfs
        r = sh("mount", "-t", "fuse.kvfs", "-o", opts.replace("ttl=60", "ttl=61"), "kvfs", mnt)
        assert r.returncode == 0, r.stderr
        st = status(mnt)
        pids.append(st["pid"])
        assert st["expiry"]["ttl_s"] == 61
        assert (mnt / "s" / "l0").read_bytes() == b"x" * 100
        fstype = sh("findmnt", "-n", "-o", "FSTYPE", mnt).stdout.strip()
        assert fstype == "fuse.kvfs"
        assert sh("umount", mnt).returncode == 0
        wait_for(lambda: _daemon_gone(pids[-1]), 30, what="daemon exit after umount")

        # an /etc/fstab line; etcd endpoints and the store from a config file
        cfg = tmp_path / "kvfs.json"
        cfg.write_text(
            json.dumps(
                {
                    "kv_transfer_config": {
                        "local_dir": str(tmp_path / "store"),
                        "etcd_endpoints": etcd.endpoints.split(","),
                        "kv_expire_time": 62,
                    }
                }
            )
        )
        fstab = tmp_path / "fstab"
        fstab.write_text(
            f"kvfs {mnt} fuse.kvfs config={cfg},etcd_prefix={prefix},"
            f"state_dir={tmp_path / 'state'},_netdev,nofail,x-systemd.after=etcd.service 0 0\n"
        )
        r = sh("mount", "--fstab", fstab, mnt)
        assert r.returncode == 0, r.stderr
        st = status(mnt)
        pids.append(st["pid"])
        assert st["expiry"]["ttl_s"] == 62
        assert os.listdir(mnt / "s") == ["l0"]
        assert sh("umount", mnt).returncode == 0
        wait_for(lambda: _daemon_gone(pids[-1]), 30, what="daemon exit after umount")
    finally:
        unmount_lazy(mnt)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# -- the config file -------------------------------------------------------------------


@pytest.mark.parametrize(
    "content,names",
    [
        ('{"ttl": 60, "cach_sessions": 5}', ["cach_sessions", "unknown"]),
        ('{"kv_transfer_config": {"enable_prefetch": "maybe"}}', ["maybe", "enable_prefetch"]),
        ('{"capacity": "lots"}', ["lots", "capacity"]),
        ('{"cleanup_interval": -1}', ["-1", "cleanup_interval"]),
        ('{"local_dir": "/x"}', ["local_dir", "kv_transfer_config"]),
        ('{"kv_transfer_config": {"etcd_endpoints": 2379}}', ["2379", "etcd"]),
        ('{"ttl": 60,}', ["not valid JSON"]),
        ("[1]", ["JSON object"]),
    ],
)
def test_config_errors_name_the_setting(tmp_path, content, names):
    cfg = tmp_path / "kvfs.json"
    cfg.write_text(content)
    (tmp_path / "mnt").mkdir()
    r = sh(*KVFS, "mount", "--foreground", "--config", cfg, tmp_path / "mnt")
    assert r.returncode == 1
    assert r.stderr.startswith(f"kvfs: error: {cfg}") and "Traceback" not in r.stderr
    for name in names:
        assert name in r.stderr, r.stderr
    assert not os.path.ismount(tmp_path / "mnt")


def test_config_env_and_flag_errors_name_their_source(tmp_path):
    (tmp_path / "mnt").mkdir()
    r = sh(*KVFS, "mount", "--foreground", "--ttl", "soon", tmp_path / "mnt")
    assert r.returncode == 1 and "--ttl" in r.stderr and "soon" in r.stderr
    env = {**os.environ, "KVFS_TOUCH_ON_READ": "sometimes"}
    r = sh(*KVFS, "mount", "--foreground", tmp_path / "mnt", env=env)
    assert r.returncode == 1 and "KVFS_TOUCH_ON_READ" in r.stderr and "sometimes" in r.stderr
    r = sh(*KVFS, "mount", "--foreground", "--config", tmp_path / "none.json", tmp_path / "mnt")
    assert r.returncode == 1 and "none.json" in r.stderr and "No such file" in r.stderr
    assert "Traceback" not in r.stderr


def test_flags_override_env_override_file(tmp_path, make_mount, monkeypatch):
    cfg = tmp_path / "kvfs.json"
    cfg.write_text(
        json.dumps(
            {
                "kv_transfer_config": {"kv_expire_time": 100, "cleanup_interval": 100},
                "touch_on_read": True,
                "capacity": "1M",
            }
        )
    )
    monkeypatch.setenv("KVFS_TTL", "200")
    monkeypatch.setenv("KVFS_CLEANUP_INTERVAL", "300")
    m = make_mount("--config", str(cfg), "--cleanup-interval", "400", "--no-touch-on-read")
    st = m.status()
    assert st["expiry"] == {
        "ttl_s": 200.0,  # env over file
        "cleanup_interval_s": 400.0,  # flag over env
        "touch_on_read": False,  # flag over file
        "last_gc": None,
    }
    assert st["store"]["capacity"] == 1 << 20  # the file, where nothing overrides it

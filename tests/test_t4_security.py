"""The private etcd is the permission table: only the daemon may reach it.

Issue 9.9: the private etcd that `kvfs mount` starts without --etcd listened on
an open loopback port with no authentication, so any local user could rewrite
a file's owner in etcd and then read a 0600 file on an --allow-other mount.
Here user `nobody` tries exactly that, on every socket the etcd process
listens on, with etcdctl and with a raw connect.
"""

import os
import shutil
import stat
import subprocess
import uuid
from pathlib import Path

import pytest

from kvfstest import wait_for

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
NOBODY_ENV = {"PATH": "/usr/bin:/bin", "ETCDCTL_API": "3", "HOME": "/"}
# the system's Python: nobody may not be able to read the test's virtualenv
PY = "/usr/bin/python3"


def as_nobody(*cmd, timeout=20):
    return subprocess.run(
        NOBODY + list(cmd), capture_output=True, text=True, timeout=timeout, env=NOBODY_ENV
    )


def socket_inodes(pid: int) -> set[int]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(int(link[8:-1]))
    return out


def listening(pid: int) -> tuple[list[int], list[str]]:
    """The TCP/UDP ports and the unix socket paths that process PID listens on."""
    inodes = socket_inodes(pid)
    ports = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            next(f)
            for line in f:
                cols = line.split()
                local, state, inode = cols[1], cols[3], int(cols[9])
                # TCP in LISTEN (0A); any bound UDP socket receives
                if inode in inodes and (state == "0A" or table.startswith("udp")):
                    ports.append(int(local.rsplit(":", 1)[1], 16))
    cwd = os.readlink(f"/proc/{pid}/cwd")
    paths = []
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            cols = line.split()
            flags, inode = int(cols[3], 16), int(cols[6])
            if inode in inodes and flags & 0x10000 and len(cols) > 7:  # __SO_ACCEPTCON
                path = cols[7]
                if not path.startswith("@"):  # etcd binds relative names in its cwd
                    path = os.path.join(cwd, path)
                paths.append(path)
    return sorted(set(ports)), sorted(set(paths))


ATTACK = r"""
# What a local user would do: read every key, make every owner nobody and
# every mode 0777, write it back.
E="$1"
keys=$(etcdctl --endpoints "$E" --dial-timeout=2s --command-timeout=3s get --prefix --keys-only "") || exit 10
[ -n "$keys" ] || exit 11
for k in $keys; do
    v=$(etcdctl --endpoints "$E" --dial-timeout=2s --command-timeout=3s get --print-value-only "$k") || exit 12
    nv=$(printf '%s' "$v" | sed -E 's/"uid":[0-9]+/"uid":65534/; s/"mode":16832/"mode":16895/; s/"mode":33152/"mode":33279/')
    etcdctl --endpoints "$E" --dial-timeout=2s --command-timeout=3s put "$k" "$nv" >/dev/null || exit 13
done
echo rewrote
"""


@pytest.fixture
def public_mountpoint():
    # pytest's tmp dirs are private to root: mount where nobody can walk to
    # (ask for it before make_mount, so that it is removed after the unmount)
    p = Path(f"/tmp/kvfs-sec-{uuid.uuid4().hex[:8]}")
    yield p
    try:
        p.rmdir()
    except OSError:
        pass


def test_nobody_cannot_reach_the_private_etcd(public_mountpoint, make_mount):
    if shutil.which("setpriv") is None or shutil.which("etcdctl") is None:
        pytest.fail("setpriv and etcdctl are needed (util-linux, etcd-client)")
    m = make_mount("--allow-other", name=str(public_mountpoint), private_etcd=True)
    assert m.status()["etcd"]["private"] is True
    (m.path / "priv").mkdir(mode=0o700)
    os.chmod(m.path / "priv", 0o700)  # mkdir's mode goes through the umask
    (m.path / "priv" / "secret").write_text("the secret")
    os.chmod(m.path / "priv" / "secret", 0o600)
    (m.path / "pub").mkdir()
    (m.path / "pub" / "f").write_text("shared")
    r = as_nobody("cat", str(m.path / "priv" / "secret"))
    assert r.returncode != 0 and "Permission denied" in r.stderr

    pid = int((m.store / "etcd.pid").read_text())
    ports, paths = listening(pid)
    assert ports or paths, "found no socket of the private etcd"
    endpoints = [f"127.0.0.1:{p}" for p in ports] + [f"unix://{p}" for p in paths]

    # the attack, through every endpoint the process has
    attacks = {e: as_nobody("sh", "-c", ATTACK, "attack", e, timeout=60) for e in endpoints}
    # ... and a plain connect to each
    connects = {}
    for p in ports:
        connects[p] = as_nobody(
            PY, "-c", f"import socket; socket.create_connection(('127.0.0.1', {p}), 2)"
        )
    for p in paths:
        connects[p] = as_nobody(
            PY, "-c", f"import socket; socket.socket(socket.AF_UNIX).connect({p!r})"
        )

    # whatever happened, nobody must still be kept out of the 0600 file (a
    # rewritten owner reaches the daemon through its etcd watch: give it time)
    def nobody_reads():
        r = as_nobody("cat", str(m.path / "priv" / "secret"))
        return r.returncode == 0 and r.stdout

    try:
        leaked = wait_for(nobody_reads, 3, 0.2)
    except AssertionError:
        leaked = None
    assert leaked is None, f"nobody read the 0600 file: {leaked!r}; attacks: {attacks}"

    for e, r in attacks.items():
        print(f"attack via {e}: rc={r.returncode} {(r.stdout + r.stderr).strip()[-300:]}")
    for p, r in connects.items():
        print(f"connect to {p}: rc={r.returncode} {r.stderr.strip()[-200:]}")
    for e, r in attacks.items():
        assert r.returncode != 0 and "rewrote" not in r.stdout, (
            f"nobody used the private etcd at {e}: rc={r.returncode} {r.stdout}{r.stderr}"
        )
    for p, r in connects.items():
        assert r.returncode != 0, f"nobody connected to the private etcd's {p}"
    # nothing on an IP port at all, and every socket in a directory only root enters
    assert ports == [], f"the private etcd listens on TCP/UDP ports {ports}"
    for p in paths:
        d = os.stat(os.path.dirname(p))
        assert d.st_uid == 0 and stat.S_IMODE(d.st_mode) == 0o700, (p, oct(d.st_mode))

    # the mount itself goes on working, for root and for nobody where allowed
    assert (m.path / "priv" / "secret").read_text() == "the secret"
    st = os.stat(m.path / "priv" / "secret")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
    (m.path / "pub" / "g").write_text("after")
    assert (m.path / "pub" / "g").read_text() == "after"
    r = as_nobody("cat", str(m.path / "pub" / "f"))
    assert r.returncode == 0 and r.stdout == "shared", r.stderr

"""Access: who may use the mount, etcd over TLS and with passwords, no pickle."""

import os
import re
import subprocess
import uuid
from pathlib import Path

import pytest

from kvfstest import KVFS, Mount, free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_no_pickle_anywhere():
    pattern = re.compile(r"\bimport pickle\b|\bpickle\.|torch\.(load|save)\(|\bcloudpickle\b")
    offenders = []
    for d in ("kvfs", "connector"):
        for p in (ROOT / d).rglob("*.py"):
            for i, line in enumerate(p.read_text().splitlines(), 1):
                if pattern.search(line.split("#")[0]):
                    offenders.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
    assert offenders == []


def test_mount_is_private_without_allow_other(make_mount):
    m = make_mount()
    (m.path / "s").mkdir()
    (m.path / "s" / "f").write_bytes(b"secret")
    r = subprocess.run(NOBODY + ["cat", str(m.path / "s" / "f")], capture_output=True, text=True)
    assert r.returncode != 0 and "Permission denied" in r.stderr


def test_allow_other_with_permission_checks(make_mount):
    # pytest's tmp dirs are private to root: mount where nobody can walk to
    public = Path(f"/tmp/kvfs-acc-{uuid.uuid4().hex[:8]}")
    m = make_mount("--allow-other", name=str(public))
    (m.path / "s").mkdir()
    (m.path / "s" / "f").write_bytes(b"shared")
    (m.path / "s" / "private").write_bytes(b"x")
    os.chmod(m.path / "s" / "private", 0o600)
    r = subprocess.run(NOBODY + ["cat", str(m.path / "s" / "f")], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "shared"
    r = subprocess.run(
        NOBODY + ["cat", str(m.path / "s" / "private")], capture_output=True, text=True
    )
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = subprocess.run(
        NOBODY + ["touch", str(m.path / "s" / "new")], capture_output=True, text=True
    )
    assert r.returncode != 0 and "Permission denied" in r.stderr


def _etcd(tmp_path, extra, scheme="http"):
    port, peer = free_port(), free_port()
    data = tmp_path / f"etcd-{port}"
    cmd = [
        "etcd",
        "--name",
        "a",
        "--data-dir",
        str(data),
        "--listen-client-urls",
        f"{scheme}://127.0.0.1:{port}",
        "--advertise-client-urls",
        f"{scheme}://127.0.0.1:{port}",
        "--listen-peer-urls",
        f"http://127.0.0.1:{peer}",
        "--initial-advertise-peer-urls",
        f"http://127.0.0.1:{peer}",
        "--initial-cluster",
        f"a=http://127.0.0.1:{peer}",
        "--heartbeat-interval",
        "10",
        "--election-timeout",
        "100",
    ] + extra
    log = open(tmp_path / f"etcd-{port}.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    return proc, f"127.0.0.1:{port}"


def _mount_cmd(tmp_path, endpoint, *args):
    m = Mount(
        path=tmp_path / f"mnt-{uuid.uuid4().hex[:6]}",
        store=tmp_path / "store",
        etcd=endpoint,
        prefix="/acc/",
        state_dir=tmp_path / "state",
        args=list(args),
    )
    m.path.mkdir()
    return m


@pytest.fixture
def certs(tmp_path):
    d = tmp_path / "pki"
    d.mkdir()

    def ssl(*a):
        subprocess.run(["openssl", *a], check=True, capture_output=True, cwd=d)

    ssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=kvfs-test-ca",
    )
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        ssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        ssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "2",
            "-extfile",
            "san.cnf",
        )
    return d


def test_etcd_over_tls(tmp_path, certs):
    proc, ep = _etcd(
        tmp_path,
        [
            "--cert-file",
            str(certs / "server.crt"),
            "--key-file",
            str(certs / "server.key"),
            "--trusted-ca-file",
            str(certs / "ca.crt"),
            "--client-cert-auth",
        ],
        scheme="https",
    )
    try:
        good = [
            "--etcd-ca-cert",
            str(certs / "ca.crt"),
            "--etcd-cert",
            str(certs / "client.crt"),
            "--etcd-key",
            str(certs / "client.key"),
        ]
        m = _mount_cmd(tmp_path, ep, *good)
        wait_for(lambda: _try_mount(m), 30, 0.3, what="mount over TLS")
        try:
            (m.path / "s").mkdir()
            (m.path / "s" / "f").write_bytes(b"over tls")
            assert (m.path / "s" / "f").read_bytes() == b"over tls"
            assert m.status()["etcd"]["endpoints"][0]["healthy"] is True
        finally:
            m.umount()
        # without a client certificate, or without TLS at all: a clear refusal
        for bad in (good[:2], []):
            r = _mount_once(_mount_cmd(tmp_path, ep, *bad))
            assert r.returncode != 0
            assert "etcd" in r.stderr and "Traceback" not in r.stderr, r.stderr
    finally:
        proc.terminate()
        proc.wait()


def test_etcd_with_password(tmp_path):
    proc, ep = _etcd(tmp_path, [])
    env = {**os.environ, "ETCDCTL_API": "3"}
    try:
        wait_for(
            lambda: (
                subprocess.run(
                    ["etcdctl", "--endpoints", ep, "endpoint", "health"],
                    capture_output=True,
                    env=env,
                ).returncode
                == 0
            ),
            30,
        )
        for cmd in (
            ["user", "add", "root:rootpw"],
            ["user", "add", "kv:kvpw"],
            ["role", "add", "kvrole"],
            ["role", "grant-permission", "kvrole", "--prefix=true", "readwrite", "/acc/"],
            ["user", "grant-role", "kv", "kvrole"],
            ["auth", "enable"],
        ):
            subprocess.run(
                ["etcdctl", "--endpoints", ep, *cmd], check=True, capture_output=True, env=env
            )
        m = _mount_cmd(tmp_path, ep, "--etcd-user", "kv")
        os.environ["KVFS_ETCD_PASSWORD"] = "kvpw"
        try:
            m.mount()
            (m.path / "s").mkdir()
            (m.path / "s" / "f").write_bytes(b"authenticated")
            assert (m.path / "s" / "f").read_bytes() == b"authenticated"
            m.umount()
            os.environ["KVFS_ETCD_PASSWORD"] = "wrong"
            r = _mount_once(_mount_cmd(tmp_path, ep, "--etcd-user", "kv"))
            assert r.returncode != 0
            assert "authentication failed" in r.stderr and "Traceback" not in r.stderr, r.stderr
        finally:
            os.environ.pop("KVFS_ETCD_PASSWORD", None)
            m.umount()
    finally:
        proc.terminate()
        proc.wait()


def _mount_once(m):
    cmd = KVFS + [
        "mount",
        str(m.path),
        "--store",
        f"local:{m.store}",
        "--state-dir",
        str(m.state_dir),
        "--etcd-prefix",
        m.prefix,
        "--etcd",
        m.etcd,
        "--foreground",
        *m.args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def _try_mount(m):
    try:
        m.mount()
        return True
    except AssertionError:
        return False

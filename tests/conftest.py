"""Shared fixtures: a real etcd (one node, or three on loopback) and real kvfs mounts.

Mounts run `kvfs mount` as a user would, in its own process; each test gets
its own store directory and its own etcd key prefix, so tests never see each
other's entries while sharing one etcd server.
"""

import shutil
import uuid
from pathlib import Path

import pytest

from kvfstest import EtcdCluster, Mount


@pytest.fixture(scope="session")
def etcd(tmp_path_factory):
    """One real etcd server for the whole run."""
    if shutil.which("etcd") is None:
        pytest.fail("etcd is not installed (tools/setup.sh installs it)")
    c = EtcdCluster(tmp_path_factory.mktemp("etcd"), 1).start()
    yield c
    c.stop()


@pytest.fixture(scope="session")
def crail(tmp_path_factory):
    """A Crail NameNode and TCP DataNode for the whole run (tests/crailtest.py)."""
    from crailtest import CrailCluster

    c = CrailCluster(tmp_path_factory.mktemp("crail"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture
def etcd_cluster(tmp_path):
    """A fresh three-member etcd cluster on loopback."""
    c = EtcdCluster(tmp_path / "etcd3", 3).start()
    yield c
    c.stop()


@pytest.fixture
def make_mount(tmp_path, etcd, request):
    """Mount kvfs instances; all share this test's etcd prefix unless told otherwise."""
    mounts = []
    prefix = f"/t-{uuid.uuid4().hex[:8]}/"

    def make(*args, store=None, etcd_endpoints=None, name=None, private_etcd=False):
        i = len(mounts)
        m = Mount(
            path=tmp_path / (name or f"mnt{i}"),
            store=Path(store) if store else tmp_path / "store",
            etcd="" if private_etcd else (etcd_endpoints or etcd.endpoints),
            prefix=prefix,
            state_dir=tmp_path / f"state{i}",
            args=list(args),
        )
        mounts.append(m)
        return m.mount()

    yield make
    errors = []
    for m in mounts:
        try:
            m.umount()  # fails on a daemon that does not exit by itself
        except AssertionError as exc:
            errors.append(str(exc))
        text = m.log()
        if "Traceback" in text and "allow_traceback" not in request.keywords:
            errors.append(f"{m.path}: daemon log has a traceback:\n{text[-4000:]}")
    if errors:
        pytest.fail("\n".join(errors))


@pytest.fixture
def kvfs_mount(make_mount):
    """One live kvfs mount (a real FUSE filesystem backed by a real etcd)."""
    return make_mount()

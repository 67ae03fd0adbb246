"""kvfs over Apache Crail: real mounts on a real Crail (tests/crailtest.py), one per run.

Each test gets a Crail directory of its own; `crail.pause` and
`kill_datanode` act on the run's one cluster, so those tests put it back.
"""

import errno
import json
import os
import time
import uuid

import pytest

from kvfs.config import load_config
from kvfs.errors import KvfsError
from kvfs.namespace import DELETE_GRACE
from kvfs.store.crail import CrailStore, parse_spec

from kvfstest import recover_after_losing_etcd, seen, wait_for, wait_seen


@pytest.fixture
def spec(crail):
    crail.ensure_serving()
    return crail.spec(f"t-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def probe(spec, tmp_path):
    """This process's own client of the test's Crail directory."""
    s = CrailStore(spec.removeprefix("crail:"), node="probe", state_dir=str(tmp_path))
    yield s
    s.close()


def obj_key(path) -> str:
    return os.getxattr(path, "user.kvfs.object").decode()


def _drop_caches():
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def write_layers(mnt, session, n, size):
    os.makedirs(mnt / session, exist_ok=True)
    data = {}
    for i in range(n):
        name = f"layer{i:02d}"
        data[name] = os.urandom(size)
        (mnt / session / name).write_bytes(data[name])
    return data


def test_store_specs():
    assert parse_spec("//nn:9060/kvfs") == ("nn:9060", "/kvfs")
    assert parse_spec("//nn:9060/a/b/") == ("nn:9060", "/a/b")
    assert parse_spec("./crail_kvcache") == (None, "/crail_kvcache")  # the original's default
    assert parse_spec("/kv") == (None, "/kv")
    with pytest.raises(KvfsError, match="HOST:PORT"):
        parse_spec("//nn/kvfs")


def test_interrupted_commits_are_settled_at_the_next_start(spec, tmp_path):
    s = CrailStore(spec.removeprefix("crail:"), node="n1", state_dir=str(tmp_path))
    done = s.writer("aa/live.kvd")
    done.pwrite(b"committed, etcd has it", 0)
    done.commit()  # a crash before forget_intent(): the intent record remains
    lost = s.writer("aa/lost.kvd")
    lost.pwrite(b"published, etcd never heard", 0)
    lost.commit()
    s.writer("aa/staged.kvd").pwrite(b"never published", 0)

    def cut_short():  # an upload that never reached its rename
        s._write(s._upload_path(), lambda buf, off: len(buf), 5)

    s._run("upload", cut_short)
    again = CrailStore(spec.removeprefix("crail:"), node="n1", state_dir=str(tmp_path))
    try:
        assert again.clean_staging(lambda key: key == "aa/live.kvd") == 4
        assert list(again.list()) == ["aa/live.kvd"]
        assert again.get("aa/live.kvd") == b"committed, etcd has it"
        assert again.clean_staging() == 0
    finally:
        again.close()
        s.close()


def test_write_read_replace_rm_over_crail(make_mount, spec, probe):
    m = make_mount("--store", spec)
    assert m.status()["store"]["url"] == spec
    data = write_layers(m.path, "s", 3, 3 * (1 << 20) + 17)  # spans Crail blocks
    for name, want in data.items():
        assert (m.path / "s" / name).read_bytes() == want
    key = obj_key(m.path / "s" / "layer01")
    assert probe.get(key) == data["layer01"]  # the bytes are in Crail
    assert m.status()["counters"]["opens_daemon"] >= 3  # not local files: the daemon serves
    # replace: a new object; the old one goes after its grace period
    (m.path / "s" / "layer01").write_bytes(b"replaced")
    assert (m.path / "s" / "layer01").read_bytes() == b"replaced"
    wait_for(lambda: not probe.exists(key), 10, what="the replaced object deleted")
    key2 = obj_key(m.path / "s" / "layer02")
    os.unlink(m.path / "s" / "layer02")
    assert sorted(os.listdir(m.path / "s")) == ["layer00", "layer01"]
    wait_for(lambda: not probe.exists(key2), 10, what="the removed object deleted")
    # an open file keeps reading its version across a replace
    with open(m.path / "s" / "layer00", "rb") as f:
        (m.path / "s" / "layer00").write_bytes(b"newer")
        assert f.read() == data["layer00"]


def test_two_mounts_share_one_crail_and_one_etcd(make_mount, spec):
    a = make_mount("--store", spec)
    b = make_mount("--store", spec)
    data = write_layers(a.path, "chat", 4, 700_000)
    for name, want in data.items():
        assert seen(b.path / "chat" / name) == want
    (b.path / "chat" / "from-b").write_bytes(b"b wrote this")
    assert seen(a.path / "chat" / "from-b") == b"b wrote this"


def test_expiry_deletes_from_crail(make_mount, spec, probe):
    m = make_mount("--store", spec, "--ttl", "2", "--cleanup-interval", "0.3", "--no-touch-on-read")
    (m.path / "s").mkdir()
    (m.path / "s" / "old").write_bytes(b"x" * 10000)
    key = obj_key(m.path / "s" / "old")
    assert probe.exists(key)
    wait_for(lambda: not (m.path / "s").exists(), 8, what="expiry")
    wait_for(lambda: not probe.exists(key), 5, what="the object deleted from Crail")
    assert list(probe.list()) == []


def test_recover_rebuilds_etcd_from_crail(make_mount, spec, etcd):
    m = make_mount("--store", spec, "--no-touch-on-read")
    data = write_layers(m.path, "s", 3, 5000)
    out = recover_after_losing_etcd(m, etcd)
    assert "recovered 3 entries" in out
    for name, want in data.items():
        assert (m.path / "s" / name).read_bytes() == want


def test_hard_links_over_crail(make_mount, spec, probe, etcd):
    # links are names in etcd over one Crail object: rm of one name keeps it,
    # the last takes it, recover brings every name back from the header
    m = make_mount("--store", spec, "--no-touch-on-read")
    data = write_layers(m.path, "s", 1, 2 * (1 << 20) + 5)["layer00"]
    os.mkdir(m.path / "t")
    os.link(m.path / "s" / "layer00", m.path / "t" / "shared")
    os.link(m.path / "s" / "layer00", m.path / "s" / "again")
    key = obj_key(m.path / "s" / "layer00")
    assert os.stat(m.path / "t" / "shared").st_nlink == 3
    assert (m.path / "t" / "shared").read_bytes() == data
    # one data object (and its header) in Crail for three names
    assert [k for k in probe.list() if k.endswith(".kvd")] == [key]
    os.unlink(m.path / "s" / "again")
    recover_after_losing_etcd(m, etcd)
    assert os.listdir(m.path / "s") == ["layer00"] and os.listdir(m.path / "t") == ["shared"]
    assert os.stat(m.path / "t" / "shared").st_nlink == 2
    os.unlink(m.path / "s" / "layer00")
    time.sleep(DELETE_GRACE + 1)  # past the grace a removed version's bytes get
    assert probe.exists(key)
    _drop_caches()
    assert (m.path / "t" / "shared").read_bytes() == data
    os.unlink(m.path / "t" / "shared")
    wait_for(lambda: not probe.exists(key), 10, what="the last name's object deleted")


def test_config_file_storage_type_crail(make_mount, crail, tmp_path):
    # the original's keys name a Crail directory; the NameNode is CRAIL_HOME's
    cfg = tmp_path / "kvfs.json"
    d = f"/t-cfg-{uuid.uuid4().hex[:8]}"
    cfg.write_text(json.dumps({"kv_transfer_config": {"storage_type": "crail", "crail_dir": d}}))
    assert load_config(str(cfg), env={}).store_spec() == f"crail:{d}"
    before = os.environ.get("CRAIL_HOME")
    os.environ["CRAIL_HOME"] = str(crail.base)  # the daemon inherits it
    try:
        m = make_mount("--store", f"crail:{d}")
    finally:
        if before is None:
            del os.environ["CRAIL_HOME"]
        else:
            os.environ["CRAIL_HOME"] = before
    assert m.status()["store"]["url"] == f"crail:{d}"
    (m.path / "s").mkdir()
    (m.path / "s" / "f").write_bytes(b"through crail_dir")
    assert (m.path / "s" / "f").read_bytes() == b"through crail_dir"


def test_ssd_cache_and_prefetch_over_crail_and_crail_down(make_mount, spec, crail, tmp_path):
    a = make_mount("--store", spec)
    cache = tmp_path / "cache"
    b = make_mount(
        "--store", spec, "--ssd-cache", str(cache), "--prefetch", "--prefetch-layers", "2"
    )
    data = write_layers(a.path, "s", 5, 300_000)
    keys = {n: obj_key(a.path / "s" / n) for n in data}
    wait_seen(b.path / "s" / n for n in data)  # prefetch follows b's listing
    before = b.status()["counters"]["opens_passthrough"]
    assert (b.path / "s" / "layer00").read_bytes() == data["layer00"]
    wait_for(lambda: b.status()["ssd_cache"]["prefetched"] == 2, 10, what="prefetch")
    assert {n for n, k in keys.items() if (cache / "objects" / k).exists()} == {
        "layer00",
        "layer01",
        "layer02",
    }
    # a cached object is a local file: the kernel reads it (passthrough)
    assert (b.path / "s" / "layer01").read_bytes() == data["layer01"]
    assert b.status()["counters"]["opens_passthrough"] >= before + 2
    crail.pause(True)
    try:
        # Crail unreachable: cached layers still read, the others fail clearly
        assert (b.path / "s" / "layer02").read_bytes() == data["layer02"]
        with pytest.raises(OSError) as e:
            (b.path / "s" / "layer04").read_bytes()
        assert e.value.errno == errno.EIO
        assert b.status()["store"]["last_error"]
        with pytest.raises(OSError) as e:
            (b.path / "s" / "new").write_bytes(b"cannot be stored")
        assert e.value.errno == errno.EIO
    finally:
        crail.pause(False)
    assert "crail" in b.log() and "failed" in b.log()
    # Crail back: the same mount reads and writes again, nothing lost from etcd
    try:
        wait_for(
            lambda: _reads(b.path / "s" / "layer04") == data["layer04"],
            30,
            0.5,
            "reads after Crail",
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{crail.tails()}") from None
    (b.path / "s" / "new").write_bytes(b"stored")
    assert seen(a.path / "s" / "new") == b"stored"
    assert sorted(os.listdir(a.path / "s")) == sorted([*data, "new"])


def test_a_killed_datanode_gives_eio_and_etcd_keeps_every_name(make_mount, spec, crail):
    m = make_mount("--store", spec)
    data = write_layers(m.path, "s", 2, 200_000)
    crail.kill_datanode()
    try:
        for name in data:
            with pytest.raises(OSError) as e:
                (m.path / "s" / name).read_bytes()
            assert e.value.errno == errno.EIO
        st = m.status()
        assert st["store"]["last_error"] and st["store"]["entries"] == 2
        assert "failed" in m.log()
        # nothing committed is lost from etcd's point of view
        assert sorted(os.listdir(m.path / "s")) == sorted(data)
    finally:
        # Crail's TCP tier keeps blocks in the DataNode's memory: with it went
        # the bytes and the directory blocks of Crail's tree, so a new Crail
        crail.restart()
    # the same mount, no remount, stores and reads through the new Crail
    wait_for(lambda: _writes(m.path / "s" / "after", b"after the restart"), 30, 0.5, "writes")
    assert (m.path / "s" / "after").read_bytes() == b"after the restart"
    # its bytes died with the DataNode: the new Crail has no such object; the
    # name is still listed, so a read is an EIO (logged, counted), not ENOENT
    with pytest.raises(OSError) as e:
        (m.path / "s" / "layer00").read_bytes()
    assert e.value.errno == errno.EIO
    assert "missing from the store" in m.log()


def _reads(path):
    try:
        return path.read_bytes()
    except OSError:
        return None


def _writes(path, data) -> bool:
    try:
        path.write_bytes(data)
        return True
    except OSError:
        time.sleep(0.2)
        return False

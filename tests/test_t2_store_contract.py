"""The store contract, held by every store: the real `local` one and the in-memory fake."""

import os
from importlib.metadata import entry_points

import pytest

from kvfs.errors import KvfsError, NotFound
from kvfs.store import open_store, store_class
from kvfs.store.cached import CachedStore
from kvfs.store.crail import CrailStore
from kvfs.store.local import LocalStore
from kvfs.store.memory import MemoryStore


@pytest.fixture(params=["local", "memory", "ssd-cached", "crail"])
def store(request, tmp_path):
    if request.param == "local":
        yield LocalStore(str(tmp_path / "store"), node="n1")
    elif request.param == "crail":
        # a real Crail (tests/crailtest.py), a directory of its own for each test
        spec = request.getfixturevalue("crail").spec(tmp_path.name)
        s = CrailStore(spec.removeprefix("crail:"), node="n1", state_dir=str(tmp_path))
        yield s
        s.close()
    elif request.param == "ssd-cached":
        # the SSD cache in front of a store that is not local files
        s = CachedStore(MemoryStore(), str(tmp_path / "cache"), 1 << 20, node="n1")
        yield s
        s.close()
    else:
        yield MemoryStore()


def test_put_get_ranges(store):
    store.put("ab/one.kv", b"0123456789")
    assert store.get("ab/one.kv") == b"0123456789"
    assert store.get("ab/one.kv", 3, 4) == b"3456"
    assert store.get("ab/one.kv", 8, 100) == b"89"
    assert store.exists("ab/one.kv") and not store.exists("ab/two.kv")
    assert store.stat("ab/one.kv").size == 10
    r = store.reader("ab/one.kv")
    assert r.pread(2, 1) == b"12"
    buf = bytearray(3)
    assert r.readinto(buf, 7) == 3 and bytes(buf) == b"789"
    r.close()


def test_missing_objects(store):
    with pytest.raises(NotFound):
        store.get("no/such.kv")
    with pytest.raises(NotFound):
        store.stat("no/such.kv")
    store.delete("no/such.kv")  # deleting a missing key is fine


def test_list_and_delete(store):
    for k in ("aa/1.kv", "aa/2.kv", "bb/3.kv"):
        store.put(k, b"x")
    assert sorted(store.list()) == ["aa/1.kv", "aa/2.kv", "bb/3.kv"]
    assert sorted(store.list("aa/")) == ["aa/1.kv", "aa/2.kv"]
    store.delete("aa/1.kv")
    assert sorted(store.list()) == ["aa/2.kv", "bb/3.kv"]


def test_staged_writer_invisible_until_commit(store):
    w = store.writer("cc/new.kv")
    w.pwrite(b"hello", 0)
    w.pwrite(b"!", 10)
    assert w.size() == 11 and w.pread(5, 0) == b"hello"
    assert not store.exists("cc/new.kv")
    w.commit()
    w.forget_intent()
    assert store.get("cc/new.kv") == b"hello" + bytes(5) + b"!"


def test_aborted_writer_leaves_nothing(store):
    w = store.writer("cc/gone.kv")
    w.pwrite(b"partial", 0)
    w.abort()
    assert not store.exists("cc/gone.kv")
    assert list(store.list()) == []


def test_replacing_an_object(store):
    store.put("dd/x.kv", b"old")
    store.put("dd/x.kv", b"new!")
    assert store.get("dd/x.kv") == b"new!"


def test_header_rewrite(store):
    store.put("ee/h.kv", b"HEADERdata")
    store.rewrite_header("ee/h.kv", b"header")
    assert store.get("ee/h.kv") == b"headerdata"


def test_local_staging_cleaned_at_start(tmp_path):
    s = LocalStore(str(tmp_path / "st"), node="n1")
    w = s.writer("ff/x.kv")
    w.pwrite(b"interrupted", 0)  # a crash: never committed nor aborted
    other = LocalStore(str(tmp_path / "st"), node="n2")
    other.writer("ff/y.kv").pwrite(b"another node's write", 0)
    again = LocalStore(str(tmp_path / "st"), node="n1")
    assert again.clean_staging() == 1
    assert other.clean_staging() == 1  # each node cleans only its own


def test_local_interrupted_commits_are_settled(tmp_path):
    s = LocalStore(str(tmp_path / "st"), node="n1")
    done = s.writer("aa/live.kv")
    done.pwrite(b"committed, etcd has it", 0)
    done.commit()  # crash before forget_intent(): the intent record remains
    lost = s.writer("aa/lost.kv")
    lost.pwrite(b"published, etcd never heard", 0)
    lost.commit()
    staged = s.writer("aa/staged.kv")
    staged.pwrite(b"never published", 0)
    again = LocalStore(str(tmp_path / "st"), node="n1")
    assert again.clean_staging(lambda key: key == "aa/live.kv") == 3
    assert sorted(again.list()) == ["aa/live.kv"]
    assert os.listdir(again.staging_dir) == []


def test_local_rejects_escaping_keys(tmp_path):
    s = LocalStore(str(tmp_path / "st"))
    for key in ("../x", "/etc/passwd", "a/../../x"):
        with pytest.raises(KvfsError):
            s.put(key, b"x")


def test_registry_and_entry_points():
    assert {ep.name for ep in entry_points(group="kvfs.stores")} >= {"local", "memory"}
    assert store_class("local") is LocalStore
    assert isinstance(open_store("memory:"), MemoryStore)
    with pytest.raises(KvfsError, match="unknown store type"):
        open_store("nosuch:/x")


def test_third_party_store_registers_by_entry_point(tmp_path):
    import subprocess
    import sys

    site = tmp_path / "site"
    (site / "acme_kvstore-1.0.dist-info").mkdir(parents=True)
    (site / "acme_kvstore-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: acme-kvstore\nVersion: 1.0\n"
    )
    (site / "acme_kvstore-1.0.dist-info" / "entry_points.txt").write_text(
        "[kvfs.stores]\nacme = acme_kvstore:AcmeStore\n"
    )
    (site / "acme_kvstore.py").write_text(
        "from kvfs.store.memory import MemoryStore\n"
        "class AcmeStore(MemoryStore):\n"
        "    def __init__(self, arg, **kw):\n"
        "        super().__init__(arg, **kw)\n"
        "        self.url = 'acme:' + arg\n"
    )
    code = "from kvfs.store import open_store; print(open_store('acme:bucket', node='x').url)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(site)},
        check=True,
    ).stdout
    assert out.strip() == "acme:bucket"


def test_passthrough_descriptors(store):
    # a store staging in local files lends the kernel a writer's descriptor; one
    # whose objects are local files (or a cache of them) a reader's too
    w = store.writer("gg/pt.kvd")
    fd = w.fileno()
    if isinstance(store, MemoryStore):
        assert fd is None and store.open_fd("gg/pt.kvd") is None
        w.abort()
        return
    os.pwrite(fd, b"written by the kernel", 0)
    w.commit()
    w.forget_intent()
    rfd = store.open_fd("gg/pt.kvd")
    if isinstance(store, CrailStore):
        assert rfd is None  # Crail's files are not local: the daemon serves reads
        assert store.get("gg/pt.kvd") == b"written by the kernel"
        return
    try:
        assert os.pread(rfd, 100, 0) == b"written by the kernel"
    finally:
        os.close(rfd)


def test_local_data_ranges_find_the_holes(tmp_path):
    s = LocalStore(str(tmp_path / "st"), node="n1")
    w = s.writer("hh/sparse.kvd")
    w.truncate(64 << 20)
    w.pwrite(b"x" * 10, 32 << 20)
    ranges = list(w.data_ranges(64 << 20))
    assert sum(e - st for st, e in ranges) < (2 << 20)  # not the whole file
    assert any(st <= 32 << 20 < e for st, e in ranges)
    w.abort()

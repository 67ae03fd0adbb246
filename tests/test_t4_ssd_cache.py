"""The SSD cache in front of a remote store, and prefetch: the store alone, then real mounts.

In the mounts the "remote" store is a `local:` directory shared by two daemons
(as NFS or CephFS would be); an outage is that directory's `objects` turning
into a plain file, so every open of an object fails (ENOTDIR, an I/O error to
kvfs) until it is put back, as a store that stops answering would.
"""

import errno
import os
import subprocess

import pytest

from kvfs.errors import StoreError
from kvfs.store.cached import CachedStore
from kvfs.store.memory import MemoryStore

from kvfstest import KVFS, recover_after_losing_etcd, seen, wait_for, wait_seen

MiB = 1 << 20


class Remote(MemoryStore):
    """A store that can stop answering, as a remote one does."""

    down = False

    def _check(self):
        if self.down:
            raise StoreError("remote store unreachable")

    def get(self, key, offset=0, size=-1):
        self._check()
        return super().get(key, offset, size)

    def stat(self, key):
        self._check()
        return super().stat(key)

    def put(self, key, data):
        self._check()
        super().put(key, data)

    def writer(self, key):
        self._check()
        return super().writer(key)


@pytest.fixture
def remote():
    return Remote()


@pytest.fixture
def cached(remote, tmp_path):
    s = CachedStore(remote, str(tmp_path / "cache"), 3 * MiB, node="n1")
    yield s
    s.close()


def test_filled_on_read_then_served_while_the_store_is_down(remote, cached):
    remote.put("aa/x.kvd", b"x" * 1000)
    remote.put("aa/y.kvd", b"y" * 1000)
    assert cached.get("aa/x.kvd", 10, 5) == b"xxxxx"  # a ranged get does not fill
    assert cached.statistics()["objects"] == 0
    r = cached.reader("aa/x.kvd")  # an open fills
    assert r.pread(4, 996) == b"xxxx"
    r.close()
    st = cached.statistics()
    assert (st["objects"], st["used"], st["fills"], st["misses"]) == (1, 1000, 1, 1)
    remote.down = True
    fd = cached.open_fd("aa/x.kvd")  # a local file: passthrough can read it
    try:
        assert os.pread(fd, 3, 0) == b"xxx"
    finally:
        os.close(fd)
    assert cached.get("aa/x.kvd") == b"x" * 1000
    with pytest.raises(StoreError):
        cached.reader("aa/y.kvd").pread(1, 0)  # not cached: the outage shows
    assert "remote store unreachable" in cached.statistics()["last_error"]
    remote.down = False
    assert cached.reader("aa/y.kvd").pread(2, 0) == b"yy"


def test_a_broken_cache_disk_falls_back_to_the_store(remote, cached, caplog):
    remote.put("ee/x.kvd", b"e" * 100)
    # a plain file where the cache keeps ee/: no copy can land there
    open(os.path.join(cached.cache_dir, "objects", "ee"), "w").close()
    r = cached.reader("ee/x.kvd")
    assert r.pread(3, 0) == b"eee"
    r.close()
    assert "cannot fill ee/x.kvd" in caplog.text
    assert cached.statistics()["objects"] == 0
    assert os.listdir(cached.local.staging_dir) == []


def test_bounded_least_recently_used_out(remote, cached):
    for i in range(5):
        remote.put(f"bb/{i}.kvd", bytes([i]) * MiB)
    for i in range(3):
        os.close(cached.open_fd(f"bb/{i}.kvd"))
    os.close(cached.open_fd("bb/0.kvd"))  # 0 is now the most recently used
    os.close(cached.open_fd("bb/3.kvd"))  # pushes out 1, the least recently used
    st = cached.statistics()
    assert st["used"] <= 3 * MiB and st["evictions"] == 1
    on_disk = sorted(os.listdir(os.path.join(cached.cache_dir, "objects", "bb")))
    assert on_disk == ["0.kvd", "2.kvd", "3.kvd"]
    # too large for the whole cache: read from the store, nothing evicted for it
    remote.put("bb/big.kvd", b"B" * (4 * MiB))
    r = cached.reader("bb/big.kvd")
    assert r.pread(1, 4 * MiB - 1) == b"B"
    r.close()
    assert cached.statistics()["uncacheable"] == 1 and cached.statistics()["evictions"] == 1
    # a restart finds the copies and keeps the bound
    again = CachedStore(remote, cached.cache_dir, 2 * MiB, node="n1")
    assert again.statistics()["used"] <= 2 * MiB and again.statistics()["objects"] == 2


def test_write_through_and_abort(remote, cached):
    w = cached.writer("cc/w.kvd")
    w.pwrite(b"staged locally", 0)
    assert isinstance(w.fileno(), int)  # the kernel may write it directly
    os.pwrite(w.fileno(), b"!", 100)
    assert not remote.exists("cc/w.kvd")
    w.commit()
    w.forget_intent()
    want = b"staged locally" + bytes(86) + b"!"
    assert remote.get("cc/w.kvd") == want  # written through to the store
    remote.down = True
    assert cached.get("cc/w.kvd") == want  # and kept in the cache
    remote.down = False
    # a failed upload leaves nothing, here or there
    w = cached.writer("cc/lost.kvd")
    w.pwrite(b"never stored", 0)
    remote.down = True
    with pytest.raises(StoreError):
        w.commit()
    remote.down = False
    assert not remote.exists("cc/lost.kvd")
    assert not os.path.exists(os.path.join(cached.cache_dir, "objects", "cc", "lost.kvd"))
    assert os.listdir(cached.local.staging_dir) == []


def test_prefetch_fills_in_the_background_and_only_logs_failures(remote, cached, caplog):
    for i in range(3):
        remote.put(f"dd/{i}.kvd", b"p" * 1000)
    assert cached.prefetch(["dd/0.kvd", "dd/1.kvd", "dd/missing.kvd"]) == 3
    wait_for(cached.prefetch_idle, 10, what="prefetch done")
    st = cached.statistics()
    assert (st["prefetched"], st["prefetch_errors"], st["objects"]) == (2, 1, 2)
    assert "prefetch of dd/missing.kvd failed" in caplog.text
    assert cached.prefetch(["dd/0.kvd", "dd/2.kvd"]) == 1  # the cached one is skipped
    wait_for(cached.prefetch_idle, 10, what="prefetch done")
    remote.down = True
    assert cached.reader("dd/2.kvd").pread(1, 0) == b"p"


# -- through real mounts ---------------------------------------------------------------


def obj_key(path) -> str:
    return os.getxattr(path, "user.kvfs.object").decode()


def write_layers(mnt, session, n, size):
    os.makedirs(mnt / session, exist_ok=True)
    data = {}
    for i in range(n):
        data[f"layer{i:02d}"] = os.urandom(size)
        (mnt / session / f"layer{i:02d}").write_bytes(data[f"layer{i:02d}"])
    return data


def ssd(m) -> dict:
    return m.status()["ssd_cache"]


def test_two_nodes_write_through_and_fill_on_read(make_mount, tmp_path):
    a = make_mount("--ssd-cache", str(tmp_path / "cache-a"))
    b = make_mount("--ssd-cache", str(tmp_path / "cache-b"))
    data = write_layers(a.path, "s", 3, 300_000)
    key = obj_key(a.path / "s" / "layer01")
    # written through: in the shared store and in the writer's cache
    assert (a.store / "objects" / key).read_bytes() == data["layer01"]
    assert (tmp_path / "cache-a" / "objects" / key).read_bytes() == data["layer01"]
    assert ssd(a)["objects"] >= 3
    # the other node fills its cache on the first read and reads by passthrough
    wait_seen(b.path / "s" / name for name in data)
    before = b.status()["counters"]["opens_passthrough"]
    for name, want in data.items():
        assert (b.path / "s" / name).read_bytes() == want
    st = ssd(b)
    assert st["fills"] == 3 and st["misses"] == 3 and st["hits"] == 0
    assert (tmp_path / "cache-b" / "objects" / key).read_bytes() == data["layer01"]
    assert b.status()["counters"]["opens_passthrough"] == before + 3
    # a replace is a new object: the other node reads the new bytes, not its cached copy
    (a.path / "s" / "layer01").write_bytes(b"new bytes")
    wait_for(lambda: (b.path / "s" / "layer01").read_bytes() == b"new bytes", 10, what="replace")
    os.unlink(a.path / "s" / "layer02")
    wait_for(lambda: not (b.path / "s" / "layer02").exists(), 10, what="rm seen")


def test_outage_gives_eio_cached_files_still_read_and_the_mount_recovers(make_mount, tmp_path):
    a = make_mount()
    b = make_mount("--ssd-cache", str(tmp_path / "cache-b"))
    data = write_layers(a.path, "s", 3, 200_000)
    assert seen(b.path / "s" / "layer00") == data["layer00"]  # cached now
    wait_seen(b.path / "s" / name for name in data)
    objects = a.store / "objects"
    away = a.store / "objects.away"
    objects.rename(away)
    objects.write_text("the store is unreachable")
    try:
        # cached: read from the cache, the store is not asked
        assert (b.path / "s" / "layer00").read_bytes() == data["layer00"]
        # not cached: a clear error, a log line and a status field
        with pytest.raises(OSError) as e:
            (b.path / "s" / "layer01").read_bytes()
        assert e.value.errno == errno.EIO
        key = obj_key(a.path / "s" / "layer01")
        assert key in ssd(b)["last_error"]
        assert f"cannot fill {key}" in b.log()
        text = subprocess.run(
            KVFS + ["status", str(b.path)], check=True, capture_output=True, text=True
        ).stdout
        assert "last store error" in text and key in text
        # a write cannot commit: it fails and leaves etcd as it was
        with pytest.raises(OSError) as e:
            (b.path / "s" / "new").write_bytes(b"lost")
        assert e.value.errno == errno.EIO
        assert not (b.path / "s" / "new").exists()
    finally:
        objects.unlink()
        away.rename(objects)
    # back, without a remount
    assert (b.path / "s" / "layer01").read_bytes() == data["layer01"]
    (b.path / "s" / "new").write_bytes(b"kept")
    assert seen(a.path / "s" / "new") == b"kept"
    assert sorted(os.listdir(a.path / "s")) == ["layer00", "layer01", "layer02", "new"]


def test_prefetch_fetches_the_following_layers(make_mount, tmp_path):
    a = make_mount()
    cache = tmp_path / "cache-b"
    b = make_mount("--ssd-cache", str(cache), "--prefetch", "--prefetch-layers", "2")
    data = write_layers(a.path, "s", 5, 100_000)
    keys = {name: obj_key(a.path / "s" / name) for name in data}
    wait_seen(b.path / "s" / name for name in data)  # prefetch follows b's listing
    assert (b.path / "s" / "layer01").read_bytes() == data["layer01"]
    wait_for(lambda: ssd(b)["prefetched"] == 2, 10, what="prefetch")
    # the two layers after layer01 (by name), not the one before, not further ones
    cached = {n for n, k in keys.items() if (cache / "objects" / k).exists()}
    assert cached == {"layer01", "layer02", "layer03"}
    # read from the cache now (a hit, no miss), and the window moves on: layer04
    assert (b.path / "s" / "layer02").read_bytes() == data["layer02"]
    wait_for(lambda: ssd(b)["prefetched"] == 3, 10, what="prefetch of layer04")
    st = ssd(b)
    assert (st["hits"], st["misses"], st["fills"]) == (1, 1, 4)
    assert (cache / "objects" / keys["layer04"]).exists()
    assert not (cache / "objects" / keys["layer00"]).exists()
    assert ssd(b)["prefetch"] == {"layers_ahead": 2, "hints_dropped": 0}


def test_expiry_removes_the_object_from_the_store_and_the_cache(make_mount, tmp_path):
    cache = tmp_path / "cache"
    m = make_mount(
        "--ssd-cache", str(cache), "--ttl", "2", "--cleanup-interval", "0.3", "--no-touch-on-read"
    )
    (m.path / "s").mkdir()
    (m.path / "s" / "old").write_bytes(b"x" * 10000)
    key = obj_key(m.path / "s" / "old")
    assert (cache / "objects" / key).exists() and (m.store / "objects" / key).exists()
    wait_for(lambda: not (m.path / "s").exists(), 8, what="expiry")
    wait_for(lambda: not (m.store / "objects" / key).exists(), 5, what="the object deleted")
    assert not (cache / "objects" / key).exists()
    assert ssd(m)["objects"] == 0 and ssd(m)["used"] == 0


def test_recover_on_a_cached_mount_rebuilds_from_the_store(make_mount, tmp_path, etcd):
    m = make_mount("--ssd-cache", str(tmp_path / "cache"), "--no-touch-on-read")
    data = write_layers(m.path, "s", 3, 5000)
    out = recover_after_losing_etcd(m, etcd)
    assert "recovered 3 entries" in out
    for name, want in data.items():
        assert (m.path / "s" / name).read_bytes() == want


def test_the_cache_stays_within_its_size(make_mount, tmp_path):
    a = make_mount()
    cache = tmp_path / "cache-b"
    b = make_mount("--ssd-cache", str(cache), "--ssd-cache-size", "1M")
    data = write_layers(a.path, "s", 6, 300_000)
    wait_seen(b.path / "s" / name for name in data)
    for _ in range(2):
        for name, want in data.items():
            assert (b.path / "s" / name).read_bytes() == want
    st = ssd(b)
    assert st["used"] <= MiB and st["evictions"] >= 6
    on_disk = sum(p.stat().st_size for p in (cache / "objects").rglob("*.kvd"))
    assert on_disk <= MiB


def test_prefetch_without_the_cache_is_refused(make_mount):
    with pytest.raises(AssertionError, match="enable_ssd_caching"):
        make_mount("--prefetch")

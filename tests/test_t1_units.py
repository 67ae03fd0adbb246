"""Pure units: names, the object format, configuration, the metadata cache."""

import errno
import json
import os

import pytest
from safetensors import safe_open
from safetensors.numpy import load

from kvfs.config import Config, load_config, ssd_cache_dir
from kvfs.errors import InvalidName, KvfsError
from kvfs.metacache import MetaCache
from kvfs.names import check_name
from kvfs.objects import (
    BLOCK,
    HEADER_SIZE,
    BlockSums,
    data_offset,
    decode_blocks,
    decode_header,
    encode_blocks,
    encode_header,
    header_key,
    new_object_key,
    sums_of,
)
from kvfs.records import Entry, SessionInfo, WatchEvent


@pytest.mark.parametrize("bad", [b"", b".", b"..", b"a/b", b"a\0b", b"\xff"])
def test_invalid_names(bad):
    with pytest.raises(InvalidName) as e:
        check_name(bad)
    assert e.value.errno == errno.EINVAL


def test_name_length():
    assert check_name(b"a" * 255) == "a" * 255
    with pytest.raises(InvalidName) as e:
        check_name(b"a" * 256)
    assert e.value.errno == errno.ENAMETOOLONG


def test_header_and_data_make_a_valid_safetensors_file(tmp_path):
    # the header object followed by the data object is a safetensors file:
    # any safetensors reader can inspect a store by hand
    data = bytes(range(256)) * 40
    header = encode_header({"session": "s", "name": "layer.0", "size": len(data)}, len(data))
    (tmp_path / "o.st").write_bytes(header + data)
    with safe_open(str(tmp_path / "o.st"), framework="numpy") as f:
        assert f.get_tensor("data").tobytes() == data
    meta, offset, size = decode_header(header)
    assert (meta["name"], offset, size) == ("layer.0", len(header), len(data))


def test_legacy_object_is_a_valid_safetensors_file(tmp_path):
    data = bytes(range(256)) * 40
    meta = {"session": "s", "name": "layer.0", "size": len(data)}
    header = encode_header(meta, len(data), HEADER_SIZE)
    assert len(header) == HEADER_SIZE
    (tmp_path / "o.kv").write_bytes(header + data)
    with safe_open(str(tmp_path / "o.kv"), framework="numpy") as f:
        assert f.metadata()["session"] == "s"
        assert f.get_tensor("data").tobytes() == data
    meta, offset, size = decode_header(header)
    assert (meta["session"], meta["name"], offset, size) == ("s", "layer.0", HEADER_SIZE, len(data))
    assert load(header + data)["data"].tobytes() == data


def test_object_keys():
    version, key = new_object_key()
    assert key == f"{version[:2]}/{version}.kvd" and data_offset(key) == 0
    assert header_key(key) == f"{version[:2]}/{version}.kvh"
    assert data_offset("ab/abc.kv") == HEADER_SIZE and header_key("ab/abc.kv") == "ab/abc.kv"


def test_sums_of_skips_holes():
    size = 5 * BLOCK + 7
    data = bytearray(size)
    data[2 * BLOCK + 3] = 1
    reads = []

    def read(n, off):
        reads.append(off)
        return bytes(data[off : off + n])

    dense = sums_of(read, size)
    reads.clear()
    sparse = sums_of(read, size, lambda s: [(2 * BLOCK, 2 * BLOCK + 4096)])
    assert sparse == dense and reads == [2 * BLOCK]
    big = 40 * BLOCK + 3
    data = bytearray(os.urandom(big))
    assert sums_of(read, big, workers=4) == sums_of(read, big)


def test_empty_object_and_unicode_names():
    header = encode_header({"session": "会话", "name": "é" * 127, "size": 0}, 0)
    meta, _, size = decode_header(header)
    assert meta["session"] == "会话" and size == 0


def test_header_rejects_garbage():
    with pytest.raises(KvfsError):
        decode_header(b"\x00" * 16)
    with pytest.raises(KvfsError):
        decode_header(b"\xff" * 8 + b"{}")


def test_block_sums_match_a_full_pass_and_detect_out_of_order():
    data = bytes(range(256)) * 9000  # a little over two blocks
    c = BlockSums()
    for off in range(0, len(data), 300_000):  # writes that straddle block edges
        c.update(data[off : off + 300_000], off)
    assert c.result(len(data)) == sums_of(lambda n, off: data[off : off + n], len(data))
    assert len(c.result(len(data))) == 3
    c.update(b"x", 1)
    assert c.result(len(data)) is None
    assert decode_blocks(encode_blocks([1, 2, 3])) == [1, 2, 3]


def test_config_original_keys(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(
        json.dumps(
            {
                "kv_transfer_config": {
                    "storage_type": "local",
                    "local_dir": "/data/kv",
                    "etcd_endpoints": ["127.0.0.1:2379", "127.0.0.1:22379"],
                    "kv_expire_time": 600,
                    "cleanup_interval": 60,
                    "enable_ssd_caching": False,
                    "ssd_cache_dir": "/tmp/ssd",
                    "enable_prefetch": False,
                },
                "rank": 0,
                "local_rank": 0,
            }
        )
    )
    cfg = load_config(str(p), env={})
    assert cfg.store == "local:/data/kv"
    assert cfg.etcd == ["127.0.0.1:2379", "127.0.0.1:22379"]
    assert (cfg.ttl, cfg.cleanup_interval) == (600, 60)
    cfg = load_config(str(p), env={"KVFS_TTL": "30"}, overrides={"cleanup_interval": "5"})
    assert (cfg.ttl, cfg.cleanup_interval) == (30, 5)


def test_config_ssd_cache_and_prefetch(tmp_path):
    p = tmp_path / "config.json"
    tc = {"enable_ssd_caching": True, "ssd_cache_size": "2G", "enable_prefetch": True}
    p.write_text(json.dumps({"kv_transfer_config": tc}))
    cfg = load_config(str(p), env={})
    assert (cfg.enable_ssd_caching, cfg.ssd_cache_size, cfg.enable_prefetch) == (
        True,
        2 << 30,
        True,
    )
    assert ssd_cache_dir(cfg) == os.path.join(cfg.state_dir, "ssd-cache")
    # prefetch fills the SSD cache: without it, accepted and ignored would be worse than refused
    p.write_text(json.dumps({"kv_transfer_config": {"enable_prefetch": True}}))
    with pytest.raises(KvfsError) as e:
        load_config(str(p), env={})
    assert "enable_prefetch" in str(e.value) and "enable_ssd_caching" in str(e.value)


@pytest.mark.parametrize(
    "doc,needle",
    [
        ({"kv_transfer_config": {"kv_expire_tme": 1}}, "kv_expire_tme"),
        ({"ttl": "soon"}, "'ttl'"),
        ({"capacity": -5}, "'capacity'"),
        ({"local_dir": "/x"}, "kv_transfer_config"),
    ],
)
def test_config_errors_name_the_key(tmp_path, doc, needle):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(KvfsError) as e:
        load_config(str(p), env={})
    assert needle in str(e.value)


def test_capacity_suffixes():
    assert load_config(None, env={}, overrides={"capacity": "10G"}).capacity == 10 << 30
    assert Config().capacity is None


def _entry(name, rev, size=1, session="s"):
    return Entry(session=session, name=name, size=size, rev=rev, version=f"v{rev}")


def test_cache_levels_and_coherence():
    c = MetaCache(max_sessions=4, max_layers=8, max_recent=2)
    assert c.lookup_entry("s", "a") == (False, None)
    c.fill_entry("s", "a", _entry("a", 5), c.epoch)
    assert c.lookup_entry("s", "a")[1].rev == 5  # from the layer level
    assert c.lookup_entry("s", "a")[1].rev == 5  # now from the recent level
    st = c.statistics()
    assert st["layer"]["hits"] == 1 and st["recent"]["hits"] == 1
    # a watch event replaces it; an older event arriving late does not
    c.apply(WatchEvent("entry", "s", "a", _entry("a", 7).to_json(), 7))
    c.apply(WatchEvent("entry", "s", "a", _entry("a", 6).to_json(), 6))
    assert c.lookup_entry("s", "a")[1].rev == 7
    c.apply(WatchEvent("entry", "s", "a", None, 8))
    assert c.lookup_entry("s", "a") == (True, None)


def test_the_event_of_an_own_commit_is_not_parsed_again():
    # every commit comes back through the watch: the entry the commit cached
    # at that revision is the event's, and only another revision is read
    c = MetaCache()
    mine = _entry("a", 4)
    c.put_entry(mine)
    assert c.event_entry(WatchEvent("entry", "s", "a", mine.to_json(), 4)) is mine
    other = c.event_entry(WatchEvent("entry", "s", "a", _entry("a", 5, size=9).to_json(), 5))
    assert other is not mine and (other.rev, other.size) == (5, 9)
    c.apply(WatchEvent("entry", "s", "a", None, 6), None)
    assert c.lookup_entry("s", "a") == (True, None)


def test_cache_fill_racing_a_watch_event_is_not_kept():
    c = MetaCache()
    epoch = c.epoch
    c.apply(WatchEvent("entry", "s", "b", _entry("b", 9).to_json(), 9))
    c.fill_entry("s", "a", _entry("a", 3), epoch)  # fetched before the event: maybe stale
    assert c.lookup_entry("s", "a") == (False, None)


def test_cache_fill_racing_a_local_commit_is_not_kept():
    # a lookup's etcd get sent before this daemon's own commit landed answers
    # "absent": it must not hide the entry the commit put in the cache
    c = MetaCache()
    epoch = c.epoch
    c.put_entry(_entry("a", 4))
    c.fill_entry("s", "a", None, epoch)
    assert c.lookup_entry("s", "a")[1].rev == 4
    epoch = c.epoch
    c.drop_entry("s", "a", 5)
    c.fill_entry("s", "a", _entry("a", 4), epoch)
    assert c.lookup_entry("s", "a") == (True, None)


def test_cache_session_listing_answers_negatives_and_is_bounded():
    c = MetaCache(max_sessions=2, max_layers=3, max_recent=1)
    c.fill_listing("s", SessionInfo("s", rev=1), [_entry("a", 2)], c.epoch)
    assert c.lookup_entry("s", "zzz") == (True, None)
    assert c.statistics()["session"]["hits"] == 1
    for i in range(10):
        c.fill_entry("t", f"n{i}", _entry(f"n{i}", i + 1, session="t"), c.epoch)
        c.fill_session(f"x{i}", SessionInfo(f"x{i}", rev=1), c.epoch)
    sizes = c.statistics()["sizes"]
    assert sizes["layer"] <= 3 and sizes["session"] <= 2 and sizes["recent"] <= 1

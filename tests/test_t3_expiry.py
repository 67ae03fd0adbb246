"""Expiry by mtime, touch and read extending life, `kvfs gc`, and the capacity limit."""

import errno
import os
import subprocess
import time

import pytest

from kvfstest import KVFS, wait_for


def objects(m):
    return list((m.store / "objects").rglob("*.kvd"))


def test_expired_entries_and_their_data_go(make_mount):
    m = make_mount("--ttl", "2", "--cleanup-interval", "0.3", "--no-touch-on-read")
    (m.path / "s").mkdir()
    (m.path / "s" / "old").write_bytes(b"x" * 10000)
    wait_for(lambda: len(objects(m)) == 1, 2, what="the commit")
    wait_for(lambda: not (m.path / "s").exists(), 8, what="expiry of the entry and session")
    assert objects(m) == []
    assert m.status()["counters"]["expiries"] >= 1


def test_touch_extends_life(make_mount):
    m = make_mount("--ttl", "2", "--cleanup-interval", "0.2", "--no-touch-on-read")
    (m.path / "s").mkdir()
    (m.path / "s" / "kept").write_bytes(b"k")
    (m.path / "s" / "dropped").write_bytes(b"d")
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        subprocess.run(["touch", str(m.path / "s" / "kept")], check=True)
        time.sleep(0.5)  # the point: time passes beyond the ttl, with touches in it
    assert os.listdir(m.path / "s") == ["kept"]


def test_reads_extend_life(make_mount):
    m = make_mount("--ttl", "2", "--cleanup-interval", "0.2", "--touch-interval", "0.3")
    (m.path / "s").mkdir()
    (m.path / "s" / "read").write_bytes(b"r")
    (m.path / "s" / "idle").write_bytes(b"i")
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        assert (m.path / "s" / "read").read_bytes() == b"r"
        time.sleep(0.4)  # the point: time passes beyond the ttl, with reads in it
    assert os.listdir(m.path / "s") == ["read"]


def test_reads_do_not_extend_life_when_disabled(make_mount):
    m = make_mount("--ttl", "1.5", "--cleanup-interval", "0.2", "--no-touch-on-read")
    (m.path / "s").mkdir()
    (m.path / "s" / "f").write_bytes(b"r")

    def gone():
        try:
            (m.path / "s" / "f").read_bytes()
            return False
        except FileNotFoundError:
            return True

    wait_for(gone, 6, 0.2, what="expiry despite reads")


def test_kvfs_gc_expires_now(make_mount):
    m = make_mount("--ttl", "1", "--cleanup-interval", "3600", "--no-touch-on-read")
    (m.path / "s").mkdir()
    for i in range(3):
        (m.path / "s" / f"l{i}").write_bytes(b"x")
    time.sleep(1.2)  # the point: the ttl (1 s) passes for these three, not for "fresh"
    (m.path / "s" / "fresh").write_bytes(b"y")
    out = subprocess.run(KVFS + ["gc", str(m.path)], capture_output=True, text=True, check=True)
    assert "expired 3 entries" in out.stdout
    assert os.listdir(m.path / "s") == ["fresh"]
    wait_for(lambda: len(objects(m)) == 1, 5, what="expired objects deleted")


def test_capacity_evicts_least_recently_used(make_mount):
    mib = 1 << 20
    m = make_mount("--capacity", str(10 * mib), "--no-touch-on-read")
    (m.path / "s").mkdir()
    for name in ("a", "b", "c"):
        (m.path / "s" / name).write_bytes(name.encode() * (3 * mib))
        time.sleep(0.05)  # the point: distinct mtimes, which order the LRU
    os.utime(m.path / "s" / "a")  # a is now the most recently used
    (m.path / "s" / "d").write_bytes(b"d" * (3 * mib))
    assert sorted(os.listdir(m.path / "s")) == ["a", "c", "d"]
    st = m.status()
    assert st["counters"]["evictions"] == 1
    assert st["store"]["used"] <= 10 * mib
    df = subprocess.run(["df", "-B1", str(m.path)], capture_output=True, text=True).stdout
    assert int(df.splitlines()[1].split()[1]) == 10 * mib
    wait_for(lambda: len(objects(m)) == 3, 5, what="evicted object deleted")


def test_file_larger_than_capacity_is_enospc(make_mount):
    mib = 1 << 20
    m = make_mount("--capacity", str(4 * mib))
    (m.path / "s").mkdir()
    (m.path / "s" / "small").write_bytes(b"s" * mib)
    with pytest.raises(OSError) as e:
        with open(m.path / "s" / "huge", "wb") as f:
            for _ in range(5):
                f.write(b"h" * mib)
    assert e.value.errno == errno.ENOSPC
    assert os.listdir(m.path / "s") == ["small"]
    assert (m.path / "s" / "small").read_bytes() == b"s" * mib

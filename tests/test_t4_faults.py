"""Faults injected for real: a killed daemon, lost etcd data, etcd down, a full
store, objects damaged behind the daemon's back."""

import errno
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvfs.objects import block_checksum, sums_of

from kvfstest import KVFS, EtcdCluster, _alive, recover_after_losing_etcd, wait_for

HERE = Path(__file__).parent


def object_of(path):
    """The store file that holds PATH's committed bytes."""
    return os.getxattr(path, "user.kvfs.object").decode()


def flip_byte(obj, offset: int) -> None:
    """Damage a stored object behind kvfs's back: one byte inverted."""
    with open(obj, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def committed_objects(m):
    out = set()
    for session in os.listdir(m.path):
        for name in os.listdir(m.path / session):
            out.add(object_of(m.path / session / name))
    return out


def store_objects(m):
    return {str(p.relative_to(m.store / "objects")) for p in (m.store / "objects").rglob("*.kvd")}


def test_sigkill_mid_writes_loses_nothing_committed(make_mount, tmp_path):
    m = make_mount()
    journal = tmp_path / "journal"
    w = subprocess.Popen([sys.executable, str(HERE / "faultwriter.py"), str(m.path), str(journal)])
    wait_for(
        lambda: journal.exists() and len(journal.read_text().splitlines()) >= 25,
        60,
        what="writes under way",
    )
    m.kill()
    assert w.wait(30) == 0
    m.mount()
    committed = dict(line.split() for line in journal.read_text().splitlines())
    assert len(committed) >= 25
    for rel, digest in committed.items():
        assert hashlib.sha256((m.path / rel).read_bytes()).hexdigest() == digest, rel
    # nothing partial: every visible file verifies itself
    for session in os.listdir(m.path):
        for name in os.listdir(m.path / session):
            body = (m.path / session / name).read_bytes()
            (n,) = struct.unpack_from("<Q", body)
            assert len(body) == 40 + n and hashlib.sha256(body[40:]).digest() == body[8:40]
    # the interrupted write left nothing behind in the store
    assert os.listdir(m.store / "staging" / m.status()["node"]) == []
    assert store_objects(m) == committed_objects(m)


def test_a_daemon_that_hangs_on_unmount_fails_the_test(make_mount):
    """The helper's unmount never passes a daemon it had to kill, yet clears it away."""
    m = make_mount()
    pid = m.pid
    os.kill(pid, signal.SIGSTOP)  # a daemon that no longer answers the kernel
    with pytest.raises(AssertionError, match="did not"):
        m.umount(timeout=3)
    assert m.pid is None and not _alive(pid) and not os.path.ismount(m.path)


def test_recover_rebuilds_metadata_from_the_store(make_mount, etcd):
    m = make_mount("--no-touch-on-read")  # reads below must not move mtimes
    (m.path / "chat-1").mkdir()
    (m.path / "chat-2").mkdir()
    tree = {}
    for s in ("chat-1", "chat-2"):
        for i in range(4):
            p = m.path / s / f"layer.{i}"
            p.write_bytes(os.urandom(1000 * (i + 1)))
            os.setxattr(p, "user.model", f"tiny-{s}".encode())
    os.utime(m.path / "chat-1" / "layer.0", (1_700_000_000, 1_700_000_000))
    (m.path / "chat-2" / "layer.3").write_bytes(b"replaced")
    for s in ("chat-1", "chat-2"):
        for name in os.listdir(m.path / s):
            p = m.path / s / name
            st = os.stat(p)
            tree[f"{s}/{name}"] = (p.read_bytes(), st.st_mtime_ns, os.getxattr(p, "user.model"))
    out = recover_after_losing_etcd(m, etcd)
    assert "recovered 8 entries" in out, out
    got = {}
    for s in sorted(os.listdir(m.path)):
        for name in os.listdir(m.path / s):
            p = m.path / s / name
            got[f"{s}/{name}"] = (
                p.read_bytes(),
                os.stat(p).st_mtime_ns,
                os.getxattr(p, "user.model"),
            )
    assert got == tree


@pytest.mark.parametrize("stop", ["umount", "kill"])
def test_a_renamed_file_survives_a_restart(make_mount, stop):
    # issue 9.5: start-up cleanup took the renamed file's object for a leftover
    m = make_mount()
    (m.path / "s").mkdir()
    (m.path / "s" / "f.tmp").write_bytes(b"x\n")
    os.rename(m.path / "s" / "f.tmp", m.path / "s" / "f")
    m.umount() if stop == "umount" else m.kill()
    m.mount()
    assert os.listdir(m.path / "s") == ["f"]
    assert (m.path / "s" / "f").read_bytes() == b"x\n"


def test_recover_on_a_live_mount_neither_resurrects_nor_duplicates(make_mount):
    # issue 9.6
    m = make_mount()
    (m.path / "s").mkdir()
    for n in ("gone", "moved", "kept"):
        (m.path / "s" / n).write_bytes(n.encode())
    os.unlink(m.path / "s" / "gone")
    os.rename(m.path / "s" / "moved", m.path / "s" / "there")
    out = subprocess.run(
        KVFS + ["recover", str(m.path)], capture_output=True, text=True, check=True
    )
    assert "recovered 0 entries" in out.stdout, out.stdout + out.stderr
    assert sorted(os.listdir(m.path / "s")) == ["kept", "there"]
    objects = [os.getxattr(m.path / "s" / n, "user.kvfs.object") for n in ("kept", "there")]
    assert len(set(objects)) == 2
    os.unlink(m.path / "s" / "kept")
    assert (m.path / "s" / "there").read_bytes() == b"moved"


def test_recover_after_etcd_loss_knows_renames_and_deletes(make_mount, etcd):
    m = make_mount()
    (m.path / "s").mkdir()
    for n in ("gone", "moved"):
        (m.path / "s" / n).write_bytes(n.encode())
    os.unlink(m.path / "s" / "gone")
    os.rename(m.path / "s" / "moved", m.path / "s" / "there")
    recover_after_losing_etcd(m, etcd)
    assert os.listdir(m.path / "s") == ["there"]
    assert (m.path / "s" / "there").read_bytes() == b"moved"


@pytest.fixture
def lone_etcd(tmp_path):
    c = EtcdCluster(tmp_path / "lone", 1).start()
    yield c
    c.stop()


def test_etcd_down_fails_promptly_then_recovers(make_mount, lone_etcd):
    m = make_mount(etcd_endpoints=lone_etcd.endpoints)
    (m.path / "s").mkdir()
    (m.path / "s" / "before").write_bytes(b"b")
    lone_etcd.members[0].stop()
    for op in (
        lambda: (m.path / "new-session").mkdir(),
        lambda: (m.path / "s" / "during").write_bytes(b"d"),
        lambda: os.listdir(m.path),
    ):
        t0 = time.monotonic()
        with pytest.raises(OSError) as e:
            op()
        assert e.value.errno == errno.ETIMEDOUT
        assert time.monotonic() - t0 < 10
    assert m.status()["etcd"]["errors"] > 0  # the daemon is up and says why
    lone_etcd.members[0].start()
    wait_for(
        lambda: _ok(lambda: (m.path / "s" / "after").write_bytes(b"a")),
        30,
        0.2,
        what="writes again once etcd is back",
    )
    assert sorted(os.listdir(m.path / "s")) == ["after", "before"]
    assert (m.path / "s" / "before").read_bytes() == b"b"


def _ok(fn):
    try:
        fn()
        return True
    except OSError:
        return False


def test_full_store_gives_enospc_and_keeps_other_files(make_mount, tmp_path):
    store = tmp_path / "small"
    store.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(store)], check=True)
    try:
        m = make_mount(store=store)
        (m.path / "s").mkdir()
        (m.path / "s" / "keep").write_bytes(b"k" * (1 << 20))
        with pytest.raises(OSError) as e:
            with open(m.path / "s" / "big", "wb") as f:
                for _ in range(10):
                    f.write(b"b" * (1 << 20))
        assert e.value.errno == errno.ENOSPC
        assert os.listdir(m.path / "s") == ["keep"]
        assert (m.path / "s" / "keep").read_bytes() == b"k" * (1 << 20)
        wait_for(lambda: store_objects(m) == committed_objects(m), 5, what="no leftovers")
        (m.path / "s" / "small").write_bytes(b"fits")  # space came back
        assert (m.path / "s" / "small").read_bytes() == b"fits"
        m.umount()
    finally:
        subprocess.run(["umount", "-l", str(store)])


def read_is_refused_and_counted(m, session, name):
    """A cold read of SESSION/NAME is an EIO, counted and named in `kvfs status`."""
    _drop_caches()
    with pytest.raises(OSError) as e:
        (m.path / session / name).read_bytes()
    assert e.value.errno == errno.EIO
    st = m.status()
    assert st["counters"]["corrupt"] >= 1 and st["last_corrupt"] == f"{session}/{name}"


def _drop_caches():
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_object_is_refused(make_mount, damage):
    # with passthrough the kernel reads objects itself; --verify-reads keeps
    # every read checked (the connector checks its own checksums either way)
    m = make_mount("--verify-reads")
    (m.path / "s").mkdir()
    data = os.urandom(3 << 20)
    (m.path / "s" / "f").write_bytes(data)
    (m.path / "s" / "ok").write_bytes(b"fine")
    obj = m.store / "objects" / object_of(m.path / "s" / "f")
    if damage == "flip":
        flip_byte(obj, 2_000_000)
    else:
        os.truncate(obj, 1_000_000)
    read_is_refused_and_counted(m, "s", "f")
    assert "s/f" in m.log()
    assert (m.path / "s" / "ok").read_bytes() == b"fine"
    # appending or truncating copies the old bytes: the copy must not launder them
    with pytest.raises(OSError) as e:
        with open(m.path / "s" / "f", "ab") as f:
            f.write(b"tail")
    assert e.value.errno == errno.EIO
    with pytest.raises(OSError) as e:
        os.truncate(m.path / "s" / "f", 2_500_000)
    assert e.value.errno == errno.EIO
    _drop_caches()
    with pytest.raises(OSError) as e:
        (m.path / "s" / "f").read_bytes()
    assert e.value.errno == errno.EIO


@pytest.mark.parametrize("how", ["kvfs scrub", "background"])
def test_scrub_finds_what_passthrough_reads_cannot(make_mount, how):
    # with passthrough the kernel reads objects itself; a scrub re-checks them
    # at rest and quarantines a bad one: EIO for readers, a miss for the connector
    args = ("--scrub-interval", "0.5") if how == "background" else ()
    m = make_mount(*args)
    (m.path / "s").mkdir()
    data = os.urandom(3 << 20)
    (m.path / "s" / "f").write_bytes(data)
    (m.path / "s" / "ok").write_bytes(b"fine")
    obj = m.store / "objects" / object_of(m.path / "s" / "f")
    flip_byte(obj, 2_000_000)
    if how == "kvfs scrub":
        out = subprocess.run(
            KVFS + ["scrub", str(m.path)], capture_output=True, text=True, check=True
        )
        assert "scrubbed 2 files, quarantined 1" in out.stdout, out.stdout + out.stderr
    else:
        wait_for(lambda: m.status()["counters"]["quarantined"] == 1, 20, what="background scrub")
    _drop_caches()
    with pytest.raises(OSError) as e:
        (m.path / "s" / "f").read_bytes()
    assert e.value.errno == errno.EIO
    assert b"block 1" in os.getxattr(m.path / "s" / "f", "user.kvfs.quarantined")
    assert (m.path / "s" / "ok").read_bytes() == b"fine"
    st = m.status()
    assert st["counters"]["quarantined"] == 1 and st["last_corrupt"] == "s/f"
    assert "quarantined" in m.log()
    (m.path / "s" / "f").write_bytes(b"rewritten")  # a new version is good again
    assert (m.path / "s" / "f").read_bytes() == b"rewritten"


def test_killed_daemon_with_private_etcd_remounts(make_mount):
    m = make_mount(private_etcd=True)
    (m.path / "s").mkdir()
    (m.path / "s" / "f").write_bytes(b"kept")
    m.kill()  # its private etcd survives it, holding the data directory
    m.mount()
    assert (m.path / "s" / "f").read_bytes() == b"kept"
    assert "a killed daemon left behind" in m.log()


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_open_read_handles_cost_no_block_of_memory_each(make_mount):
    # issue 9.11: 300 open files once took the daemon from 57 to 358 MiB
    m = make_mount("--no-passthrough")  # the daemon serves (and checks) reads
    (m.path / "s").mkdir()
    for i in range(10):
        (m.path / "s" / f"f{i}").write_bytes(os.urandom(3 << 20))
    pid = m.status()["pid"]
    _drop_caches()
    before = _rss_kib(pid)
    fds = [os.open(m.path / "s" / f"f{i % 10}", os.O_RDONLY) for i in range(300)]
    try:
        for i, fd in enumerate(fds):
            assert len(os.pread(fd, 100_000, (i % 3) << 20)) == 100_000
        grown = (_rss_kib(pid) - before) // 1024
    finally:
        for fd in fds:
            os.close(fd)
    assert grown < 80, f"the daemon grew {grown} MiB for 300 open files"


def test_many_small_xattrs_keep_the_limit_exactly_and_the_daemon_up(make_mount):
    # issue 9.7: ~165 small xattrs overflowed a 4 KiB header: EIO, yet stored,
    # and the next touch-on-read killed the daemon
    m = make_mount("--touch-interval", "0.2")
    (m.path / "s").mkdir()
    f = m.path / "s" / "f"
    f.write_bytes(b"data")
    for i in range(170):
        os.setxattr(f, f"user.x{i:03d}", b"vvv")  # 9 + 3 bytes each: 2040 in all
    with pytest.raises(OSError) as e:
        os.setxattr(f, "user.one-too-many", b"v")
    assert e.value.errno == errno.ENOSPC
    names = [n for n in os.listxattr(f) if not n.startswith("user.kvfs.")]
    assert len(names) == 170 and "user.one-too-many" not in names  # all or nothing
    time.sleep(0.5)  # the point: let the touch interval pass before the next reads
    for _ in range(3):
        assert f.read_bytes() == b"data"
        time.sleep(0.3)
    assert os.getxattr(f, "user.x169") == b"vvv"
    assert m.status()["pid"]  # the daemon answers


def test_a_missing_object_is_an_eio_not_a_missing_name(make_mount):
    # the bytes of a committed name are gone from the store (a wiped Crail, an
    # object file deleted by hand): `ls` shows the name, so a read says EIO,
    # logs and counts it; the name can still be removed or written anew
    m = make_mount()
    (m.path / "s").mkdir()
    (m.path / "s" / "f").write_bytes(b"x" * 100_000)
    (m.path / "s" / "ok").write_bytes(b"fine")
    obj = m.store / "objects" / object_of(m.path / "s" / "f")
    obj.unlink()
    read_is_refused_and_counted(m, "s", "f")
    assert "missing from the store" in m.log()
    with pytest.raises(OSError) as e:
        with open(m.path / "s" / "f", "ab") as f:
            f.write(b"tail")
    assert e.value.errno == errno.EIO
    assert sorted(os.listdir(m.path / "s")) == ["f", "ok"]
    assert (m.path / "s" / "ok").read_bytes() == b"fine"
    (m.path / "s" / "f").write_bytes(b"rewritten")
    assert (m.path / "s" / "f").read_bytes() == b"rewritten"
    os.unlink(m.path / "s" / "f")
    assert os.listdir(m.path / "s") == ["ok"]


def _xattr(path, name):
    try:
        return os.getxattr(path, name)
    except OSError:
        return None


def test_large_files_publish_first_and_get_their_sums_moments_later(make_mount, etcd):
    # a large file the kernel wrote (passthrough) is published at close without
    # a pass over its bytes; a background job adds its block sums, and from
    # then on a scrub finds damage in it as in any file
    m = make_mount()
    (m.path / "s").mkdir()
    data = os.urandom(10 << 20)
    f = m.path / "s" / "f"
    f.write_bytes(data)
    want = block_checksum(sums_of(lambda n, off: data[off : off + n], len(data))).encode()
    wait_for(lambda: _xattr(f, "user.kvfs.checksum") == want, 10, what="the sums after publishing")
    assert m.status()["counters"]["sums_after_publish"] == 1
    # a daemon stopped before that job left an entry without sums: a scrub adds them
    env = {**os.environ, "ETCDCTL_API": "3"}
    ctl = ["etcdctl", "--endpoints", etcd.endpoints]
    key = f"{m.prefix}e/s/f"
    raw = subprocess.run(
        [*ctl, "get", key, "--print-value-only"], env=env, capture_output=True, check=True
    ).stdout
    record = json.loads(raw)
    assert record["blocks"]
    record["checksum"] = record["blocks"] = ""
    subprocess.run([*ctl, "put", key, json.dumps(record)], env=env, capture_output=True, check=True)
    wait_for(lambda: _xattr(f, "user.kvfs.checksum") is None, 5, what="the sums gone")
    subprocess.run(KVFS + ["scrub", str(m.path)], capture_output=True, check=True)
    wait_for(lambda: _xattr(f, "user.kvfs.checksum") == want, 5, what="the sums from the scrub")
    # and now damage is found
    flip_byte(m.store / "objects" / object_of(f), 5_000_000)
    out = subprocess.run(KVFS + ["scrub", str(m.path)], capture_output=True, text=True, check=True)
    assert "quarantined 1" in out.stdout, out.stdout + out.stderr
    _drop_caches()
    with pytest.raises(OSError) as e:
        f.read_bytes()
    assert e.value.errno == errno.EIO

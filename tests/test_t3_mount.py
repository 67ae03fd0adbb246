"""The filesystem through a real mount: what `ls`, `cp`, `rm` and friends rely on."""

import errno
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from kvfs.fs.procfs import open_fd_count
from kvfs.fs.writes import INLINE_FDS
from kvfs.namespace import DELETE_GRACE
from kvfs.objects import block_checksum, sums_of

from kvfstest import wait_for


def checksum_of(data: bytes) -> bytes:
    sums = sums_of(lambda n, off: data[off : off + n], len(data))
    return block_checksum(sums).encode()


def sh(*cmd, check=True, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, check=check, **kw)


def test_sessions_and_layers(kvfs_mount):
    root = kvfs_mount.path
    (root / "chat-1").mkdir()
    (root / "chat-1" / "layer0").write_bytes(b"k" * 1000)
    (root / "chat-1" / "layer1").write_bytes(b"v" * 2000)
    assert sorted(os.listdir(root)) == ["chat-1"]
    assert sorted(os.listdir(root / "chat-1")) == ["layer0", "layer1"]
    assert (root / "chat-1" / "layer1").read_bytes() == b"v" * 2000
    st = os.stat(root / "chat-1" / "layer0")
    assert st.st_size == 1000 and st.st_nlink == 1
    assert os.path.isdir(root / "chat-1")


@pytest.mark.parametrize(
    "name,err",
    [
        (b"a" * 256, errno.ENAMETOOLONG),
        (b"\xff\xfe", errno.EINVAL),
    ],
)
def test_bad_names(kvfs_mount, name, err):
    root = os.fsencode(kvfs_mount.path)
    with pytest.raises(OSError) as e:
        os.mkdir(root + b"/" + name)
    assert e.value.errno == err
    os.mkdir(root + b"/s")
    with pytest.raises(OSError) as e:
        open(root + b"/s/" + name, "wb").close()
    assert e.value.errno == err
    assert os.listdir(root + b"/s") == []


def test_longest_name_works(kvfs_mount):
    name = "é" * 127  # 254 bytes of UTF-8
    d = kvfs_mount.path / name
    d.mkdir()
    (d / name).write_bytes(b"x")
    assert os.listdir(d) == [name]


def test_nesting_and_root_files_refused(kvfs_mount):
    root = kvfs_mount.path
    (root / "s").mkdir()
    with pytest.raises(OSError) as e:
        (root / "s" / "deeper").mkdir()
    assert e.value.errno == errno.EPERM
    with pytest.raises(OSError) as e:
        (root / "file-in-root").write_bytes(b"x")
    assert e.value.errno == errno.EPERM
    os.mknod(root / "s" / "reg", 0o600 | stat.S_IFREG)  # tar --xattrs makes files so
    assert (root / "s" / "reg").read_bytes() == b""
    with pytest.raises(FileExistsError):
        os.mknod(root / "s" / "reg", 0o600 | stat.S_IFREG)
    for fn in (lambda: os.symlink("x", root / "s" / "l"), lambda: os.mkfifo(root / "s" / "f")):
        with pytest.raises(OSError) as e:
            fn()
        assert e.value.errno == errno.EPERM


def test_no_partial_file_visible_while_writing(kvfs_mount):
    root = kvfs_mount.path
    (root / "s").mkdir()
    (root / "s" / "f").write_bytes(b"old" * 1000)
    with open(root / "s" / "f", "wb") as f:
        f.write(b"new" * 500)
        f.flush()
        # another process sees the old version, whole
        assert sh("cat", str(root / "s" / "f")).stdout == "old" * 1000
        with open(root / "s" / "g", "wb") as g:
            g.write(b"partial")
            g.flush()
            assert "g" not in sh("ls", str(root / "s")).stdout.split()
        f.write(b"new" * 500)
    assert (root / "s" / "f").read_bytes() == b"new" * 1000
    assert (root / "s" / "g").read_bytes() == b"partial"


def test_random_offsets_and_sparse(kvfs_mount):
    p = kvfs_mount.path / "s"
    p.mkdir()
    with open(p / "f", "wb") as f:
        f.seek(1 << 20)
        f.write(b"tail")
        f.seek(10)
        f.write(b"head")
    data = (p / "f").read_bytes()
    assert len(data) == (1 << 20) + 4
    assert data[10:14] == b"head" and data[-4:] == b"tail"
    assert data[:10] == bytes(10) and data[14 : 1 << 20] == bytes((1 << 20) - 14)
    # append mode and read-modify-write keep the old bytes
    with open(p / "f", "ab") as f:
        f.write(b"more")
    with open(p / "f", "r+b") as f:
        f.seek(0)
        f.write(b"X")
    data2 = (p / "f").read_bytes()
    assert data2[0:1] == b"X" and data2[1:] == data[1:] + b"more"


def test_concurrent_writers_one_whole_version(kvfs_mount):
    p = kvfs_mount.path / "s"
    p.mkdir()
    size = 3 << 20
    payloads = [bytes([i]) * size for i in range(4)]

    def writer(i):
        with open(p / "f", "wb") as f:
            for off in range(0, size, 65536):
                f.write(payloads[i][off : off + 65536])

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (p / "f").read_bytes() in payloads
    # only one object remains in the store for the name
    wait_for(
        lambda: len(list((kvfs_mount.store / "objects").rglob("*.kvd"))) == 1,
        5,
        what="replaced objects deleted",
    )


def test_coreutils(kvfs_mount, tmp_path):
    root = kvfs_mount.path
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 << 20))
    sh("mkdir", str(root / "s"))
    sh("cp", str(src), str(root / "s" / "a"))
    assert sh("cmp", str(src), str(root / "s" / "a")).returncode == 0
    out = sh("ls", "-l", str(root / "s")).stdout
    assert " 3145728 " in out and out.rstrip().endswith("a")
    assert sh("stat", "-c", "%s %F", str(root / "s" / "a")).stdout.strip() == "3145728 regular file"
    du = int(sh("du", "-sk", str(root / "s")).stdout.split()[0])
    assert 3072 <= du <= 3100
    sh("mv", str(root / "s" / "a"), str(root / "s" / "b"))
    assert os.listdir(root / "s") == ["b"]
    assert sh("cmp", str(src), str(root / "s" / "b")).returncode == 0
    sh("cp", str(root / "s" / "b"), str(tmp_path / "back"))
    assert (tmp_path / "back").read_bytes() == src.read_bytes()
    r = sh("rmdir", str(root / "s"), check=False)
    assert r.returncode != 0 and "not empty" in r.stderr
    sh("rm", str(root / "s" / "b"))
    sh("rmdir", str(root / "s"))
    assert os.listdir(root) == []
    sh("mkdir", str(root / "t"))
    for i in range(5):
        (root / "t" / f"l{i}").write_bytes(b"x" * 100)
    sh("rm", "-r", str(root / "t"))
    assert os.listdir(root) == []
    wait_for(
        lambda: not list((kvfs_mount.store / "objects").rglob("*.kvd")),
        5,
        what="objects of removed files deleted",
    )
    df = sh("df", "-B1", str(root)).stdout.splitlines()[1].split()
    assert int(df[1]) > 0 and int(df[3]) > 0


def test_mv_replaces_atomically_and_noreplace(kvfs_mount):
    p = kvfs_mount.path / "s"
    p.mkdir()
    (p / "a").write_bytes(b"A")
    (p / "b").write_bytes(b"B")
    os.rename(p / "a", p / "b")
    assert os.listdir(p) == ["b"] and (p / "b").read_bytes() == b"A"
    (p / "c").write_bytes(b"C")
    r = sh("mv", "-n", str(p / "c"), str(p / "b"), check=False)
    assert (p / "b").read_bytes() == b"A" and (p / "c").exists()
    del r
    (kvfs_mount.path / "t").mkdir()
    os.rename(p / "c", kvfs_mount.path / "t" / "c")
    assert (kvfs_mount.path / "t" / "c").read_bytes() == b"C"


def test_touch_sets_mtime(kvfs_mount):
    p = kvfs_mount.path / "s"
    p.mkdir()
    (p / "f").write_bytes(b"x")
    sh("touch", "-d", "2020-01-02 03:04:05 UTC", str(p / "f"))
    assert time.gmtime(os.stat(p / "f").st_mtime)[:6] == (2020, 1, 2, 3, 4, 5)
    before = time.time()
    sh("touch", str(p / "f"))
    assert os.stat(p / "f").st_mtime >= before - 1
    sh("touch", str(p / "new"))
    assert (p / "new").read_bytes() == b""


def test_truncate(kvfs_mount):
    p = kvfs_mount.path / "s"
    p.mkdir()
    (p / "f").write_bytes(b"0123456789")
    os.truncate(p / "f", 4)
    assert (p / "f").read_bytes() == b"0123"
    with open(p / "f", "r+b") as f:
        f.truncate(2)
    assert (p / "f").read_bytes() == b"01"
    with open(p / "f", "wb"):
        pass
    assert (p / "f").read_bytes() == b""


def test_xattrs(kvfs_mount):
    p = kvfs_mount.path / "s"
    p.mkdir()
    f = p / "f"
    f.write_bytes(b"hello")
    names = os.listxattr(f)
    for n in ("user.kvfs.size", "user.kvfs.ctime", "user.kvfs.store", "user.kvfs.checksum"):
        assert n in names
    assert os.getxattr(f, "user.kvfs.size") == b"5"
    assert os.getxattr(f, "user.kvfs.checksum") == checksum_of(b"hello")
    assert os.getxattr(f, "user.kvfs.store").startswith(b"local:")
    os.setxattr(f, "user.model", b"tiny-llama")
    assert os.getxattr(f, "user.model") == b"tiny-llama"
    out = sh("getfattr", "-d", str(f)).stdout
    assert 'user.model="tiny-llama"' in out and "user.kvfs.size=" in out
    sh("setfattr", "-x", "user.model", str(f))
    assert "user.model" not in os.listxattr(f)
    # computed attributes are kvfs's to say: a copy tool setting or removing
    # one (cp -a, rsync -aX) succeeds and changes nothing
    os.setxattr(f, "user.kvfs.size", b"1")
    os.removexattr(f, "user.kvfs.size")
    assert os.getxattr(f, "user.kvfs.size") == b"5"
    with pytest.raises(OSError) as e:
        os.setxattr(f, "trusted.x", b"1")
    assert e.value.errno in (errno.ENOTSUP, errno.EPERM)
    with pytest.raises(OSError) as e:
        os.setxattr(f, "user." + "n" * 300, b"1")
    assert e.value.errno == errno.ERANGE
    with pytest.raises(OSError) as e:
        os.setxattr(f, "user.big", b"v" * 5000)
    assert e.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as e:
        os.getxattr(f, "user.absent")
    assert e.value.errno == errno.ENODATA
    # attributes survive a replace made by copying over the file
    os.setxattr(f, "user.keep", b"1")
    with open(f, "r+b") as fh:
        fh.write(b"J")
    assert os.getxattr(f, "user.keep") == b"1" and f.read_bytes() == b"Jello"
    # session directories carry user xattrs too
    os.setxattr(p, "user.owner", b"team-a")
    assert os.getxattr(p, "user.owner") == b"team-a"
    assert os.getxattr(p, "user.kvfs.files") == b"1"


def test_ls_l_does_not_ask_for_labels_and_acls_per_file(kvfs_mount):
    # kvfs keeps user.* attributes only; the others are unsupported, as on a
    # filesystem without labels or ACLs, and `ls -l` (which remembers a
    # device that said so) then lists a big session without a daemon round
    # trip per file
    p = kvfs_mount.path / "s"
    p.mkdir()
    for i in range(200):
        (p / f"f{i}").write_bytes(b"x")
    for name in ("security.selinux", "system.posix_acl_access", "trusted.x"):
        with pytest.raises(OSError) as e:
            os.getxattr(p / "f0", name)
        assert e.value.errno == errno.ENOTSUP, name
    before = kvfs_mount.status()["operations"].get("getxattr", {}).get("count", 0)
    out = sh("ls", "-l", str(p)).stdout
    assert len(out.splitlines()) == 201 and "+" not in out.splitlines()[1].split()[0]
    asked = kvfs_mount.status()["operations"].get("getxattr", {}).get("count", 0) - before
    assert asked <= 4, asked


def test_a_fresh_mount_answers_names_without_etcd(make_mount):
    # no etcd on a read path: with the watch up, lookups, listings, getattr and
    # getxattr are answered from the records the daemon read at mount and the
    # watch keeps current (another mount's changes too); etcd sees changes only
    m = make_mount()
    for sname in ("s", "t"):
        (m.path / sname).mkdir()
        for i in range(50):
            (m.path / sname / f"f{i}").write_bytes(b"x" * i)
    os.setxattr(m.path / "s" / "f1", "user.tag", b"v")
    m.umount()
    m.mount()  # a new daemon: nothing cached
    wait_for(lambda: m.status()["etcd"]["watch"] == "up", 10, what="the watch")
    before = m.status()
    assert sorted(os.listdir(m.path)) == ["s", "t"]
    assert len(sh("ls", "-l", str(m.path / "s")).stdout.splitlines()) == 51
    assert os.getxattr(m.path / "s" / "f1", "user.tag") == b"v"
    assert os.stat(m.path / "t" / "f7").st_size == 7  # never listed: a lookup
    for missing in (m.path / "t" / "nope", m.path / "u"):
        with pytest.raises(FileNotFoundError):
            os.stat(missing)
    other = make_mount()
    (other.path / "t" / "new").write_bytes(b"n")
    (other.path / "v").mkdir()
    wait_for(lambda: (m.path / "t" / "new").exists(), 5, what="the other mount's file")
    wait_for(lambda: "v" in os.listdir(m.path), 5, what="the other mount's session")
    after = m.status()
    assert after["etcd"]["calls"] == before["etcd"]["calls"]
    assert after["counters"]["index_hits"] > before["counters"]["index_hits"]
    assert (m.path / "t" / "new").read_bytes() == b"n"


def test_committed_names_stay_in_the_kernel_while_the_watch_is_up(kvfs_mount):
    # the connector stats every chunk file of a prompt at each lookup: names the
    # watch keeps coherent are cached for attrs.FILE_TIMEOUT (10 s), so a stat
    # seconds later is the kernel's alone (another mount's changes still show
    # within a second: test_t4_links.test_two_mounts_see_links_come_and_go)
    p = kvfs_mount.path / "s"
    p.mkdir()
    files = [p / f"f{i}" for i in range(16)]
    for f in files:
        f.write_bytes(b"x")
    time.sleep(0.5)  # the watch events of the commits have invalidated what they do
    for f in files:
        os.stat(f)

    def asked():
        ops = kvfs_mount.status()["operations"]
        return sum(ops.get(k, {}).get("count", 0) for k in ("lookup", "getattr"))

    time.sleep(1.5)  # past the 1 s that directories and new names get
    before = asked()
    for f in files:
        os.stat(f)
    assert asked() - before <= 2, "a stat of a cached name reached the daemon"  # 2: the root's


def test_xattr_set_on_open_file_commits_with_it(kvfs_mount):
    p = kvfs_mount.path / "s"
    p.mkdir()
    with open(p / "f", "wb") as fh:
        fh.write(b"data")
        os.setxattr(fh.fileno(), "user.tokens", b"512")
    assert os.getxattr(p / "f", "user.tokens") == b"512"


@pytest.mark.parametrize("extra_fds", [0, 100])
def test_a_file_open_twice_commits_at_its_last_close(kvfs_mount, extra_fds):
    # every close(2) is a FUSE flush: the daemon commits at the one after which
    # the process holds the file no more, found in /proc (in a worker thread
    # for a process with many descriptors, as a CUDA one has)
    p = kvfs_mount.path / "s"
    p.mkdir()
    held = [os.open("/dev/null", os.O_RDONLY) for _ in range(extra_fds)]
    try:
        # (the daemon counts them with one stat of /proc/PID/fd)
        assert (open_fd_count(os.getpid()) > INLINE_FDS) == (extra_fds > INLINE_FDS)
        commits = kvfs_mount.status()["counters"]["commits"]
        fd = os.open(p / "f", os.O_WRONLY | os.O_CREAT, 0o644)
        fd2 = os.dup(fd)
        os.write(fd, b"first")
        os.close(fd)
        time.sleep(0.2)
        assert kvfs_mount.status()["counters"]["commits"] == commits
        os.write(fd2, b" second")
        os.close(fd2)
        assert kvfs_mount.status()["counters"]["commits"] == commits + 1
        assert (p / "f").read_bytes() == b"first second"
    finally:
        for h in held:
            os.close(h)


def test_status_reports_counters(kvfs_mount):
    p = kvfs_mount.path / "s"
    p.mkdir()
    (p / "f").write_bytes(b"x" * 4096)
    (p / "f").read_bytes()
    st = kvfs_mount.status()
    assert st["counters"]["commits"] >= 1
    assert st["counters"]["bytes_written"] >= 4096
    assert st["counters"]["files_read"] >= 1
    assert set(st["cache"]) >= {"session", "layer", "recent"}
    # with FUSE passthrough the kernel moves the bytes: reads and writes never
    # reach the daemon, opens do, and say which path they took
    assert st["operations"]["create"]["count"] >= 1 and st["operations"]["open"]["mean_ms"] > 0
    assert st["passthrough"] == "on" and st["counters"]["opens_passthrough"] >= 2
    assert "read" not in st["operations"] and "write" not in st["operations"]
    assert st["etcd"]["endpoints"][0]["healthy"] in (True, False)
    human = sh(*__import__("kvfstest").KVFS, "status", str(kvfs_mount.path)).stdout
    assert "cache" in human and "etcd" in human


@pytest.fixture
def shm_store():
    """A store directory on tmpfs, removed after the mount that uses it (ask first)."""
    store = Path(tempfile.mkdtemp(prefix="kvfs-test-store-", dir="/dev/shm"))
    yield store
    shutil.rmtree(store, ignore_errors=True)


def test_reopening_a_file_costs_one_request_and_a_replace_frees_its_space(shm_store, make_mount):
    # a read-only open is one request (no flush at close) and reuses the
    # version's backing file; once the name is replaced, that backing file
    # goes, so the old object's space comes back when its grace ends
    m = make_mount(store=shm_store)
    p = m.path / "s"
    p.mkdir()

    def free():
        st = os.statvfs(shm_store)
        return st.f_bavail * st.f_frsize

    before = free()
    data = os.urandom(64 << 20)
    (p / "f").write_bytes(data)
    ops = m.status()["operations"]
    for _ in range(20):
        with open(p / "f", "rb") as fh:
            assert fh.read(16) == data[:16]
    after = m.status()["operations"]

    def asked(op):
        return after.get(op, {}).get("count", 0) - ops.get(op, {}).get("count", 0)

    assert asked("open") == 20 and asked("flush") == 0
    assert free() < before - (60 << 20)
    (p / "f").write_bytes(b"new")
    assert (p / "f").read_bytes() == b"new"
    wait_for(
        lambda: free() > before - (8 << 20),
        timeout=DELETE_GRACE + 10,
        what="the replaced version's space",
    )


def test_readahead_hints_on_passthrough_files(kvfs_mount):
    # the kernel sends the daemon the readahead of posix_fadvise even for a
    # file it reads itself: answered with the true bytes, no error logged
    p = kvfs_mount.path / "s"
    p.mkdir()
    data = os.urandom(5 << 20)
    (p / "f").write_bytes(data)
    fd = os.open(p / "f", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)
    assert os.getxattr(kvfs_mount.path, "user.kvfs.passthrough") == b"on"


def test_reads_come_from_page_cache_when_warm(kvfs_mount):
    p = kvfs_mount.path / "s"
    p.mkdir()
    data = os.urandom(4 << 20)
    (p / "f").write_bytes(data)
    assert (p / "f").read_bytes() == data
    before = kvfs_mount.status()["counters"]["bytes_read"]
    for _ in range(3):
        assert (p / "f").read_bytes() == data
    after = kvfs_mount.status()["counters"]["bytes_read"]
    assert after - before < len(data)  # served by the kernel, not the daemon
    new = os.urandom(4 << 20)
    (p / "f").write_bytes(new)
    assert (p / "f").read_bytes() == new  # and a replace drops the stale pages


def test_checksum_of_whole_file_matches(kvfs_mount):
    p = kvfs_mount.path / "s"
    p.mkdir()
    data = os.urandom(1 << 20)
    (p / "f").write_bytes(data)
    assert os.getxattr(p / "f", "user.kvfs.checksum") == checksum_of(data)
    assert hashlib.sha256((p / "f").read_bytes()).digest() == hashlib.sha256(data).digest()


def test_ram_backed_store_inline_path(make_mount):
    """Without passthrough a tmpfs store takes the inline read and write path."""
    store = Path(f"/dev/shm/kvfs-test-{os.getpid()}-{time.monotonic_ns()}")
    try:
        m = make_mount("--no-passthrough", store=store)
        (m.path / "s").mkdir()
        data = os.urandom((3 << 20) + 5)
        (m.path / "s" / "f").write_bytes(data)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        assert (m.path / "s" / "f").read_bytes() == data
        st = m.status()
        assert st["counters"]["bytes_read"] >= len(data)
        assert st["counters"]["inline_reads"] > 0
        assert os.getxattr(m.path / "s" / "f", "user.kvfs.checksum") == checksum_of(data)
        m.umount()
    finally:
        shutil.rmtree(store, ignore_errors=True)

"""Hard links through a real mount: ln, ls -l, du, rm, two mounts, recover."""

import os
import subprocess
import time

from test_t4_faults import store_objects

from kvfstest import recover_after_losing_etcd, wait_for


def objects_after_grace(m):
    time.sleep(2.5)  # removed versions linger for the delete grace
    return store_objects(m)


def test_ln_within_and_across_sessions_like_any_filesystem(make_mount):
    m = make_mount()
    for s in ("chat-42", "chat-99"):
        (m.path / s).mkdir()
    a = m.path / "chat-42" / "prefix"
    a.write_bytes(b"k" * 100_000)
    subprocess.run(["ln", str(a), str(m.path / "chat-99" / "prefix")], check=True)
    os.link(a, m.path / "chat-42" / "again")
    sa, sb = os.stat(a), os.stat(m.path / "chat-99" / "prefix")
    assert sa.st_ino == sb.st_ino and sa.st_nlink == sb.st_nlink == 3
    ls = subprocess.run(["ls", "-l", str(m.path / "chat-99")], capture_output=True, text=True)
    assert " 3 " in ls.stdout.splitlines()[1], ls.stdout  # the link count column
    # du counts a file once however many names it has in what it walks
    du = subprocess.run(["du", "-sb", str(m.path)], capture_output=True, text=True, check=True)
    assert int(du.stdout.split()[0]) < 150_000, du.stdout
    assert len(store_objects(m)) == 1
    # attributes belong to the file
    os.setxattr(m.path / "chat-99" / "prefix", "user.model", b"tiny")
    os.utime(a, ns=(10**18, 10**18))
    b = m.path / "chat-99" / "prefix"
    assert os.getxattr(m.path / "chat-42" / "again", "user.model") == b"tiny"
    assert os.stat(b).st_mtime_ns == 10**18
    links = os.getxattr(b, "user.kvfs.links").decode().split("\n")
    assert sorted(links) == ["chat-42/again", "chat-42/prefix", "chat-99/prefix"]
    # rm of one name keeps the others; the bytes go with the last
    subprocess.run(["rm", "-r", str(m.path / "chat-42")], check=True)
    assert os.stat(b).st_nlink == 1 and b.read_bytes() == b"k" * 100_000
    assert len(objects_after_grace(m)) == 1
    os.unlink(b)
    assert objects_after_grace(m) == set()
    # link(2)'s errors
    (m.path / "chat-99" / "x").write_bytes(b"x")
    os.link(m.path / "chat-99" / "x", m.path / "chat-99" / "y")
    for bad, err in (
        (m.path / "chat-99" / "y", FileExistsError),
        (m.path / "nosession" / "y", FileNotFoundError),
    ):
        try:
            os.link(m.path / "chat-99" / "x", bad)
            raise AssertionError(f"link to {bad} worked")
        except err:
            pass


def test_rm_of_a_session_erases_what_only_it_used(make_mount):
    m = make_mount()
    for s in ("chat-42", "chat-99", "index"):
        (m.path / s).mkdir()
    os.setxattr(m.path / "index", "user.kvfs.index", b"1")
    for name in ("system", "turn-42"):
        (m.path / "chat-42" / name).write_bytes(name.encode() * 1000)
        os.link(m.path / "chat-42" / name, m.path / "index" / name)
    os.link(m.path / "index" / "system", m.path / "chat-99" / "system")
    assert len(store_objects(m)) == 2
    subprocess.run(["rm", "-r", str(m.path / "chat-42")], check=True)
    assert sorted(os.listdir(m.path / "index")) == ["system"]
    assert os.stat(m.path / "chat-99" / "system").st_nlink == 2
    assert len(objects_after_grace(m)) == 1


def test_writing_through_any_name_writes_the_file(make_mount):
    # as on any filesystem: the names share one file, so a write through one
    # (truncating, appending, cp onto it) is read through all of them
    a_mnt, other = make_mount(), make_mount()
    for s in ("s", "t"):
        (a_mnt.path / s).mkdir()
    a, b = a_mnt.path / "s" / "a", a_mnt.path / "t" / "b"
    a.write_bytes(b"old bytes")
    os.link(a, b)
    b.write_bytes(b"written through b")  # the second name, opened O_TRUNC
    assert a.read_bytes() == b"written through b"
    with open(a, "ab") as f:  # the first name, O_APPEND
        f.write(b" + a's tail")
    want = b"written through b + a's tail"
    assert os.stat(b).st_size == os.stat(a).st_size == len(want)  # this very process
    assert b.read_bytes() == want
    subprocess.run(["cp", str(a_mnt.path / "s" / "a"), str(a_mnt.path / "s" / "copy")], check=True)
    subprocess.run(["sh", "-c", f"echo shell > {b}"], check=True)
    assert a.read_bytes() == b"shell\n"
    sa, sb = os.stat(a), os.stat(b)
    assert sa.st_ino == sb.st_ino and sa.st_nlink == sb.st_nlink == 2
    assert sorted(os.getxattr(a, "user.kvfs.links").decode().split("\n")) == ["s/a", "t/b"]
    wait_for(lambda: seen_bytes(other.path / "t" / "b") == b"shell\n", 5, what="b on the other")
    wait_for(lambda: seen_bytes(other.path / "s" / "a") == b"shell\n", 5, what="a on the other")
    assert len(objects_after_grace(a_mnt)) == 2  # the linked file and the copy
    # a replace by rename(2) gives one name a new file; the other keeps the old
    (a_mnt.path / "s" / "copy").rename(a)
    assert a.read_bytes() == want and b.read_bytes() == b"shell\n"
    assert os.stat(b).st_nlink == 1


def seen_bytes(path):
    try:
        return path.read_bytes()
    except OSError:
        return None


def test_two_mounts_see_links_come_and_go(make_mount):
    a, b = make_mount(), make_mount()
    (a.path / "s").mkdir()
    (a.path / "s" / "f").write_bytes(b"data")
    wait_for(lambda: (b.path / "s" / "f").exists(), 5, what="the file on the other mount")
    assert os.stat(b.path / "s" / "f").st_nlink == 1
    t0 = time.monotonic()
    os.link(a.path / "s" / "f", a.path / "s" / "g")
    # "within a second": the watch brings it in milliseconds; the slack is for
    # a loaded 2-core CI machine, as in test_t4_cluster
    wait_for(lambda: (b.path / "s" / "g").exists(), 1.5, what="the link on the other mount")
    wait_for(lambda: os.stat(b.path / "s" / "f").st_nlink == 2, 1.5, what="the new link count")
    assert time.monotonic() - t0 < 2
    assert os.stat(b.path / "s" / "g").st_ino == os.stat(b.path / "s" / "f").st_ino
    os.unlink(a.path / "s" / "f")
    wait_for(lambda: not (b.path / "s" / "f").exists(), 1.5, what="the unlink on the other mount")
    wait_for(lambda: os.stat(b.path / "s" / "g").st_nlink == 1, 1.5, what="the link count")
    assert (b.path / "s" / "g").read_bytes() == b"data"


def test_recover_restores_every_link(make_mount, etcd):
    m = make_mount()
    for s in ("s", "t"):
        (m.path / s).mkdir()
    (m.path / "s" / "a").write_bytes(b"linked")
    os.link(m.path / "s" / "a", m.path / "t" / "b")
    os.link(m.path / "s" / "a", m.path / "s" / "c")
    os.unlink(m.path / "s" / "c")  # a name removed is not brought back
    (m.path / "s" / "lone").write_bytes(b"alone")
    out = recover_after_losing_etcd(m, etcd)
    assert sorted(os.listdir(m.path / "s")) == ["a", "lone"], out
    assert os.listdir(m.path / "t") == ["b"]
    assert os.stat(m.path / "t" / "b").st_nlink == 2
    assert os.stat(m.path / "t" / "b").st_ino == os.stat(m.path / "s" / "a").st_ino
    assert (m.path / "t" / "b").read_bytes() == b"linked"
    os.unlink(m.path / "s" / "a")
    assert os.stat(m.path / "t" / "b").st_nlink == 1

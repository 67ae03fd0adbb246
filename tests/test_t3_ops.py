"""The operations class called directly, with no kernel: memory store, in-memory metadata.

What a mount cannot isolate: the claim protocol (a writer's own inode), lookup
counts, the error boundary. The kernel is a recording fake.
"""

import errno
import os
import time
from types import SimpleNamespace

import pyfuse3
import pytest
import trio

from kvfs import namespace
from kvfs.errors import KvfsError
from kvfs.fs import ROOT, Operations
from kvfs.meta import MemoryMeta
from kvfs.metacache import MetaCache
from kvfs.namespace import GROUP_PARALLEL, Namespace
from kvfs.records import Entry, SessionInfo, WatchEvent
from kvfs.store.local import LocalStore
from kvfs.store.memory import MemoryStore

CTX = SimpleNamespace(pid=os.getpid(), uid=0, gid=0, umask=0o022)
O_RDONLY, O_RDWR = os.O_RDONLY, os.O_RDWR


class RecordingKernel:
    """Stands in for the FUSE session: notes what would be sent."""

    def __init__(self, passthrough: bool = False):
        self.sent = []
        self.listed = []
        self.granted = passthrough
        self.backing: dict[int, int] = {}  # backing id -> inode of the registered fd
        self._next_id = 1

    def passthrough_granted(self):
        return self.granted

    def open_backing(self, fd):
        bid = self._next_id
        self._next_id += 1
        self.backing[bid] = os.fstat(fd).st_ino
        return bid

    def close_backing(self, backing_id):
        del self.backing[backing_id]

    def invalidate_entry(self, parent, name):
        self.sent.append(("entry", parent, name))

    def invalidate_inode(self, ino):
        self.sent.append(("inode", ino))

    async def forget_entry_now(self, parent, name):
        self.sent.append(("entry-now", parent, name))

    def readdir_reply(self, token, name, attr, next_id):
        self.listed.append((name, attr.st_ino))
        return True


def fields(**kw):
    names = ("atime", "ctime", "gid", "mode", "mtime", "size", "uid")
    return SimpleNamespace(**{f"update_{n}": kw.get(n, False) for n in names})


@pytest.fixture
def fs(tmp_path):
    """Run a test body as `await body(ops, ns, store)` inside trio.

    Over the memory store by default; `run(body, passthrough=True)` gives a
    local store in a temporary directory and a kernel that grants passthrough.
    """

    def run(body, passthrough=False):
        async def main():
            store = LocalStore(str(tmp_path / "st"), node="t3") if passthrough else MemoryStore()
            ns = Namespace(MemoryMeta(), store, MetaCache(), capacity=None, ttl=3600, node="t3")
            await ns.load_index()
            kernel = RecordingKernel(passthrough)
            ops = Operations(ns, kernel=kernel, touch_on_read=False)
            async with trio.open_nursery() as nursery:
                await nursery.start(ns.run_later)
                await body(ops, ns, store)
                nursery.cancel_scope.cancel()

        trio.run(main)

    return run


async def write_file(ops, session_ino, name: bytes, data: bytes):
    fi, attr = await ops.create(session_ino, name, 0o644, os.O_WRONLY, CTX)
    await ops.write(fi.fh, 0, data)
    await ops.flush(fi.fh)  # no mountpoint: the commit waits for release
    await ops.release(fi.fh)
    await ops.forget([(attr.st_ino, 1)])
    return attr.st_ino


async def read_all(ops, ino) -> bytes:
    fi = await ops.open(ino, O_RDONLY, CTX)
    try:
        return bytes(await ops.read(fi.fh, 0, 1 << 20))
    finally:
        await ops.release(fi.fh)


def test_write_commit_read(fs):
    async def body(ops, ns, store):
        s = await ops.mkdir(ROOT, b"s", 0o755, CTX)
        writer_ino = await write_file(ops, s.st_ino, b"f", b"hello")
        attr = await ops.lookup(s.st_ino, b"f", CTX)
        assert attr.st_size == 5 and attr.st_ino != writer_ino  # a version's own inode
        assert await read_all(ops, attr.st_ino) == b"hello"
        assert ns.counters["commits"] == 1 and ns.counters["files_read"] == 1

    fs(body)


def test_lookup_counts_free_inodes(fs):
    async def body(ops, ns, store):
        s = await ops.mkdir(ROOT, b"s", 0o755, CTX)
        await write_file(ops, s.st_ino, b"f", b"x")
        a = await ops.lookup(s.st_ino, b"f", CTX)
        b = await ops.lookup(s.st_ino, b"f", CTX)
        assert a.st_ino == b.st_ino
        node = ops.inodes.nodes[a.st_ino]
        assert node.lookups == 2
        await ops.forget([(a.st_ino, 1)])
        assert a.st_ino in ops.inodes.nodes
        await ops.forget([(a.st_ino, 1)])
        assert a.st_ino not in ops.inodes.nodes
        # forgetting what is gone, or too much, never raises
        await ops.forget([(a.st_ino, 5), (999_999, 1), (ROOT, 1)])
        assert ROOT in ops.inodes.nodes
        again = await ops.lookup(s.st_ino, b"f", CTX)
        assert again.st_ino != a.st_ino  # a fresh inode for the same version

    fs(body)


def test_writer_gets_its_own_inode_through_estale(fs):
    async def body(ops, ns, store):
        s = await ops.mkdir(ROOT, b"s", 0o755, CTX)
        await write_file(ops, s.st_ino, b"f", b"old")
        v = await ops.lookup(s.st_ino, b"f", CTX)
        reader = await ops.open(v.st_ino, O_RDONLY, CTX)
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.open(v.st_ino, O_RDWR, CTX)
        assert e.value.errno == errno.ESTALE
        w = await ops.lookup(s.st_ino, b"f", CTX)  # the kernel's retry
        assert w.st_ino != v.st_ino and w.entry_timeout == 0
        fi = await ops.open(w.st_ino, O_RDWR, CTX)
        await ops.write(fi.fh, 3, b"new")
        # the writer sees its version; readers still see theirs
        assert bytes(await ops.read(fi.fh, 0, 10)) == b"oldnew"
        assert bytes(await ops.read(reader.fh, 0, 10)) == b"old"
        await ops.release(fi.fh)
        await ops.forget([(w.st_ino, 1)])
        assert ops.inodes.claim_of("s", "f", ops.handles.get(reader.fh).owner) is None
        # after the commit the name resolves to a new version's inode
        n = await ops.lookup(s.st_ino, b"f", CTX)
        assert n.st_ino not in (v.st_ino, w.st_ino) and n.st_size == 6
        assert ("entry-now", s.st_ino, "f") in ops.kernel.sent
        assert bytes(await ops.read(reader.fh, 0, 10)) == b"old"  # an open file outlives it
        await ops.release(reader.fh)

    fs(body)


def test_errors_cross_the_boundary_with_their_errno_and_are_counted(fs):
    async def body(ops, ns, store):
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.mkdir(ROOT, b"a/b", 0o755, CTX)
        assert e.value.errno == errno.EINVAL and isinstance(e.value.__cause__, KvfsError)
        s = await ops.mkdir(ROOT, b"s", 0o755, CTX)
        await write_file(ops, s.st_ino, b"f", b"x")
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.rmdir(ROOT, b"s", CTX)
        assert e.value.errno == errno.ENOTEMPTY
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.mkdir(s.st_ino, b"deeper", 0o755, CTX)
        assert e.value.errno == errno.EPERM
        stats = ops.statistics()
        assert stats["mkdir"]["errnos"] == {"EINVAL": 1, "EPERM": 1}
        assert stats["rmdir"]["errnos"] == {"ENOTEMPTY": 1}

    fs(body)


def test_a_bug_is_eio_and_the_filesystem_keeps_serving(fs, caplog):
    async def body(ops, ns, store):
        s = await ops.mkdir(ROOT, b"s", 0o755, CTX)

        async def broken(*a, **k):
            raise ZeroDivisionError("a bug")

        ns.list_entries = broken
        fh = await ops.opendir(s.st_ino, CTX)
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.readdir(fh, 0, None)
        assert e.value.errno == errno.EIO
        assert ops.statistics()["readdir"]["errnos"] == {"EIO": 1}
        assert "internal error in readdir" in caplog.text and "ZeroDivisionError" in caplog.text
        assert (await ops.getattr(s.st_ino, CTX)).st_ino == s.st_ino

    fs(body)


def test_appending_to_a_corrupt_file_does_not_launder_it(fs):
    async def body(ops, ns, store):
        s = await ops.mkdir(ROOT, b"s", 0o755, CTX)
        await write_file(ops, s.st_ino, b"f", b"A" * 5000)
        entry = await ns.get_entry("s", "f")
        raw, t = store._objects[entry.object]
        flipped = bytearray(raw)
        flipped[-10] ^= 0xFF  # a byte of the data, behind kvfs's back
        store._objects[entry.object] = (bytes(flipped), t)
        v = await ops.lookup(s.st_ino, b"f", CTX)
        with pytest.raises(pyfuse3.FUSEError) as e:
            await read_all(ops, v.st_ino)
        assert e.value.errno == errno.EIO
        with pytest.raises(pyfuse3.FUSEError):
            await ops.open(v.st_ino, O_RDWR, CTX)  # ESTALE: the writer's own inode
        w = await ops.lookup(s.st_ino, b"f", CTX)
        fi = await ops.open(w.st_ino, O_RDWR | os.O_APPEND, CTX)
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.write(fi.fh, 5000, b"tail")
        assert e.value.errno == errno.EIO
        await ops.release(fi.fh)
        assert (await ns.get_entry("s", "f")).version == entry.version  # nothing committed
        assert ns.counters["corrupt"] == 2

    fs(body)


def test_readdir_lists_versions_and_counts_lookups(fs):
    async def body(ops, ns, store):
        s = await ops.mkdir(ROOT, b"s", 0o755, CTX)
        for name in (b"b", b"a"):
            await write_file(ops, s.st_ino, name, name)
        await ops.readdir(await ops.opendir(s.st_ino, CTX), 0, None)
        names = [n for n, _ in ops.kernel.listed]
        assert names == [b"a", b"b"]
        for _, ino in ops.kernel.listed:
            assert ops.inodes.nodes[ino].lookups == 1

    fs(body)


def test_a_directory_stream_resumes_where_it_stopped(fs):
    """A reply buffer that fills up ends a readdir; the next one resumes at the
    offset the kernel was given, which must still name the same entries even
    if files were made meanwhile (each `ls` lists and sorts a session once)."""

    async def body(ops, ns, store):
        s = await ops.mkdir(ROOT, b"s", 0o755, CTX)
        for name in (b"b", b"d"):
            await write_file(ops, s.st_ino, name, name)
        room = [1]

        def reply(token, name, attr, next_id):
            if room[0] == 0:
                return False  # the buffer is full
            room[0] -= 1
            ops.kernel.listed.append((name, next_id))
            return True

        ops.kernel.readdir_reply = reply
        fh = await ops.opendir(s.st_ino, CTX)
        await ops.readdir(fh, 0, None)
        assert ops.kernel.listed == [(b"b", 1)]
        await write_file(ops, s.st_ino, b"a", b"a")  # sorts first: a new listing would shift
        room[0] = 10
        await ops.readdir(fh, 1, None)
        assert ops.kernel.listed[1:] == [(b"d", 2)]
        ops.kernel.listed.clear()
        await ops.readdir(fh, 0, None)  # rewinddir: listed again, the new name in it
        assert ops.kernel.listed == [(b"a", 1), (b"b", 2), (b"d", 3)]
        await ops.releasedir(fh)
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.readdir(fh, 0, None)
        assert e.value.errno == errno.EBADF
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.opendir((await ops.lookup(s.st_ino, b"a", CTX)).st_ino, CTX)
        assert e.value.errno == errno.ENOTDIR

    fs(body)


def test_truncate_by_path_commits_a_new_version(fs):
    async def body(ops, ns, store):
        s = await ops.mkdir(ROOT, b"s", 0o755, CTX)
        await write_file(ops, s.st_ino, b"f", b"0123456789")
        v = await ops.lookup(s.st_ino, b"f", CTX)
        attr = pyfuse3.EntryAttributes()
        attr.st_size = 4
        await ops.setattr(v.st_ino, attr, fields(size=True), None, CTX)
        n = await ops.lookup(s.st_ino, b"f", CTX)
        assert n.st_size == 4 and await read_all(ops, n.st_ino) == b"0123"

    fs(body)


def test_a_read_on_a_read_write_open_sees_the_bytes(fs):
    async def body(ops, ns, store):
        s = await ops.mkdir(ROOT, b"s", 0o755, CTX)
        await write_file(ops, s.st_ino, b"f", b"0123456789")
        v = await ops.lookup(s.st_ino, b"f", CTX)
        with pytest.raises(pyfuse3.FUSEError):
            await ops.open(v.st_ino, O_RDWR, CTX)
        w = await ops.lookup(s.st_ino, b"f", CTX)
        fi = await ops.open(w.st_ino, O_RDWR, CTX)
        assert bytes(await ops.read(fi.fh, 0, 100)) == b"0123456789"
        await ops.release(fi.fh)
        assert (await ns.get_entry("s", "f")).version == ops.inodes.nodes[v.st_ino].entry.version

    fs(body)


def test_an_exclusive_create_of_a_name_committed_meanwhile_fails(fs):
    async def body(ops, ns, store):
        s = await ops.mkdir(ROOT, b"s", 0o755, CTX)
        await write_file(ops, s.st_ino, b"f", b"first")
        # the kernel's lookup came before the commit: create(O_EXCL) arrives
        with pytest.raises(pyfuse3.FUSEError) as err:
            await ops.create(s.st_ino, b"f", 0o644, os.O_WRONLY | os.O_CREAT | os.O_EXCL, CTX)
        assert err.value.errno == errno.EEXIST
        f = await ops.lookup(s.st_ino, b"f", CTX)
        assert await read_all(ops, f.st_ino) == b"first"
        await write_file(ops, s.st_ino, b"g", b"new")  # a new name still can be
        assert [e.name for e in await ns.list_entries("s")] == ["f", "g"]

    fs(body)


def test_rename_of_ones_own_open_file_commits_under_the_new_name(fs):
    async def body(ops, ns, store):
        s = await ops.mkdir(ROOT, b"s", 0o755, CTX)
        await write_file(ops, s.st_ino, b"x", b"old target")
        fi, attr = await ops.create(s.st_ino, b".tmp123", 0o644, os.O_WRONLY, CTX)
        await ops.write(fi.fh, 0, b"safetensors bytes")
        await ops.rename(s.st_ino, b".tmp123", s.st_ino, b"x", 0, CTX)
        await ops.release(fi.fh)
        assert await ns.get_entry("s", ".tmp123") is None
        x = await ops.lookup(s.st_ino, b"x", CTX)
        assert await read_all(ops, x.st_ino) == b"safetensors bytes"
        assert [e.name for e in await ns.list_entries("s")] == ["x"]

    fs(body)


def test_a_removed_name_stays_removed_when_its_writer_closes(fs):
    async def body(ops, ns, store):
        s = await ops.mkdir(ROOT, b"s", 0o755, CTX)
        await write_file(ops, s.st_ino, b"f", b"committed")
        # another process writes f; rm f meanwhile
        fi, attr = await ops.create(s.st_ino, b"f", 0o644, os.O_WRONLY, CTX)
        await ops.write(fi.fh, 0, b"new bytes")
        await ops.unlink(s.st_ino, b"f", CTX)
        await ops.write(fi.fh, 9, b" more")  # the descriptor keeps working
        await ops.flush(fi.fh)
        await ops.release(fi.fh)
        assert await ns.get_entry("s", "f") is None
        # a name never committed can be removed too (safetensors' cleanup does this)
        fi, attr = await ops.create(s.st_ino, b".tmp", 0o644, os.O_WRONLY, CTX)
        await ops.unlink(s.st_ino, b".tmp", CTX)
        await ops.release(fi.fh)
        assert await ns.list_entries("s") == []
        await ops.rmdir(ROOT, b"s", CTX)

    fs(body)


def test_passthrough_versions_share_one_backing_file_per_inode(fs):
    async def body(ops, ns, store):
        s = await ops.mkdir(ROOT, b"s", 0o755, CTX)
        await write_file(ops, s.st_ino, b"f", b"bytes")
        v = await ops.lookup(s.st_ino, b"f", CTX)
        a = await ops.open(v.st_ino, O_RDONLY, CTX)
        b = await ops.open(v.st_ino, O_RDONLY, CTX)
        assert a.backing_id and a.backing_id == b.backing_id
        entry = await ns.get_entry("s", "f")
        assert ops.kernel.backing[a.backing_id] == os.stat(store.path(entry.object)).st_ino
        await ops.release(a.fh)
        assert a.backing_id in ops.kernel.backing  # b still uses it
        await ops.release(b.fh)
        # a committed version keeps it for the next open, until the kernel forgets it
        assert a.backing_id in ops.kernel.backing
        c = await ops.open(v.st_ino, O_RDONLY, CTX)
        assert c.backing_id == a.backing_id
        await ops.release(c.fh)
        await ops.forget([(v.st_ino, 1)])
        assert ops.kernel.backing == {}
        assert ns.counters["opens_passthrough"] >= 3

    fs(body, passthrough=True)


def test_passthrough_writer_commits_what_the_kernel_wrote(fs):
    async def body(ops, ns, store):
        s = await ops.mkdir(ROOT, b"s", 0o755, CTX)
        fi, attr = await ops.create(s.st_ino, b"f", 0o644, os.O_WRONLY, CTX)
        assert fi.backing_id and not fi.direct_io
        w = ops.inodes.nodes[attr.st_ino]
        # the kernel writes the staged file itself; the daemon never sees it
        os.pwrite(w.pending.writer.fileno(), b"kernel bytes", 0)
        assert (await ops.getattr(attr.st_ino, CTX)).st_size == 12
        # the writer reading its own name by path gets the same backing file
        r = await ops.open(attr.st_ino, O_RDONLY, CTX)
        assert r.backing_id == fi.backing_id
        await ops.release(r.fh)
        await ops.release(fi.fh)
        assert ops.kernel.backing == {}
        entry = await ns.get_entry("s", "f")
        assert entry.size == 12
        with open(store.path(entry.object), "rb") as f:
            assert f.read() == b"kernel bytes"  # the data object is the bytes, at offset 0
        # the daemon's verified path agrees with the checksum taken at commit
        ops.reads.verify_reads = True
        v = await ops.lookup(s.st_ino, b"f", CTX)
        assert await read_all(ops, v.st_ino) == b"kernel bytes"

    fs(body, passthrough=True)


def test_an_inode_served_by_the_daemon_stays_so_while_open(fs):
    async def body(ops, ns, store):
        s = await ops.mkdir(ROOT, b"s", 0o755, CTX)
        await write_file(ops, s.st_ino, b"f", b"x")
        v = await ops.lookup(s.st_ino, b"f", CTX)
        ops.reads.verify_reads = True
        a = await ops.open(v.st_ino, O_RDONLY, CTX)
        ops.reads.verify_reads = False
        b = await ops.open(v.st_ino, O_RDONLY, CTX)
        assert not a.backing_id and not b.backing_id  # never mixed on one inode
        await ops.release(a.fh)
        await ops.release(b.fh)
        c = await ops.open(v.st_ino, O_RDONLY, CTX)
        assert c.backing_id  # all closed: the next open chooses afresh
        await ops.release(c.fh)

    fs(body, passthrough=True)


def test_untouched_passthrough_writer_commits_nothing(fs):
    async def body(ops, ns, store):
        s = await ops.mkdir(ROOT, b"s", 0o755, CTX)
        await write_file(ops, s.st_ino, b"f", b"same")
        before = await ns.get_entry("s", "f")
        v = await ops.lookup(s.st_ino, b"f", CTX)
        with pytest.raises(pyfuse3.FUSEError):
            await ops.open(v.st_ino, O_RDWR, CTX)
        w = await ops.lookup(s.st_ino, b"f", CTX)
        fi = await ops.open(w.st_ino, O_RDWR, CTX)
        assert fi.backing_id
        await ops.flush(fi.fh)
        await ops.release(fi.fh)
        assert (await ns.get_entry("s", "f")).version == before.version

    fs(body, passthrough=True)


def test_scrub_quarantines_bad_bytes_at_rest(fs):
    async def body(ops, ns, store):
        s = await ops.mkdir(ROOT, b"s", 0o755, CTX)
        await write_file(ops, s.st_ino, b"good", b"G" * 3000)
        await write_file(ops, s.st_ino, b"bad", b"B" * 3000)
        entry = await ns.get_entry("s", "bad")
        raw, t = store._objects[entry.object]
        store._objects[entry.object] = (raw[:100] + b"x" + raw[101:], t)
        assert await ns.scrub() == 1
        assert ns.scrub_state["done"] == 2 and not ns.scrub_state["running"]
        v = await ops.lookup(s.st_ino, b"bad", CTX)
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.open(v.st_ino, O_RDONLY, CTX)
        assert e.value.errno == errno.EIO
        assert b"checksum mismatch" in await ops.getxattr(v.st_ino, b"user.kvfs.quarantined", CTX)
        good = await ops.lookup(s.st_ino, b"good", CTX)
        assert await read_all(ops, good.st_ino) == b"G" * 3000
        # writing the name again replaces the quarantined version
        await write_file(ops, s.st_ino, b"bad", b"new")
        assert not (await ns.get_entry("s", "bad")).bad
        assert await ns.scrub() == 0

    fs(body)


def test_readahead_on_a_passthrough_open_gets_the_true_bytes(fs):
    # posix_fadvise(WILLNEED) fills the inode's own pages through the daemon
    # even when the kernel reads the backing file itself
    async def body(ops, ns, store):
        s = await ops.mkdir(ROOT, b"s", 0o755, CTX)
        await write_file(ops, s.st_ino, b"f", b"0123456789")
        v = await ops.lookup(s.st_ino, b"f", CTX)
        fi = await ops.open(v.st_ino, O_RDONLY, CTX)
        assert fi.backing_id
        assert bytes(await ops.read(fi.fh, 2, 4)) == b"2345"
        await ops.release(fi.fh)
        fi, attr = await ops.create(s.st_ino, b"g", 0o644, os.O_WRONLY, CTX)
        os.pwrite(ops.inodes.nodes[attr.st_ino].pending.writer.fileno(), b"staged", 0)
        r = await ops.open(attr.st_ino, O_RDONLY, CTX)
        assert bytes(await ops.read(r.fh, 0, 100)) == b"staged"
        await ops.release(r.fh)
        await ops.release(fi.fh)
        root = await ops.getxattr(ROOT, b"user.kvfs.passthrough", CTX)
        assert root == b"on"

    fs(body, passthrough=True)


@pytest.mark.parametrize("second_after", [0.0, 0.1])
def test_every_close_waits_for_the_commit_under_way(fs, second_after):
    # A forked child closes its inherited copy of a writer's descriptor while
    # the parent closes its own: two flushes of one open file. Whichever does
    # not commit must still return only once the bytes are published, or the
    # parent reads its own new file as missing (seen under etcd failover).
    async def body(ops, ns, store):
        s = await ops.mkdir(ROOT, b"s", 0o755, CTX)
        fi, attr = await ops.create(s.st_ino, b"f", 0o644, os.O_WRONLY, CTX)
        await ops.write(fi.fh, 0, b"hello")
        ops.writes.owner_closed = lambda h: True  # the opener's own close
        commit = ns.meta.commit

        def slow_commit(*args, **kw):
            time.sleep(0.3)  # etcd electing a leader
            return commit(*args, **kw)

        ns.meta.commit = slow_commit
        published = []

        async def close(delay):
            await trio.sleep(delay)
            await ops.flush(fi.fh)
            published.append(ns.meta.get_entry("s", "f") is not None)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(close, 0.0)
            nursery.start_soon(close, second_after)
        assert published == [True, True]
        await ops.release(fi.fh)
        await ops.forget([(attr.st_ino, 1)])

    fs(body)


def test_a_close_gets_the_errno_of_the_commit_it_waited_for(fs):
    async def body(ops, ns, store):
        s = await ops.mkdir(ROOT, b"s", 0o755, CTX)
        fi, attr = await ops.create(s.st_ino, b"f", 0o644, os.O_WRONLY, CTX)
        await ops.write(fi.fh, 0, b"hello")
        ops.writes.owner_closed = lambda h: True

        def failing_commit(*args, **kw):
            time.sleep(0.2)
            raise KvfsError("etcd refused", errno.EIO)

        ns.meta.commit = failing_commit
        errnos = []

        async def close():
            try:
                await ops.flush(fi.fh)
                errnos.append(0)
            except pyfuse3.FUSEError as exc:
                errnos.append(exc.errno)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(close)
            nursery.start_soon(close)
        assert errnos == [errno.EIO, errno.EIO]
        await ops.release(fi.fh)
        await ops.forget([(attr.st_ino, 1)])

    fs(body)


def test_names_are_answered_from_the_watch_fed_records_not_etcd(fs):
    # what another daemon changes reaches this one as watch events; with the
    # records complete, no lookup or listing asks etcd (here: the fake raises)
    async def body(ops, ns, store):
        await ops.mkdir(ROOT, b"s", 0o755, CTX)
        await write_file(ops, (await ops.lookup(ROOT, b"s", CTX)).st_ino, b"mine", b"m")

        def etcd(*a, **k):
            raise AssertionError("a read asked etcd")

        for fn in ("get_entry", "list_entries", "get_session", "list_sessions"):
            setattr(ns.meta, fn, etcd)
        theirs = Entry("s", "theirs", size=3, object="o1", xattrs={"user.k": b"v"})
        rev = 1000
        for ev in (
            WatchEvent("session", "t", None, SessionInfo("t").to_json(), rev),
            WatchEvent("mtime", "t", None, b"123", rev + 1),
            WatchEvent("entry", "s", "theirs", theirs.to_json(), rev + 2),
            WatchEvent("entry", "t", "x", Entry("t", "x", size=1).to_json(), rev + 3),
            WatchEvent("entry", "s", "theirs", Entry("s", "theirs", size=9).to_json(), rev - 5),
        ):
            ns.apply_event(ev)  # the last one is late: older than what came before
        ns.cache.invalidate_all()  # nothing cached: the records answer
        got = await ns.get_entry("s", "theirs")
        assert (got.size, got.xattrs, got.rev) == (3, {"user.k": b"v"}, rev + 2)
        assert [e.name for e in await ns.list_entries("s")] == ["mine", "theirs"]
        assert [i.name for i in await ns.list_sessions()] == ["s", "t"]
        assert (await ns.get_session("t")).mtime_ns == 123
        assert await ns.get_entry("s", "nope") is None
        ns.apply_event(WatchEvent("entry", "s", "theirs", None, rev + 4))
        ns.apply_event(WatchEvent("entry", "t", "x", None, rev + 5))
        ns.apply_event(WatchEvent("session", "t", None, None, rev + 6))
        ns.cache.invalidate_all()
        assert await ns.get_entry("s", "theirs") is None
        assert [e.name for e in await ns.list_entries("s")] == ["mine"]
        assert await ns.get_session("t") is None
        assert [i.name for i in await ns.list_sessions()] == ["s"]
        assert ns.counters["index_hits"] >= 1
        for i in range(70):  # enough records to parse that a thread does it
            name = f"n{i:02d}"
            raw = Entry("s", name, size=i).to_json()
            ns.apply_event(WatchEvent("entry", "s", name, raw, rev + 10 + i))
        ns.cache.invalidate_all()
        listed = await ns.list_entries("s")
        assert [e.name for e in listed] == ["mine"] + [f"n{i:02d}" for i in range(70)]
        assert (listed[-1].size, listed[-1].rev) == (69, rev + 79)

    fs(body)


def test_index_reload_keeps_a_commit_made_while_etcd_was_read(fs):
    # After a watch outage the index of names is read again; a file this
    # daemon commits meanwhile may be missing from what etcd returned, and must
    # not then be answered "no such file" from the index.
    async def body(ops, ns, store):
        s = await ops.mkdir(ROOT, b"s", 0o755, CTX)
        read_all_entries = ns.meta.iter_all_entries

        def slow_snapshot():
            snapshot = list(read_all_entries())  # etcd answered before the commit
            time.sleep(0.3)
            return iter(snapshot)

        ns.meta.iter_all_entries = slow_snapshot
        ns.index_complete = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ns.load_index)
            await trio.sleep(0.1)
            await write_file(ops, s.st_ino, b"f", b"hello")
        ns.cache.invalidate_all()  # as the watch does when it breaks again
        assert ns.index_complete
        attr = await ops.lookup(s.st_ino, b"f", CTX)
        assert attr.st_ino and await read_all(ops, attr.st_ino) == b"hello"

    fs(body)


# -- hard links ---------------------------------------------------------------------


async def data_objects(store) -> set:
    await trio.sleep(2.2)  # the delete grace of removed versions
    return {k for k in store.list() if k.endswith(".kvd")}


def test_hard_links_share_the_file_and_free_it_with_the_last_name(fs):
    async def body(ops, ns, store):
        s = await ops.mkdir(ROOT, b"s", 0o755, CTX)
        t = await ops.mkdir(ROOT, b"t", 0o755, CTX)
        await write_file(ops, s.st_ino, b"a", b"shared prefix")
        a = await ops.lookup(s.st_ino, b"a", CTX)
        b = await ops.link(a.st_ino, t.st_ino, b"b", CTX)
        c = await ops.link(a.st_ino, s.st_ino, b"c", CTX)
        assert b.st_ino == c.st_ino == a.st_ino and c.st_nlink == 3
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await ops.link(a.st_ino, t.st_ino, b"b", CTX)
        assert exc.value.errno == errno.EEXIST
        assert len(await data_objects(store)) == 1  # one copy of the bytes
        # attributes belong to the file: set through one name, seen through all
        await ops.setxattr(b.st_ino, b"user.tag", b"v", CTX)
        await ops.setattr(b.st_ino, SimpleNamespace(st_mode=0o100600), fields(mode=True), None, CTX)
        e = await ns.get_entry_uncached("s", "c")
        assert e.xattrs == {"user.tag": b"v"} and e.mode & 0o777 == 0o600
        assert sorted(e.links) == [("s", "a"), ("s", "c"), ("t", "b")]
        # rm of one name keeps the others; the last name takes the bytes along
        await ops.unlink(s.st_ino, b"a", CTX)
        again = await ops.lookup(t.st_ino, b"b", CTX)
        assert again.st_nlink == 2 and await read_all(ops, again.st_ino) == b"shared prefix"
        await ops.unlink(t.st_ino, b"b", CTX)
        assert (await ns.get_entry_uncached("s", "c")).links == []
        assert len(await data_objects(store)) == 1
        await ops.unlink(s.st_ino, b"c", CTX)
        assert await data_objects(store) == set()
        assert ns.used == 0

    fs(body)


def test_writing_one_name_writes_the_file_replacing_it_keeps_the_other(fs):
    async def body(ops, ns, store):
        s = await ops.mkdir(ROOT, b"s", 0o755, CTX)
        await write_file(ops, s.st_ino, b"a", b"old")
        a = await ops.lookup(s.st_ino, b"a", CTX)
        await ops.link(a.st_ino, s.st_ino, b"b", CTX)
        # written through a: the file changes, under both names, in one step
        await write_file(ops, s.st_ino, b"a", b"new")
        a, b = await ns.get_entry_uncached("s", "a"), await ns.get_entry_uncached("s", "b")
        assert a.version == b.version and sorted(b.links) == [("s", "a"), ("s", "b")]
        assert await read_all(ops, (await ops.lookup(s.st_ino, b"b", CTX)).st_ino) == b"new"
        assert ns.used == 3  # one file
        # replaced by rename(2): a new file under a; b keeps the one it had
        await write_file(ops, s.st_ino, b"tmp", b"other")
        await ops.rename(s.st_ino, b"tmp", s.st_ino, b"a", 0, CTX)
        b = await ns.get_entry_uncached("s", "b")
        assert b.links == [] and (await ns.get_entry_uncached("s", "a")).links == []
        assert await read_all(ops, (await ops.lookup(s.st_ino, b"b", CTX)).st_ino) == b"new"
        assert await read_all(ops, (await ops.lookup(s.st_ino, b"a", CTX)).st_ino) == b"other"
        # rename of a linked name: the other name learns the new one
        b_ino = (await ops.lookup(s.st_ino, b"b", CTX)).st_ino
        await ops.link(b_ino, s.st_ino, b"c", CTX)
        await ops.rename(s.st_ino, b"c", s.st_ino, b"d", 0, CTX)
        assert sorted((await ns.get_entry_uncached("s", "b")).links) == [("s", "b"), ("s", "d")]
        # rename onto another name of the same file changes nothing
        await ops.rename(s.st_ino, b"b", s.st_ino, b"d", 0, CTX)
        assert (await ns.get_entry_uncached("s", "b")) is not None

    fs(body)


def test_names_in_an_index_directory_do_not_keep_a_file_alive(fs):
    async def body(ops, ns, store):
        chat = await ops.mkdir(ROOT, b"chat-42", 0o755, CTX)
        other = await ops.mkdir(ROOT, b"chat-99", 0o755, CTX)
        idx = await ops.mkdir(ROOT, b"index", 0o755, CTX)
        await ops.setxattr(idx.st_ino, b"user.kvfs.index", b"1", CTX)
        assert await ops.getxattr(idx.st_ino, b"user.kvfs.index", CTX) == b"1"
        for name in (b"only-mine", b"shared"):
            await write_file(ops, chat.st_ino, name, name)
            ino = (await ops.lookup(chat.st_ino, name, CTX)).st_ino
            await ops.link(ino, idx.st_ino, name, CTX)
        shared = (await ops.lookup(chat.st_ino, b"shared", CTX)).st_ino
        await ops.link(shared, other.st_ino, b"shared", CTX)
        # rm -r chat-42: what only it used goes, index names included
        await ops.unlink(chat.st_ino, b"only-mine", CTX)
        await ops.unlink(chat.st_ino, b"shared", CTX)
        assert await ns.get_entry_uncached("index", "only-mine") is None
        assert (await ns.get_entry_uncached("index", "shared")).nlink == 2
        assert len(await data_objects(store)) == 1
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await ops.setxattr(idx.st_ino, b"user.kvfs.index", b"yes", CTX)
        assert exc.value.errno == errno.EINVAL

    fs(body)


def test_a_linked_file_expires_whole(fs):
    async def body(ops, ns, store):
        s = await ops.mkdir(ROOT, b"s", 0o755, CTX)
        t = await ops.mkdir(ROOT, b"t", 0o755, CTX)
        await write_file(ops, s.st_ino, b"a", b"x" * 100)
        a = await ops.lookup(s.st_ino, b"a", CTX)
        await ops.link(a.st_ino, t.st_ino, b"b", CTX)
        assert ns.used == 100  # one file, counted once
        assert await ns.expire(now_ns=time.time_ns() + int(ns.ttl * 1e9) + 10**9) >= 2
        assert await ns.get_entry_uncached("t", "b") is None
        assert await data_objects(store) == set()

    fs(body)


def test_commits_at_the_same_moment_share_a_transaction(fs):
    # group commit: 8 writers closing together pay far fewer etcd round trips,
    # and a commit into a removed session fails alone
    async def body(ops, ns, store):
        s = await ops.mkdir(ROOT, b"s", 0o755, CTX)
        g = await ops.mkdir(ROOT, b"gone", 0o755, CTX)
        ops.writes.owner_closed = lambda h: True
        calls = []
        commit, commit_many = ns.meta.commit, ns.meta.commit_many

        def slow(fn):
            def call(*args, **kw):
                calls.append(fn.__name__)
                time.sleep(0.05)  # one etcd round trip
                return fn(*args, **kw)

            return call

        ns.meta.commit, ns.meta.commit_many = slow(commit), slow(commit_many)
        handles = []
        for i in range(8):
            fi, attr = await ops.create(s.st_ino, f"f{i}".encode(), 0o644, os.O_WRONLY, CTX)
            await ops.write(fi.fh, 0, b"x%d" % i)
            handles.append((fi.fh, attr.st_ino))
        fg, ag = await ops.create(g.st_ino, b"lost", 0o644, os.O_WRONLY, CTX)
        await ops.write(fg.fh, 0, b"y")
        outcomes = {}

        async def close(fh, name):
            try:
                await ops.flush(fh)
                outcomes[name] = 0
            except pyfuse3.FUSEError as exc:
                outcomes[name] = exc.errno

        commit(Entry("s", "first", object="o"))  # one commit already in flight
        commit.__self__.delete_session("gone")  # removed behind the writer's back
        async with trio.open_nursery() as nursery:
            for i, (fh, _) in enumerate(handles):
                nursery.start_soon(close, fh, f"f{i}")
            nursery.start_soon(close, fg.fh, "lost")
        assert outcomes == {f"f{i}": 0 for i in range(8)} | {"lost": errno.ENOENT}
        # GROUP_PARALLEL go alone; the rest wait and share (the gone session's
        # group is refused whole, then published again without it)
        assert len(calls) <= GROUP_PARALLEL + 2 and "commit_many" in calls, calls
        assert ns.counters["group_commits"] >= 1
        for i in range(8):
            assert (await ns.get_entry_uncached("s", f"f{i}")).size == 2
        for fh, ino in handles:
            await ops.release(fh)
            await ops.forget([(ino, 1)])
        await ops.release(fg.fh)
        await ops.forget([(ag.st_ino, 1)])

    fs(body)


def test_block_sums_wait_for_commits_to_pause_but_not_forever(monkeypatch):
    # (a version published before its block sums: a large passthrough write)
    monkeypatch.setattr(namespace, "SUMS_QUIET", 0.1)
    monkeypatch.setattr(namespace, "SUMS_WAIT_MAX", 0.5)
    filled = []

    async def main():
        ns = Namespace(MemoryMeta(), MemoryStore(), MetaCache(), capacity=None, ttl=3600, node="t")
        monkeypatch.setattr(ns, "_fill_sums", lambda e: filled.append((e.name, time.monotonic())))
        async with trio.open_nursery() as nursery:
            await nursery.start(ns.run_later)
            ns._last_commit = time.monotonic()
            ns.sums_later_for(Entry(session="s", name="a", size=1))
            await trio.sleep(0.03)
            assert filled == [] and ns.later_pending() == 1
            await trio.sleep(0.3)  # commits paused
            assert [name for name, _ in filled] == ["a"]
            # a commit every 20 ms: b's sums wait SUMS_WAIT_MAX, then go anyway
            ns.sums_later_for(Entry(session="s", name="b", size=1))
            queued = time.monotonic()
            while time.monotonic() - queued < 3 and len(filled) < 2:
                ns._last_commit = time.monotonic()
                await trio.sleep(0.02)
            assert [name for name, _ in filled] == ["a", "b"]
            assert 0.45 <= filled[1][1] - queued < 2
            nursery.cancel_scope.cancel()

    trio.run(main)

"""The metadata contract, held by every implementation: etcd (real) and the in-memory fake."""

import threading
import time
import uuid

import pytest

from kvfs.errors import Conflict, Exists, MetaUnavailable, NotEmpty, NotFound
from kvfs.meta import EtcdMeta, MemoryMeta
from kvfs.records import Entry, SessionInfo


@pytest.fixture(params=["etcd", "memory"])
def meta(request):
    if request.param == "etcd":
        etcd = request.getfixturevalue("etcd")
        m = EtcdMeta(etcd.endpoints, prefix=f"/u-{uuid.uuid4().hex[:8]}/")
    else:
        m = MemoryMeta()
    yield m
    m.close()


def test_sessions(meta):
    meta.create_session(SessionInfo("s", ctime_ns=1, mtime_ns=1))
    with pytest.raises(Exists):
        meta.create_session(SessionInfo("s"))
    assert [s.name for s in meta.list_sessions()] == ["s"]
    meta.commit(Entry("s", "a", size=3, mtime_ns=2))
    with pytest.raises(NotEmpty):
        meta.delete_session("s")
    meta.delete_entry("s", "a")
    meta.delete_session("s")
    assert meta.get_session("s") is None
    with pytest.raises(NotFound):
        meta.delete_session("s")


def test_commit_returns_replaced_and_needs_session(meta):
    with pytest.raises(NotFound):
        meta.commit(Entry("nosession", "a"))
    meta.create_session(SessionInfo("s"))
    assert meta.commit(Entry("s", "a", object="o1")) is None
    prev = meta.commit(Entry("s", "a", object="o2"))
    assert prev.object == "o1"
    e = meta.get_entry("s", "a")
    assert e.object == "o2" and e.rev > 0
    with pytest.raises(Conflict):
        meta.commit(Entry("s", "a", object="o3"), expect_rev=e.rev - 1)


def test_rename_is_atomic(meta):
    meta.create_session(SessionInfo("s"))
    meta.create_session(SessionInfo("t"))
    meta.commit(Entry("s", "a", object="oa"))
    meta.commit(Entry("t", "b", object="ob"))
    replaced = meta.rename_entry(meta.get_entry("s", "a"), "t", "b")
    assert replaced.object == "ob"
    assert meta.get_entry("s", "a") is None and meta.get_entry("t", "b").object == "oa"


def test_change_entries_is_one_compare_and_swap(meta):
    # the step a hard link takes: every name of the file rewritten at once
    meta.create_session(SessionInfo("s"))
    meta.create_session(SessionInfo("t"))
    a = meta.commit(Entry("s", "a", object="o")) or meta.get_entry("s", "a")
    names = [("s", "a"), ("t", "b")]
    linked_a = a.renamed("s", "a", links=names)
    linked_b = a.renamed("t", "b", links=names)
    meta.change_entries([(linked_a, a.rev), (linked_b, 0)], [])
    got = meta.get_entry("t", "b")
    assert got.object == "o" and got.links == names and got.nlink == 2
    assert meta.get_entry("s", "a").rev == got.rev == linked_a.rev
    # a stale revision anywhere: nothing applies
    with pytest.raises(Conflict):
        meta.change_entries([(a.renamed("s", "a"), got.rev)], [("t", "b", got.rev - 1)])
    assert meta.get_entry("t", "b").links == names
    # a name that exists where absence was expected
    with pytest.raises(Conflict):
        meta.change_entries([(a.renamed("t", "b"), 0)], [])
    with pytest.raises(NotFound):
        meta.change_entries([(a.renamed("gone", "c"), 0)], [])
    # unlink one name: delete it, rewrite the other, together
    meta.change_entries([(a.renamed("s", "a"), got.rev)], [("t", "b", got.rev)])
    assert meta.get_entry("t", "b") is None and meta.get_entry("s", "a").links == []


def test_commit_many_publishes_a_group_or_nothing(meta):
    meta.create_session(SessionInfo("s"))
    meta.create_session(SessionInfo("t"))
    meta.commit(Entry("s", "a", object="old"))
    prevs = meta.commit_many(
        [Entry("s", "a", object="a2"), Entry("s", "b", object="b1"), Entry("t", "c", object="c1")]
    )
    assert [p.object if p else None for p in prevs] == ["old", None, None]
    assert meta.get_entry("t", "c").object == "c1" and meta.get_entry("s", "a").object == "a2"
    with pytest.raises(NotFound):
        meta.commit_many([Entry("s", "d", object="d1"), Entry("gone", "e", object="e1")])
    if isinstance(meta, EtcdMeta):  # one transaction: all or nothing
        assert meta.get_entry("s", "d") is None


def test_watch_sees_changes(meta):
    seen = []
    done = threading.Event()

    def cb(events):
        if isinstance(events, Exception):
            return
        seen.extend(events)
        if any(ev.kind == "entry" and ev.value is None for ev in events):
            done.set()

    wid = meta.watch(cb, meta.revision() + 1)
    meta.create_session(SessionInfo("w"))
    meta.commit(Entry("w", "x", object="o"))
    meta.delete_entry("w", "x")
    assert done.wait(5)
    kinds = [(ev.kind, ev.name, ev.value is None) for ev in seen]
    assert ("entry", "x", False) in kinds and ("entry", "x", True) in kinds
    meta.cancel_watch(wid)


def test_compare_and_swap(meta):
    meta.create_session(SessionInfo("s", mtime_ns=5))
    info = meta.get_session("s")
    assert info.mtime_ns == 5
    stale = meta.get_session("s")
    info.mode = 0o040700
    meta.update_session(info)
    assert meta.get_session("s").mode == 0o040700
    with pytest.raises(Conflict):
        meta.update_session(stale)
    meta.commit(Entry("s", "a", object="o1"))
    e = meta.get_entry("s", "a")
    with pytest.raises(Conflict):
        meta.delete_entry("s", "a", expect_rev=e.rev + 100)
    meta.commit(Entry("s", "a", object="o2"))
    with pytest.raises(Conflict):
        meta.rename_entry(e, "s", "b")  # E is no longer current
    assert meta.commit(Entry("s", "new", object="o3"), expect_rev=0) is None
    with pytest.raises(Conflict):
        meta.commit(Entry("s", "new", object="o4"), expect_rev=0)
    assert meta.delete_entry("s", "a").object == "o2"
    assert meta.delete_entry("s", "a") is None
    assert sorted(e.name for e in meta.list_entries("s")) == ["new"]
    assert [(e.session, e.name) for e in meta.iter_all_entries()] == [("s", "new")]


def test_commit_moves_session_mtime(meta):
    meta.create_session(SessionInfo("s", mtime_ns=1))
    meta.commit(Entry("s", "a", mtime_ns=42))
    assert meta.get_session("s").mtime_ns == 42
    assert [s.mtime_ns for s in meta.list_sessions()] == [42]


def test_revision_orders_changes(meta):
    r0 = meta.revision()
    meta.create_session(SessionInfo("s"))
    meta.commit(Entry("s", "a"))
    assert meta.revision() >= r0 + 2
    assert meta.get_entry("s", "a").rev > r0


def test_lock_is_exclusive(meta):
    a = meta.try_lock("gc", 10, "node-a")
    assert a is not None
    assert meta.try_lock("gc", 10, "node-b") is None
    meta.unlock(a)
    b = meta.try_lock("gc", 10, "node-b")
    assert b is not None
    meta.unlock(b)


def test_health_reports_every_member(meta):
    h = meta.health()
    assert h and all(m["healthy"] for m in h)


def test_unreachable_etcd_fails_fast():
    m = EtcdMeta("127.0.0.1:1", timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(MetaUnavailable):
        m.get_entry("s", "a")
    assert time.monotonic() - t0 < 5
    m.close()

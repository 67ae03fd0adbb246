"""Sessions sharing chunks through the index directory, and the weights in every key (fast).

The index logic runs against a plain directory (sharing forced on, as the
connector only does on a checked kvfs mount) and, for what only kvfs does
(an index's names do not keep a file alive), against a real mount.
"""

import errno
import json
import logging
import os
import shutil
import struct
import time

import pytest
import torch

from kvfs_connector.cachedir import INDEX_XATTR, CacheDir
from kvfs_connector.fingerprint import checkpoint_fingerprint
from kvfs_connector.keys import KeySpace, chain_root, derived_session, token_chain, valid_session
from kvfs_connector.plan import ChunkOp, StepPlan
from kvfs_connector.scheduler import PromptInfo, SchedulerSide
from kvfs_connector.settings import Settings
from kvfs_connector.worker import WorkerSide

LOG = logging.getLogger("test")
BLOCK, CHUNK, LAYERS = 16, 32, 2
NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
TOKENS = list(range(500, 500 + 3 * CHUNK + 5))  # three whole chunks and a few more
LINKS = token_chain(TOKENS, CHUNK)


def space(**kw) -> KeySpace:
    base = dict(model="org/tiny", dtype="float32", layout="L", chunk_size=CHUNK, num_layers=2)
    base.update(kw)
    return KeySpace(**base)


def matched(sched: SchedulerSide, info: PromptInfo) -> int:
    for _ in range(2000):
        n, _ = sched.get_num_new_matched_tokens(info.req_id, 0, lambda: info)
        if n is not None:
            return n
        time.sleep(0.005)
    raise AssertionError("lookup never answered")


class Worker:
    """WorkerSide over paged CPU blocks, saving and loading as vLLM drives it."""

    def __init__(self, root, shared: bool | None = True, require_kvfs: bool = False, **kw):
        os.makedirs(root, exist_ok=True)
        settings = Settings(mount=str(root), require_kvfs=require_kvfs, **kw)
        self.cache = CacheDir(str(root), require_kvfs=require_kvfs, shared=shared)
        self.space = space()
        self.w = WorkerSide(settings, self.space, LOG, cache=self.cache)
        g = torch.Generator().manual_seed(7)
        self.kv = {n: torch.randn(24, 2, BLOCK, 8, generator=g) for n in NAMES}
        self.w.register_kv_caches(self.kv)

    def op(self, req, session, i, blocks, **kw) -> ChunkOp:
        parent = LINKS[i - 1] if i else chain_root()
        return ChunkOp(req, session, i, LINKS[i].hex(), parent.hex(), blocks, **kw)

    def save(self, session: str, chunks=(0, 1, 2), repair: bool = False) -> None:
        ops = [
            self.op("r", session, i, [2 * i, 2 * i + 1], tokens=TOKENS[i * CHUNK : (i + 1) * CHUNK])
            for i in chunks
        ]
        for op in ops:
            op.repair = repair
        plan = StepPlan(saves=ops)
        for n in NAMES:
            self.w.save_layer(plan, n, self.kv[n])
        self.w.submit_saves(plan)
        self.w.writer.flush()

    def load(self, session: str, chunks=(0, 1, 2)) -> None:
        """Load into blocks 10.., then check them against the blocks saved from."""
        ops = [self.op("q", session, i, [10 + 2 * i, 11 + 2 * i]) for i in chunks]
        for n in NAMES:
            self.kv[n][10:16] = 0
        self.w.start_load(StepPlan(loads=ops), None)
        for n in NAMES:
            self.w.wait_for_layer(n)
        assert self.w.take_load_errors() == set()
        self.w.writer.flush()
        for n in NAMES:
            got, want = self.kv[n][10 : 10 + 2 * len(chunks)], self.kv[n][: 2 * len(chunks)]
            assert torch.equal(got, want)

    def file(self, i: int) -> str:
        return self.space.file_name(i, LINKS[i])

    def totals(self) -> dict:
        return self.w.stats.totals()


def ino(path) -> int:
    return os.stat(path).st_ino


# -- names ----------------------------------------------------------------------------


def test_one_index_per_configuration_shared_by_its_ranks():
    ranks = [space(tp_rank=r, tp_size=2) for r in range(2)]
    pp = [space(pp_rank=r, pp_size=2, extra=(("layers", f"{r}-{r + 1}"),)) for r in range(2)]
    assert ranks[0].index_session() == ranks[1].index_session()
    assert pp[0].index_session() == pp[1].index_session()
    name = space().index_session()
    assert name.startswith("tiny-index-") and valid_session(name)
    others = [
        space(model="org/other"),
        space(dtype="bfloat16"),
        space(layout="L2"),
        space(chunk_size=64),
        space(tp_size=2),
        space(extra=(("weights", "ab12"),)),
    ]
    assert len({name, *(s.index_session() for s in others)}) == 1 + len(others)


# -- the scheduler: the session first, then the index ------------------------------------


def test_lookups_find_another_sessions_chunks_through_the_index(tmp_path):
    cache = CacheDir(str(tmp_path), require_kvfs=False, shared=True)
    s = space()
    sched = SchedulerSide(Settings(mount=str(tmp_path)), [s], BLOCK, LOG, cache=cache)
    index = s.index_session()
    assert sched.index == index
    (tmp_path / "chat-42").mkdir()
    (tmp_path / index).mkdir()
    for i in range(2):  # chat-42 stored two chunks, and linked them into the index
        (tmp_path / "chat-42" / s.file_name(i, LINKS[i])).write_bytes(b"")
        os.link(
            tmp_path / "chat-42" / s.file_name(i, LINKS[i]),
            tmp_path / index / s.file_name(i, LINKS[i]),
        )
    assert matched(sched, PromptInfo("a", TOKENS, {"kvfs_session": "chat-42"})) == 2 * CHUNK
    assert matched(sched, PromptInfo("b", TOKENS, {"kvfs_session": "chat-99"})) == 2 * CHUNK
    assert matched(sched, PromptInfo("c", TOKENS, None)) == 2 * CHUNK
    # A request naming no session keeps its chunks in the index itself.
    sched.update_state_after_alloc("c", [], 0)
    assert sched.request_finished("c")["kvfs_session"] == index
    # A chunk only in the session still counts for it (the index lost its name).
    (tmp_path / "chat-42" / s.file_name(2, LINKS[2])).write_bytes(b"")
    assert matched(sched, PromptInfo("d", TOKENS, {"kvfs_session": "chat-42"})) == 3 * CHUNK
    assert matched(sched, PromptInfo("e", TOKENS, {"kvfs_session": "chat-99"})) == 2 * CHUNK
    sched.shutdown()


def test_not_shared_off_a_checked_kvfs_mount(tmp_path):
    """require_kvfs off (a plain directory): no index, sessions as before."""
    sched = SchedulerSide(Settings(mount=str(tmp_path), require_kvfs=False), [space()], BLOCK, LOG)
    assert sched.index is None
    assert matched(sched, PromptInfo("a", TOKENS, None)) == 0
    sched.update_state_after_alloc("a", [], 0)
    assert sched.request_finished("a")["kvfs_session"] == derived_session("org/tiny", LINKS[0])
    w = Worker(tmp_path / "plain", shared=None)
    w.save("chat-42")
    assert sorted(os.listdir(tmp_path / "plain")) == ["chat-42"]
    sched.shutdown()
    w.w.shutdown()


# -- the worker: one copy of the bytes, names where they are used ---------------------


def test_saves_link_into_the_index_and_loads_link_into_the_session(tmp_path):
    w = Worker(tmp_path)
    index = w.space.index_session()
    w.save("chat-42")
    assert os.getxattr(tmp_path / index, INDEX_XATTR) == b"1"
    for i in range(3):  # one file under two names
        assert ino(tmp_path / "chat-42" / w.file(i)) == ino(tmp_path / index / w.file(i))
    assert w.totals()["saved_files"] == 3

    # chat-99 loads what chat-42 stored, through the index, and keeps a name for it.
    w.load("chat-99")
    assert w.totals()["linked_files"] == 3
    for i in range(3):
        assert ino(tmp_path / "chat-99" / w.file(i)) == ino(tmp_path / "chat-42" / w.file(i))
    assert w.totals()["saved_files"] == 3  # nothing written again

    # A save of chunks the index has (computed locally, say): linked, not written.
    w.save("chat-7", chunks=(0,))
    assert ino(tmp_path / "chat-7" / w.file(0)) == ino(tmp_path / index / w.file(0))
    assert w.totals()["saved_files"] == 3 and w.totals()["linked_files"] == 4

    # A request naming no session writes into the index directly.
    other = Worker(tmp_path / "m2")
    other.save(index)
    assert sorted(os.listdir(tmp_path / "m2")) == [index]
    assert os.getxattr(tmp_path / "m2" / index, INDEX_XATTR) == b"1"
    assert other.totals().get("linked_files", 0) == 0
    w.w.shutdown()
    other.w.shutdown()


def test_a_repair_replaces_the_index_name_too(tmp_path):
    """After a failed load, the recomputed chunk replaces the damaged file in
    the session and in the index, where every other session would find it."""
    w = Worker(tmp_path)
    index = w.space.index_session()
    w.save("chat-42")
    bad = ino(tmp_path / index / w.file(1))
    w.save("chat-99", chunks=(1,), repair=True)
    good = ino(tmp_path / "chat-99" / w.file(1))
    assert good != bad and ino(tmp_path / index / w.file(1)) == good
    assert ino(tmp_path / "chat-42" / w.file(1)) == bad  # chat-42's own name is its own
    w.w.shutdown()


def test_a_failed_link_is_only_not_shared(tmp_path, caplog):
    w = Worker(tmp_path)
    index = w.space.index_session()
    with caplog.at_level(logging.WARNING):
        assert not w.cache.link("gone", "x.safetensors", "chat-42")
    assert w.cache.counters.totals()["link_errors"] == 1
    assert "not shared" in caplog.text
    # A name another worker made first is success.
    w.save("chat-42", chunks=(0,))
    assert w.cache.link("chat-42", w.file(0), index)
    # The index lost a chunk between lookup and load: that chunk is a miss.
    os.unlink(tmp_path / index / w.file(0))
    ops = [w.op("q", "chat-99", 0, [10, 11])]
    w.w.start_load(StepPlan(loads=ops), None)
    assert w.w.take_load_errors() == {10, 11}
    w.w.shutdown()


# -- on kvfs: the index's names keep nothing alive ------------------------------------


def store_objects(mount) -> set[str]:
    return {p.name for p in mount.store.rglob("*.kvd")}


def wait_objects(mount, want: int) -> set[str]:
    deadline = time.monotonic() + 10  # removed versions go after a short grace
    while len(got := store_objects(mount)) != want and time.monotonic() < deadline:
        time.sleep(0.2)
    return got


def test_rm_r_of_a_session_erases_what_only_it_used(kvfs_mount):
    root = kvfs_mount.path
    w = Worker(root, shared=None, require_kvfs=True)  # shared: it is a live kvfs mount
    index = w.space.index_session()
    w.save("chat-42")
    w.save("chat-99", chunks=(0,))  # chat-99 uses the first chunk too (a link)
    assert w.totals()["linked_files"] == 1
    assert len(wait_objects(kvfs_mount, 3)) == 3  # three chunks, one copy each
    assert os.stat(root / "chat-42" / w.file(0)).st_nlink == 3
    links = os.getxattr(root / index / w.file(0), "user.kvfs.links").decode().split("\n")
    assert sorted(links) == sorted(f"{s}/{w.file(0)}" for s in ("chat-42", "chat-99", index))
    shutil.rmtree(root / "chat-42")
    # Chunks 1 and 2 were only chat-42's: gone from the index and the store.
    assert sorted(os.listdir(root / index)) == [w.file(0)]
    assert len(wait_objects(kvfs_mount, 1)) == 1
    assert os.stat(root / "chat-99" / w.file(0)).st_nlink == 2
    # A file written into the index directly lives on its own.
    w.save(index, chunks=(1,))
    assert sorted(os.listdir(root / index)) == [w.file(0), w.file(1)]
    w.w.shutdown()


# -- the weights in every key ---------------------------------------------------------


def checkpoint(path, scale: float = 1.0):
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text('{"hidden_size": 8}')
    g = torch.Generator().manual_seed(0)
    save_file(
        {"w1": torch.randn(64, 8, generator=g) * scale, "w2": torch.randn(8, generator=g)},
        str(path / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return path


def test_the_checkpoint_fingerprint_follows_the_weights(tmp_path):
    ckpt = checkpoint(tmp_path / "m")
    fp = checkpoint_fingerprint(str(ckpt))
    assert fp and checkpoint_fingerprint(str(ckpt)) == fp
    # The same files elsewhere are the same weights.
    assert checkpoint_fingerprint(str(checkpoint(tmp_path / "copy"))) == fp
    st = ckpt / "model.safetensors"

    def changed(edit) -> str:
        data = bytearray(st.read_bytes())
        edit(data)
        st.write_bytes(bytes(data))
        new = checkpoint_fingerprint(str(ckpt))
        assert new and new != fp
        checkpoint(ckpt)  # back to the original
        assert checkpoint_fingerprint(str(ckpt)) == fp
        return new

    # a byte of the header
    (n,) = struct.unpack("<Q", st.read_bytes()[:8])
    head = st.read_bytes()[8 : 8 + n]
    pos = 8 + head.index(b'"pt"') + 2
    changed(lambda d: d.__setitem__(pos, ord("x")))
    changed(lambda d: d.extend(b"\0" * 16))  # the size
    # values of a tensor (retrained weights of the same shapes)
    start = 8 + n + json.loads(head)["w1"]["data_offsets"][0]
    changed(lambda d: d.__setitem__(start, d[start] ^ 0x40))
    # the config
    (ckpt / "config.json").write_text('{"hidden_size": 8, "rope_theta": 1}')
    assert checkpoint_fingerprint(str(ckpt)) != fp
    assert checkpoint_fingerprint(str(tmp_path / "nowhere" / "model")) is None


def test_a_hub_snapshot_is_fingerprinted_by_its_blobs(tmp_path, monkeypatch):
    """A model loaded by hub id: its snapshot in the Hugging Face cache, whose
    files are links to blobs named by their content hashes."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / ("c" * 40)
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c" * 40)

    def publish(content: bytes, sha: str) -> None:
        (blobs / sha).write_bytes(content)
        target = snap / "model.safetensors"
        if target.is_symlink():
            target.unlink()
        target.symlink_to(os.path.relpath(blobs / sha, snap))

    publish(b"x" * 100, "a" * 64)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fp = checkpoint_fingerprint("org/tiny", None, str(cache))
    assert fp is not None
    publish(b"x" * 100, "b" * 64)  # new content under the same name and size
    assert checkpoint_fingerprint("org/tiny", None, str(cache)) not in (None, fp)
    assert checkpoint_fingerprint("org/not-downloaded", None, str(cache)) is None


def test_the_api_shares_across_sessions_too(kvfs_mount):
    from kvfs_connector import init_engine

    root = kvfs_mount.path
    eng = init_engine(mount=str(root), model_id="m1", dtype="float32", num_layers=2, chunk_size=8)
    ids = list(range(100, 124))
    kv = [torch.randn(24, 3), torch.randn(24, 3)]
    assert eng.store_kv(ids, kv, session="chat-42") == 24
    r = eng.retrieve_kv(ids, session="chat-99")
    assert r.num_tokens == 24 and torch.equal(r.kv_caches[1], kv[1])
    assert eng.counters.totals()["linked_files"] == 3
    mine, theirs = files_inodes(root / "chat-42"), files_inodes(root / "chat-99")
    assert mine == theirs and len(mine) == 3
    assert eng.retrieve_kv(ids).num_tokens == 24  # no session: the index
    assert eng.store_kv(ids, kv, session="chat-7") == 0  # linked, not written
    assert files_inodes(root / "chat-7") == mine
    shutil.rmtree(root / "chat-42")
    assert eng.retrieve_kv(ids, session="chat-42").num_tokens == 24  # chat-99's, still
    eng.close()


def files_inodes(d) -> dict[str, int]:
    return {f: os.stat(d / f).st_ino for f in os.listdir(d)}


def test_a_chunk_whose_commit_fails_is_reported_and_not_there(make_mount):
    # store_kv closes chunk files (kvfs's commit) beside the next chunk's
    # writes: a close that fails must still fail the call and leave no file
    from kvfs_connector import init_engine

    m = make_mount("--capacity", "1K")
    eng = init_engine(mount=str(m.path), model_id="m1", dtype="float32", num_layers=2, chunk_size=8)
    ids = list(range(100, 124))
    kv = [torch.randn(24, 3), torch.randn(24, 3)]
    with pytest.raises(OSError) as e:
        eng.store_kv(ids, kv, session="chat-1")
    assert e.value.errno == errno.ENOSPC
    assert os.listdir(m.path / "chat-1") == []
    assert eng.retrieve_kv(ids, session="chat-1").num_tokens == 0
    eng.close()

"""Keys, chunk files and the engine-neutral API, without vLLM (fast)."""

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from kvfs_connector import RetrieveStatus, StoreStatus, init_engine
from kvfs_connector.chunkfile import ChunkError, ChunkFile, decode_tokens, write_chunk
from kvfs_connector.keys import KeySpace, chain, derived_session, token_chain, valid_session
from kvfs_connector.scheduler import PromptInfo, SchedulerSide
from kvfs_connector.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def space(**kw) -> KeySpace:
    base = dict(model="m", dtype="float32", layout="L", chunk_size=4, num_layers=2)
    base.update(kw)
    return KeySpace(**base)


# -- keys ---------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.integers(0, 50_000), min_size=8, max_size=40),
    st.integers(0, 39),
    st.integers(1, 50_000),
)
def test_chain_links_depend_on_the_whole_prefix(tokens, pos, delta):
    pos %= len(tokens)
    other = list(tokens)
    other[pos] = (other[pos] + delta) % 50_001
    a, b = token_chain(tokens, 4), token_chain(other, 4)
    assert len(a) == len(tokens) // 4
    changed_chunk = pos // 4
    # Chunks before the change are shared, every chunk from it on differs.
    assert a[:changed_chunk] == b[:changed_chunk]
    assert all(x != y for x, y in zip(a[changed_chunk:], b[changed_chunk:], strict=True))


def test_key_space_separates_models_dtypes_layouts_and_ranks():
    link = token_chain(list(range(4)), 4)[0]
    variants = [
        space(),
        space(model="other"),
        space(dtype="bfloat16"),
        space(layout="L2"),
        space(tp_rank=1, tp_size=2),
        space(tp_rank=0, tp_size=2),
        space(pp_rank=1, pp_size=2),
        space(num_layers=3),
    ]
    names = {s.file_name(0, link) for s in variants}
    assert len(names) == len(variants)
    assert space(tp_rank=1, tp_size=2).file_name(0, link).split(".")[1] == "tp1"
    assert space().file_name(2, link).startswith("000008-000012.tp0.")


def test_session_names():
    link = token_chain(list(range(4)), 4)[0]
    s = derived_session("/models/Qwen3 0.6B/", link)
    assert s.startswith("Qwen3-0.6B-") and valid_session(s)
    for bad in ["", ".", "..", "a/b", "a\0b", "x" * 256, None, 3]:
        assert not valid_session(bad)
    assert valid_session("x" * 255)
    assert valid_session("chat-42")


# -- chunk files ----------------------------------------------------------------


def sample_chunk(tmp_path, **meta):
    tensors = {
        "model.layers.0.self_attn.attn": torch.randn(2, 2, 32, 64),
        "model.layers.1.self_attn.attn": torch.randn(2, 2, 32, 64),
    }
    path = str(tmp_path / "c.safetensors")
    write_chunk(path, tensors, {"model": "m", "tokens": "", **meta})
    return path, tensors


def test_chunk_file_is_plain_safetensors(tmp_path):
    path, tensors = sample_chunk(tmp_path, format="kvfs-kv/1")
    with safe_open(path, "pt") as f:
        assert f.metadata()["format"] == "kvfs-kv/1"
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t)
            assert f.metadata()[f"crc32.{name}"]
    with ChunkFile(path) as f:
        f.expect({"model": "m"})
        for name, t in tensors.items():
            f.expect_tensor(name, torch.float32, t.shape)
            assert torch.equal(f.read_tensor(name), t)


def test_chunk_file_reads_into_scattered_destinations(tmp_path):
    path, tensors = sample_chunk(tmp_path)
    name, t = next(iter(tensors.items()))
    paged = torch.zeros(5, 2, 32, 64)
    dests = [paged[3], paged[1]]
    with ChunkFile(path) as f:
        f.read_into(name, [memoryview(d.view(torch.uint8).numpy()).cast("B") for d in dests])
    assert torch.equal(paged[3], t[0]) and torch.equal(paged[1], t[1])


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda b: b[:-100], "truncated data"),
        (lambda b: b[:5], "truncated header"),
        (lambda b: b + b"x", "trailing bytes"),
        (lambda b: b[:-8] + bytes(x ^ 1 for x in b[-8:]), "checksum mismatch"),
        (lambda b: b[:8] + b"[" + b[9:], "unreadable header"),
    ],
)
def test_damaged_chunk_files_are_refused(tmp_path, damage, reason):
    path, tensors = sample_chunk(tmp_path)
    Path(path).write_bytes(damage(Path(path).read_bytes()))
    with pytest.raises(ChunkError) as e:
        with ChunkFile(path) as f:
            for name in tensors:
                f.read_tensor(name)
    assert reason in e.value.reason


def test_foreign_chunk_files_are_refused(tmp_path):
    path, tensors = sample_chunk(tmp_path)
    name = next(iter(tensors))
    with ChunkFile(path) as f:
        with pytest.raises(ChunkError, match="model is 'm', expected 'other'"):
            f.expect({"model": "other"})
        with pytest.raises(ChunkError, match="BF16"):
            f.expect_tensor(name, torch.bfloat16, [2, 2, 32, 64])
        with pytest.raises(ChunkError, match="expected F32"):
            f.expect_tensor(name, torch.float32, [2, 2, 16, 64])
        with pytest.raises(ChunkError, match="no tensor"):
            f.expect_tensor("model.layers.9.self_attn.attn", torch.float32, [2, 2, 32, 64])
    with pytest.raises(ChunkError, match="missing"):
        ChunkFile(str(tmp_path / "nope"))


def test_a_rank_refuses_another_ranks_file(tmp_path):
    link, parent = token_chain(list(range(4)), 4)[0], b"\0" * 16
    rank1, rank0 = space(tp_rank=1, tp_size=2), space(tp_rank=0, tp_size=2)
    path = str(tmp_path / "f")
    write_chunk(path, {"x": torch.zeros(1)}, rank1.header(link, parent))
    with ChunkFile(path) as f:
        f.expect(rank1.header(link, parent))
        with pytest.raises(ChunkError, match="key is"):
            f.expect(rank0.header(link, parent))


LOG = logging.getLogger("test")


def scheduler(mount, spaces, **settings) -> SchedulerSide:
    return SchedulerSide(
        Settings(mount=str(mount), require_kvfs=False, **settings), spaces, 32, LOG
    )


def matched(sched, info: PromptInfo, computed: int = 0) -> int:
    """vLLM's question, asked again while the answer is deferred, as vLLM does."""
    for _ in range(2000):
        n, load_async = sched.get_num_new_matched_tokens(info.req_id, computed, lambda: info)
        if n is not None:
            assert not load_async
            return n
        time.sleep(0.005)
    raise AssertionError("lookup never answered")


def test_scheduler_hits_only_when_every_rank_has_the_chunk(tmp_path):
    spaces = [space(tp_rank=r, tp_size=2, chunk_size=64) for r in range(2)]
    sched = scheduler(tmp_path, spaces)
    tokens = list(range(3, 3 + 200))
    info = PromptInfo("r1", tokens, {"kvfs_session": "s"})
    links = token_chain(tokens, 64)
    (tmp_path / "s").mkdir()
    for i in range(3):  # rank 0 has all three chunks, rank 1 only the first two
        (tmp_path / "s" / spaces[0].file_name(i, links[i])).write_bytes(b"")
    for i in range(2):
        (tmp_path / "s" / spaces[1].file_name(i, links[i])).write_bytes(b"")
    assert matched(sched, info, 0) == 128
    assert matched(sched, info, 64) == 64


def test_a_hit_does_not_save_again_the_stored_chunk_it_computes_the_end_of(tmp_path):
    """A prompt of whole chunks: a hit loads all but the last block and
    computes that; the chunk it ends, stored by an earlier request, is not
    copied out and written again at every hit."""
    spaces = [space(chunk_size=64)]
    sched = scheduler(tmp_path, spaces)
    sched.bind(lambda req_id: list(range(8)))
    tokens = list(range(3, 3 + 256))  # four chunks, eight blocks of 32
    links = token_chain(tokens, 64)
    (tmp_path / "s").mkdir()
    for i, link in enumerate(links):
        (tmp_path / "s" / spaces[0].file_name(i, link)).write_bytes(b"")
    tail = chain(links[2], tokens[192:224])  # the block before the last token's
    (tmp_path / "s" / spaces[0].file_name(3, tail, 32)).write_bytes(b"")

    def hit(req):
        info = PromptInfo(req, tokens, {"kvfs_session": "s"})
        assert matched(sched, info) == 224
        sched.update_state_after_alloc(req, list(range(8)), 224)
        return sched.build_plan({req: (224, 32)})

    assert hit("r1").saves == []
    os.unlink(tmp_path / "s" / spaces[0].file_name(3, links[3]))
    assert [op.index for op in hit("r2").saves] == [3]


# -- the engine-neutral API -----------------------------------------------------------


def api_engine(mount, **kw):
    cfg = dict(mount=str(mount), model_id="m1", dtype="float32", num_layers=2, chunk_size=8)
    cfg.setdefault("require_kvfs", False)  # a plain directory, unless the test mounts kvfs
    cfg.update(kw)
    return init_engine(cfg)


def test_api_store_and_retrieve_longest_prefix(tmp_path):
    eng = api_engine(tmp_path)
    ids = list(range(100, 130))  # 3 whole chunks of 8, and 6 more tokens
    kv = [torch.randn(30, 2, 4), torch.randn(30, 2, 4)]
    assert eng.should_retrieve(ids) is RetrieveStatus.MISS
    assert eng.should_store(ids) is StoreStatus.STORED
    assert eng.store_kv(ids, kv) == 24
    assert eng.should_store(ids) is StoreStatus.SKIPPED
    r = eng.retrieve_kv(ids)
    assert r.status is RetrieveStatus.HIT and r.num_tokens == 24
    assert all(torch.equal(a, b[:24]) for a, b in zip(r.kv_caches, kv, strict=True))
    # A prompt sharing the first two chunks gets exactly those.
    other = ids[:16] + [7] * 14
    r = eng.retrieve_kv(other, session=eng._session(token_chain(ids, 8), None))
    assert r.num_tokens == 16
    assert all(torch.equal(a, b[:16]) for a, b in zip(r.kv_caches, kv, strict=True))
    # Another model never sees these chunks.
    assert api_engine(tmp_path, model_id="m2").retrieve_kv(ids).status is RetrieveStatus.MISS


def test_api_damaged_chunk_ends_the_prefix(tmp_path):
    eng = api_engine(tmp_path)
    ids = list(range(100, 124))
    eng.store_kv(ids, [torch.randn(24, 3), torch.randn(24, 3)], session="s")
    files = sorted((tmp_path / "s").iterdir())
    data = bytearray(files[1].read_bytes())
    data[-1] ^= 0xFF
    files[1].write_bytes(bytes(data))
    r = eng.retrieve_kv(ids, session="s")
    assert r.num_tokens == 8
    assert len(r.errors) == 1 and "checksum" in r.errors[0]


def test_api_a_hole_in_a_stored_prompt_is_filled_and_the_rest_left_alone(tmp_path):
    eng = api_engine(tmp_path)
    ids = list(range(100, 132))  # 4 chunks
    kv = [torch.randn(32, 3), torch.randn(32, 3)]
    assert eng.store_kv(ids, kv, session="s") == 32
    files = sorted((tmp_path / "s").iterdir(), key=lambda p: p.stat().st_mtime_ns)
    before = {p.name: p.stat().st_ino for p in files}

    def index_of(p):
        with ChunkFile(str(p)) as c:
            return c.metadata["chunk_index"]

    hole = next(p for p in files if index_of(p) == "1")
    hole.unlink()
    assert eng.retrieve_kv(ids, session="s").num_tokens == 8
    # chunks 2 and 3 are not asked for one by one: their writes find them
    # there and write nothing (not even their checksums)
    assert eng.store_kv(ids, kv, session="s") == 8
    after = {p.name: p.stat().st_ino for p in (tmp_path / "s").iterdir()}
    assert set(after) == set(before)
    assert all(after[n] == before[n] for n in after if n != hole.name)
    r = eng.retrieve_kv(ids, session="s")
    assert r.num_tokens == 32
    assert all(torch.equal(a, b) for a, b in zip(r.kv_caches, kv, strict=True))


def test_api_stores_token_ids_in_the_header(tmp_path):
    eng = api_engine(tmp_path)
    ids = list(range(100, 108))
    eng.store_kv(ids, [torch.randn(8, 3), torch.randn(8, 3)], session="s")
    (f,) = (tmp_path / "s").iterdir()
    with ChunkFile(str(f)) as c:
        assert decode_tokens(c.metadata["tokens"]) == ids
        assert c.metadata["model"] == "m1"


def test_hf_example_output_is_the_same_with_a_cached_prefix(kvfs_mount, tiny_models):
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "hf_generate.py"),
            "--model",
            str(tiny_models["tiny-a"]),
            "--mount",
            str(kvfs_mount.path),
            "--session",
            "hf-demo",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert p.returncode == 0, p.stderr[-4000:]
    import json

    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["cold_hit_tokens"] == 0
    assert r["warm_hit_tokens"] >= r["prompt_tokens"] // 2
    assert r["no_cache"] == r["cold"] == r["warm"]
    assert os.listdir(kvfs_mount.path / "hf-demo")


def test_api_store_object_corrupted_behind_kvfs_is_a_miss(kvfs_mount):
    """kvfs answers EIO for an object that fails its own check; that is a miss too."""
    store = getattr(kvfs_mount, "store", None)
    if store is None:
        pytest.skip("this mount fixture does not expose its store")
    eng = api_engine(kvfs_mount.path, require_kvfs=True)
    ids = list(range(100, 124))
    eng.store_kv(ids, [torch.randn(24, 3), torch.randn(24, 3)], session="s")
    second = sorted((kvfs_mount.path / "s").iterdir())[1]
    name = Path(os.getxattr(second, "user.kvfs.object").decode()).name
    (obj,) = Path(store).rglob(name)  # wherever the local store keeps its objects
    data = bytearray(obj.read_bytes())
    data[-1] ^= 0xFF
    obj.write_bytes(bytes(data))
    fd = os.open(second, os.O_RDONLY)  # forget cached pages, so the read reaches kvfs
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    r = eng.retrieve_kv(ids, session="s")
    assert r.num_tokens == 8
    assert len(r.errors) == 1
    assert "read failed" in r.errors[0] or "checksum" in r.errors[0]


# -- issue 9: keys, modes, flags, the mount ------------------------------------------


def lora_dir(path: Path, scale: float) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16}')
    save_file({"lora_A": torch.full((8, 16), scale)}, str(path / "adapter_model.safetensors"))
    return path


def lora_files(tmp_path, name: str, path: Path) -> list[str]:
    """The chunk file names a request with this adapter would load."""
    sched = scheduler(tmp_path, [space(chunk_size=64)])
    info = PromptInfo("r", list(range(3, 203)), {"kvfs_session": "s"}, lora=(name, str(path)))
    st, _ = sched._lookup(None, info, 0)
    return [sched.spaces[0].file_name(i, link) for i, link in enumerate(st.links)]


def test_lora_key_follows_the_adapters_weights_not_its_name(tmp_path):
    """Issue 9.2: new weights under the same name and path must not hit the old KV."""
    adapter = lora_dir(tmp_path / "adapters" / "sql", 0.5)
    before = lora_files(tmp_path, "sql", adapter)
    assert lora_files(tmp_path, "sql", adapter) == before
    lora_dir(adapter, 0.25)  # retrained in place
    after = lora_files(tmp_path, "sql", adapter)
    assert set(after).isdisjoint(before)
    # The same weights under another name and path are the same adapter.
    copy = lora_dir(tmp_path / "elsewhere" / "sql-v2", 0.25)
    assert lora_files(tmp_path, "other-name", copy) == after


def test_lora_without_weights_on_this_machine_is_not_cached(tmp_path):
    sched = scheduler(tmp_path, [space(chunk_size=64)])
    info = PromptInfo("r", list(range(3, 203)), None, lora=("hub", "org/not-downloaded"))
    assert matched(sched, info) == 0
    assert sched.request_finished("r") is None  # never keyed, never stored


@pytest.mark.parametrize("value", ["false", "False", "0", "no", "off", 0, False])
def test_string_false_turns_loading_and_storing_off(tmp_path, value):
    """Issue 9.12: "false" from a JSON body is false, not a non-empty string."""
    spaces = [space(chunk_size=64)]
    sched = scheduler(tmp_path, spaces)
    tokens = list(range(3, 203))
    (tmp_path / "s").mkdir()
    for i, link in enumerate(token_chain(tokens, 64)):
        (tmp_path / "s" / spaces[0].file_name(i, link)).write_bytes(b"")
    params = {"kvfs_session": "s", "kvfs_load": value, "kvfs_store": value}
    assert matched(sched, PromptInfo("r", tokens, params)) == 0
    sched.update_state_after_alloc("r", [], 0)
    plan = sched.build_plan({"r": (0, len(tokens))})
    assert plan.saves == []
    # And the default, or "true", still loads.
    on = {"kvfs_session": "s", "kvfs_load": "true"}
    assert matched(sched, PromptInfo("r2", tokens, on)) == 192


def test_a_bad_flag_falls_back_to_the_default(tmp_path, caplog):
    sched = scheduler(tmp_path, [space(chunk_size=64)])
    info = PromptInfo("r", list(range(3, 203)), {"kvfs_store": "maybe"})
    with caplog.at_level(logging.WARNING):
        matched(sched, info)
    assert "kvfs_store must be true or false" in caplog.text
    with pytest.raises(ValueError, match="verify_checksum"):
        Settings.from_extra_config({"verify_checksum": "perhaps"})
    assert Settings.from_extra_config({"verify_checksum": "false"}).verify_checksum is False


def test_lookup_is_deferred_while_the_mount_is_slow(tmp_path):
    """A slow mount never stalls vLLM's scheduler thread: it is told to ask again."""
    import threading

    from kvfs_connector.cachedir import CacheDir

    class SlowDir(CacheDir):  # a mount whose names are not cached yet
        gate = threading.Event()

        def exists(self, session, name):
            self.gate.wait()
            return super().exists(session, name)

    spaces = [space(chunk_size=64)]
    cache = SlowDir(str(tmp_path), require_kvfs=False)
    sched = SchedulerSide(Settings(mount=str(tmp_path)), spaces, 32, LOG, cache=cache)
    tokens = list(range(3, 203))
    (tmp_path / "s").mkdir()
    link = token_chain(tokens, 64)[0]
    (tmp_path / "s" / spaces[0].file_name(0, link)).write_bytes(b"")
    info = PromptInfo("r", tokens, {"kvfs_session": "s"})
    t0 = time.perf_counter()
    assert sched.get_num_new_matched_tokens("r", 0, lambda: info) == (None, False)
    assert sched.get_num_new_matched_tokens("r", 0, lambda: info) == (None, False)
    assert time.perf_counter() - t0 < 0.5
    assert sched.stats.totals()["lookups_deferred"] == 1
    SlowDir.gate.set()
    assert matched(sched, info) == 64
    sched.shutdown()


def test_a_slow_mount_delays_a_step_by_one_wait_however_many_requests_arrive(tmp_path):
    """The scheduler thread waits for lookups out of one budget a step
    (LOOKUP_WAIT_SECONDS), so a quick mount answers at the first ask while a
    slow one holds up no step by more than the budget."""
    import threading

    from kvfs_connector.cachedir import CacheDir
    from kvfs_connector.scheduler import LOOKUP_WAIT_SECONDS

    gate = threading.Event()

    class SlowDir(CacheDir):
        def exists(self, session, name):
            gate.wait()
            return super().exists(session, name)

    spaces = [space(chunk_size=64)]
    cache = SlowDir(str(tmp_path), require_kvfs=False)
    sched = SchedulerSide(Settings(mount=str(tmp_path)), spaces, 32, LOG, cache=cache)
    infos = [
        PromptInfo(f"r{i}", list(range(3 + i, 203 + i)), {"kvfs_session": "s"}) for i in range(40)
    ]
    t0 = time.perf_counter()
    for info in infos:
        assert sched.get_num_new_matched_tokens(info.req_id, 0, lambda i=info: i) == (None, False)
    assert time.perf_counter() - t0 < 6 * LOOKUP_WAIT_SECONDS  # one wait, not 40
    sched.build_plan({}, ())  # the step is scheduled: the next one waits afresh
    t0 = time.perf_counter()
    assert sched.get_num_new_matched_tokens("r0", 0, lambda: infos[0]) == (None, False)
    assert time.perf_counter() - t0 >= 0.8 * LOOKUP_WAIT_SECONDS
    gate.set()
    assert matched(sched, infos[0]) == 0  # nothing stored: a miss, once the mount answers
    sched.shutdown()


def mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def test_chunk_files_are_private_by_default(kvfs_mount):
    """Issue 9.10: chunk files hold prompts: 0600 in 0700 sessions."""
    eng = api_engine(kvfs_mount.path, require_kvfs=True)
    eng.store_kv(list(range(100, 116)), [torch.randn(16, 3), torch.randn(16, 3)], session="s")
    assert mode(kvfs_mount.path / "s") == 0o700
    files = list((kvfs_mount.path / "s").iterdir())
    assert len(files) == 2 and all(mode(f) == 0o600 for f in files)


def test_chunk_files_shared_only_when_configured(kvfs_mount):
    old = os.umask(0o077)  # a strict umask must not undo a deliberate share
    try:
        eng = api_engine(kvfs_mount.path, require_kvfs=True, file_mode="0640", dir_mode=0o750)
        eng.store_kv(list(range(100, 108)), [torch.randn(8, 3), torch.randn(8, 3)], session="s")
    finally:
        os.umask(old)
    assert mode(kvfs_mount.path / "s") == 0o750
    (f,) = (kvfs_mount.path / "s").iterdir()
    assert mode(f) == 0o640
    with pytest.raises(ValueError, match="file_mode"):
        Settings.from_extra_config({"file_mode": "rw-r--r--"})


def test_a_bare_directory_is_refused(tmp_path):
    """Issue 9.8: a path that is not a kvfs mount is never written, and counted."""
    from kvfs_connector.cachedir import CacheDir, NotMounted

    cache = CacheDir(str(tmp_path))
    assert not cache.live()
    with pytest.raises(NotMounted):
        cache.write("s", "f.safetensors", {"x": torch.zeros(1)}, {})
    assert cache.counters.totals()["mount_errors"] == 2
    assert list(tmp_path.iterdir()) == []
    sched = SchedulerSide(Settings(mount=str(tmp_path)), [space(chunk_size=64)], 32, LOG)
    assert matched(sched, PromptInfo("r", list(range(3, 203)), None)) == 0
    assert sched.stats.totals()["mount_errors"] == 1


def test_mount_left_bare_by_a_dead_daemon_is_refused(kvfs_mount):
    """After the daemon dies and its mount is cleared, the mountpoint is a
    directory on the root filesystem: the cache is off, nothing lands there."""
    eng = api_engine(kvfs_mount.path, require_kvfs=True)
    ids = list(range(100, 116))
    kv = [torch.randn(16, 3), torch.randn(16, 3)]
    assert eng.store_kv(ids, kv, session="s") == 16
    assert eng.retrieve_kv(ids, session="s").num_tokens == 16
    kvfs_mount.kill()
    assert eng.should_store(ids, session="s") is StoreStatus.SKIPPED
    assert eng.store_kv(ids, kv, session="s") == 0
    assert eng.retrieve_kv(ids, session="s").status is RetrieveStatus.MISS
    assert list(kvfs_mount.path.iterdir()) == []
    assert eng.counters.totals()["mount_errors"] >= 3


def test_the_core_imports_without_vllm():
    """Issue 8.8: keys, chunk files, the scheduler and worker cores, counters
    and the API work with vLLM absent; only the facade needs it."""
    code = (
        "import sys; sys.modules['vllm'] = None\n"
        "import kvfs_connector\n"
        "from kvfs_connector import api, cachedir, chunkfile, counters, keys, scheduler, worker\n"
        "try:\n"
        "    kvfs_connector.KVFSConnector\n"
        "except ImportError:\n"
        "    print('facade needs vllm')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == "facade needs vllm"

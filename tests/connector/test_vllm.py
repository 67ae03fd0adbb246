"""Real vLLM (CPU build) with the connector over the mount, one fresh process per engine."""

import json
import os
import struct
import subprocess

import pytest
import torch
from tinymodel import make_tiny_model

from conftest import CHUNK, PROMPTS

pytestmark = pytest.mark.vllm


def req(name: str, session: str | None = None, max_tokens: int = 8) -> dict:
    r = {"prompt_token_ids": PROMPTS[name], "max_tokens": max_tokens}
    if session is not None:
        r["session"] = session
    return r


def chunk_files(directory) -> list[str]:
    return sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))


def whole_chunks(name: str) -> int:
    return len(PROMPTS[name]) // CHUNK


def loadable(name: str) -> int:
    """Prompt tokens a hit can cover: whole blocks of 32, short of the last token."""
    return (len(PROMPTS[name]) - 1) // 32 * 32


def stored_files(name: str) -> int:
    """Whole chunks, plus a short file for the loadable tail after them."""
    return whole_chunks(name) + (1 if loadable(name) % CHUNK else 0)


def test_store_then_load_in_fresh_process(kvfs_mount, tiny_models, baseline, run_vllm):
    """One process stores, another loads: full hits, a partial hit, a named
    session, and a session removed with rm -r in between."""
    model = tiny_models["tiny-a"]
    # Store with a small token budget: the prompt is prefilled over several
    # steps, and each step saves only the chunks it has computed.
    stored = run_vllm(
        model,
        [req("A"), req("C", session="chat-42")],
        kvfs_mount.path,
        engine={"max_num_batched_tokens": 96},
    )
    a0, c0 = stored["results"]
    assert a0["token_ids"] == baseline["A"]
    assert a0["kv_transfer_params"]["kvfs_hit_tokens"] == 0
    session = a0["kv_transfer_params"]["kvfs_session"]
    assert session.startswith("tiny-a-")
    assert c0["kv_transfer_params"]["kvfs_session"] == "chat-42"
    assert sorted(os.listdir(kvfs_mount.path)) == sorted([session, "chat-42"])
    # A request naming no session stores into the model's index directory,
    # where chat-42's chunks are linked too (issue 12).
    assert "-index-" in session
    files = chunk_files(kvfs_mount.path / session)
    assert len(files) == stored_files("A") + stored_files("C")
    assert files[0].startswith("000000-000064.tp0.")
    assert files[-1].startswith("000256-000288.tp0.")  # the tail, up to the last block
    assert len(chunk_files(kvfs_mount.path / "chat-42")) == stored_files("C")
    # Chunk files hold the prompt: private to the serving user (issue 9.10).
    assert os.stat(kvfs_mount.path / session).st_mode & 0o777 == 0o700
    assert {os.stat(kvfs_mount.path / session / f).st_mode & 0o777 for f in files} == {0o600}

    # rm -r of a named session erases that conversation's cache, and only it.
    subprocess.run(["rm", "-r", str(kvfs_mount.path / "chat-42")], check=True)
    assert os.listdir(kvfs_mount.path) == [session]

    reads_before = kvfs_mount.status()["counters"]["files_read"]
    loaded = run_vllm(
        model,
        [req("A"), req("B"), req("C", session="chat-42"), req("C", session="chat-42")],
        kvfs_mount.path,
    )
    a, b, c, c_again = loaded["results"]
    # The daemon saw the chunk files opened for reading: A's and C's five, and
    # B's two unless the worker still held them open from A's load (reused).
    opened = kvfs_mount.status()["counters"]["files_read"] - reads_before
    reused = sum(r["worker"].get("reused_opens", 0) for r in loaded["results"])
    assert opened >= 10 and opened + reused >= 12
    # The whole cached prefix is loaded: every block short of the last token.
    hit = loadable("A")
    assert a["kv_transfer_params"]["kvfs_hit_tokens"] == hit
    assert a["worker"]["loaded_tokens"] == hit
    assert a["worker"].get("load_errors", 0) == 0
    assert a["token_ids"] == baseline["A"]
    # B shares exactly A's first two chunks: those load, the rest is computed.
    assert b["kv_transfer_params"]["kvfs_session"] == session
    assert b["kv_transfer_params"]["kvfs_hit_tokens"] == 2 * CHUNK
    assert b["worker"]["loaded_tokens"] == 2 * CHUNK
    assert b["token_ids"] == baseline["B"]
    # The removed session is recomputed, with the same output, and stored again.
    assert c["kv_transfer_params"]["kvfs_hit_tokens"] == 0
    assert c["worker"].get("loaded_tokens", 0) == 0
    assert c["token_ids"] == baseline["C"]
    assert c_again["worker"]["loaded_tokens"] == hit
    assert c_again["token_ids"] == baseline["C"]
    assert "hit in the cache" in run_vllm.last_log


def test_damaged_files_are_misses(kvfs_mount, tiny_models, baseline, run_vllm):
    model = tiny_models["tiny-a"]
    names = ["C", "D", "E"]
    # Named sessions: each prompt's files apart from the others' (the index
    # keeps the undamaged versions; the session's damaged name is what loads).
    stored = run_vllm(model, [req(n, session=f"s-{n}") for n in names], kvfs_mount.path)
    sessions = {
        n: kvfs_mount.path / r["kv_transfer_params"]["kvfs_session"]
        for n, r in zip(names, stored["results"], strict=True)
    }
    # C: bytes flipped inside a tensor (the checksum catches it).
    victim = sessions["C"] / chunk_files(sessions["C"])[1]
    data = bytearray(victim.read_bytes())
    for i in range(len(data) - 64, len(data) - 32):
        data[i] ^= 0xFF
    victim.write_bytes(bytes(data))
    # D: truncated.
    victim = sessions["D"] / chunk_files(sessions["D"])[0]
    victim.write_bytes(victim.read_bytes()[:-1000])
    # E: another chunk's file under this chunk's name (right format, wrong key).
    e_files = chunk_files(sessions["E"])
    foreign = (sessions["C"] / chunk_files(sessions["C"])[2]).read_bytes()
    (sessions["E"] / e_files[2]).write_bytes(foreign)

    # Each damaged prompt twice: first a reported miss, then a full hit on the
    # file the first request wrote back.
    out = run_vllm(model, [req(n, session=f"s-{n}") for n in names + names], kvfs_mount.path)
    log = run_vllm.last_log
    first, second = out["results"][:3], out["results"][3:]
    for name, r in zip(names, first, strict=True):
        assert r["token_ids"] == baseline[name], name
        assert r["worker"]["load_errors"] == 1, name
    assert "checksum mismatch" in log
    assert "truncated" in log
    assert "key is" in log
    # Chunks before the damaged one still load; from it on, vLLM recomputes.
    assert [r["worker"].get("loaded_tokens", 0) for r in first] == [CHUNK, 0, 2 * CHUNK]
    assert [r["kv_transfer_params"]["kvfs_hit_tokens"] for r in first] == [CHUNK, 0, 2 * CHUNK]
    full = loadable("C")
    for name, r in zip(names, second, strict=True):
        assert r["token_ids"] == baseline[name], name
        assert r["worker"].get("load_errors", 0) == 0, name
        assert r["worker"]["loaded_tokens"] == full, name


def test_two_models_on_one_mount_never_share(kvfs_mount, tiny_models, baseline, run_vllm):
    a = run_vllm(tiny_models["tiny-a"], [req("A", session="shared")], kvfs_mount.path)
    assert a["results"][0]["token_ids"] == baseline["A"]
    files_a = chunk_files(kvfs_mount.path / "shared")

    b = run_vllm(
        tiny_models["tiny-b"],
        [req("A", session="shared"), req("A", session="shared")],
        kvfs_mount.path,
    )
    first, second = b["results"]
    # tiny-a's chunks of the same tokens are not tiny-b's: a miss, then its own hit.
    assert first["kv_transfer_params"]["kvfs_hit_tokens"] == 0
    assert first["worker"].get("loaded_tokens", 0) == 0
    assert second["worker"]["loaded_tokens"] > 0
    assert second["token_ids"] == first["token_ids"]
    assert first["token_ids"] != baseline["A"]  # really another model
    files = chunk_files(kvfs_mount.path / "shared")
    assert len(files) == 2 * len(files_a)
    assert set(files_a) < set(files)


def test_connector_loads_in_vllm_with_cli_json(tiny_models):
    """The documented --kv-transfer-config JSON parses into a config vLLM accepts."""
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    cfg = KVTransferConfig(
        kv_connector="KVFSConnector",
        kv_connector_module_path="kvfs_connector",
        kv_role="kv_both",
        kv_connector_extra_config={"mount": "/kvcache"},
    )
    cls = KVConnectorFactory.get_connector_class(cfg)
    assert cls.__name__ == "KVFSConnector"


def negate_first_layer(path) -> None:
    """Negate the first layer's KV inside a chunk file, leaving its checksum stale:
    the load fails, but only after the forward pass has run on the bad KV."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    head = json.loads(data[8 : 8 + n])
    first = head["__metadata__"]["layers"].split(",")[0]
    begin, end = head[first]["data_offsets"]
    kv = torch.frombuffer(data, dtype=torch.float32, count=(end - begin) // 4, offset=8 + n + begin)
    kv.neg_()
    path.write_bytes(bytes(data))


def test_failed_load_never_poisons_later_chunks(kvfs_mount, tiny_models, baseline, run_vllm):
    """Issue 9.1: B's later chunks are computed on top of A's damaged second
    chunk before its checksum fails; none of them may be stored, and a fresh
    process loading B must give B's uncached output."""
    model = tiny_models["tiny-a"]
    stored = run_vllm(model, [req("A")], kvfs_mount.path)
    session = kvfs_mount.path / stored["results"][0]["kv_transfer_params"]["kvfs_session"]
    negate_first_layer(session / chunk_files(session)[1])

    first = run_vllm(model, [req("B")], kvfs_mount.path)["results"][0]
    assert first["worker"]["load_errors"] == 1
    assert first["token_ids"] == baseline["B"]  # vLLM recomputed the failed chunk on

    again = run_vllm(model, [req("B")], kvfs_mount.path)["results"][0]
    assert again["worker"].get("load_errors", 0) == 0
    assert again["worker"]["loaded_tokens"] == loadable("B")  # all of B from the cache
    assert again["token_ids"] == baseline["B"]


def test_a_bare_mount_directory_is_neither_read_nor_written(
    tmp_path, tiny_models, baseline, run_vllm
):
    """Issue 9.8: the mount path left as a plain directory (the daemon died and
    the mount was cleared): vLLM serves, uncached, and nothing lands there."""
    bare = tmp_path / "kvcache"
    bare.mkdir()
    out = run_vllm(tiny_models["tiny-a"], [req("A"), req("A")], bare)
    for r in out["results"]:
        assert r["token_ids"] == baseline["A"]
        assert r["kv_transfer_params"]["kvfs_hit_tokens"] == 0
    assert out["worker_totals"]["mount_errors"] >= 1
    assert not out["worker_totals"].get("saved_tokens")
    assert list(bare.iterdir()) == []
    assert "not a live kvfs mount" in run_vllm.last_log or "refused" in run_vllm.last_log


def test_uneven_pipeline_split_keys_each_rank_by_its_own_layers(tmp_path, monkeypatch):
    """Issue 9.3: three layers over two pipeline ranks are split 2+1 by vLLM;
    the scheduler must name rank 1's files with rank 1's layers, not its own."""
    from vllm.distributed.utils import get_pp_indices
    from vllm.engine.arg_utils import EngineArgs

    from kvfs_connector.settings import Settings
    from kvfs_connector.vllm_connector import vllm_key_space

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = make_tiny_model(tmp_path / "tiny3", num_layers=3)
    config = EngineArgs(
        model=str(model),
        pipeline_parallel_size=2,
        block_size=32,
        dtype="float32",
        distributed_executor_backend="mp",
    ).create_engine_config()
    spaces = [vllm_key_space(config, Settings(), 0, pp) for pp in range(2)]
    split = [get_pp_indices(3, pp, 2) for pp in range(2)]
    assert [s.num_layers for s in spaces] == [end - first for first, end in split] == [2, 1]
    assert [dict(s.extra)["layers"] for s in spaces] == ["0-2", "2-3"]

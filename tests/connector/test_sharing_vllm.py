"""Real vLLM (CPU build) over a real kvfs mount: sessions share chunks, and erase their own.

A prompt stored under chat-42 is a hit for chat-99 and for a request naming
no session, read through the mount, with no second copy of its bytes; `rm -r`
of chat-42 then erases exactly the chunks no other session uses.
"""

import os
import shutil
import subprocess
import time

import pytest

from conftest import CHUNK, PROMPTS

pytestmark = pytest.mark.vllm

LOADABLE = (len(PROMPTS["A"]) - 1) // 32 * 32  # whole blocks short of the last token
A_FILES = len(PROMPTS["A"]) // CHUNK + (1 if LOADABLE % CHUNK else 0)  # chunks and the tail
SHARED = 2  # B starts with A's first two chunks
B_OWN = A_FILES - SHARED


def req(name: str, session: str | None = None) -> dict:
    r = {"prompt_token_ids": PROMPTS[name], "max_tokens": 8}
    if session is not None:
        r["session"] = session
    return r


def files(directory) -> dict[str, int]:
    """Chunk file name -> inode."""
    return {
        f: os.stat(directory / f).st_ino
        for f in os.listdir(directory)
        if f.endswith(".safetensors")
    }


def objects(mount, want: int) -> int:
    """Data objects in the store, once their count settles at `want` (a removed
    file's object goes after a short grace) or ten seconds have passed."""
    deadline = time.monotonic() + 10
    while True:
        n = sum(1 for _ in mount.store.rglob("*.kvd"))
        if n == want or time.monotonic() > deadline:
            return n
        time.sleep(0.2)


def test_sessions_share_chunks_and_erase_their_own(kvfs_mount, tiny_models, baseline, run_vllm):
    model, root = tiny_models["tiny-a"], kvfs_mount.path
    reads = kvfs_mount.status()["counters"]["files_read"]
    out = run_vllm(model, [req("A", "chat-42"), req("A"), req("B", "chat-99")], root)
    stored, anonymous, b = out["results"]
    assert stored["kv_transfer_params"]["kvfs_hit_tokens"] == 0
    assert stored["worker"]["saved_files"] == A_FILES
    assert stored["token_ids"] == baseline["A"]

    # No session named: all of chat-42's prompt, read through the mount.
    index = anonymous["kv_transfer_params"]["kvfs_session"]
    assert index.startswith("tiny-a-index-")
    assert os.getxattr(root / index, "user.kvfs.index") == b"1"
    assert anonymous["kv_transfer_params"]["kvfs_hit_tokens"] == LOADABLE
    assert anonymous["worker"]["loaded_tokens"] == LOADABLE
    assert anonymous["worker"]["loaded_files"] == A_FILES
    assert anonymous["worker"].get("saved_files", 0) == 0
    assert anonymous["token_ids"] == baseline["A"]
    # (B's two shared chunks are the files A's anonymous load just read: the
    # worker kept them open, so they count as reused, not as opens)
    opened = kvfs_mount.status()["counters"]["files_read"] - reads
    assert opened >= A_FILES
    assert opened + out["results"][2]["worker"].get("reused_opens", 0) >= A_FILES + SHARED

    # chat-99: A's first two chunks from chat-42, the rest computed and its own.
    assert b["kv_transfer_params"]["kvfs_session"] == "chat-99"
    assert b["kv_transfer_params"]["kvfs_hit_tokens"] == SHARED * CHUNK
    assert b["worker"]["loaded_tokens"] == SHARED * CHUNK
    assert b["worker"]["linked_files"] == SHARED
    assert b["worker"]["saved_files"] == B_OWN
    assert b["token_ids"] == baseline["B"]

    # One copy of every chunk: the shared ones are one file under three names.
    mine, theirs, indexed = files(root / "chat-42"), files(root / "chat-99"), files(root / index)
    assert len(mine) == len(theirs) == A_FILES
    shared = set(mine.values()) & set(theirs.values())
    assert len(shared) == SHARED
    assert set(indexed.values()) == set(mine.values()) | set(theirs.values())
    assert len(indexed) == A_FILES + B_OWN
    assert objects(kvfs_mount, A_FILES + B_OWN) == A_FILES + B_OWN
    # du of a session: what it uses, shared chunks included (a directory is 0 bytes).
    du = subprocess.run(["du", "-sb", str(root / "chat-99")], capture_output=True, text=True)
    assert int(du.stdout.split()[0]) == sum(os.stat(root / "chat-99" / f).st_size for f in theirs)

    # rm -r chat-42: its own chunks leave the store; those chat-99 uses stay.
    subprocess.run(["rm", "-r", str(root / "chat-42")], check=True)
    assert objects(kvfs_mount, A_FILES) == A_FILES
    assert files(root / "chat-99") == theirs
    assert set(files(root / index).values()) == set(theirs.values())

    # Repeating chat-42's prompt recomputes what it alone had, and shares the rest.
    again = run_vllm(model, [req("A", "chat-42")], root)["results"][0]
    assert again["kv_transfer_params"]["kvfs_hit_tokens"] == SHARED * CHUNK
    assert again["worker"]["loaded_tokens"] == SHARED * CHUNK
    assert again["worker"]["saved_files"] == A_FILES - SHARED
    assert again["token_ids"] == baseline["A"]
    assert objects(kvfs_mount, A_FILES + B_OWN) == A_FILES + B_OWN


def test_keys_follow_the_checkpoint_unless_model_id_is_set(tmp_path, tiny_models, monkeypatch):
    """Issue 12.3 on a real VllmConfig: a byte of the safetensors header or the
    size of a weight file changes every key; model_id replaces the identity."""
    from vllm.engine.arg_utils import EngineArgs

    from kvfs_connector.settings import Settings
    from kvfs_connector.vllm_connector import vllm_key_space

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tmp_path / "tiny"
    shutil.copytree(tiny_models["tiny-a"], model)
    config = EngineArgs(model=str(model), block_size=32, dtype="float32").create_engine_config()

    def key(**settings) -> str:
        return vllm_key_space(config, Settings(**settings), 0, 0).digest().hex()

    first, named = key(), key(model_id="tiny-v1")
    assert dict(vllm_key_space(config, Settings(), 0, 0).extra)["weights"]
    assert key() == first  # cached and stable
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    pos = data.index(b'"format":"pt"') + len('"format":"p')
    data[pos] = ord("x")  # one byte of the header's metadata
    weights.write_bytes(bytes(data))
    header_changed = key()
    with open(weights, "ab") as f:
        f.write(b"\0" * 8)  # the size
    assert len({first, header_changed, key()}) == 3
    assert key(model_id="tiny-v1") == named  # model_id overrides the fingerprint

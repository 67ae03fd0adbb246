"""The GPU path: pinned buffers, parallel reads and writes, copies on a side stream.

The layout tests run everywhere; the rest need CUDA (the `device` tool's H200:
`source .gpu-bundle/env.sh && python3 -m pytest tests/connector/test_gpu.py`).
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from safetensors.torch import load_file

from kvfs_connector.api import EngineConfig, KVEngine, RetrieveStatus
from kvfs_connector.chunkfile import ALIGN, ChunkFile
from kvfs_connector.keys import KeySpace, chain_root, token_chain
from kvfs_connector.plan import ChunkOp, StepPlan
from kvfs_connector.settings import Settings
from kvfs_connector.transfer import HostBuffers
from kvfs_connector.worker import WorkerSide

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]


def engine(tmp_path, **kw):
    cfg = dict(
        mount=str(tmp_path),
        model_id="m",
        dtype="bfloat16",
        num_layers=3,
        token_dim=2,
        chunk_size=16,
        require_kvfs=False,
        io_threads=4,
        host_buffer_bytes=1 << 20,  # smaller than a prompt: buffers must be reused
    )
    cfg.update(kw)
    return KVEngine(EngineConfig.from_any(cfg))


def kv_on(device, tokens=200):
    g = torch.Generator().manual_seed(1)
    return [
        torch.randn(2, 4, tokens, 64, generator=g).to(torch.bfloat16).to(device) for _ in range(3)
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_store_and_retrieve_on_the_device(tmp_path, device):
    eng = engine(tmp_path, device=device)
    kv = kv_on(device)
    ids = list(range(1000, 1200))
    assert eng.store_kv(ids, kv, session="s") == 192
    r = eng.retrieve_kv(ids, session="s")
    assert r.status is RetrieveStatus.HIT and r.num_tokens == 192, r.errors
    for got, want in zip(r.kv_caches, kv, strict=True):
        assert got.device.type == torch.device(device).type
        assert torch.equal(got, want[:, :, :192])
    # Again: the host buffers come back from the pool (pinned on a GPU).
    r = eng.retrieve_kv(ids[:100], session="s")
    assert r.num_tokens == 96
    assert torch.equal(r.kv_caches[2], kv[2][:, :, :96])
    eng.close()


@pytest.mark.parametrize("device", DEVICES)
def test_chunk_files_are_aligned_safetensors(tmp_path, device):
    eng = engine(tmp_path)
    kv = kv_on(device, 48)
    eng.store_kv(list(range(48)), kv, session="s")
    files = sorted((tmp_path / "s").iterdir())
    assert len(files) == 3
    for c, f in enumerate(files):
        with ChunkFile(str(f)) as cf:
            assert cf.data_start % ALIGN == 0
        tensors = load_file(str(f))
        assert sorted(tensors) == ["layer.0", "layer.1", "layer.2"]
        for j in range(3):
            assert torch.equal(tensors[f"layer.{j}"], kv[j][:, :, c * 16 : (c + 1) * 16].cpu())
    eng.close()


@pytest.mark.parametrize("device", DEVICES)
def test_damaged_chunk_ends_the_prefix_on_the_device(tmp_path, device):
    eng = engine(tmp_path, device=device)
    kv = kv_on(device, 64)
    ids = list(range(64))
    eng.store_kv(ids, kv, session="s")
    files = sorted((tmp_path / "s").iterdir())
    data = bytearray(files[2].read_bytes())
    data[-5] ^= 0x40
    files[2].write_bytes(bytes(data))
    r = eng.retrieve_kv(ids, session="s")
    assert r.num_tokens == 32
    assert len(r.errors) == 1 and "checksum" in r.errors[0]
    assert torch.equal(r.kv_caches[1], kv[1][:, :, :32])
    os.unlink(files[0])
    assert eng.retrieve_kv(ids, session="s").status is RetrieveStatus.MISS
    eng.close()


def test_host_buffers_wait_for_a_free_one():
    import threading

    pool = HostBuffers(max_bytes=100, pin=False)
    a = pool.get(60)
    got = []
    t = threading.Thread(target=lambda: got.append(pool.get(60)))
    t.start()
    t.join(0.2)
    assert t.is_alive() and not got  # over the limit: waits
    pool.put(a)
    t.join(5)
    assert got and got[0].data_ptr() == a.data_ptr()  # the same buffer, reused


@pytest.mark.parametrize("device", DEVICES)
def test_vllm_worker_saves_and_loads_paged_blocks(tmp_path, device):
    """WorkerSide without vLLM: save two chunks out of GPU paged blocks
    (gather + pinned copy on the side stream), then load them into other
    blocks, layer by layer, and compare."""
    block, blocks_per_chunk, layers = 16, 2, 4
    space = KeySpace(
        model="m",
        dtype="bfloat16",
        layout="vllm:cuda:test",
        chunk_size=block * blocks_per_chunk,
        num_layers=layers,
    )
    settings = Settings(mount=str(tmp_path), require_kvfs=False, io_threads=4)
    w = WorkerSide(settings, space, logging.getLogger("test"))
    names = [f"model.layers.{i}.self_attn.attn" for i in range(layers)]
    g = torch.Generator().manual_seed(3)
    caches = {
        n: torch.randn(20, 2, block, 8, 64, generator=g).to(torch.bfloat16).to(device)
        for n in names
    }
    w.register_kv_caches(caches)
    ids = list(range(500, 564))
    links = token_chain(ids, space.chunk_size)
    parents = [chain_root(), links[0]]
    src_blocks = [[3, 7], [1, 12]]
    saves = [
        ChunkOp(
            "r1", "s", i, links[i].hex(), parents[i].hex(), src_blocks[i], ids[i * 32 : i * 32 + 32]
        )
        for i in range(2)
    ]
    plan = StepPlan(saves=saves)
    for n in names:
        w.save_layer(plan, n, caches[n])
    w.submit_saves(plan)
    w.writer.flush()
    assert len(list((tmp_path / "s").iterdir())) == 2
    dst_blocks = [[5, 6], [15, 16]]
    loads = [
        ChunkOp("r2", "s", i, links[i].hex(), parents[i].hex(), dst_blocks[i]) for i in range(2)
    ]
    for n in names:
        caches[n][[5, 6, 15, 16]] = 0
    w.start_load(StepPlan(loads=loads), None)
    for n in names:
        w.wait_for_layer(n)
        got = caches[n][[5, 6, 15, 16]].clone()  # on the forward pass's stream
        assert torch.equal(got, caches[n][[3, 7, 1, 12]])
    assert w.take_load_errors() == set()
    assert w.stats.totals().get("load_errors", 0) == 0
    w.shutdown()

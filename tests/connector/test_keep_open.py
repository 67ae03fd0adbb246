"""Chunk files kept open between loads (worker.OpenChunks): used again only while
their name still leads to them, and never held long (fast, plain directory).

The worker checks a kept file's name with a stat before each use: the same
check on a kvfs mount is the kernel's cached attributes, covered by the
vLLM tests' repeated hits (tests/connector/test_vllm.py).
"""

import os
import shutil
import time

import torch
from test_sharing import NAMES, Worker

from kvfs_connector.plan import StepPlan
from kvfs_connector.worker import OpenChunks


def reused(w: Worker) -> int:
    return int(w.totals().get("reused_opens", 0))


def test_a_loaded_chunk_file_is_kept_open_and_read_again_without_an_open(tmp_path):
    w = Worker(tmp_path / "c", shared=False)
    w.save("s")
    w.load("s")
    assert reused(w) == 0 and len(w.w.open_files) == 3
    w.load("s")  # checks the blocks against the saved ones
    assert reused(w) == 3 and len(w.w.open_files) == 3
    w.w.shutdown()
    assert len(w.w.open_files) == 0


def test_a_kept_file_is_not_read_once_its_name_leads_elsewhere(tmp_path):
    w = Worker(tmp_path / "c", shared=False)
    w.save("s")
    w.load("s")
    # chunk 1 replaced by the same chunk saved from other KV (same name, other file)
    other = Worker(tmp_path / "c", shared=False)
    for n in NAMES:
        other.kv[n].add_(1.0)
    other.save("t", chunks=(1,))
    name = w.file(1)
    os.replace(tmp_path / "c" / "t" / name, tmp_path / "c" / "s" / name)
    # chunk 2 removed
    os.unlink(tmp_path / "c" / "s" / w.file(2))
    ops = [w.op("q", "s", i, [10 + 2 * i, 11 + 2 * i]) for i in range(3)]
    w.w.start_load(StepPlan(loads=ops), None)
    # chunk 2 is gone: its blocks come back to be computed, not read from the old file
    assert w.w.take_load_errors() == {14, 15}
    assert reused(w) == 1  # chunk 0's only
    for n in NAMES:
        assert torch.equal(w.kv[n][10:12], w.kv[n][0:2])
        assert torch.equal(w.kv[n][12:14], other.kv[n][2:4])  # the new file's bytes


def test_a_session_removed_is_a_miss_and_its_files_are_let_go(tmp_path, monkeypatch):
    monkeypatch.setattr(OpenChunks, "MAX_AGE", 0.3)
    w = Worker(tmp_path / "c", shared=False)
    w.save("s")
    w.load("s")
    shutil.rmtree(tmp_path / "c" / "s")
    ops = [w.op("q", "s", i, [10 + 2 * i, 11 + 2 * i]) for i in range(3)]
    w.w.start_load(StepPlan(loads=ops), None)
    # vLLM recomputes from the request's first chunk that failed: chunk 0
    assert w.w.take_load_errors() == {10, 11}
    assert len(w.w.open_files) == 2  # chunk 0's closed at once, the rest not asked for
    deadline = time.monotonic() + 5
    while len(w.w.open_files) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(w.w.open_files) == 0  # ... closed within about 2 x MAX_AGE


def test_kept_files_are_opened_again_after_max_age_and_closed_when_idle(tmp_path, monkeypatch):
    monkeypatch.setattr(OpenChunks, "MAX_AGE", 0.2)
    w = Worker(tmp_path / "c", shared=False)
    w.save("s")
    w.load("s")
    time.sleep(0.3)
    w.load("s")  # older than MAX_AGE: opened again (the daemon sees it in use)
    assert reused(w) == 0
    deadline = time.monotonic() + 5
    while len(w.w.open_files) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(w.w.open_files) == 0  # nothing asked for them again: closed


def test_keep_open_false_opens_every_load(tmp_path):
    w = Worker(tmp_path / "c", shared=False, keep_open=False)
    w.save("s")
    w.load("s")
    w.load("s")
    assert reused(w) == 0 and len(w.w.open_files) == 0


def test_at_most_max_open_files_are_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(OpenChunks, "MAX_OPEN", 2)
    w = Worker(tmp_path / "c", shared=False)
    w.save("s")
    w.load("s")
    assert len(w.w.open_files) == 2
    w.load("s")
    assert reused(w) == 2  # the two kept last (chunks 1 and 2), chunk 0 opened again


def test_a_load_before_the_forward_pass_reads_in_parallel_and_checks_every_layer(tmp_path):
    # layerwise_load off: the chunks spread over the I/O threads, each layer
    # checked right after its read
    w = Worker(tmp_path / "c", shared=False, layerwise_load=False, keep_open=False)
    w.save("s")
    w.load("s")  # every block as saved, no error
    path = tmp_path / "c" / "s" / w.file(1)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the last tensor's last byte
    path.write_bytes(bytes(data))
    for n in NAMES:
        w.kv[n][10:16] = 0
    ops = [w.op("q", "s", i, [10 + 2 * i, 11 + 2 * i]) for i in range(3)]
    w.w.start_load(StepPlan(loads=ops), None)
    # vLLM recomputes from the request's first bad chunk; chunk 0 is in place
    assert w.w.take_load_errors() == {12, 13}
    for n in NAMES:
        assert torch.equal(w.kv[n][10:12], w.kv[n][0:2])


def test_a_cpu_load_lowers_the_gil_switch_interval_only_while_it_runs(tmp_path, monkeypatch):
    # vLLM's CPU kernels hold the GIL; the loader beside them needs it between reads
    import sys

    import pytest

    from kvfs_connector.settings import Settings
    from kvfs_connector.worker import WorkerSide

    seen = []
    read_layer = WorkerSide.read_layer

    def spy(self, *a):
        seen.append(sys.getswitchinterval())
        return read_layer(self, *a)

    monkeypatch.setattr(WorkerSide, "read_layer", spy)
    before = sys.getswitchinterval()
    w = Worker(tmp_path / "c", shared=False)
    w.save("s")
    w.load("s")
    assert seen and max(seen) <= 0.0005 < before
    assert sys.getswitchinterval() == before  # Python's own once the load is done
    seen.clear()
    Worker(tmp_path / "c", shared=False, load_switch_interval=0).load("s")
    assert seen and set(seen) == {before}
    assert (
        Settings.from_extra_config({"load_switch_interval": "0.001"}).load_switch_interval == 0.001
    )
    with pytest.raises(ValueError, match="load_switch_interval"):
        Settings.from_extra_config({"load_switch_interval": "fast"})

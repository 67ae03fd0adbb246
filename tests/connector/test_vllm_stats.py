"""The connector's counters in vLLM's own stats path: its logged KV transfer
metrics and its Prometheus registry (what `vllm serve` exports at /metrics)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import CHUNK, PROMPTS

pytestmark = pytest.mark.vllm

HERE = Path(__file__).resolve().parent
LOADABLE = (len(PROMPTS["A"]) - 1) // 32 * 32  # every whole block short of the last token


def run_engine(tmp_path, model, mount, requests, tag) -> tuple[dict, str]:
    spec = tmp_path / f"{tag}.json"
    out = tmp_path / f"{tag}.out.json"
    spec.write_text(
        json.dumps(
            {
                "model": str(model),
                "mount": str(mount),
                "extra": {"chunk_size": CHUNK},
                "requests": requests,
            }
        )
    )
    p = subprocess.run(
        [sys.executable, str(HERE / "vllm_stats_driver.py"), str(spec), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-6000:]
    assert "Traceback" not in log, log[-6000:]
    return json.loads(out.read_text()), log


def kvfs_counters(exposition: str) -> dict[str, float]:
    """vllm:kvfs_* counters of engine 0, by field name."""
    out = {}
    for fam in text_string_to_metric_families(exposition):
        for s in fam.samples:
            m = re.fullmatch(r"vllm:kvfs_(\w+)_total", s.name)
            if m and s.labels.get("engine") == "0":
                out[m.group(1)] = s.value
    return out


def logged(log: str) -> dict[str, float]:
    """The sums of every 'KV Transfer metrics' line vLLM logged."""
    sums: dict[str, float] = {}
    for line in re.findall(r"KV Transfer metrics: (.*)", log):
        for key, val in re.findall(r"(\w+)=([-\d.e]+)", line):
            sums[key] = sums.get(key, 0) + float(val)
    return sums


def test_connector_stats_reach_vllm_metrics_and_log(kvfs_mount, tiny_models, tmp_path):
    model = tiny_models["tiny-a"]
    a = {"prompt_token_ids": PROMPTS["A"], "session": "a"}
    c = {"prompt_token_ids": PROMPTS["C"], "session": "c"}
    short = {"prompt_token_ids": PROMPTS["D"][:20]}
    stored, _ = run_engine(tmp_path, model, kvfs_mount.path, [a, c], "store")
    saved = kvfs_counters(stored["exposition"])
    # the first request's files were written before the second ran, and reported
    assert saved["saved_files"] >= 1
    assert saved["saved_bytes"] > 0
    assert saved["requests"] == 2
    assert saved["hits"] == 0

    # damage C's second chunk: its load fails, C is recomputed from there
    c_files = sorted(f for f in os.listdir(kvfs_mount.path / "c") if f.endswith(".safetensors"))
    victim = kvfs_mount.path / "c" / c_files[1]
    data = bytearray(victim.read_bytes())
    for i in range(len(data) - 64, len(data) - 32):
        data[i] ^= 0xFF
    victim.write_bytes(bytes(data))

    # a short last request (nothing to save) lets the step after C report C's saves
    report, log = run_engine(tmp_path, model, kvfs_mount.path, [a, c, short], "load")
    got = kvfs_counters(report["exposition"])
    totals = report["totals"]

    # scheduler side: two lookups found their whole prefix; C's lost the
    # tokens from its damaged chunk on
    # (the short prompt, under one block, has nothing to look up)
    assert got["requests"] == 2
    assert got["hits"] == 2
    assert got["hit_tokens"] == 2 * LOADABLE
    assert got["revoked_tokens"] == LOADABLE - CHUNK
    # worker side: exactly what the connector counted itself
    assert got["loaded_tokens"] == totals["loaded_tokens"] == LOADABLE + CHUNK
    for field in ("loads", "loaded_files", "loaded_bytes", "load_errors", "saved_files"):
        assert got[field] == totals[field], field
    assert got["load_errors"] == 1
    assert got["saved_bytes"] == totals["saved_bytes"] > 0  # C's recomputed chunks
    assert got["load_seconds"] == pytest.approx(totals["load_seconds"], rel=1e-3)
    assert got["save_dropped"] == 0  # exported even while nothing was dropped

    # vLLM's periodic log line carries the same numbers
    lines = logged(log)
    assert lines["loaded_tokens"] == totals["loaded_tokens"]
    assert lines["load_errors"] == 1
    assert lines["hits"] == 2
    # the log shows net hit tokens (the tokens that did load), the registry's
    # counter those found and then revoked_tokens, as a counter never goes down
    assert lines["hit_tokens"] == totals["loaded_tokens"]
    assert lines["revoked_tokens"] == LOADABLE - CHUNK

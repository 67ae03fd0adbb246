"""Fixtures for the connector tests: tiny models made offline, prompts, a vLLM runner.

Every vLLM engine runs in a fresh process (vllm_driver.py), like a real
deployment where one process stores and another loads.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CHUNK = 64  # tokens per chunk file in these tests: two vLLM blocks of 32


def make_prompt(seed: int, n: int = 300, prefix: list[int] | None = None) -> list[int]:
    r = random.Random(seed)
    head = list(prefix or [])
    return head + [r.randrange(3, 400) for _ in range(n - len(head))]


PROMPT_A = make_prompt(1)
PROMPT_B = make_prompt(2, prefix=PROMPT_A[: 2 * CHUNK])  # shares A's first two chunks
PROMPT_C = make_prompt(3)
PROMPT_D = make_prompt(4)
PROMPT_E = make_prompt(5)
PROMPTS = {"A": PROMPT_A, "B": PROMPT_B, "C": PROMPT_C, "D": PROMPT_D, "E": PROMPT_E}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Two different random-weight tiny Llamas (same shapes, different weights)."""
    base = tmp_path_factory.mktemp("models")
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(HERE / "tinymodel.py"), str(base / name), str(seed)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for name, seed in (("tiny-a", 0), ("tiny-b", 1))
    }
    for p in procs.values():
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err.decode()[-3000:]
    return {name: base / name for name in procs}


class VLLMRunner:
    """Runs vllm_driver.py in a fresh process and returns its JSON report."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.count = 0
        self.last_log = ""

    def __call__(self, model: Path, requests: list[dict], mount: Path | None = None, **spec):
        self.count += 1
        spec_path = self.workdir / f"spec{self.count}.json"
        out_path = self.workdir / f"out{self.count}.json"
        spec.update(model=str(model), requests=requests)
        if mount is not None:
            spec.setdefault("connector", "kvfs")
            spec["mount"] = str(mount)
            spec.setdefault("extra", {}).setdefault("chunk_size", CHUNK)
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        p = subprocess.run(
            [sys.executable, str(HERE / "vllm_driver.py"), str(spec_path), str(out_path)],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        self.last_log = p.stdout + p.stderr
        assert p.returncode == 0, self.last_log[-6000:]
        assert "Traceback" not in self.last_log, self.last_log[-6000:]
        report = json.loads(out_path.read_text())
        # Saving is best effort inside vLLM, so a broken save only shows here.
        assert not report["worker_totals"].get("save_errors"), self.last_log[-6000:]
        assert not report["worker_totals"].get("save_dropped"), self.last_log[-6000:]
        return report


@pytest.fixture
def run_vllm(tmp_path) -> VLLMRunner:
    return VLLMRunner(tmp_path)


@pytest.fixture(scope="session")
def baseline(tiny_models, tmp_path_factory) -> dict[str, list[int]]:
    """Greedy output of every prompt on tiny-a, without any connector."""
    runner = VLLMRunner(tmp_path_factory.mktemp("baseline"))
    names = list(PROMPTS)
    out = runner(tiny_models["tiny-a"], [{"prompt_token_ids": PROMPTS[n]} for n in names])
    return {n: r["token_ids"] for n, r in zip(names, out["results"], strict=True)}

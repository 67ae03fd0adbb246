"""Run one vLLM engine with its stats on (as `vllm serve` has them) over a list of
requests, and report what vLLM's own stats path made of the connector's counters.

Usage: python vllm_stats_driver.py SPEC.json RESULT.json

SPEC: {"model": path, "mount": path, "extra": {...kv_connector_extra_config...},
       "requests": [{"prompt_token_ids": [...], "session": str | null}, ...]}
RESULT: {"exposition": the text of vLLM's Prometheus registry (what its /metrics
serves), "totals": the worker connector's own counters since start}.
Each request runs on its own, after the writes of the one before are on the
mount. vLLM's own prefix cache is off, so every hit is the connector's.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# log the stats at every step, not every 10 s, so a short run logs them too
os.environ.setdefault("VLLM_LOG_STATS_INTERVAL", "0.001")


def main(spec_path: str, result_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    from prometheus_client import REGISTRY, generate_latest
    from vllm import LLM, SamplingParams
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    llm = LLM(
        model=spec["model"],
        distributed_executor_backend="uni",
        enforce_eager=True,
        block_size=32,
        max_model_len=2048,
        dtype="float32",
        enable_prefix_caching=False,
        kv_cache_memory_bytes=64 << 20,
        seed=0,
        # what `vllm serve` does by default; LLM() turns stats off unless told
        disable_log_stats=False,
        kv_transfer_config={
            "kv_connector": "KVFSConnector",
            "kv_connector_module_path": "kvfs_connector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"mount": spec["mount"], **spec.get("extra", {})},
        },
    )
    worker = get_kv_transfer_group()
    for req in spec["requests"]:
        params = {"kvfs_session": req["session"]} if req.get("session") else None
        sp = SamplingParams(
            temperature=0,
            max_tokens=4,
            ignore_eos=True,
            extra_args={"kv_transfer_params": params} if params else None,
        )
        llm.generate([{"prompt_token_ids": req["prompt_token_ids"]}], sp, use_tqdm=False)
        worker.flush()  # the next request's steps report what this one saved
    with open(result_path, "w") as f:
        json.dump({"exposition": generate_latest(REGISTRY).decode(), "totals": worker.totals()}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""Run one vLLM engine (in this process, lean) over a list of requests; report as JSON.

Usage: python vllm_driver.py SPEC.json RESULT.json

SPEC: {"model": path, "connector": null | "kvfs" | "example", "mount": path,
       "extra": {...kv_connector_extra_config...}, "engine": {...LLM kwargs...},
       "requests": [{"prompt_token_ids": [...], "session": str|null, "max_tokens": n}],
       "warmup": bool}
Each request is generated on its own, after the writes of the one before are on
the mount, so a later request can hit what an earlier one stored. vLLM's own
prefix cache is off, so every hit is the connector's.
"""

import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(spec_path: str, result_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    from vllm import LLM, SamplingParams

    kwargs = dict(
        model=spec["model"],
        distributed_executor_backend="uni",
        enforce_eager=True,
        block_size=32,
        max_model_len=2048,
        dtype="float32",
        enable_prefix_caching=False,
        kv_cache_memory_bytes=64 << 20,
        seed=0,
    )
    kwargs.update(spec.get("engine", {}))
    connector = spec.get("connector")
    if connector == "kvfs":
        kwargs["kv_transfer_config"] = {
            "kv_connector": "KVFSConnector",
            "kv_connector_module_path": "kvfs_connector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"mount": spec["mount"], **spec.get("extra", {})},
        }
    elif connector == "example":
        kwargs["kv_transfer_config"] = {
            "kv_connector": "ExampleConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"shared_storage_path": spec["mount"]},
        }
    llm = LLM(**kwargs)

    group = None
    if connector:
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        group = get_kv_transfer_group()

    def flush():
        if group is not None and hasattr(group, "flush"):
            group.flush()

    if spec.get("warmup"):
        warm = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
        llm.generate([{"prompt_token_ids": list(range(3, 40))}], warm, use_tqdm=False)

    results = []
    for req in spec["requests"]:
        extra_args = None
        if req.get("session") is not None or req.get("params"):
            params = dict(req.get("params", {}))
            if req.get("session") is not None:
                params["kvfs_session"] = req["session"]
            extra_args = {"kv_transfer_params": params}
        sp = SamplingParams(
            temperature=0,
            max_tokens=req.get("max_tokens", 8),
            ignore_eos=True,
            extra_args=extra_args,
        )
        before = group.totals() if hasattr(group, "totals") else {}
        t0 = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": req["prompt_token_ids"]}], sp, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        flush()
        after = group.totals() if hasattr(group, "totals") else {}
        o = out[0]
        results.append(
            {
                "token_ids": list(o.outputs[0].token_ids),
                "kv_transfer_params": o.kv_transfer_params,
                "seconds": elapsed,
                "worker": {k: after.get(k, 0) - before.get(k, 0) for k in after},
            }
        )
    totals = group.totals() if hasattr(group, "totals") else {}
    with open(result_path, "w") as f:
        json.dump({"results": results, "worker_totals": totals}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

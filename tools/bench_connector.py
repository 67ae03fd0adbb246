"""Benchmark the vLLM connector: time to first token of a cache hit vs recomputing vs
vLLM's ExampleConnector reading the same bytes, and the stall saving adds.

    python tools/bench_connector.py --mount /kvcache --plain-dir /dev/shm/kvbench
    python tools/bench_connector.py --self-mount /dev/shm/kvbench-store --plain-dir /dev/shm/kvbench

Every variant runs in its own fresh vLLM process (in-process engine, CPU):
  kvfs-mount     KVFSConnector on the kvfs mount
  kvfs-plain     KVFSConnector on the plain directory (the mount's overhead)
  example-plain  ExampleConnector on the plain directory (the peer)
For each prompt length a prompt is stored once, then timed `--repeats` times as
a hit and as a recompute (the same engine, the request opting out of the
cache); TTFT is the wall time of a 1-token generate, median of the repeats.
Ratios are taken within this one run. `--self-mount STORE` mounts kvfs (with a
private etcd) on a temporary directory over STORE and unmounts it at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import self_mount, self_umount

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 400


def make_model(path: Path, layers: int, hidden: int, heads: int, kv_heads: int, dtype: str):
    sys.path.insert(0, str(ROOT / "tests" / "connector"))
    import torch
    from tinymodel import make_tiny_model
    from transformers import AutoConfig, LlamaForCausalLM

    make_tiny_model(path, seed=0, num_layers=2)  # tokenizer and a config to grow
    cfg = AutoConfig.from_pretrained(path)
    cfg.update(
        dict(
            num_hidden_layers=layers,
            hidden_size=hidden,
            intermediate_size=hidden * 8 // 3 // 64 * 64,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=hidden // heads,
            max_position_embeddings=8192,
            torch_dtype=dtype,
        )
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(path, safe_serialization=True)
    n = sum(p.numel() for p in model.parameters())
    return n


# -- one variant, in its own process ---------------------------------------------------


def run_variant(spec: dict) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    from vllm import LLM, SamplingParams

    kind, path = spec["variant"], spec["path"]
    if kind.startswith("kvfs"):
        ktc = {
            "kv_connector": "KVFSConnector",
            "kv_connector_module_path": "kvfs_connector",
            "kv_role": "kv_both",
            # the plain-directory variant measures the mount's overhead: it
            # must be allowed to run off a kvfs mount
            "kv_connector_extra_config": {"mount": path, "require_kvfs": kind == "kvfs-mount"},
        }
        if spec.get("chunk_size"):
            ktc["kv_connector_extra_config"]["chunk_size"] = spec["chunk_size"]
    else:
        ktc = {
            "kv_connector": "ExampleConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"shared_storage_path": path},
        }
    llm = LLM(
        model=spec["model"],
        dtype=spec["dtype"],
        distributed_executor_backend="uni",
        enforce_eager=True,
        block_size=32,
        max_model_len=8192,
        max_num_batched_tokens=8192,
        enable_prefix_caching=False,
        kv_cache_memory_bytes=2 << 30,
        kv_transfer_config=ktc,
    )
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    conn = get_kv_transfer_group()

    def totals():
        return conn.totals() if hasattr(conn, "totals") else {}

    def ttft(ids, params=None) -> float:
        sp = SamplingParams(
            temperature=0,
            max_tokens=1,
            ignore_eos=True,
            extra_args={"kv_transfer_params": params} if params else None,
        )
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        if hasattr(conn, "flush"):
            conn.flush()
        return dt

    off = {"kvfs_load": False, "kvfs_store": False}
    r = random.Random(7)
    for _ in range(2):  # the first generates of a process carry one-time costs
        ttft([r.randrange(3, VOCAB) for _ in range(600)], off if kind.startswith("kvfs") else None)
    out = {"variant": kind, "lengths": {}}
    for n in spec["lengths"]:
        ids = [random.Random(n).randrange(3, VOCAB) for _ in range(n)]
        before = totals()
        store = ttft(ids)
        after = totals()
        hits = [ttft(ids) for _ in range(spec["repeats"])]
        loads = totals()
        row = {
            "store_s": store,
            "hit_s": statistics.median(hits),
            "save_stall_s": after.get("save_stall_seconds", 0)
            - before.get("save_stall_seconds", 0),
            "save_write_s": after.get("save_write_seconds", 0)
            - before.get("save_write_seconds", 0),
            "saved_bytes": after.get("saved_bytes", 0) - before.get("saved_bytes", 0),
            "load_s": (loads.get("load_seconds", 0) - after.get("load_seconds", 0)) / len(hits),
        }
        if kind.startswith("kvfs"):
            row["recompute_s"] = statistics.median(ttft(ids, off) for _ in range(spec["repeats"]))
            # A prompt sharing only the first half: ExampleConnector cannot use it.
            half = ids[: n // 2] + [
                random.Random(n + 1).randrange(3, VOCAB) for _ in range(n - n // 2)
            ]
            partial = [ttft(half) for _ in range(1)]
            row["partial_hit_s"] = partial[0]
            row["partial_recompute_s"] = ttft(half, off)
        out["lengths"][str(n)] = row
    return out


# -- the driver ------------------------------------------------------------------------


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mount", help="a kvfs mount to store through")
    p.add_argument("--self-mount", metavar="STORE", help="mount kvfs over STORE for the run")
    p.add_argument("--plain-dir", required=True, help="a plain directory on the store's medium")
    p.add_argument("--model", help="a model directory (default: make an 86M float32 Llama)")
    p.add_argument("--dtype", default="float32", help="vLLM's dtype (this CPU lacks native bf16)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=["kvfs-mount", "kvfs-plain", "example-plain"])
    p.add_argument("--rounds", type=int, default=1, help="run the variants this often, in turn")
    p.add_argument("--chunk-size", type=int, help="the connector's tokens per chunk file")
    p.add_argument("--json", help="write the raw results here")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        spec = json.loads(Path(args.worker[0]).read_text())
        Path(args.worker[1]).write_text(json.dumps(run_variant(spec)))
        return

    work = Path(tempfile.mkdtemp(prefix="kvbench-"))
    mounted = None
    try:
        model = args.model
        if model is None:
            model = str(work / "model")
            n = make_model(
                Path(model), layers=12, hidden=768, heads=12, kv_heads=12, dtype="float32"
            )
            print(
                f"model: {n / 1e6:.0f}M parameters, float32 (no native bf16 on this CPU), 12 layers, 12 KV heads of 64"
            )
        mount = args.mount
        if args.self_mount:
            mounted, _ = self_mount(Path(args.self_mount))
            mount = str(mounted)
        runs: dict[str, list[dict]] = {}
        for _ in range(args.rounds):  # in turn, so load from others hits all alike
            for variant in args.variants:
                if variant == "kvfs-mount":  # every round starts from an empty cache
                    if not mount:
                        continue
                    path = mount
                    for d in os.listdir(path):
                        shutil.rmtree(os.path.join(path, d))
                else:
                    path = os.path.join(args.plain_dir, variant)
                    shutil.rmtree(path, ignore_errors=True)
                    os.makedirs(path)
                spec = dict(variant=variant, path=path, model=model, dtype=args.dtype)
                spec.update(lengths=args.lengths, repeats=args.repeats, chunk_size=args.chunk_size)
                sp, op = work / f"{variant}.spec", work / f"{variant}.out"
                sp.write_text(json.dumps(spec))
                proc = subprocess.run(
                    [sys.executable, __file__, "--plain-dir", "-", "--worker", str(sp), str(op)],
                    capture_output=True,
                    text=True,
                )
                if proc.returncode != 0:
                    sys.exit(f"{variant} failed:\n{proc.stderr[-5000:]}")
                runs.setdefault(variant, []).append(json.loads(op.read_text()))
                print(f"{variant}: done", flush=True)
        # Best of the rounds: interference from other work only ever adds time.
        results = {}
        for variant, rs in runs.items():
            best = {}
            for n in rs[0]["lengths"]:
                rows = [r["lengths"][n] for r in rs]
                best[n] = {k: (min(x[k] for x in rows)) for k in rows[0]}
            results[variant] = {"variant": variant, "lengths": best, "rounds": rs}
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        report(results, args.lengths)
    finally:
        if mounted is not None:
            self_umount(mounted)
        shutil.rmtree(work, ignore_errors=True)


def report(results: dict, lengths: list[int]) -> None:
    print()
    print(
        "| prompt | recompute | kvfs hit (mount) | hit/recompute | ExampleConnector hit |"
        " kvfs/Example | kvfs hit (plain dir) | half-prefix hit/recompute |"
    )
    print("|---|---|---|---|---|---|---|---|")
    km = results.get("kvfs-mount") or results.get("kvfs-plain")
    for n in lengths:
        k = km["lengths"][str(n)]
        e = results.get("example-plain", {}).get("lengths", {}).get(str(n))
        kp = results.get("kvfs-plain", {}).get("lengths", {}).get(str(n))
        cells = [
            f"{n}",
            f"{k['recompute_s'] * 1e3:.0f} ms",
            f"{k['hit_s'] * 1e3:.0f} ms",
            f"{k['hit_s'] / k['recompute_s']:.2f}",
            f"{e['hit_s'] * 1e3:.0f} ms" if e else "-",
            f"{k['hit_s'] / e['hit_s']:.2f}" if e else "-",
            f"{kp['hit_s'] * 1e3:.0f} ms" if kp else "-",
            f"{k['partial_hit_s'] / k['partial_recompute_s']:.2f}",
        ]
        print("| " + " | ".join(cells) + " |")
    print()
    print(
        "| prompt | KV bytes | store TTFT | save stall in forward | stall/store TTFT |"
        " background write | load step per hit |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in lengths:
        k = km["lengths"][str(n)]
        cells = [
            f"{n}",
            f"{k['saved_bytes'] / 1e6:.1f} MB",
            f"{k['store_s'] * 1e3:.0f} ms",
            f"{k['save_stall_s'] * 1e3:.1f} ms",
            f"{k['save_stall_s'] / k['store_s']:.3f}",
            f"{k['save_write_s'] * 1e3:.0f} ms",
            f"{k['load_s'] * 1e3:.0f} ms",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

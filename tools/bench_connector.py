"""Benchmark the vLLM connector: time to first token of a cache hit vs recomputing vs
vLLM's ExampleConnector reading the same bytes, and the stall saving adds.

    python tools/bench_connector.py --mount /kvcache --plain-dir /dev/shm/kvbench
    python tools/bench_connector.py --self-mount /dev/shm/kvbench-store --plain-dir /dev/shm/kvbench

Every variant runs in its own vLLM process (in-process engine, CPU), all of
them side by side, each idle while another is timed:
  kvfs-mount     KVFSConnector on the kvfs mount
  kvfs-plain     KVFSConnector on the plain directory (the mount's overhead)
  example-plain  ExampleConnector on the plain directory (the peer)
For each prompt length a prompt is stored once by each, then `--repeats` hits
are timed in turn (one hit of each variant per repeat, the order rotating),
then as many recomputes (the request opting out of the cache). TTFT is the
wall time of a 1-token generate. kvfs/Example is the median over repeats of
the two hits of a repeat: on a shared guest whose speed drifts (the steal
column: CPU time the hypervisor gave elsewhere) only hits taken side by side
compare; so does the CPU a hit costs (the serving process's, all its
threads, plus the kvfs daemon's and its etcd's for the mount), which steal
does not inflate. `--self-mount STORE` mounts kvfs (with a private etcd) on a temporary
directory over STORE and unmounts it at the end.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import self_mount, self_umount, tree_cpu

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


def serve_variant(spec: dict, pipe) -> None:
    """A vLLM engine with one connector, in its own process, answering the
    driver's requests one at a time: ("ttft", ids, opt_out) -> (seconds,
    CPU seconds of the process), ("totals",) -> the connector's counters, ("quit",)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    from vllm import LLM, SamplingParams

    kind, path = spec["kind"], spec["path"]
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
        ktc["kv_connector_extra_config"].update(spec.get("kvfs_config") or {})
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
    off = {"kvfs_load": False, "kvfs_store": False} if kind.startswith("kvfs") else None

    def ttft(ids, opt_out: bool) -> float:
        params = off if opt_out else None
        sp = SamplingParams(
            temperature=0,
            max_tokens=1,
            ignore_eos=True,
            extra_args={"kv_transfer_params": params} if params else None,
        )
        t0, c0 = time.perf_counter(), time.process_time()
        llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        if hasattr(conn, "flush"):  # saves finish before the next request is timed
            conn.flush()
        return dt, cpu

    r = random.Random(7)
    for _ in range(2):  # the first generates of a process carry one-time costs
        ttft([r.randrange(3, VOCAB) for _ in range(600)], True)
    pipe.send("ready")
    while True:
        msg = pipe.recv()
        if msg[0] == "ttft":
            pipe.send(ttft(msg[1], msg[2]))
        elif msg[0] == "totals":
            pipe.send(conn.totals() if hasattr(conn, "totals") else {})
        else:
            pipe.send(None)
            return


class Variant:
    """The driver's handle on one serving process."""

    def __init__(self, ctx, spec: dict, daemon: int | None = None):
        self.name = spec["variant"]
        self.path = spec["path"]
        self.daemon = daemon  # the kvfs daemon it goes through, whose CPU counts too
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve_variant, args=(spec, child), daemon=True)
        self.proc.start()
        child.close()

    def ask(self, *msg):
        self.pipe.send(msg)
        try:
            return self.pipe.recv()
        except EOFError:
            sys.exit(f"{self.name}: its process died (exit code {self.proc.exitcode})")

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.ask("quit")
            except (OSError, SystemExit):
                pass
            self.proc.join(30)
            if self.proc.is_alive():
                self.proc.kill()


def steal_jiffies() -> int:
    """CPU time the hypervisor gave to others (all CPUs, in clock ticks)."""
    with open("/proc/stat") as f:
        return int(f.readline().split()[8])


def measure(
    variants: list[Variant], lengths: list[int], repeats: int, max_steal: float | None = None
) -> dict:
    """Every variant's hits timed in turn, one hit each per repeat (the
    order rotating), so the ratios compare hits that met the same machine.
    With `max_steal`, a repeat during which the hypervisor took more than
    that share of the CPUs is dropped and taken again (at most 5x repeats
    in all)."""
    out: dict = {v.name: {} for v in variants}
    tick = os.sysconf("SC_CLK_TCK")
    for n in lengths:
        ids = [random.Random(n).randrange(3, VOCAB) for _ in range(n)]
        half = ids[: n // 2] + [random.Random(n + 1).randrange(3, VOCAB) for _ in range(n - n // 2)]
        rows = {}
        for v in variants:
            before = v.ask("totals")
            store = v.ask("ttft", ids, False)[0]
            after = v.ask("totals")
            rows[v.name] = {
                "store_s": store,
                "save_stall_s": after.get("save_stall_seconds", 0)
                - before.get("save_stall_seconds", 0),
                "save_write_s": after.get("save_write_seconds", 0)
                - before.get("save_write_seconds", 0),
                "saved_bytes": after.get("saved_bytes", 0) - before.get("saved_bytes", 0),
                "hits": [],
                "hit_cpu": [],
                "_totals": after,
            }
        span = steal = 0.0
        kept = tries = 0
        while kept < repeats and tries < 5 * repeats:
            k, tries = tries, tries + 1
            got = {}
            t0, s0 = time.monotonic(), steal_jiffies()
            for v in variants[k % len(variants) :] + variants[: k % len(variants)]:
                d0 = tree_cpu(v.daemon) if v.daemon else 0.0
                wall, cpu = v.ask("ttft", ids, False)
                if v.daemon:
                    cpu += tree_cpu(v.daemon) - d0
                got[v.name] = (wall, cpu)
            dt, stolen = time.monotonic() - t0, (steal_jiffies() - s0) / tick
            if max_steal is not None and stolen > max_steal * dt * (os.cpu_count() or 1):
                continue
            kept += 1
            span, steal = span + dt, steal + stolen
            for name, (wall, cpu) in got.items():
                rows[name]["hits"].append(wall)
                rows[name]["hit_cpu"].append(cpu)
        if kept < repeats:
            print(f"{n} tokens: only {kept} of {repeats} repeats under the steal limit", flush=True)
        if not kept:
            sys.exit("no repeat was quiet enough: try again later or raise --max-steal")
        dropped = tries - kept
        partial_done = set()
        for v in variants:
            row = rows[v.name]
            loads = v.ask("totals")
            before = row.pop("_totals")
            row["hit_s"] = statistics.median(row["hits"])
            # every hit taken loaded, the dropped repeats' too
            row["load_s"] = (loads.get("load_seconds", 0) - before.get("load_seconds", 0)) / tries
            row["dropped"] = dropped
            row["hit_cpu_s"] = statistics.median(row["hit_cpu"])
            row["steal_share"] = steal / (span * (os.cpu_count() or 1))
            if v.name.startswith("kvfs"):
                row["recompute_s"] = statistics.median(
                    v.ask("ttft", ids, True)[0] for _ in range(repeats)
                )
                # A prompt sharing only the first half: ExampleConnector cannot
                # use it. Once per store (a second variant would find it stored).
                if v.path not in partial_done:
                    partial_done.add(v.path)
                    row["partial_hit_s"] = v.ask("ttft", half, False)[0]
                    row["partial_recompute_s"] = v.ask("ttft", half, True)[0]
            out[v.name][str(n)] = row
        for v in variants:  # each hit against the other variants' hits of its repeat
            for w in variants:
                if v is not w:
                    pairs = zip(rows[v.name]["hits"], rows[w.name]["hits"], strict=True)
                    rows[v.name][f"ratio_to_{w.name}"] = statistics.median(a / b for a, b in pairs)
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
    p.add_argument("--repeats", type=int, default=9, help="hits timed per variant and length")
    p.add_argument(
        "--variants",
        nargs="+",
        default=["kvfs-mount", "kvfs-plain", "example-plain"],
        help="KIND or KIND:JSON, the JSON more kvfs settings for that one, e.g. 'kvfs-mount:{\"keep_open\": false}'",
    )
    p.add_argument("--chunk-size", type=int, help="the connector's tokens per chunk file")
    p.add_argument(
        "--max-steal",
        type=float,
        metavar="SHARE",
        help="drop and retake a repeat during which the hypervisor took more than SHARE of the CPUs (e.g. 0.05)",
    )
    p.add_argument(
        "--kvfs-config",
        type=json.loads,
        metavar="JSON",
        help="more of the kvfs connector's settings, e.g. '{\"layerwise_load\": false}'",
    )
    p.add_argument("--json", help="write the raw results here")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="kvbench-"))
    mounted = None
    running: list[Variant] = []
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
        ctx = multiprocessing.get_context("spawn")  # vLLM and torch do not survive a fork
        cleared = set()
        for i, variant in enumerate(args.variants):
            kind, _, own = variant.partition(":")
            if kind == "kvfs-mount":  # every run starts from an empty cache
                if not mount:
                    continue
                path = mount
            else:
                path = os.path.join(args.plain_dir, f"{kind}-{i}")
            if path not in cleared:
                os.makedirs(path, exist_ok=True)
                for d in os.listdir(path):
                    shutil.rmtree(os.path.join(path, d))
                cleared.add(path)
            config = {**(args.kvfs_config or {}), **(json.loads(own) if own else {})}
            spec = dict(variant=variant, kind=kind, path=path, model=model, dtype=args.dtype)
            spec.update(chunk_size=args.chunk_size, kvfs_config=config)
            daemon = None
            if kind == "kvfs-mount":
                daemon = json.loads(os.getxattr(mount, "user.kvfs.status"))["pid"]
            running.append(Variant(ctx, spec, daemon))
        for v in running:  # started side by side, each idle while another is timed
            try:
                ready = v.pipe.poll(600) and v.pipe.recv() == "ready"
            except EOFError:
                ready = False
            if not ready:
                sys.exit(f"{v.name}: did not start (exit code {v.proc.exitcode})")
            print(f"{v.name}: ready", flush=True)
        results = measure(running, args.lengths, args.repeats, args.max_steal)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        report(results, args.lengths)
    finally:
        for v in running:
            v.stop()
        if mounted is not None:
            self_umount(mounted)
        shutil.rmtree(work, ignore_errors=True)


def table(columns: list[str], rows: list[list[str]]) -> None:
    print()
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def report(results: dict, lengths: list[int]) -> None:
    kvfs = [v for v in results if v.startswith("kvfs")]
    example = next((v for v in results if v.startswith("example")), None)

    def hit_row(name: str, n: int) -> list[str]:
        k = results[name][str(n)]
        e = results[example][str(n)] if example else None
        partial = "partial_hit_s" in k  # once per store (see measure)
        return [
            name,
            f"{n}",
            f"{k['recompute_s'] * 1e3:.0f} ms",
            f"{k['hit_s'] * 1e3:.0f} ms",
            f"{k['hit_s'] / k['recompute_s']:.2f}",
            f"{e['hit_s'] * 1e3:.0f} ms" if e else "-",
            f"{k[f'ratio_to_{example}']:.2f}" if e else "-",
            f"{k['partial_hit_s'] / k['partial_recompute_s']:.2f}" if partial else "-",
            f"{k['steal_share']:.0%}"
            + (f" ({k['dropped']} repeats dropped)" if k["dropped"] else ""),
        ]

    def save_row(name: str, n: int) -> list[str]:
        k = results[name][str(n)]
        return [
            name,
            f"{n}",
            f"{k['saved_bytes'] / 1e6:.1f} MB",
            f"{k['store_s'] * 1e3:.0f} ms",
            f"{k['save_stall_s'] * 1e3:.1f} ms",
            f"{k['save_stall_s'] / k['store_s']:.3f}",
            f"{k['save_write_s'] * 1e3:.0f} ms",
            f"{k['load_s'] * 1e3:.0f} ms",
        ]

    table(
        ["variant", "prompt", "recompute", "kvfs hit", "hit/recompute", "ExampleConnector hit"]
        + ["kvfs/Example (median of pairs)", "half-prefix hit/recompute", "steal"],
        [hit_row(name, n) for name in kvfs for n in lengths],
    )
    table(
        ["variant", "prompt", "KV bytes", "store TTFT", "save stall in forward"]
        + ["stall/store TTFT", "background write", "load step per hit"],
        [save_row(name, n) for name in kvfs for n in lengths],
    )
    table(
        ["prompt", *(f"CPU per hit: {v}" for v in results)],
        [[f"{n}", *(f"{r[str(n)]['hit_cpu_s'] * 1e3:.0f} ms" for r in results.values())]
         for n in lengths],
    )  # fmt: skip
    for n in lengths:
        hits = {v: [round(h * 1e3) for h in r[str(n)]["hits"]] for v, r in results.items()}
        print(f"hits at {n} tokens (ms, in the order taken): {hits}")


if __name__ == "__main__":
    main()

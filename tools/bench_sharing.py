"""Benchmark sessions sharing a system prompt: bytes stored, hit tokens and time to
first token, kvfs's connector against vLLM's ExampleConnector.

    python tools/bench_sharing.py --self-mount /var/tmp/kvshare-store --plain-dir /var/tmp/kvshare

Twenty sessions (`--sessions`) share one system prompt (`--system` tokens); each
adds its own turn (`--turn` tokens). The twenty prompts are sent one after the
other, then replayed a second time in the same order. Every variant runs in
its own fresh vLLM process (in-process engine, CPU, vLLM's own prefix cache
off, so every hit is the connector's):

  none     no connector: every prompt computed (the reference)
  kvfs     KVFSConnector on the kvfs mount, request i naming session chat-i
  example  ExampleConnector on the plain directory (it stores each prompt
           whole, under a hash of all its tokens, and hits only on a repeat
           of all of them)

TTFT is the wall time of a 1-token generate; with `--rounds N` the variants
run N times in turn (kvfs on a freshly mounted, empty store each time) and
each replay's round with the lowest median is shown. Engines run with one
CPU thread (`--threads`): on a shared machine a team of two threads waits
whenever either is descheduled, which made medians swing 6x between runs. Bytes stored: for kvfs the
store's data objects (`*.kvd`, one per file, however many names it has) and
what `du` gives per session; for ExampleConnector `du` of its directory.
`--model` takes any model directory; by default the tests' tiny Llama
(tests/connector/tinymodel.py: 2 layers, 2 KV heads of 32, float32) is made.
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
VOCAB = 400  # the tiny model's vocabulary


def prompts(sessions: int, system: int, turn: int) -> list[list[int]]:
    r = random.Random(0)
    shared = [r.randrange(3, VOCAB) for _ in range(system)]
    return [shared + [r.randrange(3, VOCAB) for _ in range(turn)] for _ in range(sessions)]


def du_bytes(path: str) -> int:
    out = subprocess.run(["du", "-sb", path], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


# -- one variant, in its own process ---------------------------------------------------


def run_variant(spec: dict) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    kind, path = spec["variant"], spec["path"]
    ktc = None
    if kind == "kvfs":
        ktc = {
            "kv_connector": "KVFSConnector",
            "kv_connector_module_path": "kvfs_connector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"mount": path},
        }
    elif kind == "example":
        ktc = {
            "kv_connector": "ExampleConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"shared_storage_path": path},
        }
    llm = LLM(
        model=spec["model"],
        dtype="float32",
        distributed_executor_backend="uni",
        enforce_eager=True,
        block_size=32,
        max_model_len=2048,
        enable_prefix_caching=False,
        kv_cache_memory_bytes=256 << 20,
        seed=0,
        kv_transfer_config=ktc,
    )
    conn = None
    if ktc is not None:
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        conn = get_kv_transfer_group()

    def generate(ids, params=None):
        sp = SamplingParams(
            temperature=0,
            max_tokens=1,
            ignore_eos=True,
            extra_args={"kv_transfer_params": params} if params else None,
        )
        t0 = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        if hasattr(conn, "flush"):
            conn.flush()  # the writes of this request are on the mount before the next
        return dt, out[0]

    r = random.Random(7)
    off = {"kvfs_load": False, "kvfs_store": False} if kind == "kvfs" else None
    for _ in range(2):  # the first generates of a process carry one-time costs
        generate([r.randrange(3, VOCAB) for _ in range(600)], off)
    # ExampleConnector stored the warm-up prompts too: not part of the count
    warm_bytes = du_bytes(path) if kind == "example" else 0
    warm_folders = len(os.listdir(path)) if kind == "example" else 0
    block = 32
    rows = []
    for replay in (1, 2):
        for i, ids in enumerate(spec["prompts"]):
            params = {"kvfs_session": f"chat-{i}"} if kind == "kvfs" else None
            before = len(os.listdir(path)) if kind == "example" else 0
            dt, out = generate(ids, params)
            if kind == "kvfs":
                hit = out.kv_transfer_params["kvfs_hit_tokens"]
            elif kind == "example":
                # a hit creates no folder; it covers the whole blocks before the
                # prompt's second-to-last token (ExampleConnector's own rule)
                hit = 0 if len(os.listdir(path)) > before else (len(ids) - 2) // block * block
            else:
                hit = 0
            rows.append({"replay": replay, "session": i, "ttft_s": dt, "hit_tokens": hit})
    res = {"variant": kind, "requests": rows}
    res.update(warm_bytes=warm_bytes, warm_folders=warm_folders)
    if conn is not None and hasattr(conn, "totals"):
        res["totals"] = conn.totals()
    return res


# -- the driver ------------------------------------------------------------------------


def kvd_bytes(store: Path) -> tuple[int, int]:
    """(objects, bytes) of the store's data objects: one per file, whatever its names."""
    sizes = [p.stat().st_size for p in store.rglob("*.kvd")]
    return len(sizes), sum(sizes)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--self-mount", metavar="STORE", help="mount kvfs over STORE (emptied) for each round"
    )
    p.add_argument("--mount", help="an empty kvfs mount to use instead (one round), with --store")
    p.add_argument("--store", help="the store directory of --mount (to count its objects)")
    p.add_argument("--plain-dir", required=True, help="a plain directory for ExampleConnector")
    p.add_argument("--model", help="a model directory (default: the tests' tiny Llama)")
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--system", type=int, default=1000, help="tokens of the shared system prompt")
    p.add_argument("--turn", type=int, default=256, help="tokens of each session's own turn")
    p.add_argument("--variants", nargs="+", default=["none", "kvfs", "example"])
    p.add_argument("--rounds", type=int, default=1, help="run the variants this often, in turn")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads per engine (OMP_NUM_THREADS); 1 keeps a team of threads from "
        "waiting on one another when other work shares the cores",
    )
    p.add_argument("--json", help="write the raw results here")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        spec = json.loads(Path(args.worker[0]).read_text())
        Path(args.worker[1]).write_text(json.dumps(run_variant(spec)))
        return
    if args.mount and args.rounds != 1:
        sys.exit("--mount allows one round (each round needs an empty cache): use --self-mount")

    work = Path(tempfile.mkdtemp(prefix="kvshare-"))
    t_start = time.perf_counter()
    try:
        model = args.model
        if model is None:
            sys.path.insert(0, str(ROOT / "tests" / "connector"))
            from tinymodel import make_tiny_model

            model = str(make_tiny_model(work / "tiny", seed=0))
        spec_prompts = prompts(args.sessions, args.system, args.turn)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        runs: dict[str, list[dict]] = {}
        sizes = {}
        for _ in range(args.rounds):  # in turn: other work on the machine slows all alike
            for variant in args.variants:
                mounted = None
                if variant == "kvfs":
                    mount, store = args.mount, Path(args.store) if args.store else None
                    if args.self_mount:  # a fresh, empty cache every round
                        store = Path(args.self_mount)
                        shutil.rmtree(store, ignore_errors=True)
                        mounted, _ = self_mount(store, work)
                        mount = str(mounted)
                    if not mount:
                        sys.exit("kvfs needs --self-mount STORE or --mount with --store")
                    path = mount
                else:
                    path = os.path.join(args.plain_dir, variant)
                    shutil.rmtree(path, ignore_errors=True)
                    os.makedirs(path)
                try:
                    spec = dict(variant=variant, path=path, model=model, prompts=spec_prompts)
                    sp, op = work / f"{variant}.spec", work / f"{variant}.out"
                    sp.write_text(json.dumps(spec))
                    proc = subprocess.run(
                        [
                            sys.executable,
                            __file__,
                            "--plain-dir",
                            "-",
                            "--worker",
                            str(sp),
                            str(op),
                        ],
                        capture_output=True,
                        text=True,
                        env=env,
                    )
                    if proc.returncode != 0:
                        sys.exit(f"{variant} failed:\n{proc.stderr[-5000:]}")
                    res = json.loads(op.read_text())
                    runs.setdefault(variant, []).append(res)
                    if variant == "kvfs":
                        objects, stored = kvd_bytes(store) if store else (0, 0)
                        per_session = [
                            du_bytes(os.path.join(mount, f"chat-{i}")) for i in range(args.sessions)
                        ]
                        sizes[variant] = dict(
                            objects=objects,
                            stored=stored,
                            du_root=du_bytes(mount),
                            sessions=per_session,
                        )
                    elif variant == "example":
                        sizes[variant] = dict(
                            stored=du_bytes(path) - res["warm_bytes"],
                            folders=len(os.listdir(path)) - res["warm_folders"],
                        )
                finally:
                    if mounted is not None:
                        self_umount(mounted)
                print(f"{variant}: done", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"runs": runs, "sizes": sizes}, indent=1))
        report(runs, sizes, args)
        print(f"\nwall time {time.perf_counter() - t_start:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(runs: dict, sizes: dict, args) -> None:
    """Per variant and replay: hit tokens, and TTFT's median and mean in the
    round with the lowest median (other work only ever adds time)."""
    total = args.sessions * (args.system + args.turn)
    print(
        f"\n{args.sessions} sessions x ({args.system} shared + {args.turn} own) tokens"
        f" = {total} prompt tokens a replay; best of {args.rounds} round(s)"
    )
    print()
    print("| variant | replay | hit tokens | of prompt tokens | TTFT median | TTFT mean |")
    print("|---|---|---|---|---|---|")
    for variant, rs in runs.items():
        for replay in (1, 2):
            best = None
            for res in rs:
                rows = [r for r in res["requests"] if r["replay"] == replay]
                t = [r["ttft_s"] for r in rows]
                cand = (
                    statistics.median(t),
                    statistics.mean(t),
                    sum(r["hit_tokens"] for r in rows),
                )
                best = cand if best is None or cand[0] < best[0] else best
            med, mean, hit = best
            cells = [
                variant,
                str(replay),
                str(hit),
                f"{hit / total:.0%}",
                f"{med * 1e3:.1f} ms",
                f"{mean * 1e3:.1f} ms",
            ]
            print("| " + " | ".join(cells) + " |")
    print()
    if "kvfs" in sizes:
        s = sizes["kvfs"]
        print(
            f"kvfs: {s['objects']} objects, {s['stored'] / 1e6:.2f} MB in the store;"
            f" du of the mount {s['du_root'] / 1e6:.2f} MB;"
            f" du of one session {statistics.median(s['sessions']) / 1e6:.2f} MB (median),"
            f" sum over sessions {sum(s['sessions']) / 1e6:.2f} MB"
        )
    if "example" in sizes:
        s = sizes["example"]
        print(f"ExampleConnector: {s['folders']} prompts, {s['stored'] / 1e6:.2f} MB (du)")
    if "kvfs" in sizes and "example" in sizes and sizes["kvfs"]["stored"]:
        ratio = sizes["example"]["stored"] / sizes["kvfs"]["stored"]
        print(f"ExampleConnector stores {ratio:.1f}x the bytes")


if __name__ == "__main__":
    main()

"""Use the kvfs cache from a Hugging Face `generate` loop, through the engine-neutral API.

    python examples/hf_generate.py --model MODEL_DIR --mount /kvcache [--session NAME]

Generates greedily for one prompt three times: without the cache, with the
cache when it is cold (computes everything and stores the prompt's chunks),
and with the cache when it is warm (loads the cached prefix and computes only
the rest). Prints the three outputs and the cached token count as JSON; the
three outputs are the same tokens.
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from kvfs_connector import (
    RetrieveStatus,
    StoreStatus,
    init_engine,
    retrieve_kv,
    should_retrieve,
    should_store,
    store_kv,
)

PROMPT = (
    "Attention keys and values are cached so a prefix is computed once. "
    "Every session holds chunks of the key value cache as safetensors files. "
    "Operators inspect the cache with ls, du, getfattr, touch and rm. "
) * 4


def layer_tensors(cache: DynamicCache, num_tokens: int) -> list[torch.Tensor]:
    """One tensor per layer, [2 (key, value), kv_heads, tokens, head_dim], batch 0."""
    return [
        torch.stack([layer.keys[0, :, :num_tokens], layer.values[0, :, :num_tokens]])
        for layer in cache.layers
    ]


def cache_from(kv: list[torch.Tensor], config) -> DynamicCache:
    cache = DynamicCache(config=config)
    for i, t in enumerate(kv):
        cache.update(t[0].unsqueeze(0).contiguous(), t[1].unsqueeze(0).contiguous(), i)
    return cache


def generate(model, ids: list[int], max_new_tokens: int, use_cache_files: bool, session=None):
    """Greedy generation; with `use_cache_files`, load the longest cached
    prefix first and store the prompt's chunks afterwards."""
    past, hit = None, 0
    if use_cache_files and should_retrieve(ids[:-1], session) is RetrieveStatus.HIT:
        # Keep at least the last prompt token to compute: it yields the first logits.
        r = retrieve_kv(ids[:-1], session=session)
        if r.status is RetrieveStatus.HIT:
            past, hit = cache_from(r.kv_caches, model.config), r.num_tokens
    out = model.generate(
        torch.tensor([ids]),
        past_key_values=past,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        return_dict_in_generate=True,
        pad_token_id=model.config.eos_token_id,
    )
    new_tokens = out.sequences[0, len(ids) :].tolist()
    if use_cache_files and should_store(ids, session) is StoreStatus.STORED:
        store_kv(ids, layer_tensors(out.past_key_values, len(ids)), session=session)
    return new_tokens, hit


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--mount", default="/kvcache")
    p.add_argument("--session", default=None)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=12)
    args = p.parse_args(argv)

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    init_engine(
        mount=args.mount,
        model_id=f"hf:{args.model}",
        dtype=str(model.dtype).removeprefix("torch."),
        num_layers=model.config.num_hidden_layers,
        layout="hf:[key|value,kv_heads,tokens,head_dim]",
        token_dim=2,
        chunk_size=args.chunk_size,
    )
    ids = tok(PROMPT)["input_ids"]
    with torch.no_grad():
        plain, _ = generate(model, ids, args.max_new_tokens, False)
        cold, cold_hit = generate(model, ids, args.max_new_tokens, True, args.session)
        warm, warm_hit = generate(model, ids, args.max_new_tokens, True, args.session)
    result = {
        "prompt_tokens": len(ids),
        "no_cache": plain,
        "cold": cold,
        "warm": warm,
        "cold_hit_tokens": cold_hit,
        "warm_hit_tokens": warm_hit,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

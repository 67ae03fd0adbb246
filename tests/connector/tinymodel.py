"""Make a tiny random-weight Llama model and its tokenizer offline, in seconds."""

import sys
from pathlib import Path

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A file system presents bytes as named files in directories.",
    "Attention keys and values are cached so a prefix is computed once.",
    "Every session holds chunks of the key value cache as safetensors files.",
    "Operators inspect the cache with ls, du, getfattr, touch and rm.",
    "Greedy decoding picks the most likely token at every step.",
    "Numbers like 12345 and 67890 and words like alpha beta gamma delta.",
]


def make_tiny_model(path: Path, seed: int = 0, num_layers: int = 2) -> Path:
    """Write a Llama model (hidden 128, 4 heads of 32, 2 KV heads) to `path`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(SENTENCES * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(path)

    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        # Larger weights give peaked logits, so greedy output is stable under
        # float rounding differences between batch shapes.
        initializer_range=0.2,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    return path


if __name__ == "__main__":
    make_tiny_model(Path(sys.argv[1]), seed=int(sys.argv[2]) if len(sys.argv) > 2 else 0)

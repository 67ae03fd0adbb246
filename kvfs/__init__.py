"""kvfs: the attention KV cache of LLM inference, mounted as plain files."""

__version__ = "0.1.0"

"""Tiny randomly initialised causal LMs for fast tests that need no download."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["tiny_model"]


def tiny_model(
    arch: str = "llama",
    *,
    vocab_size: int = 101,
    num_layers: int = 2,
    sliding_window: int = 8,
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> nn.Module:
    """A small random transformers causal LM in eval mode, float32, on CPU.

    Parameters
    ----------
    arch : str
        ``"llama"`` (full attention, grouped-query heads) or ``"gemma3"`` (alternating
        sliding-window and full layers, window ``sliding_window``) so that window handling
        is tested at short lengths.
    vocab_size, num_layers : int
        Sizes; the hidden size is 32 with 4 query and 2 key/value heads of size 8.
    attn_implementation : str
        ``"sdpa"`` or ``"eager"``.
    seed : int
        Seed of the weight initialisation (the global RNG is saved and restored).

    Example
    -------
    >>> model = tiny_model("gemma3", sliding_window=4)
    >>> model(torch.tensor([[1, 2, 3]])).logits.shape
    torch.Size([1, 3, 101])
    """
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        # larger than the usual 0.02 so that logits are peaked and argmax comparisons mean something
        initializer_range=0.2,
    )
    config: LlamaConfig | Gemma3TextConfig
    if arch == "llama":
        config = LlamaConfig(**common)
    elif arch == "gemma3":
        if sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
        config = Gemma3TextConfig(
            **common, sliding_window=sliding_window, layer_types=types, query_pre_attn_scalar=8
        )
    else:
        raise ValueError(f"arch must be 'llama' or 'gemma3', got {arch!r}")
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: nn.Module = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            config, dtype=torch.float32
        )
    model.eval()
    return model

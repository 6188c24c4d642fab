"""fuse_layers: the fused decoder layers compute what transformers' own layers compute.

The oracle is the unfused transformers model with the same weights, on every path the
engine and transformers use: batched prefill of prompts of different lengths, tree
forwards with additive masks (and Gemma-3's sliding-window masks past the window),
decode steps without a mask, and transformers' own ``generate``.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from adaspec.models import commit, make_draft, prefill, tiny_model, tree_forward
from adaspec.models.fast import FastLinear, Int4Linear, Int8Linear, optimize_for_cpu
from adaspec.models.fused import FusedDecoderLayer, fuse_layers
from adaspec.tree import TokenTree

ARCHS = [("llama", "sdpa"), ("llama", "eager"), ("gemma3", "sdpa"), ("gemma3", "eager")]


def pair(arch: str, attn: str) -> tuple[Any, Any]:
    model: Any = tiny_model(arch, num_layers=4, sliding_window=4, attn_implementation=attn, seed=3)
    with torch.no_grad():  # Gemma's norms start at zero (a scale of 1): make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    fused = copy.deepcopy(model)
    assert fuse_layers(fused) == 4
    assert all(isinstance(layer, FusedDecoderLayer) for layer in fused.model.layers)
    return model, fused


@pytest.mark.parametrize(("arch", "attn"), ARCHS)
def test_fused_layers_equal_transformers_layers(arch: str, attn: str) -> None:
    model, fused = pair(arch, attn)
    prompts = [[5, 9, 14, 3, 7, 8, 9, 11, 4], [42, 7], [1, 2, 3, 4, 5]]  # past the window
    s_ref, ref = prefill(model, prompts)
    s_got, got = prefill(fused, prompts)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for step in range(3):  # trees with masks, then one-token decode steps without one
        n = 4 if step < 2 else 1
        one = TokenTree([7, 3, 9, 4][:n], [-1, 0, 0, 1][:n], [0.0, -1.0, -1.5, -2.0][:n])
        tree = TokenTree.stack([one] * 3)
        ref = tree_forward(model, tree, s_ref)
        got = tree_forward(fused, tree, s_got)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        for state in (s_ref, s_got):  # keep the root and the first child
            commit(state, torch.full((3, 1), 1 if n > 1 else -1, dtype=torch.int64))
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
        have = fused.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert have.tolist() == want.tolist()


def test_fused_drafts_quantize_the_merged_projections() -> None:
    target = tiny_model(seed=1)
    draft = make_draft(target, "int4w")
    layers = [m for m in draft.modules() if isinstance(m, FusedDecoderLayer)]
    assert len(layers) == 2
    assert not any(hasattr(layer, "q_proj") for layer in layers)
    # one quantized layer each for q/k/v (4 heads + 2 x 2 key/value heads of 8) and gate/up
    for layer in layers:
        assert isinstance(layer.qkv_proj, (Int4Linear, Int8Linear))
        assert isinstance(layer.gate_up_proj, (Int4Linear, Int8Linear))
        assert (layer.qkv_proj.out_features, layer.gate_up_proj.out_features) == (64, 128)
    plain = make_draft(target, "int4w", fuse=False)
    assert not any(isinstance(m, FusedDecoderLayer) for m in plain.modules())
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(draft(ids).logits, plain(ids).logits, rtol=0.02, atol=0.05)


def test_unsupported_layers_are_left_alone() -> None:
    model = optimize_for_cpu(tiny_model(seed=0))  # FastLinear projections: not merged
    assert fuse_layers(model) == 0
    assert any(isinstance(m, FastLinear) for m in model.modules())
    assert fuse_layers(nn.Sequential(nn.ModuleList([nn.Linear(2, 2)]))) == 0
    with pytest.raises(TypeError, match="model"):
        fuse_layers("model")  # type: ignore[arg-type]
    layer: Any = next(
        m for m in pair("llama", "sdpa")[1].modules() if isinstance(m, FusedDecoderLayer)
    )
    with pytest.raises(ValueError, match="position_embeddings"):
        layer(torch.randn(1, 1, 32))


def other_model(kind: str) -> Any:
    """Tiny transformers models whose layers share llama's names (or part of them) but
    compute something else, and one with flex attention."""
    import transformers as tf

    common: dict[str, Any] = dict(
        vocab_size=101,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        pad_token_id=0,
        initializer_range=0.2,
    )
    configs = {
        "qwen3": lambda: tf.Qwen3Config(**common),  # q/k norms
        "granite": lambda: tf.GraniteConfig(**common, residual_multiplier=0.5),
        "olmo2": lambda: tf.Olmo2Config(**common),  # norms after attention and MLP
        "smollm3": lambda: tf.SmolLM3Config(  # layer 0 without rotary, layer 1 with
            **common, no_rope_layers=[0, 1], no_rope_layer_interval=2
        ),
        "flex": lambda: tf.LlamaConfig(**common),
    }
    config = configs[kind]()
    config._attn_implementation = "flex_attention" if kind == "flex" else "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize(
    ("kind", "fusable"), [("qwen3", 0), ("granite", 0), ("olmo2", 0), ("smollm3", 1), ("flex", 0)]
)
def test_layers_that_compute_something_else_are_left_alone(kind: str, fusable: int) -> None:
    model = other_model(kind)
    fused = copy.deepcopy(model)
    assert fuse_layers(fused) == fusable
    if kind == "flex":
        return  # (flex attention's own forward is not run on CPU here)
    ids = torch.tensor([[5, 9, 14, 3, 7, 8, 9, 11]])
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)

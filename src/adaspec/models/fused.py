"""Decoder layers with merged projections and fewer tensor ops, for drafts on CPU.

A draft decodes one or a few tokens per forward, where a transformers decoder layer costs
more in per-op overhead than in arithmetic: SmolLM2's int4 draft spends ~5 ms of a ~20 ms
step in its matrix products and most of the rest in the ~90 small ops per layer (three
separate q/k/v products with their casts, the norms written out as six ops each, the
rotary embedding applied to q and k apart). :func:`fuse_layers` replaces each supported
decoder layer by a :class:`FusedDecoderLayer` computing the same function with about half
the ops:

- q, k and v in one product (``qkv_proj``), gate and up in one (``gate_up_proj``), so a
  quantized draft runs 4 weight-only kernels per layer instead of 7;
- every RMSNorm as one ``F.rms_norm`` (Gemma's ``1 + w`` scale folded into the weight);
- the rotary embedding applied to q and k at once.

The model keeps transformers' outer loop (embeddings, masks, rotary tables, cache,
output layer), so the adapter (:func:`~adaspec.models.tree_forward`) and transformers'
own ``generate`` (an assisted generation's ``assistant_model``) run it unchanged. Its
``state_dict`` has the merged projections' keys instead of the separate ones.

Supported: llama-style layers (``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``,
two RMSNorms: Llama, SmolLM2, Mistral, Qwen2) and Gemma-3 layers (q/k norms, four RMSNorms,
no attention logit soft-capping), in models with sdpa or eager attention. Each candidate
layer is run against its fused version on a probe before it is replaced: a layer that
shares these names but computes something else (Qwen3's q/k norms, SmolLM3's layers
without rotary, Granite's residual multiplier, ...) is left as it is, as is anything
else.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FusedDecoderLayer", "fuse_layers"]


def _norm_weight(norm: nn.Module, size: int) -> tuple[Tensor, float] | None:
    """(weight, eps) with which ``F.rms_norm`` computes ``norm``, or None if it cannot.

    transformers' RMSNorms scale by ``w`` (Llama) or by ``1 + w`` (Gemma); which one a
    module uses is read off its output on a probe, not off its class name.
    """
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(weight, Tensor) or weight.shape != (size,) or not isinstance(eps, float):
        return None
    gen = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn(3, size, generator=gen).to(weight.device, torch.float32)
    with torch.no_grad():
        want = norm(probe).float()
        for w in (weight.detach().float(), 1 + weight.detach().float()):
            if torch.allclose(F.rms_norm(probe, (size,), w, eps), want, rtol=1e-5, atol=1e-6):
                return w.to(weight.dtype), eps
    return None


def _merged(*modules: nn.Module) -> nn.Linear | None:
    """One ``nn.Linear`` whose output rows are those of ``modules`` in turn, or None."""
    linears = [m for m in modules if type(m) is nn.Linear]
    if len(linears) != len(modules) or len({m.in_features for m in linears}) != 1:
        return None
    biases = [m.bias for m in linears]
    if any(b is None for b in biases) and any(b is not None for b in biases):
        return None
    with torch.no_grad():
        weight = torch.cat([m.weight.detach() for m in linears])
        merged = nn.Linear(
            linears[0].in_features,
            weight.shape[0],
            bias=biases[0] is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        merged.weight.copy_(weight)
        if merged.bias is not None:
            merged.bias.copy_(torch.cat([b.detach() for b in biases if b is not None]))
    return merged.requires_grad_(False)


class FusedDecoderLayer(nn.Module):
    """A llama- or Gemma-3-style decoder layer with merged projections (see the module).

    Built by :func:`fuse_layers` from a transformers decoder layer; ``forward`` takes the
    keyword arguments transformers' decoder loop passes (``attention_mask``: None, a
    boolean or an additive float mask of shape (B, 1, Q, S); ``position_embeddings``: the
    (cos, sin) tables of shape (B, Q, D); ``past_key_values``: the cache) and returns the
    (B, Q, hidden) hidden states.
    """

    def __init__(
        self,
        layer: nn.Module,
        qkv: nn.Linear,
        gate_up: nn.Linear,
        norms: list[Tensor],
        eps: float,
    ) -> None:
        super().__init__()
        attn: Any = layer.self_attn
        mlp: Any = layer.mlp
        self.layer_idx = int(attn.layer_idx)
        self.heads = int(attn.q_proj.out_features) // int(attn.head_dim)
        self.kv_heads = int(attn.k_proj.out_features) // int(attn.head_dim)
        self.head_dim = int(attn.head_dim)
        self.intermediate = int(mlp.gate_proj.out_features)
        self.scaling = float(attn.scaling)
        self.eps = eps
        self.qkv_proj = qkv
        self.o_proj = attn.o_proj
        self.gate_up_proj = gate_up
        self.down_proj = mlp.down_proj
        self.act_fn = mlp.act_fn
        # llama: input, post-attention; Gemma-3 also pre-/post-feedforward, then the q and
        # k norms stacked per head ([H + KV, 1, D], applied to q and k at once)
        self.gemma = len(norms) == 6
        for i, w in enumerate(norms[:4]):
            self.register_buffer(f"norm{i}", w)
        self.qk_norm: Tensor | None
        qk_norm = None
        if self.gemma:
            per_head = [norms[4]] * self.heads + [norms[5]] * self.kv_heads
            qk_norm = torch.stack(per_head).unsqueeze(1)
        self.register_buffer("qk_norm", qk_norm)

    def _norm(self, x: Tensor, i: int) -> Tensor:
        weight: Tensor = getattr(self, f"norm{i}")
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> Tensor:
        if position_embeddings is None:
            raise ValueError("position_embeddings (cos, sin) must be given")
        B, Q, _ = hidden_states.shape
        H, KV, D = self.heads, self.kv_heads, self.head_dim
        x = self._norm(hidden_states, 0)
        qkv = self.qkv_proj(x).view(B, Q, H + 2 * KV, D).transpose(1, 2)  # [B, H + 2KV, Q, D]
        qk, v = qkv[:, : H + KV], qkv[:, H + KV :]
        if self.qk_norm is not None:
            qk = F.rms_norm(qk, (D,), None, self.eps) * self.qk_norm
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)  # [B, 1, Q, D]
        rotated = torch.cat([-qk[..., D // 2 :], qk[..., : D // 2]], -1)
        qk = qk * cos + rotated * sin
        q, k = qk[:, :H], qk[:, H:]
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        # grouped heads read their shared keys in place (transformers repeats them when a
        # mask is given: 3x the attention time of a decode step here)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attention_mask,
            is_causal=attention_mask is None and Q > 1,
            scale=self.scaling,
            enable_gqa=H != KV,
        )  # [B, H, Q, D]
        out = self.o_proj(out.transpose(1, 2).reshape(B, Q, H * D))
        if self.gemma:
            out = self._norm(out, 1)
            hidden_states = hidden_states + out
            x = self._norm(hidden_states, 2)
        else:
            hidden_states = hidden_states + out
            x = self._norm(hidden_states, 1)
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        out = self.down_proj(self.act_fn(gate) * up)
        if self.gemma:
            out = self._norm(out, 3)
        return hidden_states + out


def _fused(module: nn.Module) -> FusedDecoderLayer | None:
    """The fused version of a transformers decoder layer, or None where unsupported.

    The attribute names only propose a candidate; it is kept only if it computes what the
    layer computes on a probe (many transformers layers share llama's names but add what
    the fused layer does not do: Qwen3's q/k norms, SmolLM3's layers without rotary,
    Granite's residual multiplier, ...).
    """
    layer: Any = module
    attn: Any = getattr(layer, "self_attn", None)
    mlp: Any = getattr(layer, "mlp", None)
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "layer_idx")
    if attn is None or mlp is None or not all(hasattr(attn, n) for n in names):
        return None
    if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return None
    if getattr(attn, "attn_logit_softcapping", None) is not None:
        return None
    if type(attn.o_proj) is not nn.Linear or type(mlp.down_proj) is not nn.Linear:
        return None
    gemma = all(
        hasattr(layer, n) for n in ("pre_feedforward_layernorm", "post_feedforward_layernorm")
    )
    hidden = int(attn.q_proj.in_features)
    D = int(attn.head_dim)
    norm_names = ["input_layernorm", "post_attention_layernorm"]
    if gemma:
        norm_names += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    found_modules = [getattr(layer, n, None) for n in norm_names]
    sizes = [hidden] * len(norm_names)
    if gemma:
        found_modules += [getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)]
        sizes += [D, D]
    modules = [m for m in found_modules if isinstance(m, nn.Module)]
    if len(modules) != len(found_modules):
        return None
    found = [_norm_weight(m, n) for m, n in zip(modules, sizes, strict=True)]
    if any(f is None for f in found) or len({f[1] for f in found if f is not None}) != 1:
        return None
    norms = [f[0] for f in found if f is not None]
    eps = next(f[1] for f in found if f is not None)
    qkv = _merged(attn.q_proj, attn.k_proj, attn.v_proj)
    gate_up = _merged(mlp.gate_proj, mlp.up_proj)
    if qkv is None or gate_up is None:
        return None
    fused = FusedDecoderLayer(layer, qkv, gate_up, norms, eps)
    return fused if _same_function(layer, fused, hidden, D) else None


def _same_function(layer: nn.Module, fused: FusedDecoderLayer, hidden: int, D: int) -> bool:
    """Whether ``fused`` computes what ``layer`` computes: 3 random tokens (with a causal
    additive mask, which every attention implementation takes alike) and random rotary
    tables, no cache; float32 to 1e-4 of the output's scale, other dtypes to 5e-2."""
    weight = next(fused.parameters())
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen).to(weight.device, weight.dtype)

    x, cos, sin = rand(1, 3, hidden), rand(1, 3, D), rand(1, 3, D)
    causal = torch.ones(3, 3, dtype=torch.bool, device=weight.device).tril()
    mask = torch.zeros(1, 1, 3, 3, dtype=weight.dtype, device=weight.device)
    mask = mask.masked_fill(~causal, torch.finfo(weight.dtype).min)
    kwargs: dict[str, Any] = dict(
        attention_mask=mask,
        position_embeddings=(cos, sin),
        position_ids=torch.arange(3, device=weight.device).unsqueeze(0),
        past_key_values=None,
    )
    try:
        with torch.no_grad():
            want = layer(x, **kwargs)
            got = fused(x, **kwargs)
    except (RuntimeError, TypeError, ValueError, AttributeError):
        return False
    want = want[0] if isinstance(want, tuple) else want
    if not isinstance(want, Tensor) or want.shape != got.shape:
        return False
    tol = 1e-4 if weight.dtype == torch.float32 else 5e-2
    scale = float(want.abs().max())
    return bool(torch.isfinite(got).all()) and float((got - want).abs().max()) <= tol * scale


def fuse_layers(model: nn.Module) -> int:
    """Replace every supported decoder layer of ``model`` by a :class:`FusedDecoderLayer`.

    Call it on plain ``nn.Linear`` layers (before quantizing them: each merged projection
    is then quantized as one layer). Layers of other kinds, or whose projections are not
    plain ``nn.Linear`` modules, are left alone.

    Parameters
    ----------
    model : nn.Module
        A transformers causal LM (modified in place).

    Returns
    -------
    int
        How many layers were replaced.

    Example
    -------
    >>> from adaspec.models import tiny_model
    >>> model = tiny_model(seed=0)
    >>> ids = torch.tensor([[1, 2, 3]])
    >>> with torch.no_grad():
    ...     before = model(ids).logits
    ...     replaced = fuse_layers(model)
    ...     after = model(ids).logits
    >>> replaced, torch.allclose(before, after, atol=1e-5)
    (2, True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return 0  # flex attention passes block masks, which SDPA does not take
    replaced = 0
    for module in list(model.modules()):
        if not isinstance(module, nn.ModuleList):
            continue
        for i, layer in enumerate(module):
            fused = _fused(layer)
            if fused is not None:
                module[i] = fused
                replaced += 1
    return replaced

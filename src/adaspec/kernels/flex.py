"""Tree attention through PyTorch's FlexAttention (eager), for comparison with the reference.

The mask is expressed as a ``mask_mod`` over (request, query node, key position): the
prefix is visible, tree keys follow the ancestor mask. FlexAttention builds a block
mask from it, so whole blocks outside a request's keys are skipped.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from adaspec.kernels.masks import effective_tree_mask

__all__ = ["tree_attention_flex"]


def tree_attention_flex(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_lens: Tensor,
    tree_mask: Tensor,
    *,
    scale: float | None = None,
) -> Tensor:
    """Tree attention with ``torch.nn.attention.flex_attention`` (same contract as the reference).

    Shape:
        - q: ``(R, Hq, N, D)``; k_cache, v_cache: ``(R, Hkv, S, D)``; cache_lens: ``(R,)``
        - tree_mask: ``(R, N, N)`` bool; returns ``(R, Hq, N, D)`` in ``q.dtype``
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    R, Hq, N, D = q.shape
    Hkv = k_cache.shape[1]
    sm_scale = 1.0 / math.sqrt(D) if scale is None else scale
    lens = cache_lens.to(device=q.device, dtype=torch.int64)
    kv_len = int(lens.max()) + N if R > 0 else N
    mask = effective_tree_mask(tree_mask.to(q.device))  # [R, N, N]

    def visible(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        j = kv_idx - lens[b]
        in_tree = (j >= 0) & (j < N)
        return (kv_idx < lens[b]) | (in_tree & mask[b, q_idx, j.clamp(0, N - 1)])

    block_mask = create_block_mask(visible, R, None, N, kv_len, device=q.device)
    with warnings.catch_warnings():
        # eager flex_attention warns that it is not compiled; that is the point of this path
        warnings.simplefilter("ignore", UserWarning)
        out = flex_attention(
            q,
            k_cache[:, :, :kv_len],
            v_cache[:, :, :kv_len],
            block_mask=block_mask,
            scale=sm_scale,
            enable_gqa=Hq != Hkv,
        )
    assert isinstance(out, Tensor)
    return out

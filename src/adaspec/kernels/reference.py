"""Plain-PyTorch tree attention: the reference that defines the contract, and the CPU path.

The computation is split in two score blocks so that no (N x S) mask is built: the
prefix block needs only a per-request key-length mask, and the tree block (N x N) takes
the ancestor mask. One softmax runs over both blocks together.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from adaspec.kernels.masks import effective_tree_mask

__all__ = ["tree_attention_reference"]


def tree_attention_reference(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_lens: Tensor,
    tree_mask: Tensor,
    *,
    scale: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Tree attention in plain PyTorch, computed in ``compute_dtype``.

    Inputs are assumed valid (see :func:`adaspec.kernels.tree_attention` for the contract
    and the checks); ``tree_mask`` here is the dense bool form.

    Shape:
        - q: ``(R, Hq, N, D)``
        - k_cache, v_cache: ``(R, Hkv, S, D)``, tree node j of request r at ``cache_lens[r] + j``
        - cache_lens: ``(R,)`` integer
        - tree_mask: ``(R, N, N)`` bool
        - returns: ``(R, Hq, N, D)`` in ``q.dtype``

    Edge cases: entries of ``tree_mask`` above the diagonal are ignored and the diagonal
    is always visible, so every row attends to at least itself.
    """
    R, Hq, N, D = q.shape
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    sm_scale = 1.0 / math.sqrt(D) if scale is None else scale
    lens = cache_lens.to(device=q.device, dtype=torch.int64)
    P = int(lens.max()) if R > 0 else 0
    mask = effective_tree_mask(tree_mask.to(q.device))  # [R, N, N]

    # query head h = kv_head * G + g, so the G query heads of one kv head are one row block
    qf = q.to(compute_dtype).reshape(R, Hkv, G * N, D) * sm_scale  # [R, Hkv, G*N, D]

    k_pre = k_cache[:, :, :P].to(compute_dtype)  # [R, Hkv, P, D]
    v_pre = v_cache[:, :, :P].to(compute_dtype)
    s_pre = qf @ k_pre.transpose(-1, -2)  # [R, Hkv, G*N, P]
    pre_visible = torch.arange(P, device=q.device) < lens.unsqueeze(1)  # [R, P]
    s_pre = s_pre.masked_fill(~pre_visible[:, None, None, :], float("-inf"))

    slots = (lens.unsqueeze(1) + torch.arange(N, device=q.device))[:, None, :, None]  # [R, 1, N, 1]
    k_tree = k_cache.gather(2, slots.expand(R, Hkv, N, D)).to(compute_dtype)  # [R, Hkv, N, D]
    v_tree = v_cache.gather(2, slots.expand(R, Hkv, N, D)).to(compute_dtype)
    s_tree = qf @ k_tree.transpose(-1, -2)  # [R, Hkv, G*N, N]
    s_tree = s_tree.masked_fill(~mask.repeat(1, G, 1)[:, None], float("-inf"))

    probs = torch.softmax(torch.cat([s_pre, s_tree], dim=-1), dim=-1)  # [R, Hkv, G*N, P+N]
    out = probs[..., :P] @ v_pre + probs[..., P:] @ v_tree  # [R, Hkv, G*N, D]
    return out.reshape(R, Hq, N, D).to(q.dtype)

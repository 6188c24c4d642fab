"""KV-cache compaction after verification: keep the root and the accepted path."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["compact_kv"]


def compact_kv(k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor, accepted: Tensor) -> Tensor:
    """Move each request's accepted tree entries right after its prefix, in place.

    Layout: request r's prefix occupies positions ``[0, cache_lens[r])``; its tree block
    (root = node 0, then the other selected nodes in tree order) occupies
    ``cache_lens[r] + i`` for node i. After compaction, positions
    ``cache_lens[r] + 1 + j`` hold node ``accepted[r, j]``; the root stays where it is.
    Everything past the returned length is stale and must be ignored or overwritten.

    Args:
        k_cache, v_cache: (R, H, S, D) key and value caches, modified in place.
        cache_lens: (R,) int64 prefix length of each request before the tree block.
        accepted: (R, A) int64 accepted node indices in path order, excluding the root,
            -1 padded on the right (as returned by verification).

    Returns:
        (R,) int64 new cache lengths: ``cache_lens + 1 + (number accepted)``.
    """
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must both have shape (R, H, S, D), got {tuple(k_cache.shape)} "
            f"and {tuple(v_cache.shape)}"
        )
    R, _, S, _ = k_cache.shape
    if cache_lens.shape != (R,) or cache_lens.dtype.is_floating_point:
        raise ValueError(
            f"cache_lens must be an (R,) = ({R},) integer tensor, got {cache_lens.dtype} {tuple(cache_lens.shape)}"
        )
    if accepted.dim() != 2 or accepted.shape[0] != R or accepted.dtype.is_floating_point:
        raise ValueError(
            f"accepted must be an (R, A) = ({R}, A) integer tensor, got {accepted.dtype} {tuple(accepted.shape)}"
        )
    lens = cache_lens.to(device=k_cache.device, dtype=torch.int64)
    acc = accepted.to(device=k_cache.device, dtype=torch.int64)
    valid = acc >= 0  # [R, A]
    A = acc.shape[1]
    if A == 0:
        return lens + 1
    if bool((acc[valid] < 1).any()) or bool((lens.unsqueeze(1) + acc >= S)[valid].any()):
        raise ValueError(
            "accepted must hold tree node indices >= 1 whose slots lie inside the cache"
        )
    dst = lens.unsqueeze(1) + 1 + torch.arange(A, device=acc.device)  # [R, A]
    # padded entries copy the root onto itself: no Python branching, no host sync
    src = torch.where(valid, lens.unsqueeze(1) + acc, lens.unsqueeze(1))
    dst = torch.where(valid, dst, lens.unsqueeze(1))
    rows = torch.arange(R, device=acc.device).unsqueeze(1).expand(R, A)
    for cache in (k_cache, v_cache):
        moved = cache[rows, :, src]  # [R, A, H, D] gathered before any write (paths overlap)
        cache[rows, :, dst] = moved
    return lens + 1 + valid.sum(1)

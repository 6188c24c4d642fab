"""KV-cache compaction after verification: keep the root and the accepted path."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["compact_kv", "compact_kv_layers"]


def compact_kv(k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor, accepted: Tensor) -> Tensor:
    """Move each request's accepted tree entries right after its prefix, in place.

    Layout: request r's prefix occupies positions ``[0, cache_lens[r])``; its tree block
    (root = node 0, then the other selected nodes in tree order) occupies
    ``cache_lens[r] + i`` for node i. After compaction, positions
    ``cache_lens[r] + 1 + j`` hold node ``accepted[r, j]``; the root stays where it is.
    Everything past the returned length is stale and must be ignored or overwritten.
    The cache grows by the emitted count (accepted + bonus): the root and the accepted
    nodes are kept, and the bonus token becomes the next step's (uncached) root.

    Parameters
    ----------
    k_cache, v_cache : Tensor
        ``(R, H, S, D)`` key and value caches, any dtype, modified in place.
    cache_lens : Tensor
        ``(R,)`` integer prefix length of each request before the tree block.
    accepted : Tensor
        ``(R, A)`` integer accepted node indices in path order, excluding the root,
        -1 padded on the right (as returned by verification).

    Returns
    -------
    Tensor
        ``(R,)`` int64 new cache lengths: ``cache_lens + 1 + (number accepted)``.

    Examples
    --------
    >>> import torch
    >>> k = torch.arange(8.0).reshape(1, 1, 8, 1); v = k.clone()
    >>> # prefix of 2, tree nodes 0..4 at slots 2..6; path root -> 2 -> 4 accepted
    >>> compact_kv(k, v, torch.tensor([2]), torch.tensor([[2, 4, -1]])).tolist()
    [5]
    >>> k.flatten()[:5].tolist()
    [0.0, 1.0, 2.0, 4.0, 6.0]
    """
    return compact_kv_layers([(k_cache, v_cache)], cache_lens, accepted)


def compact_kv_layers(
    caches: Sequence[tuple[Tensor, Tensor]], cache_lens: Tensor, accepted: Tensor
) -> Tensor:
    """:func:`compact_kv` over every layer of a model's cache, checking and planning once.

    ``caches``: one ``(k_cache, v_cache)`` pair of ``(R, H, S, D)`` tensors per layer (all
    with the same R), modified in place; ``cache_lens`` and ``accepted`` as in
    :func:`compact_kv`. Entries already in place (a chain accepted from its first node on)
    are not copied at all. Returns the ``(R,)`` int64 new cache lengths.
    """
    if not caches:
        raise ValueError("caches must hold at least one (k_cache, v_cache) pair")
    k_cache, v_cache = caches[0]
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must both have shape (R, H, S, D), got {tuple(k_cache.shape)} "
            f"and {tuple(v_cache.shape)}"
        )
    R = k_cache.shape[0]
    for k, v in caches:
        if k.dim() != 4 or v.shape != k.shape or k.shape[0] != R:
            raise ValueError(
                f"every layer's caches must have shape ({R}, H, S, D), got {tuple(k.shape)} "
                f"and {tuple(v.shape)}"
            )
    S = min(k.shape[2] for k, _ in caches)  # every layer must hold the moved slots
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
    if not torch.equal(valid, valid.to(torch.int64).cummin(1).values.bool()):
        raise ValueError("accepted must be -1 padded on the right only (no -1 before a node index)")
    # along a root -> leaf path node indices strictly increase (topological order)
    if bool((valid[:, 1:] & (acc[:, 1:] <= acc[:, :-1])).any()):
        raise ValueError("accepted must list a path in order: node indices strictly increasing")
    if bool((acc[valid] < 1).any()) or bool((lens.unsqueeze(1) + acc >= S)[valid].any()):
        raise ValueError(
            "accepted must hold tree node indices >= 1 whose slots lie inside the cache"
        )
    new_lens = lens + 1 + valid.sum(1)
    # accepted node i moves from slot lens + i to lens + 1 + (its place on the path); only
    # the entries that really move are gathered (all before any write: paths overlap)
    rows, step = (valid & (acc != torch.arange(1, A + 1, device=acc.device))).nonzero(as_tuple=True)
    if rows.numel() == 0:
        return new_lens
    src = lens[rows] + acc[rows, step]
    dst = lens[rows] + 1 + step
    for k, v in caches:
        for cache in (k, v):
            cache[rows, :, dst] = cache[rows, :, src]  # [M, H, D] gathered, then written
    return new_lens

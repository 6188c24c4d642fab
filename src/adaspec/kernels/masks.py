"""Tree masks in the two layouts the attention backends read: dense bool and packed int32 words.

The packed layout is what the Triton kernel loads: row i of request r is
``words[r, i, :]``, ``W = ceil(N / 32)`` int32 words, and node j is visible to node i
iff bit ``j % 32`` of word ``j // 32`` is set (bit 31 is the sign bit; the value is the
two's-complement reading of the 32 bits).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["effective_tree_mask", "mask_words", "pack_tree_mask", "unpack_tree_mask"]

WORD_BITS = 32


def mask_words(num_nodes: int) -> int:
    """Number of int32 words per packed mask row for ``num_nodes`` tree nodes."""
    return (num_nodes + WORD_BITS - 1) // WORD_BITS


def pack_tree_mask(mask: Tensor) -> Tensor:
    """Pack a bool tree mask into int32 words, 32 nodes per word, node j at bit ``j % 32``.

    Parameters
    ----------
    mask : Tensor
        ``(..., N, N)`` bool; ``mask[..., i, j]`` is True iff node i may attend to node j.

    Returns
    -------
    Tensor
        ``(..., N, ceil(N / 32))`` int32.

    Examples
    --------
    >>> import torch
    >>> m = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    >>> pack_tree_mask(m).flatten().tolist()
    [1, 3, 5]
    """
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() < 2:
        raise TypeError(f"mask must be a bool tensor of shape (..., N, N), got {_describe(mask)}")
    N = mask.shape[-1]
    W = mask_words(N)
    padded = torch.zeros(*mask.shape[:-1], W * WORD_BITS, dtype=torch.int64, device=mask.device)
    padded[..., :N] = mask.to(torch.int64)
    bits = padded.view(*mask.shape[:-1], W, WORD_BITS)  # [..., N, W, 32]
    weights = torch.ones(WORD_BITS, dtype=torch.int64, device=mask.device) << torch.arange(
        WORD_BITS, device=mask.device
    )
    words = (bits * weights).sum(-1)  # [..., N, W] in [0, 2**32)
    # reinterpret the top bit as the sign: an explicit wrap, not a platform-defined narrowing cast
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_tree_mask(words: Tensor, num_nodes: int) -> Tensor:
    """Inverse of :func:`pack_tree_mask`: ``(..., N, W)`` int32 words to ``(..., N, N)`` bool."""
    if not isinstance(words, Tensor) or words.dtype != torch.int32 or words.dim() < 2:
        raise TypeError(
            f"words must be an int32 tensor of shape (..., N, W), got {_describe(words)}"
        )
    if words.shape[-1] != mask_words(num_nodes):
        raise ValueError(
            f"words must have {mask_words(num_nodes)} words per row for {num_nodes} nodes, "
            f"got {words.shape[-1]}"
        )
    j = torch.arange(num_nodes, device=words.device)
    picked = words.to(torch.int64).index_select(-1, j // WORD_BITS)  # [..., N, N]
    return ((picked >> (j % WORD_BITS)) & 1).bool()


def effective_tree_mask(mask: Tensor) -> Tensor:
    """The mask every backend actually applies: lower triangle of ``mask``, diagonal forced True.

    Nodes are in topological order, so an ancestor never has a larger index than its
    descendant; entries above the diagonal are ignored. A node always sees itself, so no
    row is empty even when the prefix is empty.
    """
    N = mask.shape[-1]
    eye = torch.eye(N, dtype=torch.bool, device=mask.device)
    return mask.tril() | eye


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__

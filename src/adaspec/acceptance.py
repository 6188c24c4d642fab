"""Acceptance estimates from draft logits: logits transforms, path log-probabilities, beam trees.

The same :func:`process_logits` (temperature, then top-k, then top-p) is used by the
draft-side estimates here and by the target side in :mod:`adaspec.verify`, so a tree's
f(v) and its verification always see one definition of the sampling distribution.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from adaspec.tree import SubTree, TokenTree, subtree

__all__ = [
    "Expansion",
    "TreeGrower",
    "expand",
    "extension_logprobs",
    "grow_tree",
    "logprobs_from_logits",
    "probs_from_logits",
    "process_logits",
]

Param = float | int | Tensor | None


def _per_row(value: Param, name: str, lead: torch.Size, device: torch.device) -> Tensor | None:
    """A scalar or a tensor broadcast to ``lead`` + (1,) so it applies per row of logits."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number or a tensor, got bool")
    t = torch.as_tensor(value, device=device)
    if t.dim() > len(lead):
        raise ValueError(f"{name} must be a scalar or have at most shape {tuple(lead)}, got {tuple(t.shape)}")
    try:
        # a per-request (R,) tensor applies to every node of that request
        t = t.reshape(t.shape + (1,) * (len(lead) - t.dim())).expand(lead)
    except RuntimeError:
        raise ValueError(
            f"{name} of shape {tuple(torch.as_tensor(value).shape)} does not broadcast over logits rows {tuple(lead)}"
        ) from None
    return t.unsqueeze(-1)


def process_logits(
    logits: Tensor,
    temperature: Param = 1.0,
    top_k: Param = None,
    top_p: Param = None,
) -> Tensor:
    """Apply temperature, then top-k, then top-p to logits; removed tokens get -inf.

    Args:
        logits: (..., V) float tensor (float32/float16/bfloat16); computed in float32.
        temperature: >= 0; 0 means greedy, and the result keeps only the argmax (the first
            index on ties) at 0 with everything else at -inf. A scalar or a tensor over the
            leading dimensions (e.g. (R,) for one value per request).
        top_k: keep the k largest logits (ties with the k-th kept); None or 0 disables.
        top_p: keep the smallest set of most likely tokens whose probability reaches top_p
            (the most likely token is always kept); in (0, 1]; None or 1 disables.

    Returns:
        (..., V) float32 processed logits; ``softmax`` of them is the sampling distribution.

    Raises:
        ValueError: temperature < 0, top_k < 0, top_p outside (0, 1], NaN logits, or a row
            whose logits are all -inf.
    """
    if not isinstance(logits, Tensor) or not logits.dtype.is_floating_point or logits.dim() < 1:
        raise TypeError("logits must be a floating torch.Tensor of shape (..., V)")
    if logits.shape[-1] == 0:
        raise ValueError("logits must have a vocabulary dimension V >= 1, got V = 0")
    x = logits.float()
    lead = x.shape[:-1]
    if bool(torch.isnan(x).any()):
        raise ValueError("logits contain NaN")
    if bool((x == float("-inf")).all(-1).any()):
        raise ValueError("logits: a row is -inf everywhere (no token can be sampled)")
    temp = _per_row(temperature, "temperature", lead, x.device)
    k = _per_row(top_k, "top_k", lead, x.device)
    p = _per_row(top_p, "top_p", lead, x.device)
    if temp is not None:
        temp = temp.float()
        if bool((temp < 0).any()) or bool(torch.isnan(temp).any()):
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        greedy = temp == 0
        if bool(greedy.any()):
            onehot = torch.full_like(x, float("-inf")).scatter(-1, x.argmax(-1, keepdim=True), 0.0)
            x = torch.where(greedy, onehot, x / torch.where(greedy, 1.0, temp))
        else:
            x = x / temp
    if k is not None:
        if k.dtype.is_floating_point or bool((k < 0).any()):
            raise ValueError(f"top_k must be a non-negative integer, got {top_k}")
        V = x.shape[-1]
        kk = torch.where(k == 0, V, k.clamp(max=V)).to(torch.int64)
        if bool((kk < V).any()):
            sorted_x = x.sort(-1, descending=True).values
            kth = sorted_x.gather(-1, kk - 1)
            x = x.masked_fill(x < kth, float("-inf"))
    if p is not None:
        p = p.float()
        if bool(((p <= 0) | (p > 1) | torch.isnan(p)).any()):
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
        if bool((p < 1).any()):
            sorted_x, idx = x.sort(-1, descending=True)
            probs = sorted_x.softmax(-1)
            mass_before = probs.cumsum(-1) - probs  # [..., V] mass of the more likely tokens
            drop_sorted = (mass_before >= p) & (p < 1)
            drop_sorted[..., 0] = False
            drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
            x = x.masked_fill(drop, float("-inf"))
    return x


def probs_from_logits(
    logits: Tensor, temperature: Param = 1.0, top_k: Param = None, top_p: Param = None
) -> Tensor:
    """(..., V) float32 sampling distribution: ``softmax(process_logits(...))``."""
    return process_logits(logits, temperature, top_k, top_p).softmax(-1)


def logprobs_from_logits(
    logits: Tensor, temperature: Param = 1.0, top_k: Param = None, top_p: Param = None
) -> Tensor:
    """(..., V) float32 log of the sampling distribution (-inf for removed tokens)."""
    return process_logits(logits, temperature, top_k, top_p).log_softmax(-1)


def _estimate_temperature(temperature: Param) -> Param:
    """Temperature used for acceptance *estimates*.

    Under greedy verification (temperature 0) the draft's tempered distribution is a one-hot
    and would rank every alternative at f = 0; the untempered softmax is the estimate of how
    likely each candidate is to be the target's argmax.
    """
    if temperature is None:
        return 1.0
    if isinstance(temperature, Tensor):
        return torch.where(temperature == 0, torch.ones_like(temperature, dtype=torch.float32), temperature)
    return 1.0 if temperature == 0 else temperature


def extension_logprobs(
    frontier_logp: Tensor,
    draft_logits: Tensor,
    temperature: Param = 0.0,
    top_k: Param = None,
    top_p: Param = None,
) -> Tensor:
    """log f of every one-token extension of a frontier of tree nodes.

    Args:
        frontier_logp: (R, F) float32 log f of the frontier nodes (-inf for unused slots).
        draft_logits: (R, F, V) the draft's logits for the token after each frontier node.
        temperature, top_k, top_p: the sampling settings the target will be verified with
            (see :func:`process_logits`); temperature 0 estimates with the untempered softmax.

    Returns:
        (R, F, V) float32: ``frontier_logp[r, i] + log q(v | node i)``.
    """
    if frontier_logp.dim() != 2 or draft_logits.dim() != 3 or draft_logits.shape[:2] != frontier_logp.shape:
        raise ValueError(
            f"draft_logits must have shape (R, F, V) matching frontier_logp (R, F); got "
            f"{tuple(draft_logits.shape)} and {tuple(frontier_logp.shape)}"
        )
    logq = logprobs_from_logits(draft_logits, _estimate_temperature(temperature), top_k, top_p)
    return frontier_logp.float().unsqueeze(-1) + logq  # [R, F, V]


class Expansion(NamedTuple):
    """The ``width`` best extensions of a frontier, per request, best first.

    ``parent``: (R, W) int64 frontier slot each extension hangs from; ``tokens``: (R, W)
    int64 token ids; ``logp``: (R, W) float32 their log f (-inf where fewer than W
    extensions have nonzero probability).
    """

    parent: Tensor
    tokens: Tensor
    logp: Tensor


def expand(
    frontier_logp: Tensor,
    draft_logits: Tensor,
    width: int,
    temperature: Param = 0.0,
    top_k: Param = None,
    top_p: Param = None,
) -> Expansion:
    """One beam step: the ``width`` best extensions of the frontier by path probability.

    Shapes as in :func:`extension_logprobs`. Extensions compete across the whole frontier of
    a request (the AdaServe / EAGLE-2 beam): a likely node may keep several children while
    an unlikely one keeps none.
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an int >= 1, got {width!r}")
    ext = extension_logprobs(frontier_logp, draft_logits, temperature, top_k, top_p)  # [R, F, V]
    R, F, V = ext.shape
    w = min(width, F * V)
    logp, flat = ext.reshape(R, F * V).topk(w, dim=-1)  # [R, w]
    return Expansion(parent=flat // V, tokens=flat % V, logp=logp)


class TreeGrower:
    """Grows a batch of candidate trees one depth at a time with any draft model.

    The tree starts as the R roots. Each :meth:`expand` call takes the draft's logits at the
    current frontier (R, F, V) and appends the ``width`` best extensions per request as the
    new frontier. The growing tree (``tree``) keeps every appended node, including the rare
    ones with f = 0 (when fewer than ``width`` extensions have nonzero probability), so its
    node indices stay stable for the caller's KV cache; :meth:`candidates` drops those.

    Example (a draft that is a fixed table of next-token logits)::

        grower = TreeGrower(root_tokens, width=3)
        for _ in range(depth):
            logits = table[grower.frontier_tokens]  # [R, F, V]
            grower.expand(logits)
        cand, grown_index = grower.candidates()
    """

    def __init__(
        self,
        root_tokens: Tensor,
        width: int,
        *,
        temperature: Param = 0.0,
        top_k: Param = None,
        top_p: Param = None,
    ) -> None:
        if root_tokens.dim() != 1 or root_tokens.dtype != torch.int64 or root_tokens.numel() == 0:
            raise ValueError(
                f"root_tokens must be a non-empty (R,) int64 tensor, got {root_tokens.dtype} {tuple(root_tokens.shape)}"
            )
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be an int >= 1, got {width!r}")
        self.width = width
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        R = root_tokens.shape[0]
        dev = root_tokens.device
        self._tokens = [root_tokens.unsqueeze(1)]
        self._parents = [torch.full((R, 1), -1, dtype=torch.int64, device=dev)]
        self._logp = [torch.zeros(R, 1, device=dev)]
        self._depth = [torch.zeros(R, 1, dtype=torch.int64, device=dev)]
        self.frontier = torch.zeros(R, 1, dtype=torch.int64, device=dev)
        """(R, F) int64 node indices of the current frontier (the last level added)."""
        self.num_nodes = 1
        """Nodes grown so far per request (the same for every row)."""

    @property
    def frontier_tokens(self) -> Tensor:
        """(R, F) int64 token ids of the frontier nodes."""
        return self._tokens[-1]

    @property
    def frontier_logp(self) -> Tensor:
        """(R, F) float32 log f of the frontier nodes."""
        return self._logp[-1]

    @property
    def depth(self) -> int:
        """Levels grown so far (0 before the first :meth:`expand`)."""
        return len(self._tokens) - 1

    def expand(self, draft_logits: Tensor) -> Tensor:
        """Append the best ``width`` extensions; returns their (R, W) node indices."""
        e = expand(self.frontier_logp, draft_logits, self.width, self.temperature, self.top_k, self.top_p)
        W = e.tokens.shape[1]
        self._tokens.append(e.tokens)
        self._parents.append(self.frontier.gather(1, e.parent))
        self._logp.append(e.logp)
        self._depth.append(torch.full_like(e.tokens, self.depth + 1))
        self.frontier = torch.arange(self.num_nodes, self.num_nodes + W, device=e.tokens.device).expand_as(e.tokens)
        self.num_nodes += W
        return self.frontier

    def tree(self) -> TokenTree:
        """Every node grown so far, (R, num_nodes), f = 0 nodes included (not padding)."""
        return TokenTree(
            torch.cat(self._tokens, 1),
            torch.cat(self._parents, 1),
            torch.cat(self._logp, 1),
            torch.cat(self._depth, 1),
            validate=False,
        )

    def candidates(self) -> SubTree:
        """The candidate trees without f = 0 nodes, and each node's index in :meth:`tree`."""
        t = self.tree()
        return subtree(t, t.logp > float("-inf"))


def grow_tree(
    root_tokens: Tensor,
    draft_logits_fn: Callable[[TreeGrower], Tensor],
    depth: int,
    width: int,
    *,
    temperature: Param = 0.0,
    top_k: Param = None,
    top_p: Param = None,
) -> SubTree:
    """Beam-expand candidate trees of depth ``depth`` and width ``width``.

    Args:
        root_tokens: (R,) int64 the root token of each request.
        draft_logits_fn: called once per depth with the grower; returns the draft's logits
            (R, F, V) for ``grower.frontier`` (it may read ``grower.tree()`` for masks and
            positions).
        depth: levels below the root (>= 0); width: extensions kept per level (>= 1).

    Returns:
        :class:`~adaspec.tree.SubTree`: the candidate trees (at most 1 + depth * width
        nodes each) and each node's index among the grown nodes.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth must be an int >= 0, got {depth!r}")
    grower = TreeGrower(root_tokens, width, temperature=temperature, top_k=top_k, top_p=top_p)
    for _ in range(depth):
        grower.expand(draft_logits_fn(grower))
    return grower.candidates()

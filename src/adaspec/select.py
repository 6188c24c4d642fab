"""SLO-customized budgeted selection of tree nodes across requests (AdaServe, Alg. 2).

Each step the target verifies at most ``budget`` tree nodes in total. :func:`tokens_needed`
turns each request's SLO clock into the expected number of tokens it must emit this step;
:func:`select` first gives every request (most urgent first) its best nodes until their
Σ f covers that need, then spends what is left on the globally most likely nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from adaspec.tree import TokenTree, float_order_key, strict_order, subtree

__all__ = ["Selection", "select", "tokens_needed"]

Number = float | int | Tensor


def _nonneg(value: Number, name: str, *, positive: bool = False) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float64)
    if bool(torch.isnan(t).any()) or bool((t <= 0).any() if positive else (t < 0).any()):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value}")
    return t


def tokens_needed(
    slo: Number, elapsed: Number, decoded: Number, step_latency: Number, max_depth: int
) -> Tensor:
    """Expected tokens each request must emit this step to stay on its SLO.

    ``need = clamp((elapsed + step_latency) / slo - decoded, 1, max_depth + 1)``: after this
    step a request on schedule has decoded ``(elapsed + step_latency) / slo`` tokens. Every
    step emits at least one token (the bonus), and a tree of depth d emits at most d + 1.

    Args:
        slo: (R,) or scalar, target time per output token in seconds (> 0).
        elapsed: (R,) or scalar, decode time spent so far in seconds (>= 0).
        decoded: (R,) or scalar, tokens decoded so far (>= 0).
        step_latency: scalar or (R,), the predicted latency of this step in seconds (>= 0).
        max_depth: depth d of the candidate trees (>= 0).

    Returns:
        (R,) float32 need per request (a scalar tensor if every input is a scalar).
    """
    if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 0:
        raise ValueError(f"max_depth must be an int >= 0, got {max_depth!r}")
    t = _nonneg(slo, "slo", positive=True)
    lat = _nonneg(elapsed, "elapsed")
    out = _nonneg(decoded, "decoded")
    step = _nonneg(step_latency, "step_latency")
    try:
        need = (lat + step) / t - out
    except RuntimeError:
        raise ValueError(
            "slo, elapsed, decoded and step_latency must be scalars or tensors of one shape (R,)"
        ) from None
    return need.clamp(1, max_depth + 1).float()


@dataclass(frozen=True)
class Selection:
    """The nodes chosen for verification.

    Attributes:
        tree: the selected trees (R rows, closed under ancestors, topological order kept,
            parents reindexed).
        kept: (R, M) int64 candidate index of each selected node, -1 padded.
        expected_accepted: (R,) float32 Σ f of each selected tree (root counted as 1).
        need: (R,) float32 the need each request was given (1 when ``need`` was None).
        need_met: (R,) bool whether ``expected_accepted >= need``.
    """

    tree: TokenTree
    kept: Tensor
    expected_accepted: Tensor
    need: Tensor
    need_met: Tensor

    @property
    def num_selected(self) -> Tensor:
        """(R,) int64 nodes selected per request (root included)."""
        return self.tree.num_nodes

    @property
    def unmet(self) -> Tensor:
        """(K,) int64 indices of the requests whose need was not met."""
        return (~self.need_met).nonzero().flatten()


def _per_request(
    value: Number | None, name: str, R: int, device: torch.device, default: float
) -> Tensor:
    if value is None:
        return torch.full((R,), default, device=device)
    t = torch.as_tensor(value, device=device)
    if t.dim() == 0:
        t = t.expand(R)
    if t.shape != (R,):
        raise ValueError(f"{name} must be a scalar or shape ({R},), got {tuple(t.shape)}")
    return t


def select(
    candidates: TokenTree,
    budget: int,
    need: Number | None = None,
    max_per_request: int | Tensor | None = None,
) -> Selection:
    """Choose at most ``budget`` nodes over all requests' candidate trees.

    Phase 1 walks the requests from the largest need to the smallest (ties: lower index
    first) and gives each its best nodes (in :func:`~adaspec.tree.strict_order`) until their
    Σ f reaches its need, its cap, or the budget runs out; every request always gets its
    root. Phase 2 spends the rest of the budget on the globally best remaining nodes. Both
    phases take prefixes of each request's strict order, so every selected tree is closed
    under ancestors. With ``need=None`` the result maximises total Σ f under the budget,
    and for R = 1 it equals :func:`~adaspec.tree.build_optimal`.

    Args:
        candidates: R candidate trees of N nodes.
        budget: total nodes to select over all requests, roots included (>= R).
        need: (R,) or scalar expected tokens each request should emit (see
            :func:`tokens_needed`); None asks for nothing beyond the root.
        max_per_request: int or (R,) cap on nodes per request (>= 1); None means N.

    Returns:
        :class:`Selection`.

    Example:
        >>> a = TokenTree([5, 6, 7], [-1, 0, 1], [0.0, -0.2, -0.4])
        >>> b = TokenTree([1, 2, 3], [-1, 0, 0], [0.0, -0.1, -3.0])
        >>> s = select(TokenTree.stack([a, b]), budget=4, need=[2.4, 1.0])
        >>> s.num_selected.tolist(), s.need_met.tolist()
        ([3, 1], [True, True])
    """
    R, N = candidates.tokens.shape
    dev = candidates.device
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise TypeError(f"budget must be an int, got {type(budget).__name__}")
    if budget < R:
        raise ValueError(
            f"budget {budget} is smaller than the number of requests {R}: every request needs its root"
        )
    need_t = _per_request(need, "need", R, dev, 1.0).float()
    if not bool(torch.isfinite(need_t).all()) or bool((need_t < 0).any()):
        raise ValueError(f"need must be finite and >= 0 (expected tokens), got {need_t.tolist()}")
    cap = _per_request(max_per_request, "max_per_request", R, dev, N)
    if cap.dtype.is_floating_point or cap.dtype == torch.bool or bool((cap < 1).any()):
        raise ValueError(f"max_per_request must be integers >= 1, got {max_per_request}")
    avail = torch.minimum(cap.to(torch.int64), candidates.num_nodes)  # [R] nodes each may take

    order = strict_order(candidates)  # [R, N]
    f = candidates.logp.gather(1, order).exp()  # [R, N] f in each request's best-first order
    cum_f = f.cumsum(1)  # [R, N] Σ f of the best k + 1 nodes
    pos = torch.arange(N, device=dev)

    # Phase 1: the shortest best-first prefix whose Σ f reaches the need, within the cap.
    short = (cum_f < need_t.unsqueeze(1)).sum(1)  # [R] prefixes that still fall short
    want = torch.minimum(short + 1, avail)  # [R] nodes wanted, root included
    urgency = need_t.argsort(descending=True, stable=True)  # [R] most urgent first
    extra = (want - 1).gather(0, urgency)  # [R] nodes beyond the root, in urgency order
    spare = budget - R
    granted_before = extra.cumsum(0) - extra  # [R] budget taken by more urgent requests
    granted = (spare - granted_before).clamp(min=0).minimum(extra)
    take = torch.ones(R, dtype=torch.int64, device=dev)
    take.scatter_add_(0, urgency, granted)  # [R] nodes taken in phase 1
    left = spare - int(granted.sum())

    # Phase 2: the globally best remaining nodes by (logp desc, depth asc). Within a row that
    # order agrees with the row's strict order, so what a row gains extends its prefix; exact
    # ties between rows only decide which of two equally good nodes is taken.
    if left > 0:
        eligible = (pos.unsqueeze(0) >= take.unsqueeze(1)) & (pos.unsqueeze(0) < avail.unsqueeze(1))
        key = (float_order_key(-candidates.logp.gather(1, order)) << 32) | candidates.depth.gather(
            1, order
        )
        key = key.masked_fill(~eligible, torch.iinfo(torch.int64).max).flatten()  # [R * N]
        n_take = min(left, int(eligible.sum()))
        best = key.topk(n_take, largest=False).indices  # [n_take] flat entries to add
        take = take + torch.bincount(best // N, minlength=R)

    keep = torch.zeros(R, N, dtype=torch.bool, device=dev)
    keep.scatter_(1, order, pos.unsqueeze(0) < take.unsqueeze(1))
    sub = subtree(candidates, keep)
    expected = cum_f.gather(1, (take - 1).unsqueeze(1)).squeeze(1)
    return Selection(
        tree=sub.tree,
        kept=sub.kept,
        expected_accepted=expected,
        need=need_t,
        need_met=expected >= need_t,
    )

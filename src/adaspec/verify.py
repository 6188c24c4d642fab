"""Lossless verification of token trees: greedy and sampled, batched over requests.

Glossary (see DESIGN.md): the **root** (node 0) is the request's last committed token;
**accepted tokens** are draft nodes the target confirmed, in path order; the **bonus
token** is the one token the target adds after the last accepted node; the **emitted
tokens** are the accepted tokens followed by the bonus token (always at least one).

Three rules, chosen by how the tree's children were produced:

==========================  ==========================  ================================
rule                        when                        at a node with target dist. p
==========================  ==========================  ================================
greedy                      ``temperature == 0``        move to the child whose token is
                                                        the target's argmax; else that
                                                        argmax is the bonus token
deterministic children      sampling, ``draft_probs``   draw y ~ p; move to a child whose
(beam / top-k trees)        is None                     token is y; else y is the bonus
children drawn without      sampling, ``draft_probs``   try the children in draw order:
replacement from the draft  given                       accept x w.p. min(1, p(x)/q(x));
                                                        on rejection p <- norm((p - q)+),
                                                        q <- q without x, renormalised;
                                                        bonus ~ the final residual p
==========================  ==========================  ================================

The deterministic rule is the "try the distinct children in order, accept x with
probability p(x) / (remaining mass), zero out rejected ones, bonus from the residual"
rule written as a single draw: both accept child x with probability p(x) and end with a
bonus token distributed as p restricted to the tokens no child carries. It is exact for
any fixed list of children. A p/q ratio test on such children is *not* exact (it needs
children drawn from q), which is why the rule is chosen by how the tree was built.

Nodes whose root -> node paths carry the same tokens (repeated sibling tokens) stand for
the same text: the greedy and deterministic rules verify the tree as the trie it
represents, so the accepted path may continue below any of them (the lowest index wins,
and the target logits of the lowest-indexed such node are read). Under the draft rule a
sibling repeating an earlier sibling's token is never accepted (a draw without
replacement cannot produce it), which keeps the rule exact.

Everything is batched: Python loops run over tree depth (and, for the draft rule, over
the rank of a child among its siblings, because each rejection changes the residual that
the next sibling is tested against), never over requests or nodes. Only the rows that
verification actually reads are transformed, so the cost is a few passes over
``depth x R x V`` logits rather than over all ``R x N x V``.

Randomness comes from uniforms drawn up front, (R, N) per call, from the optional
``torch.Generator`` (or supplied as ``uniforms`` for replay). Request r consumes only row
r, in order, at most ``num_nodes[r]`` of them, so a batch gives each request exactly the
result it would get alone with the same uniform row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from adaspec.acceptance import Param, probs_from_logits
from adaspec.tree import TokenTree, path_to

__all__ = [
    "SpecStats",
    "VerifyResult",
    "sample_children",
    "verify",
    "verify_greedy",
]


# ------------------------------------------------------------------------------ results
@dataclass(frozen=True, eq=False)
class VerifyResult:
    """The outcome of verifying R token trees (every tensor on the logits' device).

    Attributes
    ----------
    accepted : Tensor
        (R, D) int64 accepted node indices in path order, root excluded, -1 padded on the
        right; D is the largest node depth in the tree batch. This is exactly what
        :func:`adaspec.kernels.compact_kv` takes.
    num_accepted : Tensor
        (R,) int64 number of accepted draft tokens (0 .. D).
    bonus : Tensor
        (R,) int64 the bonus token (sampled or argmax) after the last accepted node.
    emitted : Tensor
        (R, D + 1) int64 the accepted tokens followed by the bonus token, -1 padded.
    last_node : Tensor
        (R,) int64 index of the deepest accepted node (0, the root, if none); the bonus
        token was drawn from the target's logits row of this node's path.
    num_draft_tokens : Tensor
        (R,) int64 draft tokens that were verified (real nodes minus the root).
    """

    accepted: Tensor
    num_accepted: Tensor
    bonus: Tensor
    emitted: Tensor
    last_node: Tensor
    num_draft_tokens: Tensor

    @property
    def num_emitted(self) -> Tensor:
        """(R,) int64 emitted tokens per request: ``num_accepted + 1``."""
        return self.num_accepted + 1


@dataclass(frozen=True, eq=False)
class SpecStats:
    """Mergeable speculative-decoding counters (the names of vLLM's spec-decode stats).

    The counters are 0-d / 1-d int64 tensors on the verification device, so collecting
    them costs no host sync; the derived rates sync when read. A *draft* is one verified
    tree of one request (one per request per step), including trees with no draft nodes.

    Attributes
    ----------
    num_drafts : Tensor
        () int64 verified trees.
    num_draft_tokens : Tensor
        () int64 draft nodes verified (roots excluded).
    num_accepted_tokens : Tensor
        () int64 accepted draft tokens.
    num_emitted_tokens : Tensor
        () int64 emitted tokens: accepted + one bonus per draft.
    num_accepted_tokens_per_depth : Tensor
        (D,) int64; entry d - 1 counts the drafts whose accepted path reached depth d
        (vLLM's ``num_accepted_tokens_per_pos``).
    num_draft_tokens_per_depth : Tensor
        (D,) int64; entry d - 1 counts the draft nodes at depth d.

    Example
    -------
    >>> import torch
    >>> from adaspec.tree import TokenTree
    >>> from adaspec.verify import SpecStats, verify
    >>> tree = TokenTree([2, 1, 2, 0], [-1, 0, 0, 1], [0.0, -0.1, -0.2, -0.3])
    >>> logits = torch.full((1, 4, 3), -5.0)
    >>> logits[0, 0, 1] = logits[0, 1, 0] = logits[0, 3, 2] = 5.0
    >>> stats = SpecStats.zeros() + SpecStats.from_result(verify(tree, logits), tree)
    >>> stats.mean_accepted_length, stats.num_accepted_tokens_per_depth.tolist()
    (3.0, [1, 1])
    """

    num_drafts: Tensor
    num_draft_tokens: Tensor
    num_accepted_tokens: Tensor
    num_emitted_tokens: Tensor
    num_accepted_tokens_per_depth: Tensor
    num_draft_tokens_per_depth: Tensor

    @classmethod
    def zeros(cls, device: torch.device | str | None = None) -> SpecStats:
        """Empty counters (the identity of ``+``)."""

        def z() -> Tensor:
            return torch.zeros((), dtype=torch.int64, device=device)

        e = torch.zeros(0, dtype=torch.int64, device=device)
        return cls(z(), z(), z(), z(), e, e.clone())

    @classmethod
    def from_result(cls, result: VerifyResult, tree: TokenTree) -> SpecStats:
        """Counters of one verification of ``tree`` (the tree passed to :func:`verify`)."""
        D = result.accepted.shape[1]
        depths = torch.arange(1, D + 1, device=result.num_accepted.device)  # [D]
        reached = (result.num_accepted.unsqueeze(1) >= depths).sum(0)  # [D]
        real = tree.valid.to(result.num_accepted.device)
        dep = tree.depth.to(result.num_accepted.device)
        per_depth = ((dep.unsqueeze(-1) == depths) & real.unsqueeze(-1)).sum((0, 1))  # [D]
        accepted = result.num_accepted.sum()
        return cls(
            num_drafts=torch.tensor(result.num_accepted.shape[0], device=accepted.device),
            num_draft_tokens=result.num_draft_tokens.sum(),
            num_accepted_tokens=accepted,
            num_emitted_tokens=accepted + result.num_accepted.shape[0],
            num_accepted_tokens_per_depth=reached,
            num_draft_tokens_per_depth=per_depth,
        )

    def update(self, result: VerifyResult, tree: TokenTree) -> SpecStats:
        """``self + SpecStats.from_result(result, tree)``."""
        return self + SpecStats.from_result(result, tree)

    def merge(self, other: SpecStats) -> SpecStats:
        """Counters of both (per-depth counters padded to the deeper of the two)."""
        if not isinstance(other, SpecStats):
            raise TypeError(f"can only merge SpecStats, got {type(other).__name__}")
        dev = self.num_drafts.device

        def pad_add(a: Tensor, b: Tensor) -> Tensor:
            n = max(a.shape[0], b.shape[0])
            b = b.to(dev)
            return torch.nn.functional.pad(a, (0, n - a.shape[0])) + torch.nn.functional.pad(
                b, (0, n - b.shape[0])
            )

        return SpecStats(
            self.num_drafts + other.num_drafts.to(dev),
            self.num_draft_tokens + other.num_draft_tokens.to(dev),
            self.num_accepted_tokens + other.num_accepted_tokens.to(dev),
            self.num_emitted_tokens + other.num_emitted_tokens.to(dev),
            pad_add(self.num_accepted_tokens_per_depth, other.num_accepted_tokens_per_depth),
            pad_add(self.num_draft_tokens_per_depth, other.num_draft_tokens_per_depth),
        )

    def __add__(self, other: SpecStats) -> SpecStats:
        return self.merge(other)

    @property
    def mean_accepted_length(self) -> float:
        """τ: mean emitted tokens per verified tree (1 + accepted / drafts); nan if empty."""
        n = int(self.num_drafts)
        return int(self.num_emitted_tokens) / n if n else float("nan")

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / verified draft tokens; nan if none were verified."""
        n = int(self.num_draft_tokens)
        return int(self.num_accepted_tokens) / n if n else float("nan")

    def as_dict(self) -> dict[str, float | int | list[int]]:
        """Plain Python values (one host sync), e.g. for logging."""
        return {
            "num_drafts": int(self.num_drafts),
            "num_draft_tokens": int(self.num_draft_tokens),
            "num_accepted_tokens": int(self.num_accepted_tokens),
            "num_emitted_tokens": int(self.num_emitted_tokens),
            "num_accepted_tokens_per_depth": self.num_accepted_tokens_per_depth.tolist(),
            "num_draft_tokens_per_depth": self.num_draft_tokens_per_depth.tolist(),
            "mean_accepted_length": self.mean_accepted_length,
            "acceptance_rate": self.acceptance_rate,
        }


# ------------------------------------------------------------------------ random draws
class _Draws(Protocol):
    """Where the rules get their random decisions; ``rows`` are request indices (unique).

    Every random decision of every rule goes through one of these two calls, so a test
    can replace the source with one that enumerates all outcomes with their probabilities.
    """

    def categorical(self, rows: Tensor, probs: Tensor) -> Tensor:
        """(A,) int64 index drawn from each row of ``probs`` (A, V) (non-negative, any scale)."""
        ...

    def bernoulli(self, rows: Tensor, prob: Tensor) -> Tensor:
        """(A,) bool, True with probability ``prob`` (A,) float64 in [0, 1]."""
        ...


class _UniformDraws:
    """Decisions from a fixed (R, S) table of uniforms; request r reads row r in order."""

    def __init__(self, uniforms: Tensor) -> None:
        self.uniforms = uniforms  # [R, S] float64 in [0, 1)
        self.used = torch.zeros(uniforms.shape[0], dtype=torch.int64, device=uniforms.device)

    def _next(self, rows: Tensor) -> Tensor:
        u = self.uniforms[rows, self.used[rows]]  # [A]
        self.used[rows] += 1
        return u

    def categorical(self, rows: Tensor, probs: Tensor) -> Tensor:
        # inverse CDF accumulated in float64: a float32 cumsum over 10^5 tokens drifts by
        # ~1e-5, enough to misplace the whole mass of the rare tokens
        cdf = probs.cumsum(-1, dtype=torch.float64)  # [A, V]
        total = cdf[:, -1:].contiguous()
        y = torch.searchsorted(cdf, self._next(rows).unsqueeze(1) * total, right=True)
        # u * total can round up to total; the last token with nonzero mass is the cap
        last = torch.searchsorted(cdf, total, right=False)
        return torch.minimum(y, last).squeeze(1)

    def bernoulli(self, rows: Tensor, prob: Tensor) -> Tensor:
        return self._next(rows) < prob


# ------------------------------------------------------------------------- validation
def _check_param(
    value: Param, name: str, R: int, device: torch.device
) -> Tensor | float | int | None:
    """A scalar, or an (R,) tensor of per-request values moved to ``device``."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    if isinstance(value, Tensor):
        if value.dim() == 0:
            return value.item()
        if value.shape != (R,):
            raise ValueError(
                f"{name} must be a scalar or an (R,) = ({R},) tensor, got {tuple(value.shape)}"
            )
        return value.to(device)
    raise TypeError(f"{name} must be a number, an (R,) tensor or None, got {type(value).__name__}")


def _validate_sampling(temperature: Param, top_k: Param, top_p: Param) -> None:
    if temperature is None:
        raise ValueError("temperature must be a number >= 0 (0 means greedy), got None")
    t = torch.as_tensor(temperature, dtype=torch.float64)
    if bool((~(t >= 0)).any()):
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None:
        k = torch.as_tensor(top_k)
        if k.dtype.is_floating_point or k.dtype == torch.bool or bool((k < 0).any()):
            raise ValueError(
                f"top_k must be a non-negative integer (0 or None disables), got {top_k}"
            )
    if top_p is not None:
        p = torch.as_tensor(top_p, dtype=torch.float64)
        if bool((~((p > 0) & (p <= 1))).any()):
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")


def _validate_inputs(tree: TokenTree, target_logits: Tensor, draft_probs: Tensor | None) -> None:
    if not isinstance(tree, TokenTree):
        raise TypeError(f"tree must be an adaspec.tree.TokenTree, got {type(tree).__name__}")
    if not isinstance(target_logits, Tensor) or not target_logits.dtype.is_floating_point:
        raise TypeError("target_logits must be a floating torch.Tensor of shape (R, N, V)")
    R, N = tree.tokens.shape
    if target_logits.dim() != 3 or target_logits.shape[:2] != (R, N) or target_logits.shape[2] == 0:
        raise ValueError(
            f"target_logits must have shape (R, N, V) = ({R}, {N}, V) to match the tree, "
            f"got {tuple(target_logits.shape)}"
        )
    if target_logits.device != tree.device:
        raise ValueError(
            f"target_logits is on {target_logits.device} but the tree is on {tree.device}"
        )
    V = target_logits.shape[2]
    biggest = int(tree.tokens.masked_fill(~tree.valid, 0).max())
    if biggest >= V:
        raise ValueError(
            f"tree.tokens holds token id {biggest}, outside the vocabulary of "
            f"target_logits (V = {V})"
        )
    if draft_probs is None:
        return
    if not isinstance(draft_probs, Tensor) or not draft_probs.dtype.is_floating_point:
        raise TypeError("draft_probs must be a floating torch.Tensor of shape (R, N, V)")
    if draft_probs.shape != target_logits.shape:
        raise ValueError(
            f"draft_probs must have the shape of target_logits {tuple(target_logits.shape)}, "
            f"got {tuple(draft_probs.shape)}"
        )
    if draft_probs.device != tree.device:
        raise ValueError(f"draft_probs is on {draft_probs.device} but the tree is on {tree.device}")
    # every drawn child must be possible under its parent's draft distribution; this also
    # catches trees built by top-k (deterministic) that were passed with draft_probs
    parent = tree.parents.clamp(min=0)  # [R, N]
    child = tree.valid & (tree.parents >= 0)
    rows = torch.arange(R, device=tree.device).unsqueeze(1).expand(R, N)
    q_child = draft_probs[rows, parent, tree.tokens.masked_fill(~child, 0)]  # [R, N]
    bad = child & ~(q_child > 0)
    if bool(bad.any()):
        r, i = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"draft_probs gives child token {int(tree.tokens[r, i])} (node {i} of request {r}) "
            f"probability {float(q_child[r, i])} under its parent; with draft_probs every child "
            "must have been drawn from its parent's draft distribution"
        )


def _check_rows(
    x: Tensor, name: str, rows: Tensor, nodes: Tensor, top: Tensor | None = None
) -> None:
    """Raise if a gathered (A, V) row is NaN, holds +inf, or is -inf everywhere.

    ``top``: the rows' maxima if already computed (NaN propagates, +inf and all -inf show
    up as non-finite)."""
    if top is None:
        top = x.amax(-1)  # [A]
    bad = ~torch.isfinite(top)
    if bool(bad.any()):
        a = int(bad.nonzero()[0])
        raise ValueError(
            f"{name}: the row of node {int(nodes[a])} of request {int(rows[a])} is NaN, holds +inf "
            "or is -inf everywhere (no token can be chosen)"
        )


# ------------------------------------------------------------------------------ rules
class _Target:
    """Reads target rows for (request, node) pairs, transformed only when read."""

    def __init__(self, logits: Tensor, temperature: Param, top_k: Param, top_p: Param) -> None:
        self.logits = logits
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p

    @staticmethod
    def _pick(value: Param, rows: Tensor) -> Param:
        return value[rows] if isinstance(value, Tensor) else value

    def argmax(self, rows: Tensor, nodes: Tensor) -> Tensor:
        x = self.logits[rows, nodes]  # [A, V]
        top, best = x.max(-1)  # one pass for the check and the choice
        _check_rows(x, "target_logits", rows, nodes, top)
        return best

    def probs(self, rows: Tensor, nodes: Tensor) -> Tensor:
        x = self.logits[rows, nodes]  # [A, V]
        _check_rows(x, "target_logits", rows, nodes)
        t, k, p = (self._pick(v, rows) for v in (self.temperature, self.top_k, self.top_p))
        return probs_from_logits(x, t, k, p)  # [A, V] float32


class _ChooseFn(Protocol):
    def __call__(self, rows: Tensor, nodes: Tensor) -> Tensor: ...


def _walk_trie(tree: TokenTree, choose: _ChooseFn) -> tuple[Tensor, Tensor]:
    """Greedy and deterministic-children rule: one choice per depth, descend if a child has it.

    ``choose(rows, nodes)`` gives the (A,) next token (argmax, or a draw from the target)
    after each node. Returns (last accepted node (R,), bonus token (R,)).
    """
    R, N = tree.tokens.shape
    dev = tree.device
    real_child = tree.valid & (tree.parents >= 0)  # [R, N]
    parent = tree.parents.clamp(min=0)
    # [R, N] the nodes whose path equals the accepted path so far (duplicates included)
    frontier = torch.zeros(R, N, dtype=torch.bool, device=dev)
    frontier[:, 0] = True
    last = torch.zeros(R, dtype=torch.int64, device=dev)
    bonus = torch.full((R,), -1, dtype=torch.int64, device=dev)
    rows = torch.arange(R, device=dev)
    # a path grows by one node per pass; the bound only guards against malformed trees
    for _ in range(int(tree.depth.max()) + 1):
        if rows.numel() == 0:
            break
        f = frontier[rows]  # [A, N]
        rep = f.to(torch.uint8).argmax(1)  # [A] lowest-indexed node of the set
        y = choose(rows, rep)  # [A]
        nxt = f.gather(1, parent[rows]) & real_child[rows] & (tree.tokens[rows] == y.unsqueeze(1))
        hit = nxt.any(1)  # [A]
        stop = rows[~hit]
        bonus[stop] = y[~hit]
        last[stop] = rep[~hit]
        rows, nxt = rows[hit], nxt[hit]
        frontier[rows] = nxt
    return last, bonus


def _children_table(tree: TokenTree) -> tuple[Tensor, Tensor]:
    """Children of each node in index (draw) order.

    Returns (R, N + 1, K) int64 node indices, -1 padded, and (R, N + 1) int64 counts (the
    extra column collects non-children and is zeroed).
    """
    R, N = tree.tokens.shape
    dev = tree.device
    real_child = tree.valid & (tree.parents >= 0)
    key = torch.where(real_child, tree.parents, N)  # [R, N]; non-children grouped under N
    order = key.argsort(dim=1, stable=True)  # children grouped by parent, index order kept
    sorted_key = key.gather(1, order)
    counts = torch.zeros(R, N + 1, dtype=torch.int64, device=dev).scatter_add_(
        1, key, torch.ones_like(key)
    )
    start = counts.cumsum(1) - counts  # [R, N + 1] first slot of each parent's group
    rank = torch.arange(N, device=dev) - start.gather(1, sorted_key)  # [R, N]
    counts[:, N] = 0
    K = max(int(counts.max()), 1)
    table = torch.full((R, N + 1, K), -1, dtype=torch.int64, device=dev)
    rows = torch.arange(R, device=dev).unsqueeze(1).expand(R, N)
    is_child = sorted_key < N
    table[rows[is_child], sorted_key[is_child], rank[is_child]] = order[is_child]
    return table, counts


def _walk_draft(
    tree: TokenTree, target: _Target, draft_probs: Tensor, draws: _Draws
) -> tuple[Tensor, Tensor]:
    """Recursive rejection sampling for children drawn from the draft without replacement."""
    R, _ = tree.tokens.shape
    dev = tree.device
    children, counts = _children_table(tree)  # [R, N + 1, K], [R, N + 1]
    work = torch.promote_types(torch.float32, draft_probs.dtype)
    cur = torch.zeros(R, dtype=torch.int64, device=dev)
    bonus = torch.full((R,), -1, dtype=torch.int64, device=dev)
    last = torch.zeros(R, dtype=torch.int64, device=dev)
    rows = torch.arange(R, device=dev)
    for _ in range(int(tree.depth.max()) + 1):
        if rows.numel() == 0:
            break
        A = rows.numel()
        node = cur[rows]  # [A]
        # residuals in the draft's precision (at least float32): float64 draft_probs make
        # the rule exact to rounding of float64, which the enumeration tests rely on
        p = target.probs(rows, node).to(work)  # [A, V]
        p = p / p.sum(-1, keepdim=True)
        q = draft_probs[rows, node].to(work)  # [A, V]
        # leaves' rows are never used (a caller may leave them empty or NaN)
        parents_now = counts[rows, node] > 0  # [A]
        q = torch.where(parents_now.unsqueeze(1), q, 0.0)
        if bool((~torch.isfinite(q) | (q < 0)).any()):
            raise ValueError(
                "draft_probs must be finite and non-negative in the rows of nodes with children"
            )
        qsum = q.sum(-1, keepdim=True)
        q = torch.where(qsum > 0, q / qsum, q)
        nxt = torch.full((A,), -1, dtype=torch.int64, device=dev)
        searching = torch.ones(A, dtype=torch.bool, device=dev)
        a_idx = torch.arange(A, device=dev)
        for k in range(int(counts[rows, node].max())):
            child = children[rows, node, k]  # [A]
            x = tree.tokens[rows, child.clamp(min=0)]  # [A]
            qx = q[a_idx, x]
            # q(x) = 0 here means x was drawn (and rejected) before: a repeated sibling
            test = (searching & (child >= 0) & (qx > 0)).nonzero().squeeze(1)
            if test.numel() == 0:
                continue
            xt = x[test]
            ratio = (p[test, xt] / qx[test]).clamp(max=1.0).double()
            ok = draws.bernoulli(rows[test], ratio)
            acc = test[ok]
            nxt[acc] = child[acc]
            searching[acc] = False
            rej, xr = test[~ok], xt[~ok]
            if rej.numel() == 0:
                continue
            pr, qr = p[rej], q[rej]  # [B, V] copies
            resid = (pr - qr).clamp(min=0)
            mass = resid.sum(-1, keepdim=True)
            # mass > 0 whenever a rejection has nonzero probability; the guard only keeps
            # rounding from producing NaN
            p[rej] = torch.where(mass > 0, resid / mass, pr)
            qr[torch.arange(rej.numel(), device=dev), xr] = 0.0
            qm = qr.sum(-1, keepdim=True)
            q[rej] = torch.where(qm > 0, qr / qm, qr)
        stop = nxt < 0
        if bool(stop.any()):
            bonus[rows[stop]] = draws.categorical(rows[stop], p[stop])
            last[rows[stop]] = node[stop]
        cur[rows[~stop]] = nxt[~stop]
        rows = rows[~stop]
    return last, bonus


def _result(tree: TokenTree, last: Tensor, bonus: Tensor) -> VerifyResult:
    R = tree.num_requests
    D = int(tree.depth.masked_fill(~tree.valid, 0).max())
    path = path_to(tree, last)[:, 1:]  # [R, depth of the deepest last node]
    accepted = torch.full((R, D), -1, dtype=torch.int64, device=tree.device)
    accepted[:, : path.shape[1]] = path
    num_accepted = (accepted >= 0).sum(1)
    emitted = torch.full((R, D + 1), -1, dtype=torch.int64, device=tree.device)
    emitted[:, :D] = torch.where(accepted >= 0, tree.tokens.gather(1, accepted.clamp(min=0)), -1)
    emitted.scatter_(1, num_accepted.unsqueeze(1), bonus.unsqueeze(1))
    return VerifyResult(
        accepted=accepted,
        num_accepted=num_accepted,
        bonus=bonus,
        emitted=emitted,
        last_node=last,
        num_draft_tokens=tree.num_nodes - 1,
    )


def _verify(
    tree: TokenTree,
    target_logits: Tensor,
    temperature: Param,
    top_k: Param,
    top_p: Param,
    draft_probs: Tensor | None,
    draws: _Draws | None,
    generator: torch.Generator | None,
    uniforms: Tensor | None,
) -> VerifyResult:
    """:func:`verify` with an optional replacement for the source of random decisions."""
    _validate_inputs(tree, target_logits, draft_probs)
    _validate_sampling(temperature, top_k, top_p)
    R, N = tree.tokens.shape
    dev = tree.device
    temp = _check_param(temperature, "temperature", R, dev)
    target = _Target(
        target_logits,
        temp,
        _check_param(top_k, "top_k", R, dev),
        _check_param(top_p, "top_p", R, dev),
    )
    greedy = temp == 0 if not isinstance(temp, Tensor) else bool((temp == 0).all())
    if greedy:
        last, bonus = _walk_trie(tree, target.argmax)
        return _result(tree, last, bonus)
    if draws is None:
        if uniforms is None:
            uniforms = torch.rand(R, N, generator=generator, dtype=torch.float64, device=dev)
        elif generator is not None:
            raise ValueError("pass either generator or uniforms, not both")
        else:
            if not isinstance(uniforms, Tensor):
                raise TypeError(f"uniforms must be a torch.Tensor, got {type(uniforms).__name__}")
            if uniforms.shape != (R, N):
                raise ValueError(
                    f"uniforms must have shape (R, N) = ({R}, {N}), got {tuple(uniforms.shape)}"
                )
            uniforms = uniforms.to(device=dev, dtype=torch.float64)
            if bool((~((uniforms >= 0) & (uniforms < 1))).any()):
                raise ValueError("uniforms must lie in [0, 1)")
        draws = _UniformDraws(uniforms)
    if draft_probs is None:
        src = draws

        def sample(rows: Tensor, nodes: Tensor) -> Tensor:
            return src.categorical(rows, target.probs(rows, nodes))

        last, bonus = _walk_trie(tree, sample)
    else:
        last, bonus = _walk_draft(tree, target, draft_probs, draws)
    return _result(tree, last, bonus)


def verify(
    tree: TokenTree,
    target_logits: Tensor,
    *,
    temperature: Param = 0.0,
    top_k: Param = None,
    top_p: Param = None,
    generator: torch.Generator | None = None,
    draft_probs: Tensor | None = None,
    uniforms: Tensor | None = None,
) -> VerifyResult:
    """Verify R token trees against the target's logits; lossless for every rule.

    Parameters
    ----------
    tree : TokenTree
        The selected trees, R rows of N nodes (padding allowed).
    target_logits : Tensor
        (R, N, V) float32 / bfloat16 / float16: row i holds the target's logits for the
        token *after* node i's path. Only the rows verification reads are checked and
        transformed (padding rows are never read).
    temperature, top_k, top_p : float | int | Tensor | None
        The sampling settings, as in :func:`adaspec.acceptance.process_logits` (the same
        transform the drafts use): scalars or (R,) per-request tensors. ``temperature=0``
        (everywhere) verifies greedily; per-request zeros inside a tensor are greedy too.
    generator : torch.Generator, optional
        Source of the uniforms when sampling; the same seed gives the same result.
    draft_probs : Tensor, optional
        (R, N, V) float: row i is the draft distribution the children of node i were drawn
        from, *without replacement*, in node-index order. Selects the recursive rejection
        rule; leave it None for beam / top-k trees (deterministic children).
    uniforms : Tensor, optional
        (R, N) float in [0, 1) to replay instead of drawing from ``generator``; request r
        uses row r only, so a batch gives each request its single-request result.

    Returns
    -------
    VerifyResult
        ``accepted`` (R, D), ``num_accepted`` (R,), ``bonus`` (R,), ``emitted`` (R, D + 1),
        ``last_node`` (R,), ``num_draft_tokens`` (R,); D is the tree batch's largest depth.

    Raises
    ------
    ValueError
        Shapes that do not match the tree, token ids outside the vocabulary, a row that is
        NaN / +inf / all -inf, temperature < 0, top_k < 0, top_p outside (0, 1], children
        impossible under ``draft_probs``, or bad ``uniforms``.

    Example
    -------
    >>> import torch
    >>> from adaspec.tree import TokenTree
    >>> from adaspec.verify import verify
    >>> tree = TokenTree([2, 1, 2, 0], [-1, 0, 0, 1], [0.0, -0.1, -0.2, -0.3])
    >>> logits = torch.full((1, 4, 3), -5.0)
    >>> logits[0, 0, 1] = logits[0, 1, 0] = logits[0, 3, 2] = 5.0  # argmax path 1, 0, then 2
    >>> r = verify(tree, logits)
    >>> r.accepted.tolist(), r.emitted.tolist()
    ([[1, 3]], [[1, 0, 2]])
    >>> g = torch.Generator().manual_seed(0)
    >>> verify(tree, logits, temperature=1.0, generator=g).num_accepted.shape
    torch.Size([1])
    """
    return _verify(
        tree, target_logits, temperature, top_k, top_p, draft_probs, None, generator, uniforms
    )


def verify_greedy(tree: TokenTree, target_argmax: Tensor) -> VerifyResult:
    """Greedy verification from the target's chosen tokens: :func:`verify` at temperature 0
    for an engine that never materializes the logits.

    Parameters
    ----------
    tree : TokenTree
        The selected trees, R rows of N nodes (padding allowed).
    target_argmax : Tensor
        (R, N) integer: entry i is the argmax of the target's logits after node i's path
        (e.g. :func:`adaspec.models.tree_argmax`); -1 marks a row with no choice (a target
        output that was not finite), an error where verification reads it. Padding nodes'
        entries are never read.

    Returns
    -------
    VerifyResult
        As :func:`verify` with ``temperature=0`` on logits with these argmaxes.

    Example
    -------
    >>> import torch
    >>> from adaspec.tree import TokenTree
    >>> tree = TokenTree([2, 1, 2, 0], [-1, 0, 0, 1], [0.0, -0.1, -0.2, -0.3])
    >>> verify_greedy(tree, torch.tensor([[1, 0, 5, 2]])).emitted.tolist()
    [[1, 0, 2]]
    """
    if not isinstance(tree, TokenTree):
        raise TypeError(f"tree must be an adaspec.tree.TokenTree, got {type(tree).__name__}")
    if not isinstance(target_argmax, Tensor) or target_argmax.dtype.is_floating_point:
        raise TypeError("target_argmax must be an integer torch.Tensor of shape (R, N)")
    R, N = tree.tokens.shape
    if target_argmax.shape != (R, N):
        raise ValueError(
            f"target_argmax must have shape (R, N) = ({R}, {N}) to match the tree, "
            f"got {tuple(target_argmax.shape)}"
        )
    if target_argmax.device != tree.device:
        raise ValueError(
            f"target_argmax is on {target_argmax.device} but the tree is on {tree.device}"
        )
    chosen = target_argmax.to(torch.int64)

    def choose(rows: Tensor, nodes: Tensor) -> Tensor:
        y = chosen[rows, nodes]  # [A]
        bad = y < 0
        if bool(bad.any()):
            a = int(bad.nonzero()[0])
            raise ValueError(
                f"target_argmax: node {int(nodes[a])} of request {int(rows[a])} has no choice "
                f"({int(y[a])}): the target's output there was not finite"
            )
        return y

    last, bonus = _walk_trie(tree, choose)
    return _result(tree, last, bonus)


def sample_children(
    draft_probs: Tensor, num_children: int, *, generator: torch.Generator | None = None
) -> Tensor:
    """Draw ``num_children`` distinct tokens per row without replacement, in draw order.

    The k-th token is distributed as ``draft_probs`` with the first k - 1 removed and
    renormalised: the process the draft rule of :func:`verify` assumes. Implemented as
    the top-k of ``q / E`` with E ~ Exp(1) i.i.d. (exponential races), one pass per row.

    Parameters
    ----------
    draft_probs : Tensor
        (..., V) non-negative float probabilities (any scale per row).
    num_children : int
        k >= 0 tokens per row.

    Returns
    -------
    Tensor
        (..., k) int64 token ids in draw order; -1 where a row has fewer than k tokens of
        nonzero probability.
    """
    if isinstance(num_children, bool) or not isinstance(num_children, int) or num_children < 0:
        raise ValueError(f"num_children must be an int >= 0, got {num_children!r}")
    if (
        not isinstance(draft_probs, Tensor)
        or not draft_probs.dtype.is_floating_point
        or draft_probs.dim() < 1
    ):
        raise TypeError("draft_probs must be a floating torch.Tensor of shape (..., V)")
    V = draft_probs.shape[-1]
    if num_children > V:
        raise ValueError(f"num_children must be <= V = {V}, got {num_children}")
    q = draft_probs.double()
    if bool((~(q >= 0) | torch.isinf(q)).any()):
        raise ValueError("draft_probs must be finite and non-negative")
    u = torch.rand(q.shape, generator=generator, dtype=torch.float64, device=q.device)
    # [..., V]; zero-probability tokens get key 0 and never win
    race = torch.where(q > 0, q / -torch.log1p(-u), 0.0)
    keys, tokens = race.topk(num_children, dim=-1)
    return tokens.masked_fill(keys <= 0, -1)

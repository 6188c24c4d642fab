"""The token-tree format and the optimal tree under a node budget.

A batch of token trees is a handful of dense tensors with one row per request and
nodes in topological order (every parent before its children). Node 0 of a row is
its **root**: the request's last committed token, depth 0, path probability 1.

=============  ======  =======  ====================================================
field          shape   dtype    meaning
=============  ======  =======  ====================================================
``tokens``     (R, N)  int64    token id of each node (0 for padding)
``parents``    (R, N)  int64    index of the parent node; -1 for the root and padding
``logp``       (R, N)  float32  log f(v), the estimated log-probability that the
                                target accepts the whole path root -> v; 0 for the
                                root, -inf for padding
``depth``      (R, N)  int64    edges from the root; 0 for the root and padding
``num_nodes``  (R,)    int64    real nodes per row; nodes ``num_nodes[r]:`` are padding
=============  ======  =======  ====================================================

Everything here is tensors in, tensors out, and imports nothing else of adaspec.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "SubTree",
    "TokenTree",
    "ancestor_mask",
    "build_optimal",
    "expected_accepted",
    "float_order_key",
    "is_leaf",
    "path_to",
    "position_ids",
    "strict_order",
    "subtree",
]

_TensorLike = (
    Tensor | Sequence[int] | Sequence[float] | Sequence[Sequence[int]] | Sequence[Sequence[float]]
)


def _as_2d(value: _TensorLike, name: str, dtype: torch.dtype) -> Tensor:
    """Turn a (N,) or (R, N) tensor or (nested) list into an (R, N) tensor of ``dtype``."""
    if isinstance(value, Tensor):
        t = value
        if t.dtype != dtype:
            if dtype == torch.int64 and t.dtype.is_floating_point:
                raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
            if dtype.is_floating_point and t.dtype == torch.bool:
                raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
            t = t.to(dtype)
    elif isinstance(value, (list, tuple)):
        try:
            t = torch.tensor(value, dtype=dtype)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{name} could not be read as a {dtype} tensor: {e}") from None
    else:
        raise TypeError(f"{name} must be a torch.Tensor or a list, got {type(value).__name__}")
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise ValueError(f"{name} must have shape (N,) or (R, N), got {tuple(t.shape)}")
    return t


def _depth_from_parents(parents: Tensor) -> Tensor:
    """Depth of every node by pointer doubling: O(log N) gathers, no loop over nodes."""
    jump = parents.clone()  # [R, N] ancestor reached by the current jump, -1 past the root
    dist = (parents >= 0).to(torch.int64)  # [R, N] edges covered by that jump
    while bool((jump >= 0).any()):
        safe = jump.clamp(min=0)
        live = jump >= 0
        dist = torch.where(live, dist + dist.gather(1, safe), dist)
        jump = torch.where(live, jump.gather(1, safe), jump)
    return dist


@dataclass(frozen=True, init=False, eq=False)
class TokenTree:
    """A batch of R token trees of at most N nodes each (see the module docstring).

    Construct from batched tensors, ``TokenTree(tokens=t, parents=p, logp=lp)``, or
    from Python lists for a single tree, ``TokenTree([5, 7, 9], [-1, 0, 0], [0.0, -0.1,
    -2.3])``. One-dimensional inputs make a batch of one (R = 1). ``depth`` and
    ``num_nodes`` are derived when not given and checked when given. Use
    :meth:`stack` to pad single trees into a batch.

    Every constructor validates (``validate=False`` skips it for trusted hot paths) and
    raises ``ValueError`` naming the field and the offending row/node for: shape or
    dtype mismatches; R = 0 or N = 0; a parent index not smaller than the node's own
    index or out of range; a non-root node with parent -1 before the padding; a root
    with a parent; NaN or positive ``logp``; a root with ``logp`` != 0; padding whose
    ``logp`` is not -inf; a child whose ``logp`` exceeds its parent's.

    Real nodes may carry ``logp = -inf`` (f = 0): they are valid but never useful.
    """

    tokens: Tensor
    parents: Tensor
    logp: Tensor
    depth: Tensor
    num_nodes: Tensor

    def __init__(
        self,
        tokens: _TensorLike,
        parents: _TensorLike,
        logp: _TensorLike,
        depth: _TensorLike | None = None,
        num_nodes: Tensor | Sequence[int] | None = None,
        *,
        validate: bool = True,
    ) -> None:
        tok = _as_2d(tokens, "tokens", torch.int64)
        par = _as_2d(parents, "parents", torch.int64).to(tok.device)
        lp = _as_2d(logp, "logp", torch.float32).to(tok.device)
        for name, t in (("parents", par), ("logp", lp)):
            if t.shape != tok.shape:
                raise ValueError(
                    f"{name} must have the shape of tokens {tuple(tok.shape)}, got {tuple(t.shape)}"
                )
        R, N = tok.shape
        if R == 0 or N == 0:
            raise ValueError(
                f"a TokenTree needs at least one row and one node, got shape (R={R}, N={N})"
            )
        has_parent = par >= 0
        has_parent[:, 0] = True
        # [R, N] the root and the unbroken run of nodes with a parent after it; the rest is padding
        real = has_parent.to(torch.int64).cumprod(1).bool()
        derived_num = real.sum(1)
        if num_nodes is None:
            num = derived_num
        else:
            num = torch.as_tensor(num_nodes, dtype=torch.int64, device=tok.device).reshape(-1)
            if validate and not torch.equal(num, derived_num):
                raise ValueError(
                    f"num_nodes {num.tolist()} disagrees with the parents, which give {derived_num.tolist()}"
                )
        if validate:
            _validate(tok, par, lp, num)
        if depth is None:
            dep = _depth_from_parents(par)
        else:
            dep = _as_2d(depth, "depth", torch.int64).to(tok.device)
            if validate:
                if dep.shape != tok.shape:
                    raise ValueError(
                        f"depth must have the shape of tokens {tuple(tok.shape)}, got {tuple(dep.shape)}"
                    )
                if not torch.equal(dep, _depth_from_parents(par)):
                    raise ValueError("depth disagrees with the depths implied by parents")
        object.__setattr__(self, "tokens", tok)
        object.__setattr__(self, "parents", par)
        object.__setattr__(self, "logp", lp)
        object.__setattr__(self, "depth", dep)
        object.__setattr__(self, "num_nodes", num)

    # ----------------------------------------------------------------- views
    @property
    def num_requests(self) -> int:
        """R, the number of rows (requests)."""
        return int(self.tokens.shape[0])

    @property
    def max_nodes(self) -> int:
        """N, the padded number of nodes per row."""
        return int(self.tokens.shape[1])

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    @property
    def valid(self) -> Tensor:
        """(R, N) bool: True for real nodes, False for padding."""
        return torch.arange(self.max_nodes, device=self.device) < self.num_nodes.unsqueeze(1)

    def to(self, device: torch.device | str) -> TokenTree:
        """The same tree on another device."""
        return TokenTree(
            self.tokens.to(device),
            self.parents.to(device),
            self.logp.to(device),
            self.depth.to(device),
            self.num_nodes.to(device),
            validate=False,
        )

    def __getitem__(self, r: int) -> TokenTree:
        """Row ``r`` as a single tree (R = 1), trimmed to its real nodes."""
        if not -self.num_requests <= r < self.num_requests:
            raise IndexError(f"row {r} out of range for {self.num_requests} requests")
        r = r % self.num_requests
        n = int(self.num_nodes[r])
        return TokenTree(
            self.tokens[r : r + 1, :n],
            self.parents[r : r + 1, :n],
            self.logp[r : r + 1, :n],
            self.depth[r : r + 1, :n],
            self.num_nodes[r : r + 1],
            validate=False,
        )

    def __len__(self) -> int:
        return self.num_requests

    def __repr__(self) -> str:
        return (
            f"TokenTree(R={self.num_requests}, N={self.max_nodes}, "
            f"num_nodes={self.num_nodes.tolist()}, device={self.device})"
        )

    @staticmethod
    def stack(trees: Sequence[TokenTree]) -> TokenTree:
        """Concatenate the rows of several trees into one batch, padding to the largest N.

        Padding nodes get token 0, parent -1, logp -inf and depth 0.
        """
        if len(trees) == 0:
            raise ValueError("stack needs at least one tree, got an empty sequence")
        for i, t in enumerate(trees):
            if not isinstance(t, TokenTree):
                raise TypeError(f"trees[{i}] must be a TokenTree, got {type(t).__name__}")
        n = max(t.max_nodes for t in trees)

        def pad(field: str, value: float) -> Tensor:
            return torch.cat(
                [
                    torch.nn.functional.pad(getattr(t, field), (0, n - t.max_nodes), value=value)
                    for t in trees
                ]
            )

        return TokenTree(
            pad("tokens", 0),
            pad("parents", -1),
            pad("logp", float("-inf")),
            pad("depth", 0),
            torch.cat([t.num_nodes for t in trees]),
            validate=False,
        )


def _first_bad(bad: Tensor) -> tuple[int, int]:
    idx = bad.nonzero()[0]
    return int(idx[0]), int(idx[1])


def _validate(tok: Tensor, par: Tensor, lp: Tensor, num: Tensor) -> None:
    _R, N = tok.shape
    if (num < 1).any() or (num > N).any():
        raise ValueError(f"num_nodes must lie in [1, {N}], got {num.tolist()}")
    node = torch.arange(N, device=tok.device).unsqueeze(0)  # [1, N]
    real = node < num.unsqueeze(1)  # [R, N]
    if bool((tok[real] < 0).any()):
        r, i = _first_bad(real & (tok < 0))
        raise ValueError(f"tokens must be >= 0, got {int(tok[r, i])} at row {r}, node {i}")
    if bool((par[:, 0] != -1).any()):
        r = int((par[:, 0] != -1).nonzero()[0])
        raise ValueError(f"the root (node 0) must have parent -1, row {r} has {int(par[r, 0])}")
    nonroot = real & (node > 0)
    bad = nonroot & ((par >= node) | (par < 0))
    if bool(bad.any()):
        r, i = _first_bad(bad)
        if int(par[r, i]) < 0:
            raise ValueError(f"parents: non-root node {i} of row {r} has parent {int(par[r, i])}")
        raise ValueError(
            f"parents: node {i} of row {r} has parent {int(par[r, i])}; a parent index must be "
            "smaller than the node's own index (topological order)"
        )
    pad = ~real
    if bool((pad & (par != -1)).any()):
        r, i = _first_bad(pad & (par != -1))
        k = int(num[r])
        raise ValueError(
            f"parents: non-root node {k} of row {r} has parent -1, yet node {i} after it has a "
            "parent; padding (parent -1) must come after all real nodes"
        )
    if bool(torch.isnan(lp).any()):
        r, i = _first_bad(torch.isnan(lp))
        raise ValueError(f"logp is NaN at row {r}, node {i}")
    if bool((lp > 0).any()):
        r, i = _first_bad(lp > 0)
        raise ValueError(
            f"logp must be <= 0 (a log-probability), got {float(lp[r, i])} at row {r}, node {i}"
        )
    if bool((lp[:, 0] != 0).any()):
        r = int((lp[:, 0] != 0).nonzero()[0])
        raise ValueError(f"logp of the root must be 0 (f = 1), row {r} has {float(lp[r, 0])}")
    if bool((pad & (lp != float("-inf"))).any()):
        r, i = _first_bad(pad & (lp != float("-inf")))
        raise ValueError(f"logp of padding node {i} of row {r} must be -inf")
    parent_lp = lp.gather(1, par.clamp(min=0))
    bad = nonroot & (lp > parent_lp)
    if bool(bad.any()):
        r, i = _first_bad(bad)
        raise ValueError(
            f"logp: node {i} of row {r} has logp {float(lp[r, i])} larger than its parent's "
            f"{float(parent_lp[r, i])}; a path cannot gain probability"
        )


# ------------------------------------------------------------------- derived views
def ancestor_mask(tree: TokenTree) -> Tensor:
    """(R, N, N) bool: ``mask[r, i, j]`` is True iff node j is node i or one of its ancestors.

    Row i is what node i may attend to inside the tree. Padding nodes see only themselves,
    so no row is empty. Cost: one scatter per tree level.
    """
    R, N = tree.tokens.shape
    mask = torch.zeros(R, N, N, dtype=torch.bool, device=tree.device)
    rows = torch.arange(R, device=tree.device).unsqueeze(1).expand(R, N)
    nodes = torch.arange(N, device=tree.device).unsqueeze(0).expand(R, N)
    cur = nodes.clone()  # [R, N] the ancestor of every node reached so far
    live = torch.ones(R, N, dtype=torch.bool, device=tree.device)
    while bool(live.any()):
        mask[rows[live], nodes[live], cur[live]] = True
        cur = torch.where(live, tree.parents.gather(1, cur.clamp(min=0)), cur)
        live = live & (cur >= 0)
    return mask


def position_ids(tree: TokenTree, cache_lens: Tensor | int) -> Tensor:
    """(R, N) int64 position of every node: the request's cached prefix length plus depth.

    ``cache_lens`` is an int or an (R,) integer tensor: tokens already in each request's
    KV cache (the root, not yet cached, sits at position ``cache_lens``).
    """
    lens = torch.as_tensor(cache_lens, dtype=torch.int64, device=tree.device)
    if lens.dim() == 0:
        lens = lens.expand(tree.num_requests)
    if lens.shape != (tree.num_requests,):
        raise ValueError(
            f"cache_lens must be an int or shape ({tree.num_requests},), got {tuple(lens.shape)}"
        )
    if bool((lens < 0).any()):
        raise ValueError(f"cache_lens must be >= 0, got {lens.tolist()}")
    return lens.unsqueeze(1) + tree.depth


def expected_accepted(tree: TokenTree) -> Tensor:
    """(R,) float32: Σ f(v) over the real nodes of each row, the root counted as 1.

    This is the expected number of *emitted* tokens of one verification (accepted + bonus)
    when the f are calibrated acceptance probabilities.
    """
    return tree.logp.exp().sum(1)


def is_leaf(tree: TokenTree) -> Tensor:
    """(R, N) bool: real nodes that are no node's parent."""
    R, N = tree.tokens.shape
    has_child = torch.zeros(R, N + 1, dtype=torch.bool, device=tree.device)
    # parent -1 (root, padding) is sent to the spare column N
    has_child.scatter_(1, torch.where(tree.parents >= 0, tree.parents, N), True)
    return tree.valid & ~has_child[:, :N]


def path_to(tree: TokenTree, nodes: Tensor) -> Tensor:
    """(R, D + 1) int64 node indices of the path root -> ``nodes[r]``, in path order.

    ``nodes`` is an (R,) int64 tensor of node indices; D is the largest of their depths.
    Shorter paths are padded with -1 on the right.
    """
    nodes = torch.as_tensor(nodes, dtype=torch.int64, device=tree.device)
    if nodes.shape != (tree.num_requests,):
        raise ValueError(f"nodes must have shape ({tree.num_requests},), got {tuple(nodes.shape)}")
    if bool(((nodes < 0) | (nodes >= tree.num_nodes)).any()):
        raise ValueError(
            f"nodes must index real nodes, got {nodes.tolist()} for num_nodes {tree.num_nodes.tolist()}"
        )
    depth = tree.depth.gather(1, nodes.unsqueeze(1)).squeeze(1)  # [R]
    width = int(depth.max()) + 1
    out = torch.full((tree.num_requests, width), -1, dtype=torch.int64, device=tree.device)
    cur = nodes.clone()
    col = depth.clone()
    rows = torch.arange(tree.num_requests, device=tree.device)
    for _ in range(width):
        live = col >= 0
        out[rows[live], col[live]] = cur[live]
        cur = torch.where(
            live, tree.parents.gather(1, cur.clamp(min=0).unsqueeze(1)).squeeze(1), cur
        )
        col = col - 1
    return out


# ------------------------------------------------------------------- optimal trees
def strict_order(tree: TokenTree) -> Tensor:
    """(R, N) int64 permutation of each row's nodes, best first, padding last.

    The order is strict and total: larger ``logp`` first, then smaller depth, then smaller
    index. A child never precedes its parent (its logp is not larger, and on a tie its depth
    is), so every prefix of the order is closed under ancestors.
    """
    N = tree.max_nodes
    if N >= (1 << 16) - 1:  # padding's depth key N + 1 must fit in 16 bits
        raise ValueError(f"strict_order supports up to 65534 nodes per tree, got N = {N}")
    # padding sorts after every real node, including real nodes with logp = -inf
    depth = torch.where(tree.valid, tree.depth, N + 1)
    node = torch.arange(N, device=tree.device)
    # One unique int64 key per node, so a single (unstable) sort gives the strict order:
    # the order-preserving integer image of -logp in the high 32 bits, depth and index below.
    key = (float_order_key(-tree.logp) << 32) | (depth << 16) | node
    return key.argsort(dim=1)


def float_order_key(x: Tensor) -> Tensor:
    """int64 tensor ordered exactly like the float32 tensor ``x`` (no NaN; -0.0 counts as 0.0).

    Flips the magnitude bits of negative floats, so that comparing the results as signed
    integers compares the floats.
    """
    bits = (x.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)


class SubTree(NamedTuple):
    """A subtree and where its nodes came from.

    ``tree``: the subtree, nodes in the original topological order, parents reindexed.
    ``kept``: (R, M) int64, the original index of each kept node (-1 for padding), so an
    engine can gather its own per-node data (hidden states, KV slots) with it.
    """

    tree: TokenTree
    kept: Tensor


def subtree(tree: TokenTree, keep: Tensor) -> SubTree:
    """Keep the nodes where ``keep`` (R, N) bool is True; order kept, parents reindexed.

    ``keep`` must be closed under ancestors and keep every root (``ValueError`` otherwise);
    padding entries of ``keep`` are ignored. The result has M = max kept count columns.
    """
    if keep.shape != tree.tokens.shape or keep.dtype != torch.bool:
        raise ValueError(
            f"keep must be a bool tensor of shape {tuple(tree.tokens.shape)}, "
            f"got {keep.dtype} {tuple(keep.shape)}"
        )
    keep = keep & tree.valid
    if not bool(keep[:, 0].all()):
        raise ValueError("keep must keep the root (node 0) of every row")
    parent_kept = keep.gather(1, tree.parents.clamp(min=0)) | (tree.parents < 0)
    if bool((keep & ~parent_kept).any()):
        r, i = _first_bad(keep & ~parent_kept)
        raise ValueError(
            f"keep is not closed under ancestors: row {r} keeps node {i} but not its parent"
        )
    count = keep.sum(1)  # [R]
    M = int(count.max())
    R, N = keep.shape
    new_index = keep.to(torch.int64).cumsum(1) - 1  # [R, N] new position of each kept node
    # scatter every kept node's index to its new position; dropped nodes go to a spare column
    kept = torch.full((R, M + 1), -1, dtype=torch.int64, device=tree.device)
    kept.scatter_(
        1, torch.where(keep, new_index, M), torch.arange(N, device=tree.device).expand(R, N)
    )
    kept = kept[:, :M]  # [R, M]
    pad = kept < 0
    src = kept.clamp(min=0)
    old_parent = tree.parents.gather(1, src)
    parents = torch.where(
        (old_parent >= 0) & ~pad, new_index.gather(1, old_parent.clamp(min=0)), -1
    )
    sub = TokenTree(
        tree.tokens.gather(1, src).masked_fill(pad, 0),
        parents,
        tree.logp.gather(1, src).masked_fill(pad, float("-inf")),
        tree.depth.gather(1, src).masked_fill(pad, 0),
        count,
        validate=False,
    )
    return SubTree(sub, kept)


def _check_budget(budget: int | Tensor, R: int, device: torch.device) -> Tensor:
    if isinstance(budget, bool) or not isinstance(budget, (int, Tensor)):
        raise TypeError(
            f"budget must be an int or an (R,) integer tensor, got {type(budget).__name__}"
        )
    b = torch.as_tensor(budget, device=device)
    if b.dtype.is_floating_point or b.dtype == torch.bool:
        raise TypeError(f"budget must be an integer, got dtype {b.dtype}")
    b = b.to(torch.int64)
    if b.dim() == 0:
        b = b.expand(R)
    if b.shape != (R,):
        raise ValueError(f"budget must be an int or shape ({R},), got {tuple(b.shape)}")
    if bool((b < 1).any()):
        raise ValueError(f"budget must be >= 1 (every tree keeps its root), got {b.tolist()}")
    return b


def build_optimal(candidates: TokenTree, budget: int | Tensor) -> SubTree:
    """The subtree of at most ``budget`` nodes that maximises Σ f, per request.

    Because f(child) <= f(parent), the ``budget`` best nodes in :func:`strict_order` form a
    tree, and no other tree of that many nodes has a larger Σ f. Real nodes with f = 0 count
    like any other (the result always has min(budget, num_nodes) nodes); trees from
    :class:`~adaspec.acceptance.TreeGrower` never hold them.

    Args:
        candidates: the candidate trees, R rows of N nodes.
        budget: an int >= 1, or an (R,) integer tensor of per-request budgets (root included).
            A budget >= ``num_nodes[r]`` keeps row r whole.

    Returns:
        :class:`SubTree` ``(tree, kept)``: the optimal trees with min(budget, num_nodes) real
        nodes each, in the candidates' topological order with parents reindexed, and
        ``kept`` (R, M) int64 the candidate index of each kept node (-1 padding).

    Example:
        >>> t = TokenTree([7, 3, 4, 9], [-1, 0, 0, 1], [0.0, -0.1, -1.5, -0.3])
        >>> build_optimal(t, 3).kept
        tensor([[0, 1, 3]])
    """
    b = _check_budget(budget, candidates.num_requests, candidates.device)
    order = strict_order(candidates)
    rank = torch.empty_like(order)
    rank.scatter_(
        1, order, torch.arange(candidates.max_nodes, device=candidates.device).expand_as(order)
    )
    return subtree(candidates, (rank < b.unsqueeze(1)) & candidates.valid)

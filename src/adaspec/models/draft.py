"""Growing candidate trees with a draft model and its own KV cache.

The draft keeps a :class:`~adaspec.models.KVState` just like the target. One draft step:

1. forward the backlog (accepted tokens of the last step the draft never forwarded) and
   the root, as one chain per request; the root's logits give depth 1;
2. for each further depth, forward only the frontier (the nodes added last) against the
   prefix and the tree grown so far, with ancestor-only visibility;
3. after the target verifies, :func:`commit_draft` keeps the root and the accepted path in
   the draft cache. The deepest level is never forwarded by the draft (its children are
   not needed), so an accepted node there goes to the backlog of the next step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from adaspec.acceptance import Param, TreeGrower
from adaspec.models.adapter import KVState, _check_state, _extend, _forward_block, commit
from adaspec.tree import TokenTree, ancestor_mask

__all__ = ["DraftTree", "commit_draft", "grow_draft_tree", "map_accepted"]


class DraftTree(NamedTuple):
    """A draft step's result.

    ``candidates``: the candidate trees (f = 0 nodes dropped), R rows.
    ``grown_index``: (R, M) int64 index of each candidate node among the grown nodes, which
    is its KV slot offset in the draft cache (-1 for padding).
    ``grown``: every grown node (the TreeGrower's tree), whose node i sits in slot
    ``lens + i`` of the draft cache when i < ``state.pending``.
    """

    candidates: TokenTree
    grown_index: Tensor
    grown: TokenTree


def map_accepted(accepted: Tensor, kept: Tensor) -> Tensor:
    """Map accepted node indices of a subtree to the indices of the tree it was taken from.

    ``accepted``: (R, A) int64, -1 padded; ``kept``: (R, M) int64 from a
    :class:`~adaspec.tree.SubTree` (``build_optimal(...).kept``, ``DraftTree.grown_index``).
    Returns (R, A) int64, -1 padded in the same places.
    """
    if accepted.dim() != 2 or kept.dim() != 2 or accepted.shape[0] != kept.shape[0]:
        raise ValueError(
            "accepted (R, A) and kept (R, M) must share R, got "
            f"{tuple(accepted.shape)} and {tuple(kept.shape)}"
        )
    if bool((accepted >= kept.shape[1]).any()):
        raise ValueError(f"accepted holds node indices >= {kept.shape[1]}, the size of kept")
    mapped = kept.gather(1, accepted.clamp(min=0))
    return torch.where(accepted >= 0, mapped, -1)


def grow_draft_tree(
    draft: nn.Module,
    state: KVState,
    root_tokens: Tensor,
    depth: int,
    width: int,
    *,
    temperature: Param = 0.0,
    top_k: Param = None,
    top_p: Param = None,
    min_gain: float = 0.0,
    stop: Callable[[TokenTree, Tensor], bool] | None = None,
) -> DraftTree:
    """Beam-expand candidate trees of up to ``depth`` levels and ``width`` nodes per level.

    Parameters
    ----------
    draft : transformers causal LM
        The draft model; ``state`` is its cache.
    state : KVState
        The draft's cache for R requests (after :func:`~adaspec.models.prefill`, or after
        :func:`commit_draft` of the previous step). Updated in place: afterwards the grown
        nodes of depth < ``depth`` are pending in it.
    root_tokens : Tensor
        (R,) int64 the root of each tree (the last committed token, not in the cache).
    depth, width : int
        Levels below the root (>= 0) and nodes kept per level (>= 1), see
        :func:`adaspec.acceptance.expand`.
    temperature, top_k, top_p :
        The sampling settings verification will use (greedy: 0); they shape f(v).
    min_gain : float
        Stop growing early when the next level cannot add this many expected accepted
        tokens over the batch: before each further draft forward, the sum over requests of
        the frontier nodes' f (the most a level can add) is compared with it. 0 (the
        default) always grows ``depth`` levels.
    stop : callable, optional
        ``stop(tree, frontier) -> bool``, asked before each further draft forward with the
        tree grown so far (a :class:`~adaspec.tree.TokenTree` of R rows, raw draft f) and
        the (R, F) node indices of its frontier; True ends the growth there. The engine's
        rule: stop when the level would lower the step's expected tokens per second.

    Returns
    -------
    DraftTree
        Costs at most ``max(depth, 1)`` draft forwards: the root (plus any backlog), then
        ``width`` tokens per request per further level (fewer levels when ``min_gain``
        stops the growth; ``grown.depth.max()`` tells how many).

    Example
    -------
    >>> from adaspec.models import prefill, tiny_model
    >>> draft = tiny_model(seed=1)
    >>> state, logits = prefill(draft, [[1, 2, 3], [4, 5]])
    >>> out = grow_draft_tree(draft, state, logits.argmax(-1), depth=3, width=2)
    >>> out.candidates.max_nodes
    7
    """
    _check_state(state)
    if root_tokens.dim() != 1 or root_tokens.shape[0] != state.num_requests:
        raise ValueError(
            f"root_tokens must have shape ({state.num_requests},), got {tuple(root_tokens.shape)}"
        )
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth must be an int >= 0, got {depth!r}")
    if not isinstance(min_gain, (int, float)) or not 0 <= min_gain < float("inf"):
        raise ValueError(f"min_gain must be a finite number >= 0, got {min_gain!r}")
    if stop is not None and not callable(stop):
        raise TypeError(f"stop must be a callable or None, got {type(stop).__name__}")
    dev = state.lens.device
    root_tokens = root_tokens.to(device=dev, dtype=torch.int64)
    grower = TreeGrower(root_tokens, width, temperature=temperature, top_k=top_k, top_p=top_p)

    # backlog + root as one right-padded chain per request  # [R, B + 1]
    backlog = state.backlog
    counts = (backlog >= 0).sum(1) + 1
    chains = torch.cat([backlog.clamp(min=0), torch.zeros_like(root_tokens).unsqueeze(1)], 1)
    chains[torch.arange(state.num_requests, device=dev), counts - 1] = root_tokens
    state.backlog = backlog[:, :0]
    root_logits = _extend(draft, state, chains, counts, keep_last=True)  # [R, V]
    if depth > 0:
        grower.expand(root_logits.unsqueeze(1))
    for _ in range(1, depth):
        tree = grower.tree()
        frontier = grower.frontier  # [R, W] node indices
        if min_gain > 0:
            # children's f sum to at most their parent's: the level adds at most Σ frontier f
            bound = tree.logp.gather(1, frontier).exp().sum()
            if float(bound) < min_gain:
                break
        if stop is not None and stop(tree, frontier):
            break
        R, W = frontier.shape
        visible = ancestor_mask(tree).gather(
            1, frontier.unsqueeze(2).expand(R, W, tree.max_nodes)
        )  # [R, W, n]
        positions = state.lens.unsqueeze(1) + tree.depth.gather(1, frontier)
        grower.expand(_forward_block(draft, state, grower.frontier_tokens, positions, visible))
    cand = grower.candidates()
    return DraftTree(cand.tree, cand.kept, grower.tree())


def commit_draft(state: KVState, draft_tree: DraftTree, accepted: Tensor) -> Tensor:
    """Keep the root and the accepted path in the draft cache after verification.

    ``accepted``: (R, A) int64 accepted *candidate* node indices (of
    ``draft_tree.candidates``) in path order, root excluded, -1 padded; map the indices of
    a selected subtree with :func:`map_accepted` first. Accepted nodes the draft never
    forwarded (the deepest level) go to ``state.backlog``. Returns the new (R,) ``lens``.
    """
    _check_state(state)
    grown = map_accepted(
        torch.as_tensor(accepted, dtype=torch.int64, device=state.lens.device),
        draft_tree.grown_index,
    )
    cached = (grown >= 0) & (grown < state.pending)
    late = (grown >= 0) & ~cached
    # along a path node indices grow, so uncached nodes come after every cached one
    tokens = draft_tree.grown.tokens.to(grown.device).gather(1, grown.clamp(min=0))
    n_late = int(late.sum(1).max()) if grown.numel() else 0
    order = (~late).to(torch.int8).argsort(dim=1, stable=True)[:, :n_late]  # late ones first
    backlog = torch.where(late.gather(1, order), tokens.gather(1, order), -1)
    lens = commit(state, torch.where(cached, grown, -1))
    state.backlog = backlog
    return lens

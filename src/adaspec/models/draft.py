"""Growing candidate trees with a draft model and its own KV cache.

The draft keeps a :class:`~adaspec.models.KVState` just like the target. One draft step:

1. forward the backlog (accepted tokens of the last step the draft never forwarded) and
   the root, as one chain per request; the root's logits give depth 1;
2. for each further depth, forward only the frontier (the nodes added last) against the
   prefix and the tree grown so far, with ancestor-only visibility;
3. after the target verifies, :func:`commit_draft` keeps the root and the accepted path in
   the draft cache. The deepest level is never forwarded by the draft (its children are
   not needed), so an accepted node there goes to the backlog of the next step.

A draft made from the target's own weights (:func:`~adaspec.models.make_draft`: quantized
copies) computes nearly the target's keys and values. Such a draft needs no cache of its
own: :func:`shares_cache` tells whether a pair qualifies, and each step the draft grows
its tree on :func:`share_prefix` of the target's cache (the prefix is shared, the tree's
entries are the draft's own and are dropped after the step): no catch-up over prompts or
plain steps, no commit, no backlog.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from adaspec.acceptance import Param, TreeGrower
from adaspec.models.adapter import (
    KVState,
    _attention_config,
    _check_state,
    _extend,
    _forward_block,
    _layers,
    _shared_cache,
    commit,
    prefill,
)
from adaspec.models.vocab import subset_scores
from adaspec.tree import TokenTree, ancestor_mask

__all__ = [
    "DraftTree",
    "commit_draft",
    "grow_draft_tree",
    "map_accepted",
    "share_prefix",
    "shares_cache",
]


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

    A draft whose output layer is a :class:`~adaspec.models.vocab.SubsetHead` runs its
    forwards in :meth:`~adaspec.models.vocab.SubsetHead.scores_only` mode: each level is
    ranked over its K columns (the same tree as over V logits that are -inf elsewhere).

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
    # a draft that proposes only part of the vocabulary is ranked over that part alone
    with subset_scores(draft) as vocab:
        grower = TreeGrower(
            root_tokens, width, temperature=temperature, top_k=top_k, top_p=top_p, vocab=vocab
        )
        _grow(draft, state, grower, root_tokens, depth, min_gain, stop)
    cand = grower.candidates()
    return DraftTree(cand.tree, cand.kept, grower.tree())


def _grow(
    draft: nn.Module,
    state: KVState,
    grower: TreeGrower,
    root_tokens: Tensor,
    depth: int,
    min_gain: float,
    stop: Callable[[TokenTree, Tensor], bool] | None,
) -> None:
    """The draft forwards of :func:`grow_draft_tree`: the root (with any backlog), then
    each further level's frontier, until ``depth`` levels or ``min_gain`` / ``stop``."""
    dev = state.lens.device
    # backlog + root as one right-padded chain per request  # [R, B + 1]
    backlog = state.backlog
    counts = (backlog >= 0).sum(1) + 1
    chains = torch.cat([backlog.clamp(min=0), torch.zeros_like(root_tokens).unsqueeze(1)], 1)
    chains[torch.arange(state.num_requests, device=dev), counts - 1] = root_tokens
    state.backlog = backlog[:, :0]
    root_logits = _extend(draft, state, chains, counts, keep_last=True)  # [R, V] (or K)
    if grower.vocab is not None and root_logits.shape[-1] != grower.vocab.shape[0]:
        grower.vocab = None  # the model never called its output module: V logits after all
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


def share_prefix(state: KVState, *, spare: bool = False) -> KVState:
    """A state over the same committed prefix as ``state``, sharing its cache tensors.

    Forwards into the new state (:func:`grow_draft_tree`) append to it alone: its first
    forward copies the cache into tensors of its own (as a ``DynamicCache``'s
    concatenation would), so ``state`` is never written. Sharing itself costs no copy.
    Until that first forward the view reads ``state``'s tensors: grow it before ``state``
    runs another forward (a forward after ``state`` dropped a token would overwrite the
    view's last slot).
    ``state`` must have no pending tree and no backlog (a target's state between steps).

    With ``spare=True`` the view's forwards write into ``state``'s free slots instead
    (each request's slots from its length on, which ``state``'s next forward overwrites
    with its own tree or masks out) while they last, and copy nothing: ``state``'s
    prefixes are untouched, but the view holds only until ``state``'s next forward, and two
    such views of one state must not be grown together. Masked slots still enter the
    attention's arithmetic: a growth that wrote non-finite keys or values (a draft whose
    own logits were NaN) leaves rows of ``state`` that forward to NaN. (The engine's draft
    step, where such a draft raises first: at batch 32 a copy of the target's cache took
    ~25 % of a draft chain of 2 levels, ``benchmarks/bench_models.py --share``.)

    Example
    -------
    >>> from adaspec.models import prefill, tiny_model
    >>> model = tiny_model(seed=0)
    >>> state, logits = prefill(model, [[1, 2, 3]])
    >>> view = share_prefix(state)
    >>> _ = grow_draft_tree(model, view, logits.argmax(-1), depth=2, width=1)
    >>> state.lens.tolist(), state.capacity, view.capacity
    ([3], 3, 5)
    """
    _check_state(state)
    if state.pending != 0:
        raise ValueError("state has an uncommitted tree; call commit() first")
    if bool((state.backlog >= 0).any()):
        raise ValueError("state has a backlog of uncached tokens; share a target's state")
    return KVState(
        _shared_cache(state.cache, spare=spare),
        state.lens.clone(),
        0,
        state.pending_pos[:, :0].clone(),
        state.backlog[:, :0],
    )


def shares_cache(target: nn.Module, draft: nn.Module, *, tol: float | None = 0.2) -> bool:
    """Whether ``draft`` can grow its trees on ``target``'s KV cache (:func:`share_prefix`).

    True when both models lay out their caches alike (layers, heads, head size, dtype,
    device, attention windows) and, on a probe of 32 tokens (fewer where a model has fewer
    positions), every layer's keys and values
    of the draft lie within ``tol`` relative error (Frobenius norm) of the target's. Drafts
    quantized from the target's weights pass (the shipped pairs on the probe: at most 0.022
    for SmolLM2's int4 draft, 0.101 for Gemma's int8 one; on real prompts 0.017 and 0.056);
    a model trained apart has errors near 1.
    ``tol=None`` checks the layout alone. Costs one short prefill of each model.

    Example
    -------
    >>> from adaspec.models import tiny_model
    >>> shares_cache(tiny_model(seed=0), tiny_model(seed=0)), shares_cache(
    ...     tiny_model(seed=0), tiny_model(seed=1))
    (True, False)
    """
    if tol is not None and (
        isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < float("inf")
    ):
        raise ValueError(f"tol must be a finite number > 0 or None, got {tol!r}")
    target_attention, draft_attention = _attention_config(target), _attention_config(draft)
    if target_attention[:2] != draft_attention[:2]:  # sliding window and layer types
        return False
    vocab = [_vocab_size(m) for m in (target, draft)]
    if None in vocab:
        return False
    generator = torch.Generator().manual_seed(0)
    # 32 tokens, or as many as both models have positions for
    length = min(32, *(m for m in (target_attention[2], draft_attention[2]) if m is not None))
    probe = torch.randint(
        0, min(v for v in vocab if v is not None), (1, length), generator=generator
    )
    target_state, _ = prefill(target, probe)
    draft_state, _ = prefill(draft, probe)
    layers = _layers(target_state), _layers(draft_state)
    if len(layers[0]) != len(layers[1]):
        return False
    for t, d in zip(*layers, strict=True):
        for a, b in ((t.keys, d.keys), (t.values, d.values)):
            if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
                return False
            if tol is None:
                continue
            error = (b.double() - a.double()).norm() / a.double().norm().clamp(min=1e-30)
            if float(error) > tol:
                return False
    return True


def _vocab_size(model: nn.Module) -> int | None:
    """Rows of a model's input embedding (the token ids it accepts), if it has one."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    rows = getattr(embedding, "num_embeddings", None)
    return int(rows) if isinstance(rows, int) else None

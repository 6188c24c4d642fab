"""Acceptance estimates from draft logits: logits transforms, path log-probabilities, beam trees.

The same :func:`process_logits` (temperature, then top-k, then top-p) is used by the
draft-side estimates here and by the target side in :mod:`adaspec.verify`, so a tree's
f(v) and its verification always see one definition of the sampling distribution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from adaspec.tree import SubTree, TokenTree, subtree

__all__ = [
    "Calibrator",
    "Expansion",
    "TreeGrower",
    "accepted_mask",
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
        raise ValueError(
            f"{name} must be a scalar or have at most shape {tuple(lead)}, got {tuple(t.shape)}"
        )
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
            (the most likely token is always kept; among equal probabilities the smaller
            token id goes first); in (0, 1]; None or 1 disables.

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
    # one reduction answers both checks: amax propagates NaN, and is -inf only for dead rows
    row_max = x.amax(-1)
    if bool(torch.isnan(row_max).any()):
        raise ValueError("logits contain NaN")
    if bool((row_max == float("-inf")).any()):
        raise ValueError("logits: a row is -inf everywhere (no token can be sampled)")
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        # scalar fast path: no per-row broadcasting
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if temperature == 0:
            x = torch.full_like(x, float("-inf")).scatter(-1, x.argmax(-1, keepdim=True), 0.0)
        elif temperature != 1:
            x = _divide(x, row_max, temperature)
        temp = None
    else:
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
            x = torch.where(greedy, onehot, _divide(x, row_max, torch.where(greedy, 1.0, temp)))
        else:
            x = _divide(x, row_max, temp)
    if k is not None:
        if k.dtype.is_floating_point or k.dtype == torch.bool or bool((k < 0).any()):
            raise ValueError(f"top_k must be a non-negative integer, got {top_k}")
        V = x.shape[-1]
        kk = torch.where(k == 0, V, k.clamp(max=V)).to(torch.int64)
        if bool((kk < V).any()):
            # the k-th largest value per row; topk of the largest k needed beats a full sort
            kth = x.topk(int(kk.max()), dim=-1).values.gather(-1, kk - 1)
            x = x.masked_fill(x < kth, float("-inf"))
    if p is not None:
        p = p.float()
        if bool(((p <= 0) | (p > 1) | torch.isnan(p)).any()):
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
        if bool((p < 1).any()):
            sorted_x, idx = x.sort(dim=-1, descending=True, stable=True)
            probs = sorted_x.softmax(-1)
            mass_before = probs.cumsum(-1) - probs  # [..., V] mass of the more likely tokens
            drop_sorted = (mass_before >= p) & (p < 1)
            drop_sorted[..., 0] = False
            drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
            x = x.masked_fill(drop, float("-inf"))
    return x


def _divide(x: Tensor, row_max: Tensor, temperature: float | Tensor) -> Tensor:
    """(x - max) / temperature: finite for any temperature, -inf where x is -inf.

    Shifting by the row maximum first keeps tiny temperatures from overflowing to inf and
    leaves the softmax unchanged.
    """
    shifted = (x - row_max.unsqueeze(-1)) / temperature
    return shifted.masked_fill(x == float("-inf"), float("-inf"))


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
        return torch.where(
            temperature == 0, torch.ones_like(temperature, dtype=torch.float32), temperature
        )
    return 1.0 if temperature == 0 else temperature


def _check_frontier(frontier_logp: Tensor, draft_logits: Tensor) -> None:
    if (
        frontier_logp.dim() != 2
        or draft_logits.dim() != 3
        or draft_logits.shape[:2] != frontier_logp.shape
    ):
        raise ValueError(
            f"draft_logits must have shape (R, F, V) matching frontier_logp (R, F); got "
            f"{tuple(draft_logits.shape)} and {tuple(frontier_logp.shape)}"
        )


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
    _check_frontier(frontier_logp, draft_logits)
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
    *,
    vocab: Tensor | None = None,
) -> Expansion:
    """One beam step: the ``width`` best extensions of the frontier by path probability.

    Shapes as in :func:`extension_logprobs`. Extensions compete across the whole frontier of
    a request (the AdaServe / EAGLE-2 beam): a likely node may keep several children while
    an unlikely one keeps none.

    ``vocab``: optional (K,) int64 sorted token id of each of the K logit columns, for a
    draft that scores only part of the vocabulary (:class:`~adaspec.models.vocab.SubsetHead`):
    the result is what the full-vocabulary logits with -inf elsewhere give (up to rounding
    and the order of exact ties), without the work over the tokens the draft can never
    propose. Default: column v is token v.
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an int >= 1, got {width!r}")
    _check_frontier(frontier_logp, draft_logits)
    _check_vocab(vocab, draft_logits)
    x = process_logits(draft_logits, _estimate_temperature(temperature), top_k, top_p)  # [R, F, V]
    R, F, V = x.shape
    w = min(width, V)
    # The best `width` extensions overall are among the best `width` of each frontier node, and
    # the log-softmax normaliser is constant per node: rank raw logits, normalise only the few.
    top_x, top_tok = x.topk(w, dim=-1)  # [R, F, w]
    ext = frontier_logp.float().unsqueeze(-1) + (top_x - x.logsumexp(-1, keepdim=True))  # [R, F, w]
    logp, flat = ext.reshape(R, F * w).topk(min(width, F * w), dim=-1)  # [R, W]
    tokens = top_tok.reshape(R, F * w).gather(1, flat)  # [R, W] logit columns
    if vocab is not None:
        tokens = vocab.to(tokens.device)[tokens]
    return Expansion(parent=flat // w, tokens=tokens, logp=logp)


def _check_vocab_ids(vocab: Tensor | None) -> None:
    if vocab is None:
        return
    if not isinstance(vocab, Tensor) or vocab.dtype != torch.int64 or vocab.dim() != 1:
        raise TypeError(f"vocab must be a 1-D int64 tensor of token ids, got {vocab!r:.80}")
    # sorted: ties among columns then rank as among the token ids (top-p, top-k)
    if vocab.numel() == 0 or bool((vocab < 0).any()) or bool((vocab.diff() <= 0).any()):
        raise ValueError("vocab must hold sorted unique token ids >= 0 (at least one)")


def _check_vocab(vocab: Tensor | None, draft_logits: Tensor) -> None:
    if vocab is None:
        return
    _check_vocab_ids(vocab)
    if vocab.shape[0] != draft_logits.shape[-1]:
        raise ValueError(
            f"vocab must name one token per logit column ({draft_logits.shape[-1]}), "
            f"got {vocab.shape[0]}"
        )


class TreeGrower:
    """Grows a batch of candidate trees one depth at a time with any draft model.

    The tree starts as the R roots. Each :meth:`expand` call takes the draft's logits at the
    current frontier (R, F, V), or (R, F, K) over the sorted token ids ``vocab``, and appends the ``width`` best extensions per request as the
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
        vocab: Tensor | None = None,
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
        _check_vocab_ids(vocab)
        self.vocab = vocab
        """(K,) int64 token id of each logit column :meth:`expand` takes, or None (all V)."""
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
        e = expand(
            self.frontier_logp,
            draft_logits,
            self.width,
            self.temperature,
            self.top_k,
            self.top_p,
            vocab=self.vocab,
        )
        W = e.tokens.shape[1]
        self._depth.append(torch.full_like(e.tokens, self.depth + 1))
        self._tokens.append(e.tokens)
        self._parents.append(self.frontier.gather(1, e.parent))
        self._logp.append(e.logp)
        self.frontier = torch.arange(
            self.num_nodes, self.num_nodes + W, device=e.tokens.device
        ).expand_as(e.tokens)
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


def accepted_mask(tree: TokenTree, accepted: Tensor) -> Tensor:
    """(R, N) bool: True at the root and at every accepted node.

    ``accepted`` is (R, A) int64 accepted node indices (root excluded, -1 padded), as
    verification returns them.
    """
    if accepted.dim() != 2 or accepted.shape[0] != tree.num_requests:
        raise ValueError(
            f"accepted must have shape ({tree.num_requests}, A), got {tuple(accepted.shape)}"
        )
    R, N = tree.tokens.shape
    mask = torch.zeros(R, N + 1, dtype=torch.bool, device=tree.device)
    # -1 padding is sent to the spare column N
    mask.scatter_(1, torch.where(accepted >= 0, accepted, N).to(tree.device), True)
    mask[:, 0] = True
    return mask[:, :N]


class Calibrator:
    """Learns how often the target accepts a tree edge, given the draft's probability of it.

    An *edge* is a non-root node v with parent u. Given that u was accepted, v is accepted
    with some probability; the raw estimate is the draft's conditional probability
    ``q = f(v) / f(u)``. The calibrator keeps, per depth bucket and per bin of q, counts of
    such trials and successes, smooths each bin toward a smooth curve fitted to the whole
    depth bucket (a prior worth ``prior_strength`` observations), makes them monotone in q
    (pool-adjacent-violators), and interpolates linearly between bin centres. The smooth
    curve is Platt scaling, ``sigmoid(a logit(q) + b)``, fitted to the bucket's counts with
    a weak pull toward the same curve fitted to all buckets pooled, which is itself pulled
    weakly toward the identity (a = 1, b = 0): a few dozen trials then move every bin, not
    only those they fell in, and deep buckets with few trials borrow the shallow ones'
    shape. (A quantized copy of the target as its draft is
    underconfident: its q of 0.3-0.9 were accepted 95-100 % of the time, while a prior
    toward q in each bin kept sparsely tried bins near q for hundreds of steps.) A
    calibrated node's f is the product of its calibrated edges, so ``expected_accepted``
    of a calibrated tree predicts the emitted count of a verification.

    Measuring calibration: :meth:`observe` also accumulates the tokens the current
    calibration predicted (Σ f - 1 over each verified tree) and those actually accepted;
    ``predicted_accepted / observed_accepted`` near 1 is good calibration.

    Args:
        num_bins: bins over q in [0, 1].
        depth_buckets: depths 1 .. depth_buckets - 1 get a bucket each; deeper edges share one.
        prior_strength: pseudo-observations per bin that pull it toward the bucket's Platt
            curve (with no evidence at all: the identity).
    """

    def __init__(
        self, num_bins: int = 20, depth_buckets: int = 4, prior_strength: float = 4.0
    ) -> None:
        if num_bins < 1 or depth_buckets < 1 or prior_strength <= 0:
            raise ValueError(
                f"need num_bins >= 1, depth_buckets >= 1, prior_strength > 0; got {num_bins}, "
                f"{depth_buckets}, {prior_strength}"
            )
        self.num_bins = num_bins
        self.depth_buckets = depth_buckets
        self.prior_strength = prior_strength
        self.trials = torch.zeros(depth_buckets, num_bins, dtype=torch.float64)
        self.successes = torch.zeros(depth_buckets, num_bins, dtype=torch.float64)
        self.predicted_accepted = 0.0
        self.observed_accepted = 0.0
        self.steps = 0
        self._table: Tensor | None = None  # [buckets, bins] fitted acceptance at bin centres

    @property
    def centers(self) -> Tensor:
        """(num_bins,) float64 bin centres of q."""
        return (torch.arange(self.num_bins, dtype=torch.float64) + 0.5) / self.num_bins

    def _bins(self, q: Tensor) -> Tensor:
        return (q.double() * self.num_bins).long().clamp(0, self.num_bins - 1)

    def _buckets(self, depth: Tensor) -> Tensor:
        return (depth.long() - 1).clamp(0, self.depth_buckets - 1)

    def observe_edges(self, depth: Tensor, draft_prob: Tensor, accepted: Tensor) -> None:
        """Record trials of individual edges.

        Args:
            depth: (E,) int64 depth of each edge's child (>= 1).
            draft_prob: (E,) float draft conditional probability q of the child, in [0, 1].
            accepted: (E,) bool whether the child was accepted (its parent was).
        """
        if not (depth.shape == draft_prob.shape == accepted.shape) or depth.dim() != 1:
            raise ValueError("depth, draft_prob and accepted must be 1-D tensors of one shape (E,)")
        q = draft_prob.detach().double().cpu()
        if bool(((q < 0) | (q > 1) | torch.isnan(q)).any()):
            raise ValueError("draft_prob must lie in [0, 1]")
        flat = self._buckets(depth.cpu()) * self.num_bins + self._bins(q)  # [E]
        size = self.depth_buckets * self.num_bins
        self.trials += torch.bincount(flat, minlength=size).double().view_as(self.trials)
        self.successes += torch.bincount(
            flat, weights=accepted.cpu().double(), minlength=size
        ).view_as(self.successes)
        self._table = None

    def observe(self, tree: TokenTree, accepted: Tensor) -> None:
        """Record one verification of ``tree`` (raw, uncalibrated f) with its outcome.

        ``accepted``: (R, A) int64 accepted node indices, root excluded, -1 padded.
        Only edges whose parent was accepted are trials: the others were never tested.
        """
        acc = accepted_mask(tree, accepted)  # [R, N]
        parent = tree.parents.clamp(min=0)
        tried = tree.valid & (tree.parents >= 0) & acc.gather(1, parent)  # [R, N]
        q = _edge_probs(tree)  # [R, N] conditional draft probability
        self.predicted_accepted += float(self.apply(tree).logp.exp().sum()) - tree.num_requests
        self.observed_accepted += float(acc.sum()) - tree.num_requests
        self.steps += 1
        self.observe_edges(tree.depth[tried], q[tried].clamp(0, 1), acc[tried])

    def _fit(self) -> Tensor:
        if self._table is not None:
            return self._table
        c = self.centers
        # every depth's curve is pulled toward the curve of all depths pooled (itself pulled
        # toward the identity): deep buckets with a few trials borrow the shape the shallow
        # ones measured (prequential edge log-loss on SmolLM2 / Gemma-3 generations: 0.209
        # -> 0.204 / 0.384 -> 0.378, over the first 30 steps 0.197 -> 0.189)
        pooled = _platt_fit(c, self.trials.sum(0), self.successes.sum(0))
        smooth = torch.stack(
            [
                _platt(c, self.trials[b], self.successes[b], toward=pooled)
                for b in range(self.depth_buckets)
            ]
        )  # [B, K]
        weight = self.trials + self.prior_strength  # [B, K]
        rate = (self.successes + self.prior_strength * smooth) / weight
        table = torch.empty_like(rate)
        for b in range(self.depth_buckets):
            table[b] = _isotonic(rate[b], weight[b])
        self._table = table
        return table

    def edge_probs(self, depth: Tensor, draft_prob: Tensor) -> Tensor:
        """Calibrated acceptance probability of edges, same shape as ``draft_prob``, in [0, 1].

        Monotone non-decreasing in ``draft_prob`` for each depth.
        """
        table = self._fit()  # [B, K]
        q = draft_prob.double().clamp(0, 1)
        pos = (q * self.num_bins - 0.5).clamp(0, self.num_bins - 1)  # fractional bin-centre index
        lo = pos.floor().long()
        hi = (lo + 1).clamp(max=self.num_bins - 1)
        frac = pos - lo
        rows = table.to(q.device)[self._buckets(depth.to(q.device))]  # [..., K]
        at_lo = rows.gather(-1, lo.unsqueeze(-1)).squeeze(-1)
        at_hi = rows.gather(-1, hi.unsqueeze(-1)).squeeze(-1)
        return (at_lo + frac * (at_hi - at_lo)).clamp(0, 1).to(draft_prob.dtype)

    def apply(self, tree: TokenTree) -> TokenTree:
        """The same tree with calibrated f: each node's f is the product of its calibrated edges."""
        parent = tree.parents.clamp(min=0)
        q = _edge_probs(tree)  # [R, N]
        # an edge the draft gave probability 0 stays impossible: no evidence is drawn for it
        calibrated = torch.where(q > 0, self.edge_probs(tree.depth, q).float(), 0.0)
        edge = torch.where(tree.parents >= 0, calibrated.log(), 0.0)
        edge = torch.where(tree.valid, edge, 0.0)
        # log f(v) = Σ of edge logs along root -> v; summed level by level, parents first
        logp = torch.zeros_like(tree.logp)
        for _ in range(int(tree.depth.max())):
            logp = edge + torch.where(tree.parents >= 0, logp.gather(1, parent), 0.0)
        logp = logp.masked_fill(~tree.valid, float("-inf"))
        return TokenTree(
            tree.tokens, tree.parents, logp, tree.depth, tree.num_nodes, validate=False
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to restore the calibrator (plain tensors and numbers)."""
        return {
            "num_bins": self.num_bins,
            "depth_buckets": self.depth_buckets,
            "prior_strength": self.prior_strength,
            "trials": self.trials.clone(),
            "successes": self.successes.clone(),
            "predicted_accepted": self.predicted_accepted,
            "observed_accepted": self.observed_accepted,
            "steps": self.steps,
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> Calibrator:
        """A calibrator restored from :meth:`state_dict` (e.g. after ``torch.save``/``torch.load``)."""
        try:
            cal = cls(
                int(state["num_bins"]), int(state["depth_buckets"]), float(state["prior_strength"])
            )
            trials, successes = state["trials"], state["successes"]
            if not isinstance(trials, Tensor) or not isinstance(successes, Tensor):
                raise TypeError("trials and successes must be tensors")
            if trials.shape != cal.trials.shape or successes.shape != cal.trials.shape:
                raise ValueError(f"trials/successes must have shape {tuple(cal.trials.shape)}")
            cal.trials = trials.double().clone()
            cal.successes = successes.double().clone()
            cal.predicted_accepted = float(state["predicted_accepted"])
            cal.observed_accepted = float(state["observed_accepted"])
            cal.steps = int(state["steps"])
        except KeyError as e:
            raise ValueError(f"state is missing the key {e}") from None
        return cal


def _edge_probs(tree: TokenTree) -> Tensor:
    """(R, N) f(v) / f(parent) in [0, 1]; 0 below a node with f = 0 (and for the root)."""
    parent_logp = tree.logp.gather(1, tree.parents.clamp(min=0))
    q = (tree.logp - parent_logp).exp()
    return torch.where((parent_logp > float("-inf")) & (tree.parents >= 0), q, 0.0).clamp(0, 1)


def _platt(
    q: Tensor,
    trials: Tensor,
    successes: Tensor,
    pull: float = 1.0,
    toward: tuple[float, float] = (1.0, 0.0),
) -> Tensor:
    """``sigmoid(a logit(q) + b)`` at ``q`` (K,), (a, b) fitted by :func:`_platt_fit`."""
    a, b = _platt_fit(q, trials, successes, pull, toward)
    return torch.sigmoid(a * q.double().logit() + b)


def _platt_fit(
    q: Tensor,
    trials: Tensor,
    successes: Tensor,
    pull: float = 1.0,
    toward: tuple[float, float] = (1.0, 0.0),
) -> tuple[float, float]:
    """(a, b) of ``sigmoid(a logit(q) + b)`` fitted to binned counts at ``q`` (K,).

    Maximises the log-likelihood minus ``pull / 2 * |(a, b) - toward|²`` (no data:
    ``toward``, by default the identity; every trial accepted: a finite fit) by Newton's
    method, each step halved until the objective rises (full steps overshoot from the
    saturated side: an overconfident draft's top bin sent the slope to -200). A slope
    below 0 (a curve falling in q) or a non-finite fit gives ``toward``. K is small: plain
    floats.
    """
    x = [math.log(c / (1 - c)) for c in q.tolist()]  # logit of the bin centres (never 0, 1)
    n, k = trials.tolist(), successes.tolist()
    a0, b0 = toward

    def objective(a: float, b: float) -> float:
        total = -0.5 * pull * ((a - a0) ** 2 + (b - b0) ** 2)
        for xi, ni, ki in zip(x, n, k, strict=True):
            if ni > 0:
                z = a * xi + b  # k log σ(z) + (n - k) log σ(-z), stable for any z
                total -= ki * _softplus(-z) + (ni - ki) * _softplus(z)
        return total

    a, b, value = a0, b0, objective(a0, b0)
    for _ in range(50):
        g_a, g_b = -pull * (a - a0), -pull * (b - b0)  # gradient and (negated) Hessian
        h_aa, h_ab, h_bb = pull, 0.0, pull
        for xi, ni, ki in zip(x, n, k, strict=True):
            if ni > 0:
                p = 1 / (1 + math.exp(-min(max(a * xi + b, -500.0), 500.0)))
                r, w = ki - ni * p, ni * p * (1 - p)
                g_a, g_b = g_a + r * xi, g_b + r
                h_aa, h_ab, h_bb = h_aa + w * xi * xi, h_ab + w * xi, h_bb + w
        det = h_aa * h_bb - h_ab * h_ab  # > 0: the ridge keeps the Hessian definite
        d_a, d_b = (h_bb * g_a - h_ab * g_b) / det, (h_aa * g_b - h_ab * g_a) / det
        step = 1.0
        while step > 1e-6 and not objective(a + step * d_a, b + step * d_b) >= value:
            step /= 2
        if step <= 1e-6:
            break  # no ascent left: at the maximum
        a, b = a + step * d_a, b + step * d_b
        value = objective(a, b)
        if max(abs(step * d_a), abs(step * d_b)) < 1e-7:
            break
    if not (math.isfinite(a) and math.isfinite(b)) or a < 0:
        a, b = a0, b0
    return a, b


def _softplus(z: float) -> float:
    """log(1 + e^z) without overflow."""
    return z + math.log1p(math.exp(-z)) if z > 0 else math.log1p(math.exp(z))


def _isotonic(values: Tensor, weights: Tensor) -> Tensor:
    """Weighted least-squares non-decreasing fit (pool adjacent violators); K is small."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for v, w in zip(values.tolist(), weights.tolist(), strict=True):
        blocks.append([v, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v2, w2, n2 = blocks.pop()
            v1, w1, n1 = blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    out = [b[0] for b in blocks for _ in range(int(b[2]))]
    return torch.tensor(out, dtype=values.dtype)

"""Sampled verification is lossless: exact enumeration on tiny vocabularies.

Every random decision of :func:`adaspec.verify.verify` goes through one of two calls
(categorical, bernoulli). ``ScriptedDraws`` replaces them with a depth-first enumeration:
each batch row follows a script of choices, then takes the first possible outcome and
records every other possible outcome as a new script. Each run is one leaf of the
decision tree, weighted by the product of its decision probabilities, so the output
distribution of the code under test is obtained exactly (no sampling).

The oracle is the target's autoregressive distribution. A verification step emits e
(accepted tokens + bonus); generation then continues from e. The step is lossless iff
the token stream "e, then autoregressive continuation" has the target's distribution,
i.e. iff for every sequence s of length D + 1 (D = tree depth),
    P(stream starts with s) = prod_i p(s_i | s_<i).
For deterministic children (fixed tree) this is the same as P(e) = p(e) on the set of
exit sequences; for drafted children it must hold averaged over the draft's draws,
which the test enumerates too, weighting each drawn tree by its draft probability.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pytest
import torch
from torch import Tensor

from adaspec.acceptance import probs_from_logits
from adaspec.tree import TokenTree
from adaspec.verify import VerifyResult, _verify

ROOT_TOKEN = 0
Sampling = tuple[float, int | None, float | None]  # temperature, top_k, top_p
TV_TOL = 1e-9


# ---------------------------------------------------------------- enumeration harness
class ScriptedDraws:
    """Decision source that enumerates: script first, then the first possible outcome."""

    def __init__(self, scripts: Sequence[list[int]]) -> None:
        self.scripts = scripts
        self.taken: list[list[int]] = [[] for _ in scripts]
        self.weight = [1.0] * len(scripts)
        self.branches: list[list[list[int]]] = [[] for _ in scripts]

    def _decide(self, rows: Tensor, weights: np.ndarray) -> list[int]:
        out = []
        for a, r in enumerate(rows.tolist()):
            w = weights[a]
            pos = len(self.taken[r])
            if pos < len(self.scripts[r]):
                c = self.scripts[r][pos]
            else:
                possible = np.nonzero(w > 0)[0].tolist()
                c = possible[0]
                self.branches[r].extend([[*self.taken[r], alt] for alt in possible[1:]])
            self.taken[r].append(c)
            self.weight[r] *= float(w[c])
            out.append(c)
        return out

    def categorical(self, rows: Tensor, probs: Tensor) -> Tensor:
        w = probs.double()
        w = w / w.sum(-1, keepdim=True)  # what the uniform sampler's u * total amounts to
        return torch.tensor(self._decide(rows, w.numpy()), dtype=torch.int64)

    def bernoulli(self, rows: Tensor, prob: Tensor) -> Tensor:
        w = torch.stack([1 - prob.double(), prob.double()], -1)  # outcome 1 = True
        return torch.tensor(self._decide(rows, w.numpy()), dtype=torch.bool)


def enumerate_outputs(
    num_items: int, run: Callable[[list[int], ScriptedDraws], VerifyResult]
) -> list[dict[tuple[int, ...], float]]:
    """Exact distribution of the emitted tokens for each of ``num_items`` batch items.

    ``run(item_ids, draws)`` verifies a batch whose row j is item ``item_ids[j]``.
    """
    dists: list[dict[tuple[int, ...], float]] = [defaultdict(float) for _ in range(num_items)]
    pending: list[tuple[int, list[int]]] = [(i, []) for i in range(num_items)]
    while pending:
        draws = ScriptedDraws([s for _, s in pending])
        res = run([i for i, _ in pending], draws)
        for r, e in enumerate(res.emitted.tolist()):
            dists[pending[r][0]][tuple(t for t in e if t >= 0)] += draws.weight[r]
        pending = [(pending[r][0], b) for r in range(len(pending)) for b in draws.branches[r]]
    return dists


# ------------------------------------------------------------------------ the models
class PrefixModel:
    """A "language model" on a tiny vocabulary: logits are a fixed random function of the
    whole prefix (all prefixes up to ``max_len`` tokens after the root are tabulated)."""

    def __init__(self, V: int, max_len: int, seed: int, scale: float = 1.5) -> None:
        g = torch.Generator().manual_seed(seed)
        self.V = V
        self.max_len = max_len
        self.prefixes = [
            p for m in range(max_len + 1) for p in itertools.product(range(V), repeat=m)
        ]
        self.index = {p: i for i, p in enumerate(self.prefixes)}
        self.logits = torch.randn(len(self.prefixes), V, generator=g) * scale  # [P, V]

    def rows(self, prefixes: Sequence[tuple[int, ...]]) -> Tensor:
        return self.logits[[self.index[p] for p in prefixes]]


def target_table(
    model: PrefixModel, temperature: float, top_k: int | None, top_p: float | None
) -> Tensor:
    """(P, V) float64 target distribution per prefix: the library transform, renormalised
    in float64 (which is what drawing with u * total from those float32 values does)."""
    p = probs_from_logits(model.logits, temperature, top_k, top_p).double()
    return p / p.sum(-1, keepdim=True)


def stream_tv(
    dist: dict[tuple[int, ...], float], table: Tensor, model: PrefixModel, length: int
) -> float:
    """TV between "emitted, then target continuation" and the target, over ``length`` tokens."""
    V = model.V
    # [V] * length joint target probabilities, and the marginals of every shorter prefix
    joint: dict[tuple[int, ...], float] = {(): 1.0}
    for m in range(length):
        for s in itertools.product(range(V), repeat=m + 1):
            joint[s] = joint[s[:-1]] * float(table[model.index[s[:-1]], s[-1]])
    mu: dict[tuple[int, ...], float] = defaultdict(float)
    lost = 0.0  # mass on emitted sequences the target gives probability 0
    for e, w in dist.items():
        assert 1 <= len(e) <= length
        if joint[e] == 0.0:
            lost += w
            continue
        for rest in itertools.product(range(V), repeat=length - len(e)):
            s = e + rest
            mu[s] += w * joint[s] / joint[e]
    full = [s for s in joint if len(s) == length]
    return 0.5 * (sum(abs(mu[s] - joint[s]) for s in full) + lost)


# ---------------------------------------------------------------------- tree shapes
def parent_arrays(max_nodes: int, max_depth: int) -> list[list[int]]:
    """Every topologically ordered parent array with 1..max_nodes nodes and depth <= max_depth."""
    out: list[list[int]] = []

    def grow(parents: list[int], depth: list[int]) -> None:
        out.append(list(parents))
        if len(parents) == max_nodes:
            return
        for p in range(len(parents)):
            if depth[p] < max_depth:
                grow([*parents, p], [*depth, depth[p] + 1])

    grow([-1], [0])
    return out


def node_paths(parents: Sequence[int], tokens: Sequence[int]) -> list[tuple[int, ...]]:
    """Token path (root excluded) of every node."""
    paths: list[tuple[int, ...]] = []
    for i, p in enumerate(parents):
        paths.append(() if p < 0 else (*paths[p], tokens[i]))
    return paths


class Bank:
    """Trees (parents, tokens) with their target (and draft) rows, stacked for batching."""

    def __init__(
        self,
        trees: Sequence[tuple[list[int], list[int]]],
        model: PrefixModel,
        draft: Tensor | None = None,
    ) -> None:
        N = max(len(p) for p, _ in trees)
        R = len(trees)
        self.tokens = torch.zeros(R, N, dtype=torch.int64)
        self.parents = torch.full((R, N), -1, dtype=torch.int64)
        self.logp = torch.full((R, N), float("-inf"))
        self.logits = torch.zeros(R, N, model.V)
        self.draft = None if draft is None else torch.zeros(R, N, model.V, dtype=torch.float64)
        for r, (par, tok) in enumerate(trees):
            n = len(par)
            paths = node_paths(par, tok)
            self.tokens[r, :n] = torch.tensor(tok)
            self.parents[r, :n] = torch.tensor(par)
            self.logp[r, :n] = -0.01 * torch.tensor([len(p) for p in paths], dtype=torch.float32)
            self.logits[r, :n] = model.rows(paths)
            # padding rows are NaN: verification must never read them
            self.logits[r, n:] = float("nan")
            if draft is not None and self.draft is not None:
                self.draft[r, :n] = draft[[model.index[p] for p in paths]]

    def tree(self, ids: list[int]) -> TokenTree:
        return TokenTree(self.tokens[ids], self.parents[ids], self.logp[ids])

    def run(self, ids: list[int], draws: ScriptedDraws, sampling: Sampling) -> VerifyResult:
        draft = None if self.draft is None else self.draft[ids]
        t, k, p = sampling
        return _verify(self.tree(ids), self.logits[ids], t, k, p, draft, draws, None, None)


SHAPES = parent_arrays(max_nodes=5, max_depth=3)
SETTINGS = [
    pytest.param(1.0, None, None, id="plain"),
    pytest.param(0.7, 2, None, id="top_k"),
    pytest.param(1.3, None, 0.75, id="top_p"),
]


def test_shapes_cover_what_the_issue_asks() -> None:
    assert [len(p) for p in SHAPES if len(p) == 1] == [1]  # the single-node tree
    assert max(len(p) for p in SHAPES) == 5
    assert max(len(path) for p in SHAPES for path in node_paths(p, [0] * len(p))) == 3
    assert len(SHAPES) == 1 + 1 + 2 + 6 + 23  # all topological orders of all shapes


# ------------------------------------------------------ deterministic children (top-k)
def all_token_assignments(V: int) -> Iterator[tuple[list[int], list[int]]]:
    for par in SHAPES:
        for tok in itertools.product(range(V), repeat=len(par) - 1):
            yield par, [ROOT_TOKEN, *tok]


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), SETTINGS)
def test_deterministic_children_exact_on_every_tree(
    temperature: float, top_k: int | None, top_p: float | None
) -> None:
    """Every shape up to depth 3 and 5 nodes, every token assignment over V = 3 (repeated
    sibling tokens included), padded into one batch: TV to the target < 1e-9 per tree."""
    V = 3
    model = PrefixModel(V, max_len=3, seed=11)
    table = target_table(model, temperature, top_k, top_p)
    trees = list(all_token_assignments(V))
    assert any(len(set(t[1:])) < len(t) - 1 and p.count(0) > 2 for p, t in trees)  # duplicates
    bank = Bank(trees, model)
    dists = enumerate_outputs(
        len(trees),
        lambda ids, d: bank.run(ids, d, (temperature, top_k, top_p)),
    )
    worst = max(stream_tv(dist, table, model, length=4) for dist in dists)
    assert worst < TV_TOL


def test_deterministic_children_exact_on_v5_random_trees() -> None:
    V = 5
    model = PrefixModel(V, max_len=3, seed=5, scale=2.0)
    table = target_table(model, 0.9, None, 0.9)
    g = torch.Generator().manual_seed(3)
    trees = [
        (par, [ROOT_TOKEN, *torch.randint(0, V, (len(par) - 1,), generator=g).tolist()])
        for par in SHAPES * 3
    ]
    bank = Bank(trees, model)
    dists = enumerate_outputs(len(trees), lambda ids, d: bank.run(ids, d, (0.9, None, 0.9)))
    assert max(stream_tv(dist, table, model, length=4) for dist in dists) < TV_TOL


# ------------------------------------------------- children drawn from the draft model
def draft_table(model: PrefixModel, seed: int, top_k: int | None = None) -> Tensor:
    """(P, V) float64 draft distribution per prefix (a different random model)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(model.prefixes), model.V, generator=g, dtype=torch.float64)
    q = probs_from_logits(logits, 1.0, top_k, None).double()
    return q / q.sum(-1, keepdim=True)


def drafted_trees(
    par: list[int], model: PrefixModel, draft: Tensor
) -> Iterator[tuple[list[int], float]]:
    """Every token assignment of shape ``par`` the draft can produce when the children of
    each node are drawn one by one without replacement, with its probability."""
    n = len(par)

    def rec(tok: list[int], w: float) -> Iterator[tuple[list[int], float]]:
        i = len(tok)
        if i == n:
            yield tok, w
            return
        paths = node_paths(par[:i], tok)
        q = draft[model.index[paths[par[i]]]].clone()
        for j in range(1, i):  # earlier siblings are no longer available
            if par[j] == par[i]:
                q[tok[j]] = 0.0
        mass = float(q.sum())
        for x in range(model.V):
            if q[x] > 0:
                yield from rec([*tok, x], w * float(q[x]) / mass)

    yield from rec([ROOT_TOKEN], 1.0)


def drafted_shape_tvs(
    model: PrefixModel,
    draft: Tensor,
    shapes: Sequence[list[int]],
    sampling: Sampling,
    *,
    trees_for: Callable[[list[int]], list[tuple[list[int], list[int], float]]],
    pass_draft: bool = True,
) -> list[float]:
    """TV to the target of each shape, averaged over the trees ``trees_for`` yields."""
    table = target_table(model, *sampling)
    items: list[tuple[int, float]] = []  # (shape index, tree probability) per bank row
    trees: list[tuple[list[int], list[int]]] = []
    for s, par in enumerate(shapes):
        for par_t, tok, w in trees_for(par):
            items.append((s, w))
            trees.append((par_t, tok))
    bank = Bank(trees, model, draft if pass_draft else None)
    dists = enumerate_outputs(len(trees), lambda ids, d: bank.run(ids, d, sampling))
    per_shape: list[dict[tuple[int, ...], float]] = [defaultdict(float) for _ in shapes]
    for (s, w), dist in zip(items, dists, strict=True):
        for e, pe in dist.items():
            per_shape[s][e] += w * pe
    return [stream_tv(d, table, model, length=4) for d in per_shape]


@pytest.mark.parametrize(
    ("V", "draft_top_k", "temperature", "top_k", "top_p"),
    [
        pytest.param(4, None, 1.0, None, None, id="V4"),
        pytest.param(5, 4, 0.8, 3, None, id="V5-sparse-draft-top_k"),
        pytest.param(4, None, 1.2, None, 0.7, id="V4-top_p"),
    ],
)
def test_drafted_children_exact_over_draft_draws(
    V: int, draft_top_k: int | None, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    model = PrefixModel(V, max_len=3, seed=21 + V)
    draft = draft_table(model, seed=99 + V, top_k=draft_top_k)

    def trees_for(par: list[int]) -> list[tuple[list[int], list[int], float]]:
        return [(par, tok, w) for tok, w in drafted_trees(par, model, draft)]

    tvs = drafted_shape_tvs(
        model,
        draft,
        SHAPES,
        (temperature, top_k, top_p),
        trees_for=trees_for,
    )
    assert max(tvs) < TV_TOL


def test_drafted_children_exact_with_a_repeated_sibling() -> None:
    """A sibling repeating the first child's token (which no draw without replacement
    yields) must not break exactness: it is never accepted."""
    model = PrefixModel(4, max_len=3, seed=7)
    draft = draft_table(model, seed=8)
    shapes = [p for p in SHAPES if p.count(0) >= 1 and len(p) <= 4]

    def trees_for(par: list[int]) -> list[tuple[list[int], list[int], float]]:
        # the repeat hangs from the root, after every drawn node, and has a child of its own
        return [
            ([*par, 0, len(par)], [*tok, tok[1], 2], w)
            for tok, w in drafted_trees(par, model, draft)
        ]

    tvs = drafted_shape_tvs(model, draft, shapes, (1.0, None, None), trees_for=trees_for)
    assert max(tvs) < TV_TOL


# ---------------------------------------------------------------------------- guards
def topk_children_trees(
    par: list[int], model: PrefixModel, draft: Tensor
) -> list[tuple[list[int], list[int], float]]:
    """The beam/top-k tree: each node's children are its draft's most likely tokens."""
    tok = [ROOT_TOKEN]
    for i in range(1, len(par)):
        paths = node_paths(par[:i], tok)
        rank = sum(1 for j in range(1, i) if par[j] == par[i])
        tok.append(int(draft[model.index[paths[par[i]]]].argsort(descending=True)[rank]))
    return [(par, tok, 1.0)]


def test_ratio_rule_on_deterministic_children_is_biased() -> None:
    """The p/q ratio test (draft rule) on top-k children fails the very same check that the
    deterministic rule passes: nobody may "simplify" the deterministic rule into it."""
    model = PrefixModel(4, max_len=3, seed=31)
    draft = draft_table(model, seed=32)
    shapes = [p for p in SHAPES if len(p) > 1]

    def trees_for(par: list[int]) -> list[tuple[list[int], list[int], float]]:
        return topk_children_trees(par, model, draft)

    biased = drafted_shape_tvs(model, draft, shapes, (1.0, None, None), trees_for=trees_for)
    exact = drafted_shape_tvs(
        model, draft, shapes, (1.0, None, None), trees_for=trees_for, pass_draft=False
    )
    assert max(exact) < TV_TOL
    assert max(biased) > 1e-2


def test_enumeration_detects_a_wrong_target_row() -> None:
    """The harness itself can fail: verifying against the logits of the wrong node (the
    parent's row, an off-by-one a real bug could make) is far from the target."""
    V = 3
    model = PrefixModel(V, max_len=3, seed=11)
    table = target_table(model, 1.0, None, None)
    trees = [
        (par, [ROOT_TOKEN, *tok]) for par, tok in [([-1, 0, 1], (1, 2)), ([-1, 0, 0, 1], (0, 1, 2))]
    ]
    bank = Bank(trees, model)
    shifted = bank.logits.clone()
    shifted[:, 1:] = bank.logits[:, :-1]
    bank.logits = shifted
    dists = enumerate_outputs(len(trees), lambda ids, d: bank.run(ids, d, (1.0, None, None)))
    assert min(stream_tv(dist, table, model, length=4) for dist in dists) > 1e-3

"""Hypothesis strategies for property-testing against adaspec.

The strategies adaspec's own tests use, for projects that want to check their engines
against adaspec's contracts. Needs the optional dependency ``hypothesis``
(``pip install adaspec[testing]``).

Example::

    from hypothesis import given
    from adaspec.testing import token_trees
    from adaspec.tree import build_optimal

    @given(token_trees(max_requests=3, max_nodes=10))
    def test_root_always_kept(tree):
        assert (build_optimal(tree, 1).tree.tokens[:, 0] == tree.tokens[:, 0]).all()
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

try:
    from hypothesis import strategies as st
except ImportError as e:  # pragma: no cover - exercised only without hypothesis
    raise ImportError(
        "adaspec.testing needs hypothesis: pip install 'adaspec[testing]' (or pip install hypothesis)"
    ) from e

from adaspec.tree import TokenTree

__all__ = ["budgets", "logits", "needs", "single_trees", "token_trees"]

# A few conditional probabilities shared across draws, so that equal f values (ties) and
# f = 1 chains occur often enough to exercise the strict order.
_TIE_PROBS = (1.0, 0.5, 0.25, 0.125)


@st.composite
def single_trees(
    draw: st.DrawFn,
    *,
    min_nodes: int = 1,
    max_nodes: int = 12,
    vocab_size: int = 50,
    ties: bool = True,
) -> TokenTree:
    """One valid token tree (R = 1) of ``min_nodes``..``max_nodes`` nodes.

    Parents are uniform over earlier nodes (any shape: chains, stars, bushy trees); edge
    probabilities are floats in [1e-3, 1] or, with ``ties``, often one of a few shared
    values, so equal f and f = 1 chains appear. Tokens are uniform in [0, vocab_size).
    """
    n = draw(st.integers(min_nodes, max_nodes))
    parents = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]
    edge = st.floats(1e-3, 1.0)
    if ties:
        edge = st.one_of(st.sampled_from(_TIE_PROBS), edge)
    logp = [0.0]
    for i in range(1, n):
        # float32 rounding is monotone, so a child's logp never exceeds its parent's
        logp.append(logp[parents[i]] + math.log(draw(edge)))
    tokens = [draw(st.integers(0, vocab_size - 1)) for _ in range(n)]
    return TokenTree(tokens, parents, logp)


@st.composite
def token_trees(
    draw: st.DrawFn,
    *,
    min_requests: int = 1,
    max_requests: int = 4,
    min_nodes: int = 1,
    max_nodes: int = 12,
    vocab_size: int = 50,
    ties: bool = True,
    extra_padding: int = 2,
) -> TokenTree:
    """A padded batch of ``min_requests``..``max_requests`` valid trees.

    Rows have different sizes; up to ``extra_padding`` padding columns are added beyond the
    largest tree, so fully padded tails are covered too.
    """
    R = draw(st.integers(min_requests, max_requests))
    rows = [
        draw(
            single_trees(min_nodes=min_nodes, max_nodes=max_nodes, vocab_size=vocab_size, ties=ties)
        )
        for _ in range(R)
    ]
    batch = TokenTree.stack(rows)
    pad = draw(st.integers(0, extra_padding))
    if pad == 0:
        return batch

    def widen(t: Tensor, value: float) -> Tensor:
        return torch.nn.functional.pad(t, (0, pad), value=value)

    return TokenTree(
        widen(batch.tokens, 0),
        widen(batch.parents, -1),
        widen(batch.logp, float("-inf")),
        widen(batch.depth, 0),
        batch.num_nodes,
    )


def budgets(tree: TokenTree, *, per_request: bool = False) -> st.SearchStrategy[int | Tensor]:
    """Valid budgets for ``tree``: a total in [R, R * N + 2], or per-request (R,) >= 1."""
    R, N = tree.num_requests, tree.max_nodes
    if per_request:
        return st.lists(st.integers(1, N + 2), min_size=R, max_size=R).map(
            lambda b: torch.tensor(b, dtype=torch.int64)
        )
    return st.integers(R, R * N + 2)


def needs(num_requests: int, max_depth: int) -> st.SearchStrategy[Tensor]:
    """(R,) float32 needs in [1, max_depth + 1], as :func:`adaspec.select.tokens_needed` gives."""
    return st.lists(
        st.floats(1.0, float(max_depth + 1), width=32), min_size=num_requests, max_size=num_requests
    ).map(lambda v: torch.tensor(v, dtype=torch.float32))


def logits(
    shape: tuple[int, ...], *, low: float = -8.0, high: float = 8.0
) -> st.SearchStrategy[Tensor]:
    """Finite float32 logits of ``shape``, elements in [low, high]; repeated values are likely."""
    size = math.prod(shape)
    return st.lists(
        st.one_of(st.sampled_from((0.0, 1.0, -1.0)), st.floats(low, high, width=32)),
        min_size=size,
        max_size=size,
    ).map(lambda v: torch.tensor(v, dtype=torch.float32).reshape(shape))

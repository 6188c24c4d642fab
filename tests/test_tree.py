import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from adaspec.testing import single_trees, token_trees
from adaspec.tree import (
    TokenTree,
    ancestor_mask,
    build_optimal,
    expected_accepted,
    is_leaf,
    path_to,
    position_ids,
    strict_order,
    subtree,
)

NEG_INF = float("-inf")


def example() -> TokenTree:
    #        0 (7)
    #       /     \
    #    1 (3)    2 (4)
    #     |
    #    3 (9)
    return TokenTree([7, 3, 4, 9], [-1, 0, 0, 1], [0.0, -0.1, -1.5, -0.3])


# ----------------------------------------------------------------------- construction
def test_lists_make_a_single_tree_with_derived_fields():
    t = example()
    assert t.tokens.shape == (1, 4)
    assert t.tokens.dtype == torch.int64
    assert t.parents.dtype == torch.int64
    assert t.logp.dtype == torch.float32
    assert t.depth.tolist() == [[0, 1, 1, 2]]
    assert t.num_nodes.tolist() == [4]


def test_batched_tensors_and_padding():
    t = TokenTree(
        tokens=torch.tensor([[1, 2, 3], [4, 0, 0]]),
        parents=torch.tensor([[-1, 0, 1], [-1, -1, -1]]),
        logp=torch.tensor([[0.0, -1.0, -2.0], [0.0, NEG_INF, NEG_INF]]),
    )
    assert t.num_nodes.tolist() == [3, 1]
    assert t.depth.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert t.valid.tolist() == [[True, True, True], [True, False, False]]
    assert t[1].tokens.tolist() == [[4]]
    assert t[-1].num_nodes.tolist() == [1]


def test_stack_pads_to_the_largest_tree():
    a, b = example(), TokenTree([5], [-1], [0.0])
    s = TokenTree.stack([a, b])
    assert s.tokens.shape == (2, 4)
    assert s.parents[1].tolist() == [-1, -1, -1, -1]
    assert s.logp[1, 1:].tolist() == [NEG_INF] * 3
    assert s.num_nodes.tolist() == [4, 1]
    assert torch.equal(s[0].tokens, a.tokens)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(tokens=[1, 2], parents=[-1, 1], logp=[0.0, -1.0]), "parent index must be smaller"),
        (dict(tokens=[1, 2], parents=[-1, 5], logp=[0.0, -1.0]), "parent index must be smaller"),
        (dict(tokens=[1, 2, 3], parents=[-1, -1, 0], logp=[0.0, -1.0, -1.0]), "has parent -1"),
        (dict(tokens=[1, 2], parents=[0, 0], logp=[0.0, -1.0]), "root"),
        (dict(tokens=[1, 2], parents=[-1, 0], logp=[0.0, 0.5]), "must be <= 0"),
        (dict(tokens=[1, 2], parents=[-1, 0], logp=[0.0, float("nan")]), "NaN"),
        (dict(tokens=[1, 2], parents=[-1, 0], logp=[-0.5, -1.0]), "root must be 0"),
        (
            dict(tokens=[1, 2, 3], parents=[-1, 0, 1], logp=[0.0, -2.0, -1.0]),
            "larger than its parent",
        ),
        (
            dict(tokens=[1, 2], parents=[-1, -1], logp=[0.0, -1.0]),
            "padding node 1 of row 0 must be -inf",
        ),
        (dict(tokens=[1, -2], parents=[-1, 0], logp=[0.0, -1.0]), "tokens must be >= 0"),
        (dict(tokens=[1, 2], parents=[-1, 0, 0], logp=[0.0, -1.0]), "shape of tokens"),
        (
            dict(tokens=[[1, 2]], parents=[[-1, 0]], logp=[[0.0, -1.0]], depth=[[0, 2]]),
            "depth disagrees",
        ),
        (dict(tokens=[[1, 2]], parents=[[-1, 0]], logp=[[0.0, -1.0]], num_nodes=[1]), "num_nodes"),
        (
            dict(
                tokens=torch.zeros(0, 3, dtype=torch.int64),
                parents=torch.zeros(0, 3, dtype=torch.int64),
                logp=torch.zeros(0, 3),
            ),
            "at least one row",
        ),
        (dict(tokens=[[[1]]], parents=[[[-1]]], logp=[[[0.0]]]), r"shape \(N,\) or \(R, N\)"),
        (dict(tokens=torch.tensor([1.5, 2.0]), parents=[-1, 0], logp=[0.0, -1.0]), "integer"),
    ],
)
def test_validation_names_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenTree(**kwargs)


def test_type_errors():
    with pytest.raises(TypeError, match="tokens"):
        TokenTree("abc", [-1], [0.0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="TokenTree"):
        TokenTree.stack([example(), "x"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="at least one tree"):
        TokenTree.stack([])
    with pytest.raises(TypeError, match="budget"):
        build_optimal(example(), 2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="budget must be >= 1"):
        build_optimal(example(), 0)
    with pytest.raises(ValueError, match="budget must be an int or shape"):
        build_optimal(example(), torch.tensor([1, 2]))


# ----------------------------------------------------------------------- derived views
def brute_ancestors(parents: list[int], i: int) -> set[int]:
    out = {i}
    while parents[i] >= 0:
        i = parents[i]
        out.add(i)
    return out


@given(token_trees())
def test_ancestor_mask_matches_parent_walk(tree):
    mask = ancestor_mask(tree)
    for r in range(tree.num_requests):
        par = tree.parents[r].tolist()
        for i in range(tree.max_nodes):
            expect = brute_ancestors(par, i) if i < tree.num_nodes[r] else {i}
            assert set(mask[r, i].nonzero().flatten().tolist()) == expect


def test_ancestor_mask_literal():
    assert ancestor_mask(example())[0].int().tolist() == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 0, 1, 0],
        [1, 1, 0, 1],
    ]


def test_positions_leaves_paths_expected():
    t = TokenTree.stack([example(), TokenTree([5, 6], [-1, 0], [0.0, -0.5])])
    assert position_ids(t, torch.tensor([10, 0])).tolist() == [[10, 11, 11, 12], [0, 1, 0, 0]]
    assert position_ids(t, 3)[1, :2].tolist() == [3, 4]
    assert is_leaf(t).tolist() == [[False, False, True, True], [False, True, False, False]]
    assert path_to(t, torch.tensor([3, 1])).tolist() == [[0, 1, 3], [0, 1, -1]]
    expected = [1 + math.exp(-0.1) + math.exp(-1.5) + math.exp(-0.3), 1 + math.exp(-0.5)]
    assert expected_accepted(t).tolist() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="cache_lens"):
        position_ids(t, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="nodes must index real nodes"):
        path_to(t, torch.tensor([0, 2]))


# ----------------------------------------------------------------------- optimal trees
def closed_subsets(parents: list[int], size: int):
    """Every ancestor-closed node set of the given size containing the root (brute force)."""
    n = len(parents)
    for rest in itertools.combinations(range(1, n), size - 1):
        s = {0, *rest}
        if all(parents[i] in s for i in rest):
            yield s


@given(single_trees(max_nodes=9), st.integers(1, 10))
def test_build_optimal_equals_brute_force(tree, budget):
    n = int(tree.num_nodes[0])
    f = tree.logp[0].double().exp().tolist()
    par = tree.parents[0].tolist()
    size = min(budget, n)
    best = max(sum(f[i] for i in s) for s in closed_subsets(par, size))
    sub, kept = build_optimal(tree, budget)
    kept_set = set(kept[0].tolist())
    assert sub.num_nodes.tolist() == [size]
    assert len(kept_set) == size
    assert 0 in kept_set
    assert all(par[i] in kept_set for i in kept_set if i != 0), "not closed under ancestors"
    assert sum(f[i] for i in kept_set) == pytest.approx(best, rel=1e-12, abs=1e-12)
    # the subtree is the same tree: tokens, logp and parent links survive the reindexing
    k = kept[0]
    assert torch.equal(sub.tokens[0], tree.tokens[0, k])
    assert torch.equal(sub.logp[0], tree.logp[0, k])
    for j, p in enumerate(sub.parents[0].tolist()):
        assert p == -1 if j == 0 else int(k[p]) == par[int(k[j])]
    assert kept[0].tolist() == sorted(kept[0].tolist()), "topological order not kept"


def test_ties_follow_the_strict_order():
    # equal logp everywhere below the root: smaller depth first, then smaller index
    t = TokenTree([0, 1, 2, 3, 4], [-1, 0, 1, 0, 3], [0.0, -1.0, -1.0, -1.0, -1.0])
    assert strict_order(t)[0].tolist() == [0, 1, 3, 2, 4]
    assert build_optimal(t, 2).kept.tolist() == [[0, 1]]
    assert build_optimal(t, 3).kept.tolist() == [[0, 1, 3]]


def test_real_nodes_with_zero_probability_rank_before_padding():
    t = TokenTree([[0, 1, 2]], [[-1, 0, -1]], [[0.0, NEG_INF, NEG_INF]])
    assert t.num_nodes.tolist() == [2]
    assert strict_order(t)[0].tolist() == [0, 1, 2]
    assert build_optimal(t, 5).tree.num_nodes.tolist() == [2]


@given(token_trees(), st.data())
def test_build_optimal_batched_equals_per_row(tree, data):
    budget = torch.tensor(
        data.draw(
            st.lists(st.integers(1, 14), min_size=tree.num_requests, max_size=tree.num_requests)
        )
    )
    sub, kept = build_optimal(tree, budget)
    assert sub.num_nodes.tolist() == torch.minimum(budget, tree.num_nodes).tolist()
    for r in range(tree.num_requests):
        one = build_optimal(tree[r], int(budget[r]))
        n = int(one.tree.num_nodes[0])
        assert torch.equal(kept[r, :n], one.kept[0])
        assert (kept[r, n:] == -1).all()
        assert torch.equal(sub.parents[r, :n], one.tree.parents[0])


def test_budget_covering_everything_returns_the_tree_unchanged():
    t = example()
    sub, kept = build_optimal(t, 10)
    for field in ("tokens", "parents", "logp", "depth", "num_nodes"):
        assert torch.equal(getattr(sub, field), getattr(t, field))
    assert kept.tolist() == [[0, 1, 2, 3]]


def test_subtree_rejects_unclosed_sets():
    t = example()
    with pytest.raises(ValueError, match="closed under ancestors"):
        subtree(t, torch.tensor([[True, False, False, True]]))
    with pytest.raises(ValueError, match="root"):
        subtree(t, torch.tensor([[False, True, False, False]]))
    with pytest.raises(ValueError, match="bool tensor of shape"):
        subtree(t, torch.ones(1, 3, dtype=torch.bool))

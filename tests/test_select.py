import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from adaspec.select import select, tokens_needed
from adaspec.testing import needs, single_trees, token_trees
from adaspec.tree import TokenTree, build_optimal


def best_value_per_size(tree: TokenTree, r: int) -> list[float]:
    """best[k] = max Σ f over ancestor-closed sets of k + 1 nodes of row r (brute force)."""
    n = int(tree.num_nodes[r])
    par = tree.parents[r].tolist()
    f = tree.logp[r].double().exp().tolist()
    best = []
    for size in range(1, n + 1):
        value = float("-inf")
        for rest in itertools.combinations(range(1, n), size - 1):
            s = {0, *rest}
            if all(par[i] in s for i in rest):
                value = max(value, sum(f[i] for i in s))
        best.append(value)
    return best


def brute_force_total(tree: TokenTree, budget: int) -> float:
    """Max total Σ f over per-request closed sets with at most ``budget`` nodes in all."""
    # knapsack over requests: table[b] = best total using b nodes
    table = {0: 0.0}
    for r in range(tree.num_requests):
        best = best_value_per_size(tree, r)
        nxt: dict[int, float] = {}
        for used, value in table.items():
            for k, v in enumerate(best, start=1):
                if used + k <= budget:
                    nxt[used + k] = max(nxt.get(used + k, float("-inf")), value + v)
        table = nxt
    return max(table.values())


def check_closed(sel, cand):
    for r in range(cand.num_requests):
        kept = [k for k in sel.kept[r].tolist() if k >= 0]
        par = cand.parents[r].tolist()
        assert 0 in kept
        assert all(par[k] in kept for k in kept if k != 0)
        assert len(kept) == int(sel.num_selected[r])


@given(token_trees(max_requests=3, max_nodes=6), st.data())
def test_throughput_selection_equals_brute_force(cand, data):
    budget = data.draw(st.integers(cand.num_requests, int(cand.num_nodes.sum()) + 2))
    sel = select(cand, budget)
    check_closed(sel, cand)
    assert int(sel.num_selected.sum()) <= budget
    assert int(sel.num_selected.sum()) == min(budget, int(cand.num_nodes.sum()))
    f = cand.logp.double().exp()
    total = sum(
        float(f[r, k]) for r in range(cand.num_requests) for k in sel.kept[r].tolist() if k >= 0
    )
    assert total == pytest.approx(brute_force_total(cand, budget), rel=1e-9)
    assert sel.expected_accepted.double().sum().item() == pytest.approx(total, rel=1e-5)


@given(single_trees(max_nodes=10), st.integers(1, 12))
def test_single_request_equals_build_optimal(tree, budget):
    assert torch.equal(select(tree, budget).kept, build_optimal(tree, budget).kept)


@given(token_trees(max_requests=4, max_nodes=8), st.data())
def test_needs_that_fit_are_met(cand, data):
    need = data.draw(needs(cand.num_requests, max_depth=4))
    cap = data.draw(st.integers(1, 9))
    sel_all = select(cand, int(cand.num_nodes.sum()), need=need, max_per_request=cap)
    budget = data.draw(st.integers(cand.num_requests, int(cand.num_nodes.sum()) + 3))
    sel = select(cand, budget, need=need, max_per_request=cap)
    check_closed(sel, cand)
    assert int(sel.num_selected.sum()) <= budget
    assert (sel.num_selected <= cap).all()
    # what each request can reach at all: Σ f of its best min(cap, n) nodes
    reachable = sel_all.expected_accepted
    f = cand.logp.exp()
    for r in range(cand.num_requests):
        kept = [k for k in sel.kept[r].tolist() if k >= 0]
        got = float(f[r, kept].sum())
        assert got == pytest.approx(float(sel.expected_accepted[r]), rel=1e-5)
        assert bool(sel.need_met[r]) == (float(sel.expected_accepted[r]) >= float(need[r]))
    # phase 1 only wants the shortest prefix reaching each need: if those fit the budget,
    # every need the tree can meet is met
    wanted = 0
    for r in range(cand.num_requests):
        n_r = min(cap, int(cand.num_nodes[r]))
        k = 1
        while k < n_r and float(build_optimal(cand[r], k).tree.logp.exp().sum()) < float(need[r]):
            k += 1
        wanted += k
    if wanted <= budget:
        met_possible = reachable >= need
        assert bool((sel.need_met | ~met_possible).all())


def test_most_urgent_request_is_served_first():
    chain = TokenTree([1, 2, 3, 4], [-1, 0, 1, 2], [0.0, -0.1, -0.2, -0.3])
    cand = TokenTree.stack([chain, chain, chain])
    # budget for the roots plus 3 more nodes: only the most urgent request (index 1) gets them
    sel = select(cand, budget=6, need=torch.tensor([2.5, 3.4, 1.0]))
    assert sel.num_selected.tolist() == [1, 4, 1]
    assert sel.need_met.tolist() == [False, True, True]
    assert sel.unmet.tolist() == [0]
    # with room for both, both needs are met and the leftover goes to the best nodes
    sel = select(cand, budget=8, need=torch.tensor([2.5, 3.4, 1.0]))
    assert sel.need_met.all()
    assert sel.num_selected.tolist() == [3, 4, 1]


def test_unmeetable_need_is_reported_and_others_still_served():
    short = TokenTree([1, 2], [-1, 0], [0.0, -2.0])
    good = TokenTree([1, 2, 3], [-1, 0, 1], [0.0, -0.05, -0.1])
    sel = select(TokenTree.stack([short, good]), budget=5, need=torch.tensor([3.0, 2.5]))
    assert sel.need_met.tolist() == [False, True]
    assert sel.num_selected.tolist() == [2, 3]


def test_select_validation():
    cand = TokenTree.stack([TokenTree([1], [-1], [0.0])] * 3)
    with pytest.raises(ValueError, match="smaller than the number of requests"):
        select(cand, 2)
    with pytest.raises(TypeError, match="budget must be an int"):
        select(cand, 3.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="need must be a scalar or shape"):
        select(cand, 3, need=torch.ones(2))
    with pytest.raises(ValueError, match="need must be finite"):
        select(cand, 3, need=-1.0)
    with pytest.raises(ValueError, match="need must be finite"):
        select(cand, 3, need=float("inf"))
    with pytest.raises(ValueError, match="max_per_request"):
        select(cand, 3, max_per_request=0)


def test_tokens_needed_formula():
    # on schedule after this step: (1.0 + 0.1) / 0.05 = 22 tokens; 20 decoded -> need 2
    need = tokens_needed(
        torch.tensor([0.05, 0.05, 1.0, 0.01]), 1.0, torch.tensor([20, 0, 5, 20]), 0.1, 4
    )
    assert need.tolist() == pytest.approx([2.0, 5.0, 1.0, 5.0])
    assert tokens_needed(0.05, 0.0, 0, 0.0, 3).item() == 1.0
    with pytest.raises(ValueError, match="slo must be > 0"):
        tokens_needed(0.0, 1.0, 1, 0.1, 4)
    with pytest.raises(ValueError, match="elapsed must be >= 0"):
        tokens_needed(0.1, -1.0, 1, 0.1, 4)
    with pytest.raises(ValueError, match="max_depth"):
        tokens_needed(0.1, 1.0, 1, 0.1, -1)
    with pytest.raises(ValueError, match="one shape"):
        tokens_needed(torch.ones(2), torch.ones(3), 1, 0.1, 2)

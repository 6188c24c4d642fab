import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from adaspec.acceptance import (
    Calibrator,
    TreeGrower,
    accepted_mask,
    expand,
    extension_logprobs,
    grow_tree,
    logprobs_from_logits,
    probs_from_logits,
    process_logits,
)
from adaspec.testing import logits as logits_strategy
from adaspec.testing import token_trees
from adaspec.tree import TokenTree, build_optimal


# --------------------------------------------------------------------------- transforms
def reference_probs(
    row: list[float], temperature: float, top_k: int | None, top_p: float | None
) -> np.ndarray:
    """Plain per-row numpy version of temperature -> top-k -> top-p, written independently."""
    x = np.array(row, dtype=np.float64)
    V = len(x)
    if temperature == 0:
        out = np.zeros(V)
        out[int(np.argmax(x))] = 1.0
        return out
    # near-equal logits are ordered as process_logits computes them: float32 (x - max) / T,
    # and the raw float32 logits when T = 1 (no division)
    x32 = x.astype(np.float32)
    key = x32 if temperature == 1 else (x32 - np.float32(x.max())) / np.float32(temperature)
    x = x / temperature
    keep = np.ones(V, dtype=bool)
    if top_k:
        kth = np.sort(key)[::-1][min(top_k, V) - 1]
        keep &= key >= kth
    p = np.where(keep, np.exp(x - x[keep].max()), 0.0)
    p /= p.sum()
    if top_p is not None and top_p < 1:
        order = sorted(range(V), key=lambda i: (-key[i], i))  # by logit, ties by token id
        mass, chosen = 0.0, []
        for i in order:
            chosen.append(i)
            mass += p[i]
            if mass >= top_p:
                break
        mask = np.zeros(V, dtype=bool)
        mask[chosen] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return p


@given(
    logits_strategy((3, 7)),
    st.sampled_from([0.0, 0.5, 1.0, 1.7]),
    st.sampled_from([None, 0, 1, 3, 7, 9]),
    st.sampled_from([None, 0.3, 0.9, 1.0]),
)
def test_transforms_match_reference(x, temperature, top_k, top_p):
    got = probs_from_logits(x, temperature, top_k, top_p)
    for r in range(x.shape[0]):
        want = reference_probs(x[r].tolist(), temperature, top_k, top_p)
        # float32 softmax; top-p boundaries decided on float32 masses may differ only on
        # exact ties of cumulated mass, which the strategy's values make rare but possible
        np.testing.assert_allclose(got[r].double().numpy(), want, atol=2e-6)


def test_per_request_parameters_and_greedy_rows():
    x = torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]])
    p = probs_from_logits(x, temperature=torch.tensor([0.0, 1.0]), top_k=torch.tensor([0, 2]))
    assert p[0].tolist() == [0.0, 1.0, 0.0]
    assert p[1, 0] == 0
    assert p[1, 1] > p[1, 2] > 0
    lp = logprobs_from_logits(x, temperature=0.0)
    assert lp[0].tolist() == [float("-inf"), 0.0, float("-inf")]


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        (dict(temperature=-0.1), ValueError, "temperature"),
        (dict(top_p=0.0), ValueError, "top_p"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(top_k=-1), ValueError, "top_k"),
        (dict(top_k=1.5), ValueError, "top_k"),
        (dict(temperature=torch.ones(5)), ValueError, "temperature"),
    ],
)
def test_transform_validation(kwargs, err, match):
    with pytest.raises(err, match=match):
        process_logits(torch.zeros(2, 4), **kwargs)


def test_bad_logits():
    with pytest.raises(ValueError, match="NaN"):
        process_logits(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="-inf everywhere"):
        process_logits(torch.tensor([[float("-inf")] * 3]))
    with pytest.raises(TypeError, match="floating"):
        process_logits(torch.zeros(2, 3, dtype=torch.int64))


# ------------------------------------------------------------------------ beam expansion
def log_softmax_list(row: list[float]) -> list[float]:
    m = max(row)
    z = math.log(sum(math.exp(v - m) for v in row)) + m
    return [v - z for v in row]


def brute_force_beam(
    table: torch.Tensor, root: int, depth: int, width: int
) -> dict[tuple[int, ...], float]:
    """Path (tokens after the root) -> log f for every node of the beam, by explicit loops.

    ``table[d, t]`` holds the draft's logits after a node of depth d with token t (a bigram
    table per depth, so that different paths do not tie by construction).
    """
    nodes: dict[tuple[int, ...], float] = {(): 0.0}
    frontier: list[tuple[int, ...]] = [()]
    for d in range(depth):
        ext = []
        for path in frontier:
            last = path[-1] if path else root
            for v, lq in enumerate(log_softmax_list(table[d, last].tolist())):
                ext.append((nodes[path] + lq, (*path, v)))
        ext.sort(key=lambda e: -e[0])
        frontier = [p for _, p in ext[:width]]
        for lp, p in ext[:width]:
            nodes[p] = lp
    return nodes


def tree_paths(tree: TokenTree, r: int) -> dict[tuple[int, ...], float]:
    out: dict[tuple[int, ...], float] = {}
    par, tok, lp = tree.parents[r].tolist(), tree.tokens[r].tolist(), tree.logp[r].tolist()
    for i in range(int(tree.num_nodes[r])):
        path, j = [], i
        while par[j] >= 0:
            path.append(tok[j])
            j = par[j]
        out[tuple(reversed(path))] = lp[i]
    return out


def grower_tree(roots: torch.Tensor, table: torch.Tensor, depth: int, width: int) -> TokenTree:
    grower = TreeGrower(roots, width, temperature=1.0)
    for _ in range(depth):
        grower.expand(table[grower.depth][grower.frontier_tokens])
    return grower.tree()


@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.integers(1, 4), st.integers(2, 5))
def test_beam_expansion_equals_brute_force(seed, depth, width, vocab):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(depth, vocab, vocab, generator=g) * 2  # logits of next | depth, last token
    roots = torch.randint(0, vocab, (3,), generator=g)
    cand, grown = grow_tree(
        roots, lambda gr: table[gr.depth][gr.frontier_tokens], depth, width, temperature=1.0
    )
    # the grown trees are valid TokenTrees: re-deriving depth and num_nodes agrees
    for t in (cand, grower_tree(roots, table, depth, width)):
        again = TokenTree(t.tokens, t.parents, t.logp)
        assert torch.equal(again.depth, t.depth)
        assert torch.equal(again.num_nodes, t.num_nodes)
    for r in range(3):
        want = brute_force_beam(table, int(roots[r]), depth, width)
        got = tree_paths(cand, r)
        assert set(got) == set(want)
        for path, lp in want.items():
            assert got[path] == pytest.approx(lp, abs=1e-5)
    assert (grown[:, 0] == 0).all()


def test_optimal_tree_lies_inside_the_beam_of_width_budget():
    # the full tree of every sequence up to depth 3 over 3 tokens, vs the width-B beam
    g = torch.Generator().manual_seed(1)
    V, D = 3, 3
    table = torch.randn(D, V, V, generator=g)  # per depth, so different paths never tie
    lsm = table.log_softmax(-1)
    tokens, parents, logp = [0], [-1], [0.0]
    paths: list[tuple[int, ...]] = [()]
    for d in range(D):
        for i, p in enumerate(list(paths)):
            if len(p) != d:
                continue
            last = p[-1] if p else 0
            for v in range(V):
                tokens.append(v)
                parents.append(i)
                logp.append(logp[i] + float(lsm[d, last, v]))
                paths.append((*p, v))
    full = TokenTree(tokens, parents, logp)
    for budget in range(1, 10):
        best = build_optimal(full, budget)
        best_paths = {paths[k] for k in best.kept[0].tolist()}
        beam, _ = grow_tree(
            torch.tensor([0]),
            lambda gr: table[gr.depth][gr.frontier_tokens],
            D,
            budget,
            temperature=1.0,
        )
        assert best_paths <= set(tree_paths(beam, 0))


def test_fewer_nonzero_extensions_than_width_are_dropped():
    table = torch.tensor([[0.0, 5.0, 1.0], [0.0, 0.0, 9.0], [3.0, 0.0, 0.0]])
    grower = TreeGrower(torch.tensor([0, 1]), width=3, top_k=1)
    grower.expand(table[grower.frontier_tokens])
    assert grower.tree().num_nodes.tolist() == [4, 4]  # grown slots keep stable indices
    cand, grown = grower.candidates()
    assert cand.num_nodes.tolist() == [2, 2]  # top-k = 1 leaves one real child per root
    assert cand.tokens[:, 1].tolist() == [1, 2]
    assert grown[:, 1].tolist() == [1, 1]


@given(
    st.integers(0, 2**31 - 1),
    st.integers(1, 4),
    st.sampled_from([0.7, 1.0, "per-request"]),
    st.sampled_from([None, 2, 5, 9, "per-request"]),  # 9: between K = 7 and V = 12
    st.sampled_from([None, 0.8, "per-request"]),
    st.booleans(),
)
def test_expand_over_a_vocabulary_subset_equals_minus_inf_elsewhere(
    seed, width, temperature, top_k, top_p, ties
):
    # a draft scoring K of V tokens: its K columns + vocab == its V logits with -inf around
    g = torch.Generator().manual_seed(seed)
    V = 12
    vocab = torch.randperm(V, generator=g)[:7].sort().values
    scores = torch.randn(2, 3, 7, generator=g) * 2
    if ties:  # whole numbers: many exactly equal scores
        scores = scores.round()
    if temperature == "per-request":
        temperature = torch.tensor([0.5, 1.3])
    if top_k == "per-request":
        top_k = torch.tensor([3, 0])  # (0: no top-k for that request)
    if top_p == "per-request":
        top_p = torch.tensor([0.6, 1.0])
    full = torch.full((2, 3, V), float("-inf")).index_copy(-1, vocab, scores)
    frontier = torch.randn(2, 3, generator=g) - 1
    want = expand(frontier, full, width, temperature, top_k, top_p)
    got = expand(frontier, scores, width, temperature, top_k, top_p, vocab=vocab)
    torch.testing.assert_close(got.logp, want.logp, atol=1e-5, rtol=0)
    real = want.logp > float("-inf")  # f = 0 slots hold arbitrary tokens (dropped later)
    assert torch.equal(got.parent[real], want.parent[real])
    if not ties:
        assert torch.equal(got.tokens[real], want.tokens[real])
    # exact ties may rank in another order: then an equally scored token of the same parent
    rows = torch.arange(2).unsqueeze(1).expand_as(got.parent)
    at = full[rows, got.parent]  # [2, W, V] the parent's logits
    assert bool(torch.isin(got.tokens[real], vocab).all())
    assert torch.equal(
        at.gather(2, got.tokens.unsqueeze(2))[real], at.gather(2, want.tokens.unsqueeze(2))[real]
    )


def test_a_bad_vocabulary_subset_is_named():
    fl, lg = torch.zeros(1, 1), torch.randn(1, 1, 3)
    with pytest.raises(TypeError, match="vocab"):
        expand(fl, lg, 2, vocab=torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="vocab must name one token per logit column"):
        expand(fl, lg, 2, vocab=torch.tensor([0, 1]))
    grower = TreeGrower(torch.tensor([0]), 2, vocab=torch.tensor([3, 5]))
    with pytest.raises(ValueError, match="vocab"):
        grower.expand(lg)
    for bad in (torch.tensor([5, 3]), torch.tensor([3, 3]), torch.tensor([-1, 2])):
        with pytest.raises(ValueError, match="sorted unique token ids"):
            TreeGrower(torch.tensor([0]), 2, vocab=bad)


def test_expand_and_extension_shapes():
    fl = torch.tensor([[0.0, -1.0]])
    lg = torch.randn(1, 2, 5)
    ext = extension_logprobs(fl, lg, temperature=1.0)
    assert ext.shape == (1, 2, 5)
    e = expand(fl, lg, 4, temperature=1.0)
    assert e.tokens.shape == (1, 4)
    assert (e.logp[:, :-1] >= e.logp[:, 1:]).all()
    with pytest.raises(ValueError, match="width"):
        expand(fl, lg, 0)
    with pytest.raises(ValueError, match="matching frontier_logp"):
        extension_logprobs(fl, torch.randn(1, 3, 5))
    with pytest.raises(ValueError, match="root_tokens"):
        TreeGrower(torch.tensor([[1]]), 2)
    with pytest.raises(ValueError, match="depth"):
        grow_tree(torch.tensor([1]), lambda g: lg, -1, 2)


def test_greedy_estimates_use_the_untempered_softmax():
    fl = torch.zeros(1, 1)
    lg = torch.tensor([[[2.0, 1.0, 0.0]]])
    assert torch.allclose(extension_logprobs(fl, lg, temperature=0.0), lg.log_softmax(-1))


# --------------------------------------------------------------------------- calibration
def test_calibrator_learns_a_monotone_curve():
    g = torch.Generator().manual_seed(0)
    q = torch.rand(200_000, generator=g)
    depth = torch.randint(1, 6, (200_000,), generator=g)
    true = q**2 * torch.where(depth == 1, 1.0, 0.8)  # deeper edges accepted less often
    acc = torch.rand(200_000, generator=g) < true
    cal = Calibrator()
    cal.observe_edges(depth, q, acc)
    grid = torch.linspace(0, 1, 101)
    for d in (1, 2, 5):
        est = cal.edge_probs(torch.full_like(grid, d, dtype=torch.int64), grid)
        assert ((est >= 0) & (est <= 1)).all()
        assert (est[1:] >= est[:-1]).all(), "calibrated curve must be monotone"
        want = grid**2 * (1.0 if d == 1 else 0.8)
        inner = (grid > 0.05) & (grid < 0.95)
        assert (est[inner] - want[inner]).abs().max() < 0.04


def test_a_few_hundred_trials_correct_an_underconfident_draft_in_every_bin():
    # a quantized copy of the target: its q of 0.3 is accepted ~80 % of the time. 300
    # trials leave most bins with a handful of trials or none (q is mostly high)
    g = torch.Generator().manual_seed(1)
    q = torch.rand(300, generator=g).sqrt()
    truth = torch.sigmoid(torch.logit(q) + 2.5)
    cal = Calibrator()
    cal.observe_edges(torch.ones(300, dtype=torch.int64), q, torch.rand(300, generator=g) < truth)
    grid = torch.linspace(0.05, 0.95, 19)
    est = cal.edge_probs(torch.ones(19, dtype=torch.int64), grid)
    want = torch.sigmoid(torch.logit(grid) + 2.5)
    assert (est - want).abs().mean() < 0.06  # the draft's own q is off by 0.36 on average
    assert (grid - want).abs().mean() > 0.3


def test_deep_buckets_with_few_trials_borrow_the_shape_the_shallow_ones_measured():
    # 300 trials at depth 1 of an underconfident draft, 5 at depth 4 (deeper levels are
    # reached rarely): depth 4's curve leans toward depth 1's, not toward the identity
    g = torch.Generator().manual_seed(2)
    q = torch.rand(305, generator=g).sqrt()
    truth = torch.sigmoid(torch.logit(q) + 2.5)
    depth = torch.ones(305, dtype=torch.int64)
    depth[300:] = 4
    cal = Calibrator()
    cal.observe_edges(depth, q, torch.rand(305, generator=g) < truth)
    grid = torch.linspace(0.05, 0.95, 19)
    deep = cal.edge_probs(torch.full((19,), 4), grid)
    want = torch.sigmoid(torch.logit(grid) + 2.5)
    assert (deep - want).abs().mean() < 0.1
    assert (deep - grid).abs().mean() > 0.25
    assert (deep[1:] >= deep[:-1]).all()


def test_an_overconfident_draft_is_corrected_and_the_curve_still_rises():
    # a small draft for a large target: its q is two logits too high, and its trials
    # crowd the top bin (where a Newton fit without step control ran to a slope of -200)
    g = torch.Generator().manual_seed(0)
    q = 1 - torch.rand(2000, generator=g) ** 3
    truth = torch.sigmoid(torch.logit(q) - 2)
    cal = Calibrator()
    cal.observe_edges(torch.ones(2000, dtype=torch.int64), q, torch.rand(2000, generator=g) < truth)
    grid = torch.linspace(0.05, 0.95, 19)
    est = cal.edge_probs(torch.ones(19, dtype=torch.int64), grid)
    assert (est[1:] >= est[:-1]).all()
    assert bool((est > 0).all())
    assert (est - torch.sigmoid(torch.logit(grid) - 2)).abs().mean() < 0.05
    # one bin only, 70 % accepted: a rising curve through it, not a step falling in q
    only = Calibrator()
    top = torch.full((200,), 0.975)
    only.observe_edges(torch.ones(200, dtype=torch.int64), top, torch.arange(200) < 140)
    curve = only.edge_probs(torch.ones(19, dtype=torch.int64), grid)
    assert (curve[1:] >= curve[:-1]).all()
    assert float(curve[0]) > 0.05
    assert abs(float(only.edge_probs(torch.ones(1, dtype=torch.int64), top[:1])) - 0.7) < 0.05


@given(token_trees(max_requests=3, max_nodes=8), st.integers(0, 2**31 - 1))
def test_calibrator_observe_and_apply_keep_the_tree_valid(tree, seed):
    cal = Calibrator(num_bins=5, depth_buckets=2)
    g = torch.Generator().manual_seed(seed)
    # accept a random root-path prefix in each row: walk to a random node
    accepted = torch.full((tree.num_requests, tree.max_nodes), -1)
    for r in range(tree.num_requests):
        n = int(tree.num_nodes[r])
        node = int(torch.randint(0, n, (1,), generator=g))
        path = []
        while node > 0:
            path.append(node)
            node = int(tree.parents[r, node])
        accepted[r, : len(path)] = torch.tensor(path[::-1], dtype=torch.int64)
    cal.observe(tree, accepted)
    out = cal.apply(tree)
    TokenTree(out.tokens, out.parents, out.logp)  # validates: root 0, children <= parents
    assert cal.observed_accepted == float((accepted >= 0).sum())
    assert accepted_mask(tree, accepted)[:, 0].all()


def test_calibrator_state_round_trip():
    cal = Calibrator(num_bins=8)
    cal.observe_edges(
        torch.tensor([1, 2, 3]), torch.tensor([0.2, 0.5, 0.9]), torch.tensor([True, False, True])
    )
    buf = io.BytesIO()
    torch.save(cal.state_dict(), buf)
    buf.seek(0)
    back = Calibrator.from_state_dict(torch.load(buf))
    grid = torch.linspace(0, 1, 11)
    d = torch.full((11,), 2)
    assert torch.equal(back.edge_probs(d, grid), cal.edge_probs(d, grid))
    with pytest.raises(ValueError, match="missing the key"):
        Calibrator.from_state_dict({"num_bins": 3})
    with pytest.raises(ValueError, match="draft_prob"):
        cal.observe_edges(torch.tensor([1]), torch.tensor([1.5]), torch.tensor([True]))


def test_uncalibrated_estimate_is_close_to_identity():
    cal = Calibrator()
    q = torch.tensor([0.1, 0.5, 0.9])
    assert cal.edge_probs(torch.ones(3, dtype=torch.int64), q).tolist() == pytest.approx(
        q.tolist(), abs=1e-6
    )


def test_calibrator_handles_zero_probability_nodes():
    inf = float("-inf")
    tree = TokenTree([1, 2, 3, 4], [-1, 0, 1, 0], [0.0, inf, inf, -0.5])
    cal = Calibrator()
    cal.observe(tree, torch.tensor([[3]]))
    out = cal.apply(tree)
    assert out.logp[0, 1] == inf
    assert out.logp[0, 2] == inf
    assert torch.isfinite(out.logp[0, 3])
    grower = TreeGrower(torch.tensor([0]), width=3, top_k=1, temperature=1.0)
    for _ in range(2):
        grower.expand(torch.randn(1, grower.frontier.shape[1], 5))
    grown = cal.apply(grower.tree())  # the grower keeps f = 0 nodes on purpose
    assert not torch.isnan(grown.logp).any()


@pytest.mark.parametrize("temperature", [1e-38, 1e-30, float("inf"), 1e30])
def test_extreme_temperatures_stay_finite(temperature):
    x = torch.tensor([[1.0, 2.0, 100.0], [0.0, float("-inf"), 3.0]])
    p = probs_from_logits(x, temperature)
    assert torch.isfinite(p).all()
    assert torch.allclose(p.sum(-1), torch.ones(2))
    if temperature < 1:
        assert p.argmax(-1).tolist() == [2, 2]
    assert p[1, 1] == 0


def test_bool_top_k_is_rejected():
    with pytest.raises(ValueError, match="top_k"):
        process_logits(torch.zeros(1, 4), top_k=torch.tensor([True]))

"""adaspec.models.greedy and tree_argmax: the exact float32 argmax from a bfloat16 pass.

Oracles: the argmax of the full projection in float64 (or float32 where ties are exact)
and tree_forward's logits; near-ties far below bfloat16's resolution are built on purpose.
"""

from __future__ import annotations

import gc
from typing import Any

import pytest
import torch
from torch import nn

from adaspec.models import (
    GreedyHead,
    commit,
    prefill,
    tiny_model,
    tree_argmax,
    tree_forward,
)
from adaspec.models import greedy as greedy_module
from adaspec.models.fast import FastLinear, optimize_for_cpu
from adaspec.models.greedy import greedy_head
from adaspec.tree import TokenTree
from tests.models_oracles import random_tree


def exact_argmax(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (h.double() @ w.double().T).argmax(-1)


@pytest.mark.parametrize("V", [3000, 4096, 262])
@pytest.mark.parametrize("scale", [0.1, 1.0, 30.0])
def test_equals_the_full_projection_on_random_rows(V: int, scale: float) -> None:
    g = torch.Generator().manual_seed(V)
    w = torch.randn(V, 64, generator=g) / 8
    h = torch.randn(7, 5, 64, generator=g) * scale
    head = GreedyHead(w)
    assert torch.equal(head(h), exact_argmax(h, w))
    assert head.rows == 35
    assert head.full_rows == 0
    assert head.candidates >= 35  # at least the winner of every row was recomputed


def test_near_ties_below_bfloat16_resolution_are_decided_in_float32() -> None:
    # pairs of tokens whose logits differ by ~1e-3 of logits ~10: bfloat16 cannot tell
    # them apart (its proxy errs by ~0.05 here), the recomputation must
    g = torch.Generator().manual_seed(0)
    V, H = 5000, 128
    w = torch.randn(V, H, generator=g) / 11
    h = torch.randn(64, H, generator=g)
    base = torch.randint(V, (64,), generator=g)
    for i in range(64):
        w[base[i]] = h[i] / h[i].norm() * 3  # token base[i] leads row i (logit ~3 |h|)
    twin = (base + 1 + torch.randint(V - 1, (64,), generator=g)) % V
    for i in range(64):
        step = torch.randn(H, generator=g)
        step -= (step @ h[i]) / (h[i] @ h[i]) * h[i]  # orthogonal to h[i]: no logit change
        sign = 1.0 if i % 2 else -1.0
        w[twin[i]] = w[base[i]] + step * 1e-2 + sign * h[i] * 1e-4  # 1e-4 |h|^2 apart
    ref = exact_argmax(h, w)
    proxy = (h.bfloat16() @ w.bfloat16().T).float().argmax(-1)
    gaps = (h.double() @ w.double().T).gather(1, torch.stack([base, twin], 1))
    assert bool(((gaps[:, 0] - gaps[:, 1]).abs() < 0.02).all())  # real near-ties
    assert not torch.equal(proxy, ref)  # (bfloat16 alone is wrong on some: not vacuous)
    head = GreedyHead(w)
    assert torch.equal(head(h), ref)
    assert set(ref.tolist()) <= set(base.tolist()) | set(twin.tolist())


def test_exact_ties_go_to_the_lowest_id_and_flat_rows_are_projected_in_full() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(300, 32, generator=g)
    w[200] = w[17]  # a duplicate row: an exact tie
    h = w[17].unsqueeze(0) * 4
    assert GreedyHead(w)(h).tolist() == [17] == (h @ w.T).argmax(-1).tolist()
    flat = torch.ones(5000, 32)  # every token ties: more candidates than are recomputed
    head = GreedyHead(flat)
    assert head(torch.randn(3, 32, generator=g)).tolist() == [0, 0, 0]
    assert head.full_rows == 3


def test_rows_that_are_not_finite_have_no_choice() -> None:
    w = torch.randn(2048, 16)
    h = torch.randn(4, 16)
    h[1, 3] = float("nan")
    h[2, 0] = float("inf")
    out = GreedyHead(w)(h)
    assert out[1] == -1
    assert out[2] == -1
    assert out[[0, 3]].tolist() == exact_argmax(h[[0, 3]], w).tolist()


def test_bad_input() -> None:
    with pytest.raises(TypeError, match="float32"):
        GreedyHead(torch.randn(10, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="weight"):
        GreedyHead(torch.randn(10))
    with pytest.raises(ValueError, match="finite"):
        GreedyHead(torch.full((10, 4), float("nan")))
    head = GreedyHead(torch.randn(10, 4))
    with pytest.raises(ValueError, match="4 features"):
        head(torch.randn(2, 5))
    with pytest.raises(TypeError, match="hidden"):
        head(torch.ones(2, 4, dtype=torch.int64))
    assert head(torch.randn(0, 4)).shape == (0,)


def test_greedy_head_is_kept_rebuilt_and_declined() -> None:
    live = len(greedy_module._HEADS)
    lin = nn.Linear(16, 600, bias=False)
    first = greedy_head(lin)
    assert first is not None
    assert greedy_head(lin) is first
    with torch.no_grad():
        lin.weight.mul_(2)  # changed in place: rebuilt, and right
    second = greedy_head(lin)
    assert second is not None
    assert second is not first
    h = torch.randn(3, 16)
    assert torch.equal(second(h), exact_argmax(h, lin.weight.detach()))
    wide = nn.Linear(16, 5000, bias=False)
    with torch.no_grad():  # nearly equal rows: every token is a candidate
        wide.weight.copy_(1 + 1e-3 * torch.randn(5000, 16))
    fast = FastLinear(wide)
    kept = greedy_head(fast)
    assert kept is not None
    h = torch.randn(3, 16)
    assert torch.equal(kept(h), exact_argmax(h, wide.weight.detach()))
    assert kept.full_rows == 3  # projected by the layer itself
    del kept, fast
    gc.collect()
    assert len(greedy_module._HEADS) == live + 1  # lin's: fast's head did not keep it alive
    assert greedy_head(nn.Linear(16, 600)) is None  # a bias
    assert greedy_head(nn.Linear(16, 600, bias=False, dtype=torch.bfloat16)) is None
    assert greedy_head(nn.Embedding(600, 16)) is None


def test_fast_linear_of_no_rows_makes_no_copies() -> None:
    fast = FastLinear(nn.Linear(64, 4096, bias=False))
    assert fast(torch.randn(2, 0, 64)).shape == (2, 0, 4096)
    assert fast._copies == {}


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("optimized", [False, True])
def test_tree_argmax_is_the_argmax_of_tree_forward(arch: str, optimized: bool) -> None:
    model = tiny_model(arch, seed=3, vocab_size=3000)
    if optimized:
        optimize_for_cpu(model)
    gen = torch.Generator().manual_seed(5)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13]]
    trees = TokenTree.stack([random_tree(gen, n, 3000) for n in (9, 4, 1)])
    a, _ = prefill(model, prompts)
    b, _ = prefill(model, prompts)
    chosen = tree_argmax(model, trees, a)  # [3, 9]
    logits = tree_forward(model, trees, b)  # [3, 9, V]
    assert chosen.dtype == torch.int64
    assert chosen.shape == (3, 9)
    valid = trees.valid
    assert torch.equal(chosen[valid], logits.argmax(-1)[valid])
    # the same cache afterwards: commit and decode on both agree
    accepted = torch.tensor([[1, -1], [-1, -1], [-1, -1]])
    assert torch.equal(commit(a, accepted), commit(b, accepted))
    roots = TokenTree(chosen[:, :1], torch.full((3, 1), -1), torch.zeros(3, 1), validate=False)
    assert torch.equal(tree_argmax(model, roots, a), tree_forward(model, roots, b).argmax(-1))


def test_tree_argmax_without_a_usable_output_layer_takes_the_logits() -> None:
    model = tiny_model(seed=4, vocab_size=500)
    model.lm_head = nn.Linear(32, 500, bias=True)  # (the tiny hidden size) a bias: declined
    tree = TokenTree([7, 8, 9], [-1, 0, 0], [0.0, -0.5, -1.0])
    a, _ = prefill(model, [[1, 2, 3]])
    b, _ = prefill(model, [[1, 2, 3]])
    assert torch.equal(tree_argmax(model, tree, a), tree_forward(model, tree, b).argmax(-1))


def test_prefill_argmax_is_the_argmax_of_its_logits() -> None:
    model = tiny_model("gemma3", seed=6, vocab_size=3000)
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    a, first = prefill(model, prompts, argmax=True)
    b, logits = prefill(model, prompts)
    assert first.dtype == torch.int64
    assert torch.equal(first, logits.argmax(-1))
    assert torch.equal(a.lens, b.lens)


def test_greedy_forwards_run_under_inference_mode() -> None:
    """Under ``torch.inference_mode()`` the head's bfloat16 copy is made outside it (it
    keeps a version counter); a weight made there keeps none, so no copy of it is kept:
    the head declines it and FastLinear runs it as it is, in-place edits included."""
    model = tiny_model("gemma3", seed=6, vocab_size=3000)
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    _, logits = prefill(model, prompts)
    with torch.inference_mode():
        _, first = prefill(model, prompts, argmax=True)
        layer = FastLinear(nn.Linear(64, 300, bias=False))  # an inference-mode weight
        x = torch.randn(3, 64)
        before = layer(x)
        assert greedy_head(layer) is None
        layer.weight.mul_(-1)  # (no version counter sees this)
        assert torch.equal(layer(x), -before)
    assert torch.equal(first, logits.argmax(-1))
    output_layer: Any = model.lm_head
    head = greedy_head(output_layer)
    assert head is not None
    assert not head._proxy.weight.is_inference()  # (the one made under inference mode)


def near_tie_rows(V: int, H: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights where token 1731 % V beats a twin by 1e-4 relative, and rows that see it."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, H, generator=g) / 8
    h = torch.randn(4, H, generator=g)
    best = 1731 % V
    w[best] = h[0] / h[0].norm() * 2
    w[(best + 1) % V] = w[best] * (1 - 1e-4)
    return w, h


@pytest.mark.parametrize("scale", [1e-25, 1e-12, 1.0, 1e12])
def test_extreme_row_scales_keep_the_bound(scale: float) -> None:
    # (float32 norms of such rows under- or overflowed: the bound collapsed, or was NaN)
    w, h = near_tie_rows(3000, 64, seed=7)
    x = h * scale
    assert torch.equal(GreedyHead(w)(x), exact_argmax(x, w))


def test_extreme_weights_and_logits() -> None:
    g = torch.Generator().manual_seed(8)
    tiny = torch.randn(1500, 16, generator=g) * 1e-30  # huge rows, tiny weights
    x = torch.randn(2, 16, generator=g) * 1e20
    assert torch.equal(GreedyHead(tiny)(x), exact_argmax(x, tiny))
    low = torch.ones(1500, 16) * 1e18  # logits near -3.4e38, still finite
    low[7] *= 0.5
    assert GreedyHead(low)(-torch.ones(2, 16) * 2.1e19).tolist() == [7, 7]
    # logits that overflow have no choice, as the full projection's argmax says
    big = torch.randn(5000, 16, generator=g) * 1e20
    assert GreedyHead(big)(torch.ones(2, 16) * 1e20).tolist() == [-1, -1]


def test_softcapped_logits_take_the_full_projection() -> None:
    # softcapping (monotone) can turn float32 near-ties into exact ties, which the
    # model's own argmax breaks by the lowest id: such models are not screened
    model: Any = tiny_model("gemma3", seed=9, vocab_size=3000)
    model.config.final_logit_softcapping = 1.0
    with torch.no_grad():
        model.lm_head.weight.mul_(100)  # every capped logit saturates to 1.0
    tree = TokenTree([7, 8, 9], [-1, 0, 0], [0.0, -0.5, -1.0])
    a, _ = prefill(model, [[1, 2, 3]])
    b, _ = prefill(model, [[1, 2, 3]])
    live = len(greedy_module._HEADS)
    assert torch.equal(tree_argmax(model, tree, a), tree_forward(model, tree, b).argmax(-1))
    assert len(greedy_module._HEADS) == live  # no head was made for it

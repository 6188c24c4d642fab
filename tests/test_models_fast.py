"""FastLinear / optimize_for_cpu and the draft's SubsetHead: equal to the plain layers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adaspec.models import make_draft, prefill, tiny_model, tree_forward
from adaspec.models.fast import (
    FastLinear,
    Int4Linear,
    Int8Linear,
    int4_linears,
    int8_linears,
    optimize_for_cpu,
    plain_linears,
    tunings,
)
from adaspec.models.vocab import SubsetHead, frequent_tokens, stdlib_token_counts
from adaspec.tree import TokenTree

OUT, IN = 65_539, 64  # large enough for every way (>= 2**22 weights), not a multiple of 4096


@pytest.fixture(scope="module")
def big() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(IN, OUT, bias=True).requires_grad_(False)


@pytest.mark.parametrize("way", ["linear", "packed", "blocked", "transposed"])
@pytest.mark.parametrize("shape", [(1, IN), (2, 3, IN), (5, IN)])
def test_every_way_equals_linear(big: nn.Linear, way: str, shape: tuple[int, ...]) -> None:
    fast = FastLinear(big)
    x = torch.randn(shape)
    out = fast._ways()[way](x)  # type: ignore[index]
    assert out.shape == (*shape[:-1], OUT)
    torch.testing.assert_close(out, F.linear(x, big.weight, big.bias), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 12, 40])
def test_forward_equals_linear_and_tunes_once(big: nn.Linear, rows: int) -> None:
    fast = FastLinear(big)
    x = torch.randn(rows, IN)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), F.linear(x, big.weight, big.bias), rtol=1e-4, atol=1e-4)
        before = tunings()
        fast(x)
    assert tunings() == before  # the plan is kept
    if rows <= 32:
        bucket = rows if rows <= 8 else 16 if rows <= 16 else 32
        assert fast.plan()[bucket] in {"linear", "packed", "blocked", "transposed"}
        assert rows <= 3 or fast.plan()[bucket] != "transposed"
        assert set(fast._copies) <= set(fast.plan().values())  # unused copies are dropped


def test_bf16_weights_serve_float32_inputs_and_grad_falls_back() -> None:
    lin = nn.Linear(32, 48)
    fast = FastLinear(nn.Linear(32, 48).to(torch.bfloat16))
    fast.weight = nn.Parameter(lin.weight.detach().to(torch.bfloat16), requires_grad=False)
    fast.bias = nn.Parameter(lin.bias.detach().to(torch.bfloat16), requires_grad=False)
    x = torch.randn(4, 32)
    with torch.no_grad():
        y = fast(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, lin(x), rtol=0.05, atol=0.05)
    g = FastLinear(nn.Linear(8, 8))
    xg = torch.randn(2, 8, requires_grad=True)
    g(xg).sum().backward()  # autograd path: plain F.linear
    assert xg.grad is not None


def test_in_place_weight_updates_rebuild_the_copies() -> None:
    fast = FastLinear(nn.Linear(16, 24).requires_grad_(False))
    x = torch.randn(2, 16)
    fast(x)
    fast.weight.mul_(3.0)
    torch.testing.assert_close(fast(x), F.linear(x, fast.weight, fast.bias))


def test_optimize_for_cpu_keeps_the_model_and_its_ties() -> None:
    model = tiny_model("gemma3", seed=0)
    keys = set(model.state_dict())
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = model(ids).logits
        optimize_for_cpu(model)
        after = model(ids).logits
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert set(model.state_dict()) == keys
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="model"):
        optimize_for_cpu("not a model")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="linear"):
        FastLinear(nn.Conv1d(1, 1, 1))  # type: ignore[arg-type]


def test_tree_forward_on_an_optimized_model_matches_the_plain_one() -> None:
    plain, fast = tiny_model(seed=3), optimize_for_cpu(tiny_model(seed=3))
    tree = TokenTree([5, 6, 7, 8], [-1, 0, 0, 1], [0.0, -0.1, -0.2, -0.3])
    out = []
    for model in (plain, fast):
        state, _ = prefill(model, [[1, 2, 3]])
        out.append(tree_forward(model, tree, state))
    torch.testing.assert_close(out[1], out[0], rtol=1e-4, atol=1e-4)


def test_subset_head_scores_only_its_tokens() -> None:
    head = nn.Linear(8, 20, bias=True)
    tokens = torch.tensor([0, 3, 4, 19])
    sub = SubsetHead(head, tokens)
    x = torch.randn(2, 5, 8)
    out = sub(x)
    full = head(x)
    assert out.shape == (2, 5, 20)
    torch.testing.assert_close(out[..., tokens], full[..., tokens])
    others = torch.ones(20, dtype=torch.bool)
    others[tokens] = False
    assert bool(torch.isneginf(out[..., others]).all())
    for bad in (torch.tensor([3, 1]), torch.tensor([20]), torch.tensor([], dtype=torch.int64)):
        with pytest.raises(ValueError, match="tokens"):
            SubsetHead(head, bad)


def test_draft_with_a_vocabulary_only_proposes_it() -> None:
    target = tiny_model(seed=0)
    vocab = torch.arange(0, 101, 2)
    for kind in ("bf16", "int8w", "int4w", "int8"):
        draft = make_draft(target, kind, vocab=vocab)
        with torch.no_grad():
            logits = draft(torch.tensor([[1, 2, 3]])).logits
        assert bool(torch.isneginf(logits[..., 1::2]).all())
        assert bool(torch.isfinite(logits[..., ::2]).all())
    with pytest.raises(ValueError, match="kind"):
        make_draft(target, "fp8")


@pytest.mark.parametrize("sizes", [(64, 96), (40, 24)], ids=["kernel", "dense-only"])
@pytest.mark.parametrize("rows", [(1,), (3,), (2, 2), (8,), (5, 9)])
def test_int8_linear_equals_its_dequantized_weights(
    sizes: tuple[int, int], rows: tuple[int, ...]
) -> None:
    torch.manual_seed(1)
    IN_, OUT_ = sizes
    lin = nn.Linear(IN_, OUT_).requires_grad_(False)
    q = Int8Linear(lin)
    assert q.qweight.dtype == torch.int8
    assert q.scales.shape == (OUT_,)
    assert q.scales.dtype == torch.bfloat16
    # per output channel: the largest weight maps to +-127 and every weight is off by at
    # most half a step (the scale itself rounded to bfloat16 adds < 0.4 %)
    step = lin.weight.abs().amax(1, keepdim=True) / 127
    assert bool((q.qweight.abs().amax(1) == 127).all())
    deq = q.qweight.float() * q.scales.float().unsqueeze(1)
    assert bool(((deq - lin.weight).abs() <= 0.51 * step + 0.004 * lin.weight.abs()).all())
    x = torch.randn(*rows, IN_)
    with torch.no_grad():
        y = q(x)
    assert y.shape == (*rows, OUT_)
    assert y.dtype == torch.float32
    # both paths (int8 kernel up to 4 rows, bfloat16 oneDNN beyond) compute x @ deq.T + b
    want = F.linear(x, deq, lin.bias)
    torch.testing.assert_close(y, want, rtol=0.02, atol=0.02 * float(want.abs().max()))
    with pytest.raises(ValueError, match="features"):
        q(torch.randn(2, IN_ + 1))
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        Int8Linear(q)  # type: ignore[arg-type]


def grid_linear(out_f: int, in_f: int, seed: int = 0) -> nn.Linear:
    """A layer whose weights lie on a 4-bit grid per group of 32 inputs, as a Q4_1 GGUF
    file dequantizes them: w = d q + m, q in [0, 15], each group using 0 and 15."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out_f, in_f // 32, 32), generator=gen)
    q[..., 0], q[..., 1] = 0, 15
    d = (torch.rand(out_f, in_f // 32, 1, generator=gen) * 0.02 + 0.001).half().float()
    m = (-8 * d + 0.01 * torch.randn(out_f, in_f // 32, 1, generator=gen)).half().float()
    lin = nn.Linear(in_f, out_f, bias=False).requires_grad_(False)
    lin.weight.copy_((d * q + m).reshape(out_f, in_f))
    return lin


@pytest.mark.parametrize("sizes", [(64, 96), (64, 40)], ids=["kernel", "dense-only"])
@pytest.mark.parametrize("rows", [(1,), (3,), (2, 2), (8,), (5, 9)])
def test_int4_linear_holds_4bit_groups_exactly_and_equals_its_dequantized_weights(
    sizes: tuple[int, int], rows: tuple[int, ...]
) -> None:
    IN_, OUT_ = sizes
    lin = grid_linear(OUT_, IN_)
    q = Int4Linear(lin)
    G = IN_ // 32
    assert q.scales_and_zeros.shape == (G, OUT_, 2)
    assert q.scales_and_zeros.dtype == torch.bfloat16
    assert q._kernel == (OUT_ % 32 == 0)
    s, z = (t.t().unsqueeze(-1) for t in q.scales_and_zeros.float().unbind(-1))  # [OUT, G, 1]
    # the grid is recovered: every weight is (q - 8) s + z for an integer q in [0, 15], up
    # to bfloat16 rounding of each group's scale and zero (relative 2^-9 each)
    w = lin.weight.reshape(OUT_, G, 32)
    grid = ((w - z) / s + 8).round()
    assert bool(((grid >= 0) & (grid <= 15)).all())
    bound = (8 * s + z.abs()) * 2**-8
    assert bool((((grid - 8) * s + z - w).abs() <= bound).all())
    deq = q.dense.weight.float()  # the same, rounded to bfloat16 once more
    assert bool(((deq - ((grid - 8) * s + z).reshape(OUT_, IN_)).abs() <= 2**-8 * deq.abs()).all())
    x = torch.randn(*rows, IN_)
    with torch.no_grad():
        y = q(x)
    assert y.shape == (*rows, OUT_)
    assert y.dtype == torch.float32
    # both paths (int4 kernel up to 4 rows, bfloat16 oneDNN beyond) compute x @ deq.T
    want = F.linear(x, deq)
    torch.testing.assert_close(y, want, rtol=0.02, atol=0.02 * float(want.abs().max()))
    with pytest.raises(ValueError, match="features"):
        q(torch.randn(2, IN_ + 1))
    with pytest.raises(ValueError, match="group_size"):
        Int4Linear(nn.Linear(48, 32))
    with pytest.raises(ValueError, match="group_size"):
        Int4Linear(lin, group_size=0)
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        Int4Linear(q)  # type: ignore[arg-type]


def test_int4_linear_on_arbitrary_weights_is_within_half_a_step() -> None:
    torch.manual_seed(2)
    lin = nn.Linear(64, 32).requires_grad_(False)
    q = Int4Linear(lin)
    w = lin.weight.reshape(32, 2, 32)
    step = (w.amax(-1, keepdim=True) - w.amin(-1, keepdim=True)) / 15
    err = (q.dense.weight.float().reshape(32, 2, 32) - w).abs()
    assert bool((err <= 0.51 * step + 0.01 * w.abs().amax(-1, keepdim=True)).all())


def test_int4_linears_choose_int4_only_where_it_is_as_accurate_as_int8() -> None:
    model = nn.Sequential(grid_linear(64, 64, seed=1), nn.Linear(64, 64), nn.Linear(40, 32))
    int4_linears(model)
    # 4-bit grid weights: exact in int4; Gaussian ones: closer in int8 per channel;
    # 40 inputs are no whole groups of 32
    assert [type(m) for m in model] == [Int4Linear, Int8Linear, Int8Linear]
    with pytest.raises(ValueError, match="group_size"):
        int4_linears(model, group_size=0)


def test_int4_groups_the_kernel_does_not_take_run_the_dense_copy() -> None:
    lin = grid_linear(32, 96)
    q = Int4Linear(lin, group_size=96)  # torch's kernel takes groups of 32, 64, 128, 256
    assert not q._kernel
    x = torch.randn(2, 96)
    with torch.no_grad():
        torch.testing.assert_close(q(x), F.linear(x, q.dense.weight.float()), rtol=0.02, atol=0.02)


def test_int8_linears_replace_every_linear_and_keep_logits_close() -> None:
    model = tiny_model(seed=3)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = model(ids).logits
    q = int8_linears(copy.deepcopy(model))
    assert not any(type(m) is nn.Linear for m in q.modules())
    with torch.no_grad():
        after = q(ids).logits
    assert (after.argmax(-1) == before.argmax(-1)).float().mean() >= 0.75
    draft = make_draft(model, "int8w", fuse=False)  # transformers' layers, as int8_linears
    assert any(isinstance(m, Int8Linear) for m in draft.modules())
    with torch.no_grad():
        torch.testing.assert_close(draft(ids).logits, after)  # the same quantization


def test_frequent_tokens_and_stdlib_counts() -> None:
    counts = torch.tensor([4, 9, 9, 0, 1])
    assert frequent_tokens(counts, 2).tolist() == [1, 2]  # ties: lower id first
    assert frequent_tokens(counts, 1, always=[3]).tolist() == [1, 3]
    with pytest.raises(ValueError, match="size"):
        frequent_tokens(counts, 0)
    with pytest.raises(ValueError, match="always"):
        frequent_tokens(counts, 1, always=[5])

    def by_char(text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [min(ord(c), 127) for c in text]}

    got = stdlib_token_counts(by_char, 128, max_chars=50_000)
    assert got.sum() >= 50_000
    assert got[ord("e")] > got[ord("Q")] > 0  # English and code: 'e' is common


def test_plain_linears_undoes_the_optimization_and_drafts_of_optimized_targets() -> None:
    model = optimize_for_cpu(tiny_model(seed=2))
    weight = model.get_submodule("lm_head").weight
    plain_linears(model)
    assert not any(isinstance(m, FastLinear) for m in model.modules())
    assert model.get_submodule("lm_head").weight is weight
    draft = make_draft(optimize_for_cpu(model), "int8")  # quantizes the FastLinears too
    assert not any(isinstance(m, (nn.Linear, FastLinear)) for m in draft.modules())


def test_replaced_cast_or_copied_weights_never_use_stale_copies() -> None:

    fast = FastLinear(nn.Linear(16, 24).requires_grad_(False))
    x = torch.randn(2, 16)
    with torch.no_grad():
        fast(x)
        fast.weight = nn.Parameter(torch.randn(24, 16), requires_grad=False)  # same version
        torch.testing.assert_close(fast(x), F.linear(x, fast.weight, fast.bias))
        twin = copy.deepcopy(fast)  # copies are not carried over, and rebuilt
        assert twin._copies == {}
        torch.testing.assert_close(twin(x), F.linear(x, fast.weight, fast.bias))
        fast.to(torch.bfloat16)  # cast in place (.data): the float32 copy is stale
        expected = F.linear(x.bfloat16(), fast.weight, fast.bias).float()
        torch.testing.assert_close(fast(x), expected, rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="features"):
        fast(torch.randn(2, 15))


def test_bad_vocabulary_and_draft_arguments_are_named() -> None:
    from adaspec.models import load_pair

    with pytest.raises(TypeError, match="counts"):
        frequent_tokens([1, 2, 3], 2)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tokens"):
        SubsetHead(nn.Linear(4, 8), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="draft_kind"):
        load_pair("smollm2-135m", draft_kind="fp8")
    for bad in (0, "many", 2.5):
        with pytest.raises(ValueError, match="draft_vocab"):
            load_pair("smollm2-135m", draft_vocab=bad)  # type: ignore[arg-type]

"""OutputHead: every way of computing the LM head equals F.linear; tuning and caching."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adaspec.models import make_draft, tiny_model
from adaspec.models.head import OutputHead, output_head

V, H = 65_539, 64  # big enough to be tuned (>= 2**22 elements), not a multiple of the block


@pytest.fixture(scope="module")
def weight() -> torch.Tensor:
    return torch.randn(V, H, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("way", ["linear", "blocked", "transposed"])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 9, 70])
def test_every_way_equals_linear(weight: torch.Tensor, way: str, rows: int) -> None:
    head = OutputHead(weight)
    hidden = torch.randn(2, rows, H, dtype=torch.float64)
    if rows <= 64:
        head.plan[rows if rows <= 8 else 16 if rows <= 16 else 64] = way  # type: ignore[assignment]
    out = head(hidden)
    assert out.shape == (2, rows, V)
    torch.testing.assert_close(out, F.linear(hidden, weight), rtol=1e-12, atol=1e-12)


def test_tuning_picks_a_way_per_bucket_and_drops_an_unused_copy(weight: torch.Tensor) -> None:
    head = OutputHead(weight)
    for rows in (1, 4, 6, 12):
        head(torch.randn(rows, H, dtype=torch.float64))
    assert set(head.plan) == {1, 4, 6, 16}
    assert set(head.plan.values()) <= {"linear", "blocked", "transposed"}
    assert all(head.plan[b] != "transposed" for b in (4, 6, 16))  # only tried for <= 3 rows
    uses_copy = "transposed" in head.plan.values()
    assert (head._transposed is not None) == uses_copy
    no_copy = OutputHead(weight, transposed_copy=False)
    no_copy(torch.randn(1, H, dtype=torch.float64))
    assert no_copy.plan[1] != "transposed"
    assert no_copy._transposed is None


def test_small_heads_and_many_rows_are_not_tuned() -> None:
    small = OutputHead(torch.randn(100, 8))
    small(torch.randn(1, 8))
    assert small.plan == {}
    assert not small.tune
    big = OutputHead(torch.randn(V, H))
    big(torch.randn(65, H))
    assert big.plan == {}


def test_bias_softcap_and_in_place_updates(weight: torch.Tensor) -> None:
    bias = torch.randn(V, dtype=torch.float64)
    head = OutputHead(weight.clone(), bias, softcap=30.0)
    hidden = torch.randn(3, H, dtype=torch.float64)
    expected = torch.tanh(F.linear(hidden, head.weight, bias) / 30.0) * 30.0
    torch.testing.assert_close(head(hidden), expected, rtol=1e-12, atol=1e-12)
    head.plan[1] = "transposed"
    head(hidden[:1])  # builds the copy
    assert head._transposed is not None
    head.weight.mul_(2.0)  # e.g. fine-tuning: the copy is stale now
    expected = torch.tanh(F.linear(hidden[:1], head.weight, bias) / 30.0) * 30.0
    torch.testing.assert_close(head(hidden[:1]), expected, rtol=1e-12, atol=1e-12)
    head.plan[1] = "transposed"  # force the copy: it must have been rebuilt
    torch.testing.assert_close(head(hidden[:1]), expected, rtol=1e-12, atol=1e-12)


def test_output_head_of_models() -> None:
    model = tiny_model(seed=0)
    head = output_head(model)
    assert head is not None
    assert head is output_head(model)
    assert head.weight is model.get_submodule("lm_head").weight
    assert output_head(model, transposed_copy=False) is not head  # reconfigured
    assert output_head(make_draft(tiny_model(seed=1))) is None  # int8 head
    assert output_head(nn.Linear(3, 3)) is None


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="weight"):
        OutputHead(torch.randn(3))
    head = OutputHead(torch.randn(10, 4))
    with pytest.raises(ValueError, match="hidden"):
        head(torch.randn(2, 5))

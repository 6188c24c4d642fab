"""Sampled verification is lossless at scale: 100,000 verified trees over V = 111.

The target is a Markov model with a different logits table per depth. Each verified step
emits e (accepted + bonus); the test completes e to three tokens by sampling the target
itself, and the histogram of those three-token streams must match the target's exact
probabilities (a step is lossless iff "e, then the target's own continuation" is
distributed as the target). Chi-square over bins with expected count >= 5 (the rest
pooled), threshold df + 6 sqrt(2 df): it scales with the sample count through the
expected counts, and a fixed seed keeps the run reproducible.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from adaspec.acceptance import probs_from_logits
from adaspec.tree import TokenTree
from adaspec.verify import VerifyResult, sample_children, verify

V = 111
ROOT = 7
SAMPLES = 100_000
CHUNK = 25_000  # rows per verify call; four batched calls keep memory near 100 MB
TEMPERATURE, TOP_K, TOP_P = 0.9, 60, 0.95
WIDTHS = (3, 2)
pytestmark = pytest.mark.slow  # children of the root, children of each depth-1 node


def markov_tables(seed: int, scale: float) -> Tensor:
    """(3, V, V) logits: [d, t] is the model's next-token logits after token t at depth d."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, V, V, generator=g) * scale


TARGET = markov_tables(1, 2.5)
# a draft that agrees with the target only partly, so both acceptances and rejections occur
DRAFT = 0.6 * TARGET + 0.8 * markov_tables(2, 2.5)


def run(
    tree: TokenTree, logits: Tensor, g: torch.Generator, draft_probs: Tensor | None = None
) -> VerifyResult:
    return verify(
        tree,
        logits,
        temperature=TEMPERATURE,
        top_k=TOP_K,
        top_p=TOP_P,
        generator=g,
        draft_probs=draft_probs,
    )


def target_probs() -> Tensor:
    """(3, V, V) float64 target distributions, the library transform renormalised."""
    p = probs_from_logits(TARGET, TEMPERATURE, TOP_K, TOP_P).double()
    return p / p.sum(-1, keepdim=True)


def stream_probs(p: Tensor) -> Tensor:
    """(V, V, V) exact probability of each three-token stream after the root."""
    return p[0, ROOT][:, None, None] * p[1][:, :, None] * p[2][None, :, :]


def complete_streams(emitted: Tensor, p: Tensor, g: torch.Generator) -> Tensor:
    """(R, 3) streams: the emitted tokens, continued by sampling the target."""
    out = emitted.clone()
    for j in range(1, 3):
        need = out[:, j] < 0
        prev = out[need, j - 1]
        out[need, j] = torch.multinomial(p[j, prev], 1, generator=g).squeeze(1)
    return out


def chi_square(streams: Tensor, expected_probs: Tensor) -> tuple[float, float]:
    """(statistic, threshold) of observed streams against exact stream probabilities."""
    n = streams.shape[0]
    flat = (streams[:, 0] * V + streams[:, 1]) * V + streams[:, 2]
    observed = torch.bincount(flat, minlength=V**3).double()
    expected = expected_probs.reshape(-1) * n
    big = expected >= 5
    o = torch.cat([observed[big], observed[~big].sum().reshape(1)])
    e = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    assert float(e.sum()) == pytest.approx(n)
    stat = float(((o - e) ** 2 / e.clamp(min=1e-300)).sum())
    df = int(big.sum())  # bins - 1 with the pooled bin
    return stat, df + 6 * math.sqrt(2 * df)


def beam_tree(R: int) -> tuple[TokenTree, Tensor, Tensor]:
    """A fixed top-k tree (deterministic children), its depths, and its logits rows (expanded)."""
    dq = probs_from_logits(DRAFT, TEMPERATURE, TOP_K, TOP_P)
    first = dq[0, ROOT].topk(WIDTHS[0]).indices  # [3]
    second = dq[1, first].topk(WIDTHS[1]).indices  # [3, 2]
    tokens = torch.cat([torch.tensor([ROOT]), first, second.reshape(-1)])
    parents = torch.tensor([-1, 0, 0, 0, 1, 1, 2, 2, 3, 3])
    depth = torch.tensor([0, 1, 1, 1, 2, 2, 2, 2, 2, 2])
    logp = -0.1 * depth.float()
    tree = TokenTree(tokens.expand(R, -1), parents.expand(R, -1), logp.expand(R, -1))
    logits = TARGET[depth, tokens].expand(R, -1, -1)  # [R, N, V], no copy
    return tree, depth, logits


def test_deterministic_children_match_target_over_100k() -> None:
    g = torch.Generator().manual_seed(0)
    tree, _, logits = beam_tree(SAMPLES)
    res = run(tree, logits, g)
    assert 0.3 < float(res.num_accepted.double().mean()) < 1.9  # both outcomes well represented
    p = target_probs()
    stat, limit = chi_square(complete_streams(res.emitted, p, g), stream_probs(p))
    assert stat < limit


def test_ratio_rule_on_deterministic_children_fails_the_same_test() -> None:
    """Guard: the same chi-square rejects the p/q ratio test on top-k children (its bias is
    so large that a fifth of the samples suffices)."""
    g = torch.Generator().manual_seed(0)
    n = SAMPLES // 5
    tree, depth, logits = beam_tree(n)
    dq = probs_from_logits(DRAFT, TEMPERATURE, TOP_K, TOP_P)
    draft_probs = dq[depth, tree.tokens[0]].expand(n, -1, -1)
    res = run(tree, logits, g, draft_probs)
    p = target_probs()
    stat, limit = chi_square(complete_streams(res.emitted, p, g), stream_probs(p))
    assert stat > 3 * limit


def drafted_batch(R: int, g: torch.Generator) -> tuple[TokenTree, Tensor, Tensor]:
    """R trees whose children are drawn from the draft without replacement."""
    dq = probs_from_logits(DRAFT, TEMPERATURE, TOP_K, TOP_P)
    root = torch.full((R, 1), ROOT)
    first = sample_children(dq[0, root.squeeze(1)], WIDTHS[0], generator=g)  # [R, 3]
    second = sample_children(dq[1, first], WIDTHS[1], generator=g).reshape(R, -1)  # [R, 6]
    tokens = torch.cat([root, first, second], 1)  # [R, 10]
    assert bool((tokens >= 0).all())  # top_k = 60 leaves enough support for every draw
    parents = torch.tensor([-1, 0, 0, 0, 1, 1, 2, 2, 3, 3]).expand(R, -1)
    depth = torch.tensor([0, 1, 1, 1, 2, 2, 2, 2, 2, 2]).expand(R, -1)
    tree = TokenTree(tokens, parents, -0.1 * depth.float(), depth)
    return tree, TARGET[depth, tokens], dq[depth, tokens]  # [R, N, V] each


def test_drafted_children_match_target_over_100k() -> None:
    g = torch.Generator().manual_seed(1)
    p = target_probs()
    streams, accepted = [], []
    for _ in range(SAMPLES // CHUNK):
        tree, logits, draft_probs = drafted_batch(CHUNK, g)
        res = run(tree, logits, g, draft_probs)
        streams.append(complete_streams(res.emitted, p, g))
        accepted.append(res.num_accepted)
    assert 0.3 < float(torch.cat(accepted).double().mean()) < 1.9
    stat, limit = chi_square(torch.cat(streams), stream_probs(p))
    assert stat < limit


def test_sample_children_draws_without_replacement_in_order() -> None:
    """P(first = a, second = b) = q(a) q(b) / (1 - q(a)), over 100,000 draws."""
    q = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05, 0.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    draws = sample_children(q.expand(SAMPLES, -1), 2, generator=g)  # [S, 2]
    assert bool((draws >= 0).all())
    assert bool((draws[:, 0] != draws[:, 1]).all())
    assert bool((draws != 5).all())  # zero probability never drawn
    exact = q[:, None] * q[None, :] / (1 - q[:, None])
    exact.fill_diagonal_(0)
    observed = torch.bincount(draws[:, 0] * 6 + draws[:, 1], minlength=36).double()
    expected = exact.reshape(-1) * SAMPLES
    keep = expected > 0
    stat = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    df = int(keep.sum()) - 1
    assert stat < df + 6 * math.sqrt(2 * df)
    assert float(observed[~keep].sum()) == 0

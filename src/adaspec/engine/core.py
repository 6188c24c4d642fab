"""A step-level engine: SLO-customized tree speculation over a batch of live requests.

One :meth:`Engine.step`:

    draft beam expansion (draft KV cache, frontier only)      -> candidate trees
    tokens_needed from each request's SLO clock               -> needs
    select under the step's token budget                      -> selected trees
    tree_forward of the target over every selected tree       -> target logits
                                                                 (tree_argmax: greedy)
    verify (greedy, or sampled with the deterministic-children rule)
    commit the accepted paths into both caches, emit tokens, update clocks and models

Requests join between steps (continuous batching up to ``max_batch``) and leave when they
hit a stop token or ``max_new_tokens``; their cache rows are freed at once.
"""

from __future__ import annotations

import copy
import logging
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from adaspec.acceptance import Calibrator, probs_from_logits
from adaspec.engine.batching import (
    append_backlog,
    catch_up,
    concat_states,
    deferred_state,
    drop_last_token,
    length_groups,
)
from adaspec.engine.latency import LatencyModel
from adaspec.models import (
    KVState,
    commit,
    commit_draft,
    grow_draft_tree,
    map_accepted,
    prefill,
    share_prefix,
    shares_cache,
    tree_argmax,
    tree_forward,
)
from adaspec.models.fast import tunings
from adaspec.models.vocab import subset_scores
from adaspec.select import select, tokens_needed
from adaspec.tree import TokenTree
from adaspec.verify import SpecStats, VerifyResult, sample_children, verify, verify_greedy

__all__ = ["SLO", "Engine", "EngineConfig", "RequestOutput", "RequestStats", "RunStats"]

# the auto plan's reasoning, step by step, at DEBUG level
logger = logging.getLogger(__name__)

# with the auto budget, a run of plain steps re-probes speculation (a chain) after this
# many plain steps; each probe that does not pay doubles the interval, up to _PROBE_MAX
_PROBE_EVERY = 8
_PROBE_MAX = 128
# an engine's first probe comes right after its two measuring plain steps: the pair's
# acceptance model (one rate for every level) underrates chains whose depth follows the
# draft's confidence until chain steps were measured, and a short request (32 tokens) was
# over before the eighth plain step (SmolLM2's chains then ran 10-15 tokens a step)
_FIRST_PROBE = 2
# until two plain steps were measured at an engine's batch, plain decoding is priced this
# much faster than the latency model predicts (the warm-up profiles one request; at batch
# 4 it was 10-30 % off): speculation starts at once only where it wins even so, and
# otherwise the plain steps measure
_PLAIN_DOUBT = 1.3
# a batch size's plain price is the quickest of its first _PLAIN_FIRST measured plain
# steps (stalls only slow a step down), then a decayed mean. Where the plan speculates on
# a price from two plain steps (at a batch twice any measured it takes them first), the
# step after _PLAIN_RECHECK speculative ones is a plain one that measures the third: both
# steps after a prefill of 16 SmolLM2 prompts once took 169 ms where later ones took
# ~104, and priced by them chains ran the whole batch at 113-150 tok/s against plain
# decoding's ~154
_PLAIN_FIRST = 3
_PLAIN_RECHECK = 2
# acceptance: each drafted level the accepted path reaches is one trial, kept when the
# target accepts its token. Before any verification the pair's rate is _PRIOR_ACCEPT
# (worth _PAIR_PRIOR_WEIGHT trials): top-1 agreement of the shipped int8-weight drafts
# with their targets is 0.92-0.97 (int8 dynamic ones: 0.49-0.69, found out within a few
# steps). A request's own rate starts at the pair's, worth _PRIOR_WEIGHT trials
_PRIOR_ACCEPT = 0.93
_PRIOR_WEIGHT = 8.0
# weight of the past in the acceptance counts and in the measured step overheads, per step
_STATS_DECAY = 0.9
# the pair's acceptance counts (a new request's prior) forget more slowly: acceptance
# varies by prompt (the same SmolLM2 pair: 2.9 to 8 tokens per target forward), and a new
# request should start from the pair's long-run rate, not from the last request's
_PAIR_DECAY = 0.99
# ... and rest on a prior worth more trials: one early rejection (1 of 1 tried) otherwise
# dropped the pair's rate from 0.93 to 0.83, and every later request decoded plainly
_PAIR_PRIOR_WEIGHT = 32.0
# switching from plain decoding to speculation needs a predicted rate this much higher
# (its terms are measured, but single steps vary by about 10 %); staying needs only a gain
_MARGIN = 1.1
# a probe is exploration: it may spend on the draft's catch-up at most this share of the
# time plain decoding of the remaining tokens takes (a batch-4 probe on the optimistic
# rate of an always-accepted 16-level chain paid a 0.78 s catch-up of 4 prompts, a
# quarter of the run, and never repaid it)
_PROBE_CATCH_UP = 0.1
# in a closed batch, a probe only where its requests likely stay level: where the odds that
# every one accepts the chain's first level fall below this, plain decoding after a probe
# that did not pay spends a step on each token the slowest request fell behind (Gemma at
# batch 16, α 0.93: odds 0.31; its probes cost 2-5 % of a 32-token run, 0.954-0.990x plain
# decoding in 10-round paired runs, 0.994x without them)
_PROBE_LEVEL_ODDS = 0.5
# a speculative step takes longer than its forwards' latency models predict (tree growth
# and masks): measured steps correct the plan by their ratio to the prediction, which
# starts here (with the draft's first level priced apart: 1.02-1.10 at batch 1 on the
# shipped pairs, 0.98-1.15 at batch 4)
_SPEC_TIME_PRIOR = 1.1
# ... kept per class of batch size (1, 2-3, 4-7, ..., 128 and more): the latency models rest
# on single-request warm-up forwards and on whatever steps ran, and a speculative step of
# 16 requests took ~1.2x its prediction where one of a single request took ~1.05x (one
# ratio over all sizes, learned at batch 1, had Gemma speculate at batch 16 at a loss)
_RATIO_CLASSES = 8
# ... each the lower median of its class's last _RATIO_WINDOW steps, as the latency models
# keep their buckets: one stalled step moves nothing. (A running mean kept a stall for
# many steps: with the ratio high the plan decodes plainly, and only rare probes measure
# speculation again. Three busy processes beside two Gemma prompts left both kinds' ratios
# at 3, and every later request in the process decoded plainly)
_RATIO_WINDOW = 5
# a chain may grow this many times the beam's depth (transformers' assisted generation
# drafts up to 20 tokens; on the shipped SmolLM2 pair confident stretches ran past 8)
_CHAIN_DEPTHS = 4
# a draft backlog longer than this (prompts, many plain steps) is forwarded on its own
_CATCH_UP_MIN = 8
# while plain steps run no request's acceptance moves (no trials): only measured step
# times and the tokens to go change the plan. So where plain decoding won by a wide margin
# (speculation's best rate below this share of what it had to beat, a probe's included),
# the next _REPLAN_GAP steps of the same requests decode plainly unplanned (a plan costs
# 1-3 ms: 2-3 % of a plain Gemma step at batch 16-32, where plain decoding wins throughout)
_REPLAN_HEADROOM = 0.9
_REPLAN_GAP = 4
# with SLOs, the plan weighs a step's tokens by whether their request stays on its SLO
# (goodput): a token of a request off it is worth this much of one on it
_MISSED_WORTH = 0.1
# ... with the odds that it stays on it: its remaining time at a shape's pace, normal with
# this relative spread (a model error of the pace as a whole, not of independent steps:
# single steps vary by about 10 %, and the pace model's prices by as much)
_PACE_SPREAD = 0.1


@dataclass
class _Profile:
    """What engines measured about one (target, draft) pair on this machine.

    The first engine on a pair runs the warm-up; every later one in the process starts
    from the profile the last one left (its latency models, the prices of catch-ups and
    step overheads, and the decayed acceptance counts) instead of paying the warm-up
    again (3-6 s on the shipped CPU pairs: longer than many a generate() call). A profile
    is left whenever an engine runs out of requests; of two engines running at once on
    one pair, the one that goes idle last leaves its own. Moving or casting a model, or
    changing torch's thread count, makes the next engine warm up again.
    """

    verify_latency: LatencyModel
    draft_latency: LatencyModel
    draft_prefill_per_token: float | None
    prefill_per_token: float
    catch_up_per_token: float
    accept_trials: Tensor
    accept_hits: Tensor
    spec_ratios: list[list[list[float]]]
    overhead: list[float]
    calibrator: Calibrator | None
    chain_steps: list[float]
    # what the latencies were measured under: each model's device and dtype, torch's threads
    setting: tuple[object, ...]


# target -> draft -> profile; an entry goes away with either model
_PROFILES: weakref.WeakKeyDictionary[nn.Module, weakref.WeakKeyDictionary[nn.Module, _Profile]] = (
    weakref.WeakKeyDictionary()
)
# target -> draft -> (setting, whether the draft may grow its trees on the target's cache)
_SHARES: weakref.WeakKeyDictionary[
    nn.Module, weakref.WeakKeyDictionary[nn.Module, tuple[tuple[object, ...], bool]]
] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class SLO:
    """A latency target: ``tpot`` seconds per output token, with an optional class name."""

    tpot: float
    name: str = ""

    def __post_init__(self) -> None:
        if not self.tpot > 0:
            raise ValueError(f"SLO tpot must be > 0 seconds per token, got {self.tpot}")


@dataclass(frozen=True)
class EngineConfig:
    """How the engine speculates. Defaults were chosen on the two shipped CPU pairs.

    Attributes:
        depth: levels of the draft beam below the root (0 disables speculation).
        width: nodes the beam keeps per level.
        adaptive_shape: shrink the beam as the batch grows (AdaServe): each request's beam
            is limited to about ``4 * max_tokens_per_step / R`` nodes.
        max_per_request: cap on the nodes one request may have verified per step.
        budget: total tree nodes verified per step, or ``"auto"``: each step's shape (plain,
            a chain, a beam; its depth) and budget are planned for the most expected
            emitted tokens per second under the step-latency model (with ``"slo"``
            selection, tokens of requests on their SLO: goodput), the budget never below
            what the requests' SLO needs take.
        max_tokens_per_step: upper bound of the auto budget.
        max_batch: live requests at most; more wait in a queue.
        calibrate: learn acceptance rates online (:class:`~adaspec.acceptance.Calibrator`)
            and select on the calibrated estimates.
        selection: ``"slo"`` (AdaServe: SLO needs first, then throughput), ``"throughput"``
            (ignore SLOs: the globally best nodes), or ``"even"`` (the budget split evenly,
            each request's own optimal tree). The last two are baselines for comparison;
            a fixed chain of k tokens is ``depth=k, width=1, budget=R * (k + 1)``.
        warmup: profile target and draft forwards before the first step to seed the
            latency models; once per (target, draft) pair in a process: a later engine on
            the same pair starts from what the last one measured and learned, whenever it
            ran out of requests (latency models, acceptance counts, step prices).
        share_cache: let the draft grow its trees on the target's KV cache instead of
            keeping its own (:func:`~adaspec.models.share_prefix`): the draft never
            prefills prompts, never catches up after plain steps, never commits. ``None``
            (the default): when :func:`~adaspec.models.shares_cache` finds the draft's keys
            and values close to the target's (drafts quantized from the target's weights,
            as ``load_pair`` makes them); ``True`` insists (the caches must be laid out
            alike), ``False`` keeps a draft cache.
    """

    depth: int = 4
    width: int = 4
    adaptive_shape: bool = True
    max_per_request: int | None = None
    budget: int | Literal["auto"] = "auto"
    max_tokens_per_step: int = 256
    max_batch: int = 32
    calibrate: bool = True
    warmup: bool = True
    selection: Literal["slo", "throughput", "even"] = "slo"
    share_cache: bool | None = None

    def __post_init__(self) -> None:
        if self.selection not in ("slo", "throughput", "even"):
            raise ValueError(
                f"EngineConfig.selection must be 'slo', 'throughput' or 'even', got {self.selection!r}"
            )
        for name in ("depth", "max_tokens_per_step", "max_batch", "width"):
            value = getattr(self, name)
            low = 0 if name == "depth" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"EngineConfig.{name} must be an int >= {low}, got {value!r}")
        if self.budget != "auto" and (
            isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1
        ):
            raise ValueError(
                f"EngineConfig.budget must be an int >= 1 or 'auto', got {self.budget!r}"
            )
        if self.max_per_request is not None and self.max_per_request < 1:
            raise ValueError(
                f"EngineConfig.max_per_request must be >= 1, got {self.max_per_request}"
            )
        if self.share_cache is not None and not isinstance(self.share_cache, bool):
            raise ValueError(
                f"EngineConfig.share_cache must be None, True or False, got {self.share_cache!r}"
            )


@dataclass(frozen=True)
class RequestOutput:
    """What one request produced in one step."""

    request_id: int
    new_tokens: list[int]
    finished: bool
    finish_reason: str | None = None  # "stop", "length" or "abort"


@dataclass(frozen=True)
class RequestStats:
    """A request's latency record.

    The first token comes with the prompt's prefill; ``decode_time`` runs from then to the
    last token, so time per output token is ``decode_time / (tokens - 1)`` (as vLLM counts
    TPOT: the prefill is not a decode-phase cost).
    """

    request_id: int
    prompt_tokens: int
    tokens: int
    decode_time: float
    steps: int
    slo: SLO | None

    @property
    def tpot(self) -> float:
        """Achieved seconds per output token after the first (0 for a single token)."""
        return self.decode_time / (self.tokens - 1) if self.tokens > 1 else 0.0

    @property
    def tau(self) -> float:
        """Emitted tokens per target forward for this request."""
        return self.tokens / self.steps if self.steps else float("nan")

    @property
    def attained(self) -> bool | None:
        """Whether decode time <= SLO x tokens after the first (None without an SLO)."""
        if self.slo is None:
            return None
        if self.tokens <= 1:
            return True  # no decode phase to judge
        return self.decode_time <= self.slo.tpot * (self.tokens - 1)


@dataclass
class RunStats:
    """Counters of a run: vLLM-shaped speculation counters plus SLO and time accounting."""

    spec: SpecStats = field(default_factory=SpecStats.zeros)
    steps: int = 0
    target_tokens: int = 0
    draft_time: float = 0.0
    verify_time: float = 0.0
    overhead_time: float = 0.0
    prefill_time: float = 0.0
    wall_time: float = 0.0
    requests: list[RequestStats] = field(default_factory=list)

    @property
    def emitted_tokens(self) -> int:
        return sum(r.tokens for r in self.requests)

    @property
    def throughput(self) -> float:
        """Emitted tokens per second of wall time."""
        return self.emitted_tokens / self.wall_time if self.wall_time > 0 else float("nan")

    @property
    def attainment(self) -> float:
        """Share of requests with an SLO that met it (nan if none had one)."""
        judged = [r.attained for r in self.requests if r.attained is not None]
        return sum(judged) / len(judged) if judged else float("nan")

    @property
    def goodput(self) -> float:
        """Tokens per second of wall time from requests that met their SLO."""
        good = sum(r.tokens for r in self.requests if r.attained)
        return good / self.wall_time if self.wall_time > 0 else float("nan")

    @property
    def tau(self) -> float:
        """Mean emitted tokens per verified tree."""
        return self.spec.mean_accepted_length

    def summary(self) -> dict[str, Any]:
        return {
            "requests": len(self.requests),
            "steps": self.steps,
            "emitted_tokens": self.emitted_tokens,
            "throughput_tok_s": self.throughput,
            "tau": self.tau,
            "slo_attainment": self.attainment,
            "goodput_tok_s": self.goodput,
            "time_s": {
                "draft": self.draft_time,
                "verify": self.verify_time,
                "select_verify_overhead": self.overhead_time,
                "prefill": self.prefill_time,
                "wall": self.wall_time,
            },
            **{f"spec_{k}": v for k, v in self.spec.as_dict().items()},
        }


@dataclass
class _Request:
    id: int
    prompt: list[int]
    slo: SLO | None
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    stop: frozenset[int]
    generator: torch.Generator | None
    root: int
    output: list[int] = field(default_factory=list)
    # decayed acceptance counts of this request (chains, wider beams), see Engine._alpha
    trials: list[float] = field(default_factory=lambda: [0.0, 0.0])
    hits: list[float] = field(default_factory=lambda: [0.0, 0.0])
    start: float | None = None
    decode_time: float = 0.0
    steps: int = 0

    def stats(self) -> RequestStats:
        return RequestStats(
            self.id, len(self.prompt), len(self.output), self.decode_time, self.steps, self.slo
        )


def _mean(old: float, new: float, keep: float = _STATS_DECAY) -> float:
    """A decayed mean: ``new`` if nothing was measured yet (``old == 0``)."""
    return new if old == 0.0 else keep * old + (1 - keep) * new


def _ratio(seconds: float, predicted: float) -> float:
    """A step's measured / predicted seconds, clamped to [0.5, 3]."""
    return min(max(seconds / max(predicted, 1e-9), 0.5), 3.0)


def _mean_ratio(old: float, seconds: float, predicted: float, keep: float = _STATS_DECAY) -> float:
    """Fold a step's measured / predicted seconds (clamped to [0.5, 3]) into ``old``."""
    return _mean(old, _ratio(seconds, predicted), keep)


def _ratio_class(R: int) -> int:
    """The class of batch size R for the speculative time ratios: 1, 2-3, 4-7, ..."""
    return min(max(R, 1).bit_length() - 1, _RATIO_CLASSES - 1)


def _expected_max(mean: Tensor, std: Tensor, points: int = 33) -> Tensor:
    """E[max_i X_i] of independent normals X_i ~ N(mean_i, std_i²), over the last dim.

    ``mean``, ``std``: (..., R) float64 -> (...). Every X_i lies within 6 std of its mean
    (but for 1e-9), so max X lies in [lo, hi] = [max_i (mean - 6 std), max_i (mean + 6 std)]
    and E[max X] = lo + ∫ P(max X > x) dx over [lo, hi], where P(max X > x) is
    1 - Π_i Φ((x - mean_i) / std_i) (trapezoid rule on ``points`` points).
    """
    x, below = _grid_of_max(mean, std, points)
    return x[..., 0] + torch.trapezoid(1 - below.prod(-2), x, dim=-1)


def _grid_of_max(
    mean: Tensor, std: Tensor, points: int, *, cell_below: bool = False
) -> tuple[Tensor, Tensor]:
    """The grid the maximum of independent normals is integrated on, over the last dim.

    ``mean``, ``std``: (..., R) float64 -> x (..., points) from lo = max_i (mean - 6 std)
    (one cell lower with ``cell_below``) to hi = max_i (mean + 6 std), and each X_i's
    CDF Φ((x - mean_i) / std_i) there (..., R, points); std at least 1e-9.
    """
    std = std.clamp(min=1e-9)
    lo = (mean - 6 * std).max(-1).values
    hi = (mean + 6 * std).max(-1).values
    if cell_below:
        lo = lo - (hi - lo) / (points - 1)
    x = lo.unsqueeze(-1) + (hi - lo).unsqueeze(-1) * torch.linspace(0, 1, points, dtype=lo.dtype)
    below = torch.special.ndtr((x.unsqueeze(-2) - mean.unsqueeze(-1)) / std.unsqueeze(-1))
    return x, below


def _steps_to_finish(goal: Tensor, alphas: Tensor, depths: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each request's steps to emit its goal, per chain depth 0..``depths``: (mean, std,
    tokens a step) each (R, depths + 1) float64 (see :func:`_closed_batch_seconds`)."""
    d = torch.arange(depths + 1, dtype=torch.float64)
    power = alphas.unsqueeze(1) ** d  # [R, L + 1]
    per_step = power.cumsum(1)  # E[X]
    square = ((2 * d + 1) * power).cumsum(1)  # E[X²]
    var = square - per_step**2
    g = goal.unsqueeze(1)
    steps = (g + (square - per_step) / (2 * per_step)) / per_step
    spread = (g * var.clamp(min=0) / per_step**3).sqrt()
    return steps, spread, per_step


def _closed_batch_seconds(
    goal: Tensor, alphas: Tensor, batch_seconds: Tensor, single_seconds: Tensor
) -> Tensor:
    """Expected seconds until the last request of a closed batch is done, per chain depth.

    ``goal``: (R,) tokens each request has still to emit; ``alphas``: (R,) each one's
    acceptance rate per drafted level; ``batch_seconds``, ``single_seconds``: (L + 1,) what
    a step of depth 0..L takes with all R requests and with one left. A step of r requests
    is priced on the line through these two, fixed + per_request r, so a run takes
    fixed E[steps of the last request] + per_request Σ_i E[steps of request i].

    A request emits X = 1 + min(A, d) tokens per step of depth d, where P(A ≥ j) = α^j: so
    E[X] = Σ_{j≤d} α^j and E[X²] = Σ_{j≤d} (2j + 1) α^j. By renewal theory the steps it
    needs for g tokens are about normal, with mean (g + o) / E[X] (its last step overshoots
    the goal by o = (E[X²] - E[X]) / (2 E[X]) tokens on average) and variance
    g Var[X] / E[X]³. The batch ends with the maximum of these: plain decoding advances
    every request alike, speculation some faster than others (Gemma at batch 4, 32 tokens:
    speculative steps ran 1.18x plain ones, but a request left alone in the last ~7 steps
    took 16 % of the run, and the run lost 4 % to plain decoding). Within 1 % of simulated
    batches in the tests, whose goals are several steps' tokens; the maximum of the mean
    steps, all priced at R, was up to 12 % off there. In a batch's last steps (goals within
    a few times d + 1) the overshoot's long-run mean is off by up to half a step a request:
    15-45 % of what is left (an exact distribution of the steps would fix that).
    """
    steps, spread, _ = _steps_to_finish(goal, alphas, batch_seconds.numel() - 1)
    last = _expected_max(steps.T, spread.T)  # [L + 1]
    fixed, per_request = _step_line(goal.numel(), batch_seconds, single_seconds)
    return fixed * last + per_request * steps.sum(0)


def _step_line(R: int, batch_seconds: Tensor, single_seconds: Tensor) -> tuple[Tensor, Tensor]:
    """(fixed, per_request) seconds of a step, on the line through a step of R requests
    and one of a single request. Neither is negative: where a step of R costs more than R
    single steps, it is all per request (fixed 0, per_request batch / R), and where a step
    of one costs more than one of R, all fixed."""
    per_request = ((batch_seconds - single_seconds) / max(R - 1, 1)).clamp(min=0)
    fixed = single_seconds - per_request
    steep = fixed < 0
    per_request = torch.where(steep, batch_seconds / R, per_request)
    return torch.where(steep, 0.0, fixed), per_request


def _critical_weights(
    goal: Tensor, alphas: Tensor, batch_seconds: float, single_seconds: float, depth: int
) -> Tensor:
    """(R,) what a token of each request is worth to a closed batch whose steps are chains
    of ``depth`` levels, relative to the average of the tokens it has still to emit
    (Σ_i goal_i w_i = Σ_i goal_i).

    ``batch_seconds``, ``single_seconds``: what such a step takes with all R requests and
    with one left. In the model of :func:`_closed_batch_seconds` (fixed E[max_i S_i] +
    per_request Σ_i S_i, S_i request i's steps to go), a token more for request i now
    shortens S_i by 1 / E[X_i] steps, and so the run by (fixed P(i is last) +
    per_request) / E[X_i] seconds. Requests alike are worth alike; a request likely to be
    the last is worth up to R of the average where a step of one request costs about what
    one of R does (Gemma at batch 4: chains grew 4-6 levels for three confident requests
    and left the fourth, whose target accepted ~0.5 a level, 1-3 tokens a step where plain
    steps give it 4-6 in that time (a 6-level step: 480 ms, 1 token for it, 7 for two
    others); it decoded its last tokens alone, and the run lost 5-10 % to plain decoding).
    Relative to the average token still to emit, since that is what the long-run rate a
    level must beat averages over (Σ_i goal_i w_i is about the run's seconds over theirs).
    """
    steps, spread, per_step = (x[:, depth] for x in _steps_to_finish(goal, alphas, depth))
    fixed, per_request = _step_line(
        goal.numel(),
        torch.tensor(batch_seconds, dtype=torch.float64),
        torch.tensor(single_seconds, dtype=torch.float64),
    )
    worth = (fixed * _last_odds(steps, spread) + per_request) / per_step
    return worth * goal.sum() / (goal * worth).sum().clamp(min=1e-12)


def _last_odds(mean: Tensor, std: Tensor, points: int = 129) -> Tensor:
    """P(X_i is the largest) of independent normals X_i ~ N(mean_i, std_i²), over the last dim.

    ``mean``, ``std``: (..., R) float64 -> (..., R), summing to 1. P(X_i largest) =
    ∫ Π_{j≠i} Φ_j dΦ_i over [lo, hi] as in :func:`_expected_max` (below lo some X_j is
    surely larger), summed over the ``points - 1`` cells of a grid with the others'
    product the mean of its values at each cell's ends (so a request with no spread is a
    step of Φ_i, and ties split evenly).
    """
    # (a cell below lo: a request with no spread may sit at lo)
    _, below = _grid_of_max(mean, std, points, cell_below=True)
    # [..., R, points]: the product of every other request's Φ (exclusive prefix x suffix)
    ones = torch.ones_like(below[..., :1, :])
    prefix = torch.cat([ones, below[..., :-1, :]], -2).cumprod(-2)
    suffix = torch.cat([below[..., 1:, :], ones], -2).flip(-2).cumprod(-2).flip(-2)
    others = prefix * suffix
    cell = (below[..., 1:] - below[..., :-1]) * (others[..., 1:] + others[..., :-1]) / 2
    odds: Tensor = cell.sum(-1)
    return odds / odds.sum(-1, keepdim=True).clamp(min=1e-12)


def _on_slo_share(
    seconds_per_token: Tensor, elapsed: Tensor, decoded: Tensor, to_go: Tensor, tpot: Tensor
) -> tuple[Tensor, Tensor]:
    """The share of a step's tokens that goodput counts, per shape of step, and what each
    request's tokens are worth at each.

    ``seconds_per_token``: (R, L) what each request's next tokens would take in steps of
    each of L shapes; ``elapsed``, ``decoded``, ``to_go``, ``tpot``: (R,) its decode time so
    far, tokens decoded since its first, tokens still to emit, and SLO (seconds per output
    token, 0 for none). A request is on its SLO where its decode time at the end, the
    elapsed time plus its remaining tokens at that shape's pace, stays within SLO x its
    tokens after the first; one without an SLO always is. The pace is uncertain (its
    remaining time normal with relative spread ``_PACE_SPREAD``), so a request is on its
    SLO with the odds of that, not by a hard line, which made the share jump with requests
    near their SLO. Tokens of a request off its SLO count ``_MISSED_WORTH`` of one on it
    (goodput counts them 0; they still finish the request, and an SLO out of every shape's
    reach leaves the choice to throughput).
    -> (L,) float64 in [``_MISSED_WORTH``, 1]: the on-SLO share of the tokens a step emits
    at each shape, and (R, L) each request's tokens' worth there (from ``_MISSED_WORTH``
    off its SLO to 1 on it).
    """
    rate = 1 / seconds_per_token.clamp(min=1e-12)  # [R, L] tokens per second
    rest = to_go.unsqueeze(1) * seconds_per_token  # [R, L] seconds to its last token
    slack = tpot.unsqueeze(1) * (decoded + to_go).unsqueeze(1) - elapsed.unsqueeze(1) - rest
    odds = torch.special.ndtr(slack / (_PACE_SPREAD * rest).clamp(min=1e-12))
    odds = torch.where((tpot <= 0).unsqueeze(1), 1.0, odds)
    worth = _MISSED_WORTH + (1 - _MISSED_WORTH) * odds
    return (worth * rate).sum(0) / rate.sum(0), worth


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class Engine:
    """SLO-customized tree speculation for a batch of requests, one step at a time.

    Args:
        target: a transformers causal LM (the model whose output is reproduced).
        draft: a cheaper causal LM with the same tokenizer (proposes the candidate trees).
        tokenizer: optional; lets :meth:`add_request` take strings and provides the eos
            token as a default stop token.
        config: an :class:`EngineConfig`.

    Example::

        engine = Engine(target, draft, tokenizer=tok)
        rid = engine.add_request("Hello", slo=0.05, max_new_tokens=32)
        while engine.has_unfinished():
            for out in engine.step():
                print(out.request_id, out.new_tokens, out.finished)
    """

    def __init__(
        self,
        target: nn.Module,
        draft: nn.Module,
        *,
        tokenizer: Any = None,
        config: EngineConfig | None = None,
    ) -> None:
        self.target = target
        self.draft = draft
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.device = _model_device(target)
        self.stats = RunStats()
        self.verify_latency = LatencyModel()
        self.draft_latency = LatencyModel()
        self.calibrator = Calibrator() if self.config.calibrate else None
        self._waiting: deque[_Request] = deque()
        self._active: list[_Request] = []
        self._target_state: KVState | None = None
        # the draft's own cache; None throughout when it shares the target's
        self._draft_state: KVState | None = None
        self._share_cache = self._decide_sharing()
        self._next_id = 0
        # the pair's decayed acceptance counts per beam kind (index 0: chains, 1: wider
        # beams): drafted levels the accepted path reached, and how many the target accepted
        # (each request keeps its own too)
        self._accept_trials = torch.zeros(2, dtype=torch.float64)
        self._accept_hits = torch.zeros(2, dtype=torch.float64)
        # decayed mean seconds a step spends outside the draft and target forwards
        # (selection, verification, commits): index 0 plain steps, 1 speculative ones
        self._overhead = [0.0, 0.0]
        # seconds per (padded) token of the target's prefills and of the draft's catch-ups
        # (the one-off price of speculating after plain steps); 0 until measured
        self._prefill_per_token = 0.0
        self._catch_up_per_token = 0.0
        # the warm-up's, until a catch-up is measured (None: not timed, a draft on the
        # target's cache never catches up)
        self._draft_prefill_per_token: float | None = None
        # measured / predicted seconds of the last _RATIO_WINDOW speculative steps
        # [kind][batch class] (kind 0: chains, 1: beams); empty where none was measured
        self._spec_ratios: list[list[list[float]]] = [
            [[] for _ in range(_RATIO_CLASSES)] for _ in range(2)
        ]
        # the same for plain steps (0 until one is measured): forwards of one token per request
        # differ from the warm-up's single-request trees and drift from the shared model (its
        # buckets move together as speculative steps observe larger sizes)
        self._plain_time_ratio = 0.0
        self._plain_samples = 0
        # batch size -> (seconds, steps) of the plain steps measured there: the quickest of
        # the first _PLAIN_FIRST, then a decayed mean; it prices plain decoding from the
        # second step on (the latency model's prediction for R tokens moves as speculative
        # steps feed it larger trees: Gemma at batch 6 priced plain steps at 67-88 tok/s
        # between speculative ones, they ran at ~92, and the plan speculated at parity; a
        # first plain step after a prefill of 16 prompts ran at 115 tok/s, the next at 135)
        self._plain_seconds: dict[int, tuple[float, int]] = {}
        self._plain_batch = 1  # the largest batch plain steps were measured at (1: none)
        self._last_plain_size = 0  # the batch size of the last plain step (0: none yet)
        # the plan of this step: its draft's first level and further ones (seconds), and the
        # long-run tokens per second it expects (what a further level must beat)
        self._planned: tuple[float, float, float] | None = None
        # ... and the first and further levels as the draft's latency model prices them now
        self._ratio_prices: tuple[float, float] | None = None
        # ... and (R,) what a token of each request is worth to a closed batch, relative to
        # the average token still to emit (None: alike; see _critical_weights)
        self._worth: Tensor | None = None
        self._plain_streak = 0  # plain steps since the last speculative one
        # decayed sums over chain steps: tokens emitted per request, levels grown, steps
        self._chain_steps = [0.0, 0.0, 0.0]
        # speculative steps since the plan last chose plain decoding (re-measuring plain
        # steps among them do not end the run)
        self._spec_streak = 0
        self._spec_since_plain = 0  # speculative steps since the last plain step
        self._probe_every = _FIRST_PROBE
        self._probed = False  # the last speculative step was a probe
        # this step's plan prices the draft's levels at the lowest costs seen (a probe);
        # speculative steps until such a step among planned ones, and the gap after it
        self._optimistic = False
        self._cost_probe_wait = self._cost_probe_gap = _PROBE_EVERY
        # plain steps left that reuse the last plan's plain decision, for the requests it
        # was made for (see _REPLAN_HEADROOM)
        self._unplanned = 0
        self._unplanned_for: tuple[tuple[int, ...], bool] = ((), False)
        if self.config.warmup:
            by_draft = _PROFILES.get(target)
            profile = by_draft.get(draft) if by_draft is not None else None
            if profile is None or profile.setting != self._setting():
                self._warmup()
                self._save_profile()
            else:
                self._load_profile(profile)
                # engines whose draft shared the target's cache left no catch-up price
                unpriced = self._draft_prefill_per_token is None and not self._catch_up_per_token
                if unpriced and self._draft_state_kept():
                    self._price_draft_prefill()

    def _draft_state_kept(self) -> bool:
        """Whether this engine keeps a draft cache of its own (and pays catch-ups)."""
        return not self._share_cache and self.config.depth > 0

    def _decide_sharing(self) -> bool:
        """Whether the draft grows its trees on the target's cache (config.share_cache)."""
        want = self.config.share_cache
        if want is False or self.config.depth == 0:
            return False
        if want:
            if not shares_cache(self.target, self.draft, tol=None):
                raise ValueError(
                    "EngineConfig.share_cache=True needs a draft whose KV cache is laid out "
                    "like the target's (layers, heads, head size, dtype, device, attention "
                    "windows; both with input embeddings); this pair's differs"
                )
            return True
        by_draft = _SHARES.setdefault(self.target, weakref.WeakKeyDictionary())
        setting = self._setting()
        known = by_draft.get(self.draft)
        if known is None or known[0] != setting:
            known = by_draft[self.draft] = (setting, shares_cache(self.target, self.draft))
        return known[1]

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        prompt: str | Sequence[int] | Tensor,
        *,
        slo: float | SLO | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop: Iterable[int] | None = None,
        seed: int | None = None,
    ) -> int:
        """Queue a request; returns its id. It joins the batch at the next step with room.

        ``prompt``: token ids (a list or 1-D tensor), or a string when the engine has a
        tokenizer. ``slo``: seconds per output token (or an :class:`SLO`), None for best
        effort. ``stop``: token ids that end the request (emitted, then nothing after);
        defaults to the tokenizer's eos token. ``seed`` seeds this request's sampling.
        """
        ids = self.encode(prompt)
        if (
            isinstance(max_new_tokens, bool)
            or not isinstance(max_new_tokens, int)
            or max_new_tokens < 1
        ):
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and (
            isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0
        ):
            raise ValueError(f"top_k must be an int >= 0 or None, got {top_k!r}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1] or be None, got {top_p}")
        if slo is not None and not isinstance(slo, SLO):
            slo = SLO(float(slo))
        if stop is None:
            eos = (
                getattr(self.tokenizer, "eos_token_id", None)
                if self.tokenizer is not None
                else None
            )
            stop_set = frozenset([eos] if isinstance(eos, int) else [])
        else:
            stop_set = frozenset(int(t) for t in stop)
        gen = None
        if temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
        req = _Request(
            id=self._next_id,
            prompt=ids,
            slo=slo,
            max_new_tokens=max_new_tokens,
            temperature=float(temperature),
            top_k=int(top_k or 0),
            top_p=float(top_p if top_p is not None else 1.0),
            stop=stop_set,
            generator=gen,
            root=ids[-1],
        )
        self._next_id += 1
        self._waiting.append(req)
        return req.id

    def encode(self, prompt: str | Sequence[int] | Tensor) -> list[int]:
        """Token ids of a prompt (a string needs the engine's tokenizer); validates it."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise TypeError(
                    "prompt is a string but the engine has no tokenizer; pass token ids"
                )
            ids = list(self.tokenizer(prompt)["input_ids"])
        elif isinstance(prompt, Tensor):
            if prompt.dim() != 1 or prompt.dtype.is_floating_point:
                raise ValueError(
                    f"prompt must be a 1-D integer tensor, got {prompt.dtype} {tuple(prompt.shape)}"
                )
            ids = [int(t) for t in prompt.tolist()]
        elif isinstance(prompt, Sequence):
            ids = [int(t) for t in prompt]
        else:
            raise TypeError(
                f"prompt must be a string, a list of token ids or a tensor, got {type(prompt).__name__}"
            )
        if len(ids) == 0:
            raise ValueError("prompt must hold at least one token, got an empty prompt")
        if min(ids) < 0:
            raise ValueError("prompt token ids must be >= 0")
        return ids

    def has_unfinished(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self._waiting or self._active)

    def abort(self, request_id: int) -> bool:
        """Drop a request; returns False if it is unknown or already finished."""
        for i, req in enumerate(self._waiting):
            if req.id == request_id:
                del self._waiting[i]
                return True
        for i, req in enumerate(self._active):
            if req.id == request_id:
                self._finish([i])
                return True
        return False

    # ------------------------------------------------------------------ batching
    def _admit(self) -> list[RequestOutput]:
        """Prefill waiting requests into the batch; returns their first tokens."""
        room = self.config.max_batch - len(self._active)
        new: list[_Request] = []
        while self._waiting and len(new) < room:
            new.append(self._waiting.popleft())
        if not new:
            return []
        t0 = time.perf_counter()
        # the prefill's logits give each request its first token, the root of its first
        # tree (not cached yet, like every root). The draft catches up on the prompt only
        # when it first drafts for these requests. Prompts of similar lengths are prefilled
        # together (padding every prompt to the longest cost up to half the prefill)
        groups = length_groups([len(r.prompt) for r in new])
        new = [new[i] for group in groups for i in group]
        prompts = [r.prompt for r in new]
        first, padded, start = [], 0, 0
        joined: KVState | None = None
        for group in groups:
            part, reqs = prompts[start : start + len(group)], new[start : start + len(group)]
            if all(r.temperature == 0 for r in reqs):  # (greedy: no logits needed)
                state, tokens = prefill(self.target, part, argmax=True)  # [len(group)]
                if bool((tokens < 0).any()):
                    bad = reqs[int((tokens < 0).nonzero()[0])]
                    raise ValueError(
                        f"the target's logits after the prompt of request {bad.id} are not "
                        "finite (NaN or inf)"
                    )
                first += [int(t) for t in tokens.tolist()]
            else:
                state, logits = prefill(self.target, part)  # logits [len(group), V]
                first += self._first_tokens(reqs, logits)
            joined = concat_states(joined, state)
            padded += len(part) * max(len(p) for p in part)
            start += len(group)
        assert joined is not None
        self._target_state = concat_states(self._target_state, joined)
        if self._draft_state_kept():
            self._draft_state = concat_states(
                self._draft_state,
                deferred_state([[*p, t] for p, t in zip(prompts, first, strict=True)], self.device),
            )
        start = len(self._active)
        self._active.extend(new)
        now = time.perf_counter()
        self.stats.prefill_time += now - t0
        self._prefill_per_token = _mean(self._prefill_per_token, (now - t0) / padded)
        for r in new:
            r.start = now  # the decode clock starts at the first token
        return self._emit([[t] for t in first], [1] * len(new), rows=range(start, start + len(new)))

    def _first_tokens(self, reqs: list[_Request], logits: Tensor) -> list[int]:
        """Each request's first token from its prefill logits (argmax, or a draw)."""
        tokens = logits.argmax(-1)  # [R]
        for i, r in enumerate(reqs):
            if r.temperature > 0:
                probs = probs_from_logits(logits[i], r.temperature, r.top_k or None, r.top_p)
                tokens[i] = sample_children(probs, 1, generator=r.generator)[0]  # one draw
        return [int(t) for t in tokens.tolist()]

    def _finish(self, rows: list[int]) -> None:
        keep = [i for i in range(len(self._active)) if i not in set(rows)]
        for i in rows:
            self.stats.requests.append(self._active[i].stats())
        self._active = [self._active[i] for i in keep]
        if keep:
            assert self._target_state is not None
            self._target_state = self._target_state.select(keep)
            if self._draft_state is not None:
                self._draft_state = self._draft_state.select(keep)
        else:
            self._target_state = self._draft_state = None
            if self.config.warmup and not self._waiting:
                self._save_profile()  # idle: the next engine on this pair starts from here

    # ------------------------------------------------------------------ the step
    def _sampling(self) -> tuple[float | Tensor, Tensor | None, Tensor | None, bool]:
        reqs = self._active
        greedy = all(r.temperature == 0 for r in reqs)
        if greedy:
            return 0.0, None, None, True
        temp = torch.tensor([r.temperature for r in reqs], device=self.device)
        top_k = torch.tensor([r.top_k for r in reqs], device=self.device)
        top_p = torch.tensor([r.top_p for r in reqs], device=self.device)
        return temp, top_k, top_p, False

    def _beam_shape(self, R: int) -> tuple[int, int]:
        """(depth, width) of this step's beam, before the auto plan shortens it."""
        depth, width = self.config.depth, self.config.width
        if self.config.adaptive_shape and depth > 0:
            # AdaServe shrinks the beam as the batch grows: keep about 4x the per-request
            # share of the step's token bound in candidates
            share = max(1, 4 * self.config.max_tokens_per_step // R)
            while depth * width > share and width > 1:
                width -= 1
            while depth * width > share and depth > 1:
                depth -= 1
        return depth, width

    def _plan_shape(self, R: int, depth: int, width: int) -> tuple[int, int]:
        """Beam (depth, width) with the most expected emitted tokens per second; depth 0 = plain.

        With the auto budget, each depth d and each width w in {1 (a chain), ``width``} is
        scored from measurements: the draft costs its first level (the roots with the
        accepted tokens it has not seen) and d - 1 further levels of the draft latency model
        at R w tokens, verification the target latency model at every node grown (R (d + 1)
        for a chain, R (1 + d w) for a beam, at most the step's token bound), each kind of
        step its measured overhead, all scaled by how much longer such steps really took
        than so predicted (plain steps one ratio, speculative ones one per kind and class
        of batch size); a request emits 1 + α + α² + ... + α^d tokens,
        where α is the rate at which the target accepts a drafted level the accepted path
        reached (per width, see :meth:`_alpha`). With SLOs (and SLO selection) a rate counts
        the tokens of requests that the shape keeps on their SLO, each request at its own
        acceptance rate (goodput, see :func:`_on_slo_share`): a shape that alone keeps a
        request on its SLO can beat plain decoding's tokens per second, and one that takes
        a request off it loses to fewer tokens per second. A chosen chain is returned at
        its longest (``_CHAIN_DEPTHS`` x ``depth``, within the step's token bound and the
        per-request cap): :meth:`_level_rule` ends it where the draft's confidence no
        longer pays (a probe keeps the depth its optimistic rate was best at).
        At a batch at least twice any plain steps were measured at, the first two steps are
        plain (they measure what plain decoding costs there); at batch 1, until two plain steps
        were measured, plain decoding is priced ``_PLAIN_DOUBT`` times faster than
        predicted: speculation starts at once only where it wins even so;
        switching to speculation needs a predicted 10 % gain, staying with it only a
        gain, and a long run of speculation takes a plain step now and then to re-measure
        (and, where plain decoding at this batch size is priced from two plain steps, the
        step after two speculative ones, once).
        Speculating after plain steps first costs a draft catch-up over the tokens the draft
        has not seen; it is chosen only when the tokens still to come repay it. While plain
        decoding wins, a chain is probed now and then (exponential back-off; in a closed
        batch only where its requests likely stay level, see ``_PROBE_LEVEL_ODDS``) where an upper
        confidence bound of α says it could pay (and repay its catch-up by the margin) with
        the forwards priced at the lowest they have cost and ρ at most its prior, so that α
        and the costs stay current; while speculating, a chain now and then (after 8, 16,
        32, ... chains) grows its levels at those prices too. Where plain decoding (priced
        from measured plain steps) won by a wide margin, the next ``_REPLAN_GAP`` steps of
        the same requests decode plainly without a plan.
        """
        self._optimistic = False
        if self.config.budget != "auto" or depth == 0 or not self.verify_latency.observed:
            return depth, width
        batch = (tuple(r.id for r in self._active), bool(self._waiting))
        if self._unplanned > 0 and self._unplanned_for == batch:
            self._unplanned -= 1
            self._planned, self._worth, self._spec_streak = None, None, 0
            logger.debug("plan R=%d: plain, unplanned (%d more)", R, self._unplanned)
            return 0, width
        self._unplanned = 0
        headroom = 0.0  # the best speculative rate over the rate it had to beat
        # a chain may grow to _CHAIN_DEPTHS times the beam's depth: the draft's confidence
        # stops it where a further level no longer pays (_level_rule). It verifies all it
        # grows: no longer than the step's token bound and the per-request cap allow
        cap = max(self.config.max_tokens_per_step, R) // R
        if self.config.max_per_request is not None:
            cap = min(cap, self.config.max_per_request)
        # no request emits more than it has left: a level beyond that is never used (with
        # one token left, a plain step emits it in half a speculative step's time)
        to_go = [r.max_new_tokens - len(r.output) for r in self._active]
        left = max(to_go)
        if left <= 1:
            return 0, width
        if 2 * self._plain_batch <= R:
            # the latency models rest on other batch sizes (the warm-up's one request): at
            # Gemma's batch 4 they priced a plain step 1.4x slower than it ran, and the plan
            # speculated at a 6 % loss. Two plain steps measure it (and lose nothing; one
            # was not enough: the first plain step after a prefill of 4 Gemma prompts took
            # 98 ms, the next ones 74-91, and priced by it the plan speculated at a loss);
            # a batch growing request by request pays two per doubling
            self._planned = self._worth = None
            return 0, width
        cap = min(cap, left)
        depth = min(depth, left - 1)
        chain = max(1, min(_CHAIN_DEPTHS * depth, cap - 1))
        d = torch.arange(chain + 1, dtype=torch.float64)  # depths, and powers of α
        verify_s = self.verify_latency.predict(R * (d + 1))  # [chain + 1]
        plain_rate = self._plain_rate(R)
        # the draft's one-off catch-up over what it has not seen (prompts, plain steps),
        # repaid only by the tokens still to come
        backlog = 0  # a draft that shares the target's cache has seen everything
        if self._draft_state is not None:
            backlog = int((self._draft_state.backlog >= 0).sum(1).max())
        catch_up_s = 0.0
        if backlog > _CATCH_UP_MIN and self.draft_latency.observed:
            # one draft forward's fixed cost, and per (padded) token what the last catch-ups
            # took beyond it, else the warm-up's draft prefill (a flat rate per token, from
            # a 55-token catch-up, priced SmolLM2's 150-token prompts 25 % high)
            per_token = self._catch_up_per_token or self._draft_prefill_per_token or 0.0
            if per_token == 0.0:  # neither (no warm-up): the target's prefill, scaled by
                # the draft's cost relative to the target's at the largest observed size
                n = 32 * R
                ratio = self.draft_latency.predict(n) / self.verify_latency.predict(n).clamp(
                    min=1e-9
                )
                per_token = self._prefill_per_token * float(ratio)
            catch_up_s = float(self.draft_latency.predict(R)) + R * backlog * per_token
        remaining = sum(to_go)
        spec_overhead = self._overhead[1] or self._overhead[0]  # before any speculative step
        # the draft's first level forwards each root together with a short backlog (the
        # accepted tokens it has not seen yet) as one right-padded chain per request
        first_tokens = R * (1 + (backlog if catch_up_s == 0 else 0))
        first = float(self.draft_latency.predict(first_tokens))
        first_best = float(self.draft_latency.predict(first_tokens, best=True))  # (probes)

        # switching to speculation needs the margin; staying with it, only to beat plain
        # decoding (leaving it and coming back would pay a catch-up)
        speculating = self._spec_streak > 0
        # with no request waiting, the batch is done when its last request is: plain steps
        # advance every request alike, speculative ones the well-predicted requests faster
        # than the others (Gemma at batch 4: its lowest-acceptance request decoded its last
        # tokens alone at 150-190 ms a step, and the run lost 6 % to plain decoding)
        closed = R > 1 and not self._waiting
        goal = torch.tensor(to_go, dtype=torch.float64)  # [R]
        plain_finish = 0.0  # plain decoding's seconds to finish a closed batch
        if closed:  # (depth 0: each request its goal in steps; a step of one request on
            # the latency model's shape, scaled to what a step of R costs)
            many = torch.tensor([R / plain_rate], dtype=torch.float64)
            one = (
                many
                * self.verify_latency.predict(1)
                / self.verify_latency.predict(R).clamp(min=1e-9)
            )
            plain_finish = float(_closed_batch_seconds(goal, torch.zeros_like(goal), many, one)[0])

        # with SLOs (and SLO selection), rates count the tokens of requests on their SLO
        # (goodput; see _on_slo_share) at each request's own pace at a shape
        slo_args: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        plain_share, at_risk = 1.0, False
        if self.config.selection == "slo" and any(r.slo is not None for r in self._active):
            tpot, elapsed, decoded = self._slo_clocks(time.perf_counter())
            pace = torch.full((R, 1), R / plain_rate, dtype=torch.float64)
            share, plain_worth = _on_slo_share(pace, elapsed, decoded, goal, tpot)
            # speculation's odds: a catch-up first delays every request by its seconds
            slo_args = (elapsed + catch_up_s, decoded, goal, tpot)
            plain_share = float(share[0])
            # a request whose odds at plain decoding's pace are neither sure nor lost
            in_play = (plain_worth > _MISSED_WORTH + 0.01) & (plain_worth < 0.99)
            at_risk = bool(in_play.any())

        def best(optimistic: bool, widths: list[int]) -> tuple[int, int]:
            """(depth, width) of the best shape; depth 0 when plain decoding wins."""
            nonlocal headroom
            plain_good = plain_share * plain_rate
            top_rate, top = (1.0 if speculating else _MARGIN) * plain_good, (0, width)
            self._planned = self._worth = None
            for w in widths:
                i = 0 if w == 1 else 1
                alpha, n = self._alpha(i)
                if optimistic:  # an upper confidence bound: few trials, much doubt
                    alpha = min(alpha + (alpha * (1 - alpha) / n) ** 0.5, 1.0)
                levels = chain if w == 1 else depth
                emitted = (alpha**d).cumsum(0)[: levels + 1]  # 1 + α + ... + α^d
                # a probe is optimistic about costs too: the draft and the target at the lowest they
                # have cost, steps at most the prior ratio over the models. (Pessimism learned in a
                # stall otherwise lasts: a draft timed at 9x during a neighbour's burst, and
                # speculative steps at 3x, kept Gemma plain for every later request)
                level = float(self.draft_latency.predict(R * w, best=optimistic))
                first_w = first_best if optimistic else first
                ratio = self._spec_ratio(i, R)
                if optimistic:
                    ratio = min(ratio, _SPEC_TIME_PRIOR)
                # a beam's verification is priced at every node it grows (the auto budget
                # keeps most of them); pricing it as a chain's made beams look ~10 % cheaper
                # than they were (Gemma's 262k output layer: 49 ms for 2 rows, 61 for 16)
                nodes = (R * (1 + d * w)).clamp(max=max(self.config.max_tokens_per_step, R))
                if optimistic:
                    verify_w = self.verify_latency.predict(
                        R * (d + 1) if w == 1 else nodes, best=True
                    )
                else:
                    verify_w = verify_s if w == 1 else self.verify_latency.predict(nodes)
                predicted = first_w + (d - 1).clamp(min=0) * level + verify_w + spec_overhead
                seconds = ratio * predicted[: levels + 1]
                mean_rate = R * emitted / seconds.clamp(min=1e-9)  # [levels + 1]
                rate, closing = mean_rate, None
                if closed and not optimistic:
                    # the batch ends with its last request: the expected seconds to finish
                    # all, at each depth, against plain decoding's (steps of one request
                    # priced as this one's, with its roots, levels and nodes)
                    alone = (
                        self.draft_latency.predict(first_tokens / R)
                        + (d - 1).clamp(min=0) * self.draft_latency.predict(w)
                        + self.verify_latency.predict(d + 1 if w == 1 else 1 + d * w)
                        + spec_overhead
                    )
                    alone = ratio * alone[: levels + 1]
                    alphas = self._alphas(i)
                    finish = _closed_batch_seconds(goal, alphas, seconds, alone)
                    rate = plain_rate * plain_finish / finish.clamp(min=1e-9)
                    closing = (seconds, alone, alphas)  # (the requests' worth, at depth k)
                straggle = rate / mean_rate.clamp(min=1e-9)
                share = torch.ones_like(rate)
                if slo_args is not None:
                    # each request's tokens a step (none beyond what it has left)
                    alphas_i = self._alphas(i).unsqueeze(1)  # [R, 1]
                    kept = d[: levels + 1] < goal.unsqueeze(1)  # [R, levels + 1]
                    tokens_i = torch.where(kept, alphas_i ** d[: levels + 1], 0.0).cumsum(1)
                    pace = seconds / tokens_i  # [R, levels + 1] seconds per token
                    share, _ = _on_slo_share(pace, *slo_args)
                k = int((rate * share)[1:].argmax()) + 1
                spec_rate = float(rate[k])
                if w == 1 and not optimistic and self._chain_steps[2] > 0:
                    # what chains really did: their depth follows the draft's confidence,
                    # which the model above (one α for every level) does not see; it
                    # predicted 22-24 tok/s where SmolLM2's chains ran at 28-33
                    blended = self._blend_measured_chains(float(mean_rate[k]), R, first, level)
                    spec_rate = blended * float(straggle[k])
                # the catch-up pays when plain decoding of what remains takes longer than
                # speculating on it after catching up; switching (a probe too, on its
                # optimistic rate) needs the margin on the whole, catch-up included (SmolLM2
                # at batch 4: a 1.6 s plan that beat plain decoding by 0.6 % switched, and
                # its catch-up of four prompts took 0.76 s, not the 0.56 s priced)
                spec_good = spec_rate * float(share[k])
                # (in goodput: the catch-up delays every token, on its SLO or not)
                after = (catch_up_s + remaining / spec_rate) / float(share[k])
                repaid = remaining / plain_good > (1.0 if speculating else _MARGIN) * after
                if optimistic:
                    repaid &= catch_up_s <= _PROBE_CATCH_UP * remaining / plain_rate
                logger.debug(
                    "plan R=%d width %d%s: alpha %.3f k %d %.1f tok/s vs plain %.1f "
                    "(on SLO: %.2f vs %.2f), catch-up %.3f s, %d tokens to go",
                    R, w, " (probe)" if optimistic else "", alpha, k, spec_rate,
                    plain_rate, float(share[k]), plain_share, catch_up_s, remaining,
                )  # fmt: skip
                headroom = max(headroom, spec_good / top_rate)
                if spec_good > top_rate and repaid:
                    top_rate, top = spec_good, (k, w)
                    # a probe's optimistic rate is no yardstick: it must only beat plain
                    # (in tokens per second: the level rule weighs every request's tokens
                    # alike, see _level_rule)
                    self._planned = (first_w, level, plain_rate if optimistic else spec_rate)
                    # ρ compares a step with the models as they are, a probe's too
                    self._ratio_prices = (first, float(self.draft_latency.predict(R * w)))
                    if closing is not None:
                        seconds_k, alone_k, alphas = closing
                        self._worth = _critical_weights(
                            goal, alphas, float(seconds_k[k]), float(alone_k[k]), k
                        )
            return top

        k, w = best(False, sorted({1, width}))
        measured = self._plain_seconds.get(R, (0.0, 0))[1]  # plain steps timed at this batch
        if k > 0:
            self._probe_every, self._probed = _PROBE_EVERY, False
            if self._spec_streak > _PROBE_EVERY or (
                self._spec_since_plain >= _PLAIN_RECHECK and measured == _PLAIN_FIRST - 1
            ):
                # a plain step now and then re-measures what plain decoding costs: its
                # prediction otherwise drifts with the shared model, fed by trees alone;
                # and once early on, where it rests on two steps (those after a prefill)
                self._spec_streak = 1
                return 0, width
            self._cost_probe_wait -= w == 1  # (chains only: a beam's levels are priced apart)
            if w == 1 and self._cost_probe_wait <= 0 and self._planned is not None:
                # now and then a chain's levels are priced at the lowest costs seen: a size
                # timed during a stall (and only then) otherwise keeps chains short for good
                # (after a burst of busy neighbours, Gemma's 3-16-token verifications stood
                # at 0.4-0.6 s against ~0.1, and chains stopped at one level)
                self._cost_probe_gap = min(2 * self._cost_probe_gap, _PROBE_MAX)
                self._cost_probe_wait = self._cost_probe_gap
                _, _, long_run = self._planned
                level = float(self.draft_latency.predict(R, best=True))
                self._planned = (first_best, level, long_run)
                self._optimistic = True
            # a chain grows as long as the draft stays confident (see _level_rule)
            return (chain if w == 1 else k), w
        self._spec_streak = 0
        if self._plain_streak == 0 and self._probed:
            # the last step was a probe and speculation still does not pay: probe half as
            # often from now on (after planned speculation, the next probe comes after
            # _PROBE_EVERY plain steps)
            self._probe_every = min(2 * self._probe_every, _PROBE_MAX)
        # (in a closed batch, only where its requests likely stay level; see _PROBE_LEVEL_ODDS)
        if self._plain_streak >= self._probe_every and (
            not closed or float(self._alphas(0).prod()) >= _PROBE_LEVEL_ODDS
        ):
            # re-probe with a chain, where the acceptance rate's upper bound could pay
            k, w = best(True, [1])
            self._probed = self._optimistic = k > 0
            if k > 0:
                return k, w
        # (not while a request may slide off its SLO: each plan weighs that anew)
        if headroom < _REPLAN_HEADROOM and measured >= 2 and not at_risk:
            # (not while plain decoding is priced from the latency model: two measured
            # plain steps reprice it, and the next plan must see them)
            self._unplanned, self._unplanned_for = _REPLAN_GAP, batch
        return 0, width

    def _alpha(self, i: int) -> tuple[float, float]:
        """(acceptance rate, trials it rests on) of beam kind ``i`` for the live batch.

        Each request's own decayed counts, on a prior of ``_PRIOR_WEIGHT`` trials at the
        pair's rate (its slowly decayed counts over every request so far, on a prior of
        ``_PAIR_PRIOR_WEIGHT`` trials at ``_PRIOR_ACCEPT``); the batch's rate is the
        requests' mean, which rests on all their trials (a probe's upper bound on it
        tightens as the batch grows: one on a single request's trials had Gemma probe
        one-level chains at batch 16 at ~0.8x a plain step's tokens per second).
        """
        if not self._active:
            return self._pair_alpha(i), float(self._accept_trials[i]) + _PAIR_PRIOR_WEIGHT
        trials = sum(r.trials[i] + _PRIOR_WEIGHT for r in self._active)
        return float(self._alphas(i).mean()), trials

    def _pair_alpha(self, i: int) -> float:
        """The pair's acceptance rate of beam kind ``i`` (a new request's prior)."""
        return float(
            (self._accept_hits[i] + _PAIR_PRIOR_WEIGHT * _PRIOR_ACCEPT)
            / (self._accept_trials[i] + _PAIR_PRIOR_WEIGHT)
        )

    def _alphas(self, i: int) -> Tensor:
        """(R,) float64 each live request's own acceptance rate of beam kind ``i``: its
        decayed counts on a prior of ``_PRIOR_WEIGHT`` trials at the pair's rate."""
        pair = self._pair_alpha(i)
        hits = torch.tensor([r.hits[i] for r in self._active], dtype=torch.float64)
        trials = torch.tensor([r.trials[i] for r in self._active], dtype=torch.float64)
        return (hits + _PRIOR_WEIGHT * pair) / (trials + _PRIOR_WEIGHT)

    def _plain_rate(self, R: int) -> float:
        """Predicted tokens per second of a plain step of R requests, as plain steps were
        measured (at batch 1 before two were, ``_PLAIN_DOUBT`` times the model's)."""
        seconds, steps = self._plain_seconds.get(R, (0.0, 0))
        if steps >= 2:
            return R / max(seconds, 1e-9)
        measured = self._plain_samples >= 2 or (self._plain_batch > 1 and self._plain_samples > 0)
        ratio = self._plain_time_ratio if measured else 1 / _PLAIN_DOUBT
        seconds = ratio * (float(self.verify_latency.predict(R)) + self._overhead[0])
        return R / max(seconds, 1e-9)

    def _spec_seconds(self, first: float, level: float, levels: float, verified: float) -> float:
        """Predicted seconds of a speculative step (before the measured ratio ρ): the draft's
        first level, ``levels - 1`` further ones, verifying ``verified`` tokens, overhead."""
        return (
            first
            + (levels - 1) * level
            + float(self.verify_latency.predict(verified))
            + (self._overhead[1] or self._overhead[0])
        )

    def _blend_measured_chains(self, modelled: float, R: int, first: float, level: float) -> float:
        """A chain's expected tokens per second: the α model's rate ``modelled``, raised
        toward what recent chain steps emitted per request for the levels they grew, priced
        at this batch (the measured part weighs as many steps as it rests on, against 2).
        """
        tokens, levels, steps = self._chain_steps
        tau, depth = tokens / steps, max(levels / steps, 1.0)
        seconds = self._spec_ratio(0, R) * self._spec_seconds(first, level, depth, R * (depth + 1))
        measured = R * tau / max(seconds, 1e-9)
        # only ever raises the model's rate: chain steps of one poorly predicted prompt
        # otherwise kept every later prompt plain, with no chain step left to correct them
        # (a request's own acceptance rate already lowers the model's)
        return max(modelled, (2 * modelled + steps * measured) / (2 + steps))

    def _level_rule(self, R: int, width: int) -> Callable[[TokenTree, Tensor], bool]:
        """When the draft should stop growing this step's trees (``grow_draft_tree``'s
        ``stop``): when a further level would lower the long-run tokens per second.

        A further level adds the frontier's Σ f expected tokens (f calibrated when the engine
        calibrates) for one more draft forward and the verification of its nodes. It is
        grown while that gain per second beats the rate the plan expects of speculation in
        the long run, and plain decoding's: stopping now, the next tokens would come at
        that rate from a fresh step (renewal-reward: a step's level pays when it beats the
        long-run rate, not the step's own rate so far, which stopped confident stretches of
        SmolLM2's draft at 6-8 levels where transformers' assisted loop ran 8+ tokens a
        step). So a step's depth follows the draft's confidence: long on confident
        stretches, short where the draft hesitates.

        The calibrated f is the pair's: a request that the target accepts less often than
        the pair's requests do (its own rate α_i below the pair's α) has the gain of a level
        d lowered by (α_i / α)^d, and a level a request cannot emit (beyond what it has
        left) adds nothing for it. In a closed batch, each request's tokens count by what
        they shorten the batch's run (see :func:`_critical_weights`): the request likely to
        finish last, most. SLOs do not weigh here: the plan chose the shape for goodput,
        but a request's tokens are worth its odds of meeting its SLO on average only; at
        the margin, a token more for a request near its SLO is worth more than that, not
        less. (Weighted by those odds, SmolLM2 at batch 16 met 4 tight SLOs of 25 in run Z
        where the throughput plan met 13; 68 and 70 of 125 over four runs.)
        """
        assert self._planned is not None
        _, level, long_run = self._planned
        kind = 0 if width == 1 else 1
        ratio = self._spec_ratio(kind, R)
        cap = self.config.max_tokens_per_step
        optimistic = self._optimistic  # a probe: the target at the lowest it has cost
        if optimistic:
            ratio = min(ratio, _SPEC_TIME_PRIOR)

        def verify(tokens: float) -> Tensor:
            return self.verify_latency.predict(tokens, best=optimistic)

        plain_rate = self._plain_rate(R)
        calibrator = self.calibrator
        # (Gemma at batch 4: one MT-bench request accepted ~0.7 a level against the pair's
        # 0.9, and its chains grew 5-8 levels on the pair's calibrated f, then lost the
        # first token; its tail steps alone took 200-280 ms for 1-3 tokens)
        below = (self._alphas(kind) / self._pair_alpha(kind)).clamp(max=1.0)  # [R]
        # in a closed batch, tokens of the request likely to finish last count most
        worth = self._worth
        if worth is None or worth.numel() != R:
            worth = torch.ones(R, dtype=torch.float64)
        to_go = torch.tensor([r.max_new_tokens - len(r.output) for r in self._active])  # [R]

        def stop(tree: TokenTree, frontier: Tensor) -> bool:
            if calibrator is not None:
                tree = calibrator.apply(tree)
            # the frontier's f bounds what its children, one level deeper, can add
            child = tree.depth.gather(1, frontier).cpu() + 1  # [R, F]
            f = tree.logp.exp().gather(1, frontier).double().cpu() * below.unsqueeze(1) ** child
            f = torch.where(child < to_go.unsqueeze(1), f, 0.0)
            gain = float((f.sum(1) * worth).sum())
            n = min(R * (int(tree.depth.max()) * width + 1), cap)
            more = ratio * (level + float(verify(min(n + R * width, cap))) - float(verify(n)))
            return gain < max(long_run, plain_rate) * more

        return stop

    def _warmup(self) -> None:
        """Seed both latency models with a few timed forwards on a short dummy prefix, and
        (for a draft with a cache of its own) the draft's catch-up price."""
        for model, lat in ((self.target, self.verify_latency), (self.draft, self.draft_latency)):
            state, _ = prefill(model, [[0] * 128])  # a typical context length
            # (a draft's levels run as grow_draft_tree runs them: scores of its own columns)
            with subset_scores(model) if model is self.draft else nullcontext():
                for n in (*range(1, 9), 16, 32):
                    tree = TokenTree([0] * n, [-1, *list(range(n - 1))], [0.0] * n)
                    times = []
                    for run in range(3):  # the first run warms up (and tunes FastLinears)
                        t0, tuned = time.perf_counter(), tunings()
                        # (the target as a greedy step runs it: most steps are)
                        (tree_argmax if model is self.target else tree_forward)(model, tree, state)
                        if run > 0 and tunings() == tuned:
                            times.append(time.perf_counter() - t0)
                        commit(state, torch.full((1, 1), -1, dtype=torch.int64))
                        drop_last_token(state)
                    if times:
                        lat.observe(n, min(times))  # the quicker of two: less noise
        if self._draft_state_kept():
            self._price_draft_prefill()

    def _price_draft_prefill(self) -> None:
        """The draft's catch-up price until one is measured: its prefill of a 128-token
        prefix per token, beyond one forward's fixed cost (as catch-ups are priced)."""
        with subset_scores(self.draft):  # (a catch-up keeps only keys and values)
            for _ in range(2):
                # timed the second time (a model's first forward in a process runs cold);
                # the target's prefill per token scaled by the draft's cost ratio in
                # decoding priced Gemma's catch-up at half what it took
                t0 = time.perf_counter()
                prefill(self.draft, [[0] * 128])
                seconds = time.perf_counter() - t0
        fixed = float(self.draft_latency.predict(1)) if self.draft_latency.observed else 0.0
        self._draft_prefill_per_token = max(seconds - fixed, 0.0) / 128

    def _setting(self) -> tuple[object, ...]:
        """What latencies depend on besides the models: their devices, dtypes, threads."""
        first = [next(m.parameters()) for m in (self.target, self.draft)]
        return (*((p.device, p.dtype) for p in first), torch.get_num_threads())

    def _save_profile(self) -> None:
        """Leave what this engine measured to the next engine on the same pair."""
        by_draft = _PROFILES.setdefault(self.target, weakref.WeakKeyDictionary())
        calibrator = self.calibrator
        old = by_draft.get(self.draft)
        if calibrator is None and old is not None:
            calibrator = old.calibrator  # an engine that does not calibrate keeps the last one
        profile = _Profile(
            verify_latency=self.verify_latency,
            draft_latency=self.draft_latency,
            draft_prefill_per_token=self._draft_prefill_per_token,
            prefill_per_token=self._prefill_per_token,
            catch_up_per_token=self._catch_up_per_token,
            accept_trials=self._accept_trials,
            accept_hits=self._accept_hits,
            spec_ratios=self._spec_ratios,
            overhead=self._overhead,
            calibrator=calibrator,
            chain_steps=self._chain_steps,
            setting=self._setting(),
        )
        by_draft[self.draft] = copy.deepcopy(profile)

    def _load_profile(self, profile: _Profile) -> None:
        p = copy.deepcopy(profile)
        self.verify_latency, self.draft_latency = p.verify_latency, p.draft_latency
        self._draft_prefill_per_token = p.draft_prefill_per_token
        self._prefill_per_token = p.prefill_per_token
        self._catch_up_per_token = p.catch_up_per_token
        self._accept_trials, self._accept_hits = p.accept_trials, p.accept_hits
        self._spec_ratios, self._overhead = p.spec_ratios, p.overhead
        self._chain_steps = p.chain_steps
        if self.calibrator is not None and p.calibrator is not None:
            self.calibrator = p.calibrator

    def _auto_budget(
        self, cand: TokenTree, need: Tensor, cap: int | None, draft_seconds: float
    ) -> int:
        """The budget with the most expected emitted tokens per second, raised toward the SLO share
        while the step stays at least as fast as plain decoding."""
        R, N = cand.tokens.shape
        if not self.verify_latency.observed:  # nothing measured yet: verify everything once
            return max(R, min(int(cand.num_nodes.sum()), self.config.max_tokens_per_step))
        f = cand.logp.exp()  # [R, N]
        if cap is not None:
            order = f.argsort(dim=1, descending=True, stable=True)
            rank = torch.empty_like(order).scatter_(1, order, torch.arange(N).expand(R, N))
            f = torch.where(rank < cap, f, 0.0)
        f_sorted = f.sort(dim=1, descending=True).values  # [R, N] the root (f = 1) first
        # nodes the SLO needs take: per request the shortest best-first prefix reaching its
        # need; a need its whole tree cannot reach is not a floor (no budget would meet it)
        cum = f_sorted.cumsum(1)  # [R, N]
        want = ((cum < need.unsqueeze(1)).sum(1) + 1).clamp(max=cand.num_nodes)
        reachable = cum[:, -1] >= need
        floor = int(torch.where(reachable, want, 1).sum())
        rest = f_sorted[:, 1:].flatten().sort(descending=True).values  # [R * (N - 1)]
        upper = min(int(cand.num_nodes.sum()), max(self.config.max_tokens_per_step, floor))
        budgets = torch.arange(R, upper + 1)
        expected = R + torch.cat([torch.zeros(1), rest.cumsum(0)])[: budgets.numel()]
        seconds = draft_seconds + self.verify_latency.predict(budgets)
        rate = expected / seconds.clamp(min=1e-9)  # [B] expected emitted tokens per second
        i_best = int(rate.argmax())
        # the SLO floor is served as far as the step stays at least as fast as plain decoding
        # (a floor that would slow every request down helps no SLO)
        plain = R / max(float(self.verify_latency.predict(R)), 1e-9)
        slow = (rate[i_best:] < min(plain, float(rate[i_best]))).nonzero().flatten()
        last = i_best + (int(slow[0]) - 1 if slow.numel() else rate.numel() - 1 - i_best)
        limit = int(budgets[last])  # the end of the run of budgets from the best that keep up
        return max(int(budgets[i_best]), min(floor, upper, limit))

    def step(self) -> list[RequestOutput]:
        """Run one step over every live request; returns what each produced in it.

        Requests admitted in this step get their first token from their prefill, then take
        part in the step like the others; each request appears at most once in the result.
        """
        first = self._admit()
        if not self._active:
            return first
        depth, width = self._beam_shape(len(self._active))
        depth, width = self._plan_shape(len(self._active), depth, width)
        if depth > 0:
            emitted, counts = self._speculative_step(depth, width)
        else:
            emitted, counts = self._plain_step()
        self.stats.steps += 1
        outputs = self._emit(emitted, counts)
        if not first:
            return outputs
        merged = {o.request_id: o for o in first}
        for o in outputs:
            early = merged.get(o.request_id)
            if early is not None:
                o = RequestOutput(
                    o.request_id, early.new_tokens + o.new_tokens, o.finished, o.finish_reason
                )
            merged[o.request_id] = o
        return list(merged.values())

    def _speculative_step(self, depth: int, width: int) -> tuple[list[list[int]], list[int]]:
        assert self._target_state is not None
        cfg = self.config
        R = len(self._active)
        temperature, top_k, top_p, greedy = self._sampling()
        t_start, tuned = time.perf_counter(), tunings()

        # 1. draft: catch up on tokens it has not seen (prompts, plain steps), then candidate
        # trees from a beam over the draft model
        # (a short backlog rides along with the roots in the beam's first forward); a draft
        # sharing the target's cache grows its trees on a view of it and has no backlog
        if self._draft_state is None:
            # (into the target's free slots: its verification overwrites or masks them)
            draft_state = share_prefix(self._target_state, spare=True)
        else:
            draft_state = self._draft_state
        backlog = draft_state.backlog
        caught_up = False
        if backlog.shape[1] > _CATCH_UP_MIN and int((backlog >= 0).sum(1).max()) > _CATCH_UP_MIN:
            catch_up(self.draft, draft_state)
            caught_up = True
        t_beam = time.perf_counter()
        roots = torch.tensor([r.root for r in self._active], device=self.device)
        stop = None
        if cfg.budget == "auto" and self._planned is not None:
            stop = self._level_rule(R, width)
        dtree = grow_draft_tree(
            self.draft, draft_state, roots, depth, width,
            temperature=temperature, top_k=top_k, top_p=top_p, stop=stop,
        )  # fmt: skip
        t_draft = time.perf_counter()
        forwards = max(1, int(dtree.grown.depth.max()))  # levels grown (maybe fewer than depth)
        tuned_draft = tunings()
        if tuned_draft == tuned:  # a step that timed new kernel plans is not typical
            self.draft_latency.observe(R * width, (t_draft - t_beam) / forwards)  # per level

        # 2. needs from the SLO clocks, the budget, and the selection
        cand_raw = dtree.candidates
        cand = self.calibrator.apply(cand_raw) if self.calibrator is not None else cand_raw
        need = self._needs(t_draft, depth)
        if cfg.budget == "auto":
            budget = self._auto_budget(cand, need, cfg.max_per_request, t_draft - t_start)
            if width == 1:
                # the plan chose this chain from measured acceptance; the draft's own f is
                # often underconfident, so verify the whole chain it paid for
                budget = max(budget, int(cand.num_nodes.sum()))
        else:
            budget = max(R, cfg.budget)
        if cfg.selection == "even":
            cap = max(1, budget // R)
            if cfg.max_per_request is not None:
                cap = min(cap, cfg.max_per_request)
            sel = select(cand, R * cap, max_per_request=cap)
        else:
            slo_need = need if cfg.selection == "slo" else None
            sel = select(cand, budget, need=slo_need, max_per_request=cfg.max_per_request)
        t_select = time.perf_counter()

        # 3. one target forward over every selected tree
        scores = self._target_forward(sel.tree, greedy)  # [R, M, V] or [R, M] argmaxes
        t_verify = time.perf_counter()
        n_tokens = int(sel.num_selected.sum())
        if tunings() == tuned_draft:
            self.verify_latency.observe(n_tokens, t_verify - t_select)

        # 4. verification, then keep the accepted paths in both caches
        res = self._verify(sel.tree, scores, temperature, top_k, top_p, greedy)
        commit(self._target_state, res.accepted)
        if self._draft_state is not None:
            commit_draft(self._draft_state, dtree, map_accepted(res.accepted, sel.kept))
        if self.calibrator is not None:
            # the calibrator learns from the draft's raw estimates of the verified nodes
            raw = cand_raw.logp.gather(1, sel.kept.clamp(min=0)).masked_fill(
                sel.kept < 0, float("-inf")
            )
            t = sel.tree
            self.calibrator.observe(
                TokenTree(t.tokens, t.parents, raw, t.depth, t.num_nodes, validate=False),
                res.accepted,
            )
        self.stats.spec = self.stats.spec.update(res, sel.tree)
        emitted, counts = res.emitted.tolist(), res.num_emitted.tolist()
        t_end = time.perf_counter()
        if width == 1 and self._planned is not None:  # a planned (auto) chain
            tokens = float(res.num_emitted.double().mean())
            sums = self._chain_steps
            self._chain_steps = [
                _STATS_DECAY * sums[0] + tokens,
                _STATS_DECAY * sums[1] + forwards,
                _STATS_DECAY * sums[2] + 1.0,
            ]
        # acceptance: each request tried the levels up to the first rejected one (or all it
        # had selected), and kept the accepted ones
        accepted = res.num_accepted.double().cpu()  # [R]
        tried = torch.minimum(accepted + 1, sel.tree.depth.max(1).values.double().cpu())
        i = 0 if width == 1 else 1
        # only the kind that ran learns (and forgets): the other keeps its evidence
        self._accept_trials[i] = _PAIR_DECAY * self._accept_trials[i] + float(tried.sum())
        self._accept_hits[i] = _PAIR_DECAY * self._accept_hits[i] + float(accepted.sum())
        for req, t, a in zip(self._active, tried.tolist(), accepted.tolist(), strict=True):
            req.trials[i] = _STATS_DECAY * req.trials[i] + t
            req.hits[i] = _STATS_DECAY * req.hits[i] + a
        self._observe_overhead(1, (t_select - t_draft) + (t_end - t_verify))
        predicted = 0.0
        if self._planned is not None and self._ratio_prices is not None and tunings() == tuned:
            # what the models predict for the levels really grown and nodes really verified
            # (as they are: a probe's best prices would skew ρ by how far they are off)
            first, level = self._ratio_prices
            predicted = self._spec_seconds(first, level, forwards, n_tokens)
            self._observe_spec_ratio(i, R, t_end - t_beam, predicted)
        self._planned, self._optimistic, self._worth = None, False, None  # this plan is spent
        if caught_up:  # per padded token, beyond one forward's fixed cost
            observed = self.draft_latency.observed
            fixed = float(self.draft_latency.predict(R)) if observed else 0.0
            seconds = max(t_beam - t_start - fixed, 0.0) / (R * backlog.shape[1])
            self._catch_up_per_token = _mean(self._catch_up_per_token, seconds)
        if logger.isEnabledFor(logging.DEBUG):  # (the mean is a tensor op: only when asked)
            logger.debug(
                "speculated R=%d width %d: %d levels, %d verified, %.2f emitted per request, "
                "%.1f ms (draft %.1f, catch-up %.1f; predicted %.1f before the ratio)",
                R, width, forwards, n_tokens, float(res.num_emitted.double().mean()),
                1e3 * (t_end - t_start), 1e3 * (t_draft - t_beam), 1e3 * (t_beam - t_start),
                1e3 * predicted,
            )  # fmt: skip
        self._plain_streak = 0
        self._spec_streak += 1
        self._spec_since_plain += 1
        self.stats.target_tokens += n_tokens
        self.stats.draft_time += t_draft - t_start
        self.stats.verify_time += t_verify - t_select
        self.stats.overhead_time += (t_select - t_draft) + (t_end - t_verify)
        return emitted, counts

    def _plain_step(self) -> tuple[list[list[int]], list[int]]:
        """One target forward of the roots alone; a draft with its own cache catches up on
        them at its next speculative step."""
        assert self._target_state is not None
        R = len(self._active)
        temperature, top_k, top_p, greedy = self._sampling()
        roots = torch.tensor([r.root for r in self._active], device=self.device)
        tree = TokenTree(
            roots.unsqueeze(1), torch.full((R, 1), -1), torch.zeros(R, 1), validate=False
        )
        t_start, tuned = time.perf_counter(), tunings()
        scores = self._target_forward(tree, greedy)  # [R, 1, V] or [R, 1] argmaxes
        t_verify = time.perf_counter()
        if tunings() == tuned:
            self.verify_latency.observe(R, t_verify - t_start)
        res = self._verify(tree, scores, temperature, top_k, top_p, greedy)
        commit(self._target_state, res.accepted)
        if self._draft_state is not None:
            append_backlog(self._draft_state, roots)  # the draft never saw these roots
        self.stats.spec = self.stats.spec.update(res, tree)
        emitted, counts = res.emitted.tolist(), res.num_emitted.tolist()
        t_end = time.perf_counter()
        self._observe_overhead(0, t_end - t_verify)
        if tunings() == tuned:
            # priced after this step joined the latency model (priced before, a slow first
            # step after a prefill counted twice: in the ratio, and in the model it moved)
            predicted = float(self.verify_latency.predict(R)) + self._overhead[0]
            if self._plain_samples < 2:  # the quicker of the first two
                sample = _ratio(t_end - t_start, predicted)
                self._plain_time_ratio = min(self._plain_time_ratio or sample, sample)
            else:  # (re-measuring steps are rare while speculating: each weighs as much
                # as in the latency model)
                self._plain_time_ratio = _mean_ratio(
                    self._plain_time_ratio, t_end - t_start, predicted, keep=0.7
                )
            self._plain_samples += 1
            if R > 1 or self._plain_samples > 2:  # (batch 1: after the doubted first ones)
                seconds = t_end - t_start
                old, n = self._plain_seconds.get(R, (seconds, 0))
                new = min(old, seconds) if n < _PLAIN_FIRST else _mean(old, seconds, keep=0.7)
                self._plain_seconds[R] = (new, n + 1)
        # measured up to the smaller of the last two plain steps' batches (a step that
        # timed new kernel plans counts too: the next one times none)
        if self._last_plain_size:
            self._plain_batch = max(self._plain_batch, min(R, self._last_plain_size))
        self._last_plain_size = R
        self._plain_streak += 1
        self._spec_since_plain = 0
        self.stats.target_tokens += R
        self.stats.verify_time += t_verify - t_start
        self.stats.overhead_time += t_end - t_verify
        return emitted, counts

    def _spec_ratio(self, kind: int, R: int) -> float:
        """Measured / predicted seconds of speculative steps of ``kind`` at batches of R's
        class: the lower median of that class's last steps, else of the nearest measured
        class's (the smaller on a tie), else the prior."""
        row, c = self._spec_ratios[kind], _ratio_class(R)
        for d in range(_RATIO_CLASSES):
            for near in (c - d, c + d):
                if 0 <= near < _RATIO_CLASSES and row[near]:
                    ratios = sorted(row[near])
                    return ratios[(len(ratios) - 1) // 2]
        return _SPEC_TIME_PRIOR

    def _observe_spec_ratio(self, kind: int, R: int, seconds: float, predicted: float) -> None:
        """Keep a speculative step's measured / predicted seconds among its batch class's
        last ``_RATIO_WINDOW``."""
        ratios = self._spec_ratios[kind][_ratio_class(R)]
        ratios.append(_ratio(seconds, predicted))
        del ratios[:-_RATIO_WINDOW]

    def _observe_overhead(self, kind: int, seconds: float) -> None:
        """Fold one step's seconds outside the forwards into the decayed mean of its kind."""
        self._overhead[kind] = _mean(self._overhead[kind], seconds)

    def _target_forward(self, tree: TokenTree, greedy: bool) -> Tensor:
        """The target over ``tree``: (R, N) argmaxes when every request is greedy (the
        output layer's exact choice without all its logits), else (R, N, V) logits."""
        assert self._target_state is not None
        forward = tree_argmax if greedy else tree_forward
        return forward(self.target, tree, self._target_state)

    def _verify(
        self,
        tree: TokenTree,
        scores: Tensor,
        temperature: float | Tensor,
        top_k: Tensor | None,
        top_p: Tensor | None,
        greedy: bool,
    ) -> VerifyResult:
        """``scores``: what :meth:`_target_forward` gave for ``greedy``."""
        if greedy:
            return verify_greedy(tree, scores)
        # each request draws from its own generator, so its result does not depend on the batch
        uniforms = torch.stack(
            [
                torch.rand(tree.max_nodes, generator=r.generator, device=self.device)
                for r in self._active
            ]
        )  # [R, N]
        return verify(
            tree, scores, temperature=temperature, top_k=top_k, top_p=top_p, uniforms=uniforms
        )

    def _emit(
        self, emitted: list[list[int]], counts: list[int], rows: Iterable[int] | None = None
    ) -> list[RequestOutput]:
        """Hand out new tokens to the live requests (or to ``rows`` of them, in order), ending
        requests exactly at stop tokens or length."""
        now = time.perf_counter()
        outputs, done = [], []
        for j, i in enumerate(range(len(self._active)) if rows is None else rows):
            req = self._active[i]
            new = emitted[j][: counts[j]]
            reason = None
            stop_at = next((j for j, tok in enumerate(new) if tok in req.stop), None)
            if stop_at is not None:
                new, reason = new[: stop_at + 1], "stop"
            room = req.max_new_tokens - len(req.output)
            if len(new) > room:
                new, reason = new[:room], "length"
            elif len(new) == room and reason is None:
                reason = "length"
            req.output.extend(new)
            req.root = new[-1]
            req.steps += 1
            req.decode_time = now - (req.start if req.start is not None else now)
            if reason is not None:
                done.append(i)
            outputs.append(RequestOutput(req.id, new, reason is not None, reason))
        if done:
            self._finish(done)
        return outputs

    def _slo_clocks(self, now: float) -> tuple[Tensor, Tensor, Tensor]:
        """(R,) float64 each live request's SLO (seconds per token, 0 for none), decode time
        so far and tokens decoded since its first (the clock starts at the first token)."""
        active, f64 = self._active, torch.float64
        tpot = [r.slo.tpot if r.slo is not None else 0.0 for r in active]
        elapsed = [now - r.start if r.start is not None else 0.0 for r in active]
        decoded = [max(len(r.output) - 1, 0) for r in active]
        return (
            torch.tensor(tpot, dtype=f64),
            torch.tensor(elapsed, dtype=f64),
            torch.tensor(decoded, dtype=f64),
        )

    def _needs(self, now: float, depth: int) -> Tensor:
        """(R,) tokens each request must emit this step to stay on its SLO (1 without one)."""
        tpot, elapsed, decoded = self._slo_clocks(now)
        has = tpot > 0
        if not bool(has.any()):
            return torch.ones(len(self._active))
        steps = max(1, self.stats.steps)
        predicted = (
            self.stats.draft_time + self.stats.verify_time + self.stats.overhead_time
        ) / steps
        need = tokens_needed(torch.where(has, tpot, 1.0), elapsed, decoded, predicted, depth)
        return torch.where(has, need, 1.0)

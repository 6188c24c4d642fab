"""The auto plan's decisions on synthetic latencies: when speculation pays, when it does not,
and how it keeps plain decoding measured."""

import pytest
import torch

from adaspec.engine import SLO, Engine, EngineConfig
from adaspec.engine.core import (
    _PROBE_EVERY,
    _PROFILES,
    _RATIO_CLASSES,
    _RATIO_WINDOW,
    _REPLAN_GAP,
    _closed_batch_seconds,
    _critical_weights,
    _expected_max,
    _last_odds,
    _on_slo_share,
    _step_line,
)
from adaspec.models import tiny_model
from adaspec.tree import TokenTree


@pytest.fixture(autouse=True)
def _fresh_profiles():
    """Each test starts with no pair profile (engines of earlier tests leave theirs)."""
    _PROFILES.clear()
    yield
    _PROFILES.clear()


def planned(draft_cost: float, *, prompt_len: int = 4, max_new_tokens: int = 200) -> Engine:
    """An engine with one admitted request and made-up latencies: a target forward takes
    50 ms + 1 ms per token, a draft level ``draft_cost`` times that; plain steps measured."""
    eng = Engine(tiny_model(seed=0), tiny_model(seed=1), config=EngineConfig(warmup=False))
    eng.add_request(list(range(1, prompt_len + 1)), max_new_tokens=max_new_tokens)
    eng._admit()
    for n in (1, 2, 4, 8, 16, 32, 64):
        eng.verify_latency.observe(n, 0.050 + 0.001 * n)
        eng.draft_latency.observe(n, draft_cost * (0.050 + 0.001 * n))
    eng._plain_samples, eng._plain_time_ratio = 2, 1.0
    eng._plain_batch = 64
    return eng


def test_plain_decoding_is_measured_first_unless_speculation_wins_anyway():
    # a cheap draft wins even against plain decoding _PLAIN_DOUBT times faster than the
    # latency model says: it speculates at once
    eng = planned(0.1)
    eng._plain_samples, eng._plain_batch = 0, 1
    assert eng._plan_shape(1, 4, 4)[0] > 0
    # a dearer one wins only against the measured plain steps: two are measured first
    eng = planned(0.5)
    eng._plain_batch = 1
    for measured in (0, 1):
        eng._plain_samples = measured
        assert eng._plan_shape(1, 4, 4) == (0, 4)
    eng._plain_samples = 2
    assert eng._plan_shape(1, 4, 4)[0] > 0


def test_a_cheap_draft_speculates_an_expensive_one_does_not():
    depth, _ = planned(0.1)._plan_shape(1, 4, 4)
    assert depth > 0
    # a draft level as slow as the target's step never pays, not even as a probe (with an
    # upper bound of the acceptance rate, after a run of plain steps)
    eng = planned(1.0)
    assert eng._plan_shape(1, 4, 4)[0] == 0
    eng._plain_streak = _PROBE_EVERY
    assert eng._plan_shape(1, 4, 4)[0] == 0


def test_long_speculation_takes_a_plain_step_to_remeasure_and_goes_on():
    eng = planned(0.1)
    eng._spec_streak = _PROBE_EVERY + 1
    assert eng._plan_shape(1, 4, 4)[0] == 0  # one plain step re-measures plain decoding
    assert eng._spec_streak == 1  # ... and does not end the run of speculation
    assert eng._plan_shape(1, 4, 4)[0] > 0


def test_speculation_on_a_plain_price_from_two_steps_remeasures_it_once():
    eng = planned(0.1)
    eng._spec_since_plain = 2
    eng._plain_seconds[1] = (0.2, 1)  # one step does not price plain decoding yet
    assert eng._plan_shape(1, 4, 4)[0] > 0
    eng._plain_seconds[1] = (0.2, 2)  # two slow plain steps (after a prefill)
    eng._spec_since_plain = 1
    assert eng._plan_shape(1, 4, 4)[0] > 0
    eng._spec_since_plain = 2
    assert eng._plan_shape(1, 4, 4)[0] == 0  # a third plain step
    eng._plain_step()  # (which measures it)
    assert eng._plain_seconds[1][1] == 3
    assert eng._spec_since_plain == 0
    eng._plain_seconds[1], eng._plain_time_ratio = (0.2, 3), 1.0  # (the tiny model's step)
    eng._spec_since_plain = 2  # measured: no more until the long-run re-measure
    assert eng._plan_shape(1, 4, 4)[0] > 0


def test_a_probe_is_priced_at_the_lowest_costs_so_a_stall_is_measured_again():
    """A burst of busy neighbours while speculating: the draft's and the target's tree
    forwards timed 5x, speculative steps 3x their prediction. The plan then decodes
    plainly, and only a probe can time them again; it is priced at the lowest costs seen."""
    eng = planned(0.2)
    for _ in range(5):
        for n in (1, 2, 4, 8, 16):
            eng.draft_latency.observe(n, 5 * 0.2 * (0.050 + 0.001 * n))
            eng.verify_latency.observe(n + 1, 5 * (0.050 + 0.001 * n))
        for kind in (0, 1):
            eng._observe_spec_ratio(kind, 1, 3.0, 1.0)
    for _ in range(3):  # the draft's levels too
        eng.draft_latency.observe(1, 5 * 0.2 * 0.051)
    eng.verify_latency.observe(1, 0.051)  # plain steps measure the target's 1-token forward
    assert eng._plan_shape(1, 4, 4)[0] == 0  # the stalled costs: plain wins
    eng._plain_streak = eng._probe_every
    assert eng._plan_shape(1, 4, 4)[0] > 0  # the probe runs on the best costs
    first, level, _ = eng._planned or (0.0, 0.0, 0.0)
    # ... and is timed against them: a further level of one token at its best, the first
    # level (the root and the prompt the draft has not seen) far below its stalled price
    assert level == pytest.approx(0.2 * 0.051)
    assert first < 2 * 0.2 * 0.051


def test_while_speculating_a_chain_now_and_then_prices_its_levels_at_the_lowest_costs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sizes timed only during a stall keep chains short while the plan speculates (no
    probe is due then): every so often a chain's levels are priced at the best costs, with
    the gap doubling each time."""
    eng = planned(0.2)
    eng._spec_ratios = [[[1.0] for _ in range(_RATIO_CLASSES)] for _ in range(2)]
    for _ in range(5):
        for n in (4, 8, 16, 32, 64):  # the stall: trees of 4+ tokens timed at 5x
            eng.verify_latency.observe(n, 5 * (0.050 + 0.001 * n))
    probes = []
    best_asked = []
    predict = eng.verify_latency.predict

    def spy(tokens: object, *, best: bool = False) -> torch.Tensor:
        best_asked.append(best)
        return predict(tokens, best=best)  # type: ignore[arg-type]

    for _ in range(3 * _PROBE_EVERY + 1):
        assert eng._plan_shape(1, 4, 1)[0] > 0  # a chain each step
        probes.append(eng._optimistic)
        monkeypatch.setattr(eng.verify_latency, "predict", spy)
        best_asked.clear()
        stop = eng._level_rule(1, 1)  # the next level's verification: priced how?
        tree = TokenTree(
            torch.tensor([[5, 6]]), torch.tensor([[-1, 0]]), torch.tensor([[0.0, -0.1]])
        )
        stop(tree, torch.tensor([[1]]))
        assert (True in best_asked) == eng._optimistic  # (plain decoding: as it is)
        monkeypatch.undo()
        if eng._optimistic:  # and the ratio of this step: against the models as they are
            assert eng._ratio_prices == pytest.approx(
                (float(eng.draft_latency.predict(5)), float(eng.draft_latency.predict(1)))
            )
    assert [i for i, p in enumerate(probes) if p] == [_PROBE_EVERY - 1, 3 * _PROBE_EVERY - 1]


def test_staying_with_speculation_needs_no_margin_switching_to_it_does():
    # a draft for which speculation is predicted to be ~4 % faster than plain decoding
    eng = planned(0.7)
    eng._accept_trials[:] = 100.0  # the pair's acceptance measured over many requests
    eng._accept_hits[:] = 85.0
    eng._spec_ratios = [[[1.0] for _ in range(_RATIO_CLASSES)] for _ in range(2)]
    eng._plain_streak = 1
    assert eng._plan_shape(1, 4, 1)[0] == 0
    eng._spec_streak, eng._plain_streak = 3, 0
    assert eng._plan_shape(1, 4, 1)[0] > 0


@pytest.mark.parametrize(("remaining", "speculates"), [(4, False), (4000, True)])
def test_the_drafts_catch_up_must_be_repaid_by_the_tokens_to_come(remaining, speculates):
    eng = planned(0.1, prompt_len=100, max_new_tokens=remaining)
    eng._catch_up_per_token = 0.01  # 100 prompt tokens: a second of catch-up
    assert (eng._plan_shape(1, 4, 4)[0] > 0) == speculates


def test_the_level_rule_grows_confident_trees_and_stops_hesitant_ones():
    from adaspec.tree import TokenTree

    eng = planned(0.1)
    # a draft level a tenth of a target forward; speculation expected at 30 tok/s
    eng._planned = (0.005, 0.005, 30.0)
    eng.calibrator = None  # judge the draft's own f
    stop = eng._level_rule(1, 1)

    def chain(f: list[float]) -> tuple[TokenTree, torch.Tensor]:
        n = len(f) + 1
        tree = TokenTree([7] * n, [-1, *range(n - 1)], [0.0, *(torch.tensor(f).log().tolist())])
        return tree, torch.tensor([[n - 1]])

    assert not stop(*chain([0.95, 0.9]))  # confident: another level pays
    assert stop(*chain([0.3, 0.02]))  # the next level adds at most 0.02 tokens
    # a dearer draft level needs a more confident frontier than a cheap one
    assert not stop(*chain([0.9, 0.5]))
    eng._planned = (0.02, 0.02, 30.0)
    assert eng._level_rule(1, 1)(*chain([0.9, 0.5]))
    assert not eng._level_rule(1, 1)(*chain([0.99, 0.98]))


def test_a_confident_chain_grows_while_a_level_beats_the_long_run_rate():
    # 12 levels at 0.97 each: this step's own rate so far (~33 tok/s) is above what
    # speculation makes in the long run (25 tok/s), and a 13th level adds 0.69 tokens in
    # ~23 ms (30 tok/s): it pays, since stopping now leaves the next tokens to a fresh step
    from adaspec.tree import TokenTree

    eng = planned(0.4)
    eng.calibrator = None
    f = [0.97**d for d in range(1, 13)]
    tree = TokenTree([7] * 13, [-1, *range(12)], [0.0, *(torch.tensor(f).log().tolist())])
    frontier = torch.tensor([[12]])
    eng._planned = (0.02, 0.02, 25.0)
    assert not eng._level_rule(1, 1)(tree, frontier)
    eng._planned = (0.02, 0.02, 40.0)  # where speculation makes 40 tok/s, a fresh step wins
    assert eng._level_rule(1, 1)(tree, frontier)


def test_a_new_request_starts_from_the_pairs_acceptance_not_the_last_requests():
    eng = planned(0.1)
    eng._accept_trials[0], eng._accept_hits[0] = 400.0, 360.0  # the pair: 0.9 over many
    alpha, trials = eng._alpha(0)
    assert abs(alpha - (360 + 32 * 0.93) / (400 + 32)) < 1e-9
    eng._active[0].trials[0], eng._active[0].hits[0] = 20.0, 10.0  # this prompt: 0.5
    alpha, trials = eng._alpha(0)
    assert 0.5 < alpha < 0.7
    assert trials == 28.0


def test_a_later_engine_on_the_same_pair_skips_the_warm_up_and_keeps_what_was_learned():
    from adaspec.models import tiny_model

    target, draft = tiny_model(seed=0), tiny_model(seed=1)
    calls = [0]

    def count(*_: object) -> None:
        calls[0] += 1

    handle = target.register_forward_pre_hook(count)
    try:
        first = Engine(target, draft)
        warm = calls[0]
        assert warm > 0
        assert first.verify_latency.observed
        first.add_request([1, 2, 3], max_new_tokens=6)
        while first.has_unfinished():
            first.step()
        learned = first._accept_trials.clone()
        calls[0] = 0
        second = Engine(target, draft)
        assert calls[0] == 0  # no warm-up forwards
        assert second.verify_latency.observed
        assert second.draft_latency.observed
        assert second._accept_trials.tolist() == learned.tolist()
        # its own copy: what the second engine learns is not the first's
        assert second.verify_latency is not first.verify_latency
        # another draft is another pair: warmed up again
        Engine(target, tiny_model(seed=2))
        assert calls[0] > 0
    finally:
        handle.remove()


def test_a_chain_never_verifies_more_than_the_step_bound():
    eng = planned(0.01)  # a nearly free draft: the longest chain is the best plan
    eng._accept_trials[:], eng._accept_hits[:] = 1000.0, 999.0
    for R in (1, 8, 32):
        for _ in range(R - len(eng._active)):
            eng.add_request([1, 2, 3, 4], max_new_tokens=200)
        eng._admit()
        depth, width = eng._plan_shape(R, 4, 4)
        assert width == 1
        assert R * (depth + 1) <= max(eng.config.max_tokens_per_step, R)
    capped = planned(0.01)
    capped.config = EngineConfig(warmup=False, max_per_request=3)
    assert capped._plan_shape(1, 4, 4)[0] <= 2  # root + 2 drafted = 3 nodes per request


def test_the_batchs_acceptance_is_the_mean_of_its_requests():
    eng = planned(0.1)
    eng.add_request([5, 6], max_new_tokens=10)
    eng._admit()
    a, b = eng._active
    a.trials[0], a.hits[0] = 40.0, 40.0
    b.trials[0], b.hits[0] = 40.0, 0.0
    alpha, trials = eng._alpha(0)
    pair = 0.93
    expected = ((40 + 8 * pair) / 48 + (0 + 8 * pair) / 48) / 2
    assert abs(alpha - expected) < 1e-9
    assert trials == 96.0  # the mean rests on both requests' trials (and priors)


@pytest.mark.parametrize(
    ("alpha", "waiting", "probes"),
    [(0.93, False, False), (0.93, True, True), (0.99, False, True)],
)
def test_a_closed_batch_probes_only_where_its_requests_likely_stay_level(
    alpha: float, waiting: bool, probes: bool
):
    """A probe that does not pay leaves a closed batch's requests unequal, and plain
    decoding after it spends a step on each token the slowest one fell behind: with 16
    requests at α 0.93 all accept a level together with odds 0.31, at 0.99 with 0.85.
    With a request waiting, a finished request's row is refilled at once: the probe runs."""
    eng = planned(0.2)
    for _ in range(15):
        eng.add_request([5, 6, 7], max_new_tokens=200)
    eng._admit()
    for req in eng._active:
        req.trials[0], req.hits[0] = 100.0, 100.0 * alpha
    for _ in range(5):  # a stall while speculating: only a probe (at the best costs) runs
        for n in (16, 32, 64):
            eng.draft_latency.observe(n, 5 * 0.2 * (0.050 + 0.001 * n))
            eng.verify_latency.observe(2 * n, 5 * (0.050 + 0.001 * 2 * n))
        eng._observe_spec_ratio(0, 16, 3.0, 1.0)
    if waiting:
        eng.add_request([8], max_new_tokens=200)  # queued: not admitted yet
    eng._plain_streak = 1
    assert eng._plan_shape(16, 4, 1)[0] == 0  # the stalled costs: plain wins
    eng._plain_streak = eng._probe_every
    assert (eng._plan_shape(16, 4, 1)[0] > 0) == probes


def test_a_probes_bound_on_the_batchs_acceptance_tightens_as_the_batch_grows():
    """Fresh requests at the pair's rate: one request's bound reaches 1 (a probe may pay),
    the mean of 16 such requests rests on 16 times the trials and stays near the rate."""
    eng = planned(0.1)
    alpha, n = eng._alpha(0)
    assert min(alpha + (alpha * (1 - alpha) / n) ** 0.5, 1.0) > 0.99
    for _ in range(15):
        eng.add_request([5, 6], max_new_tokens=10)
    eng._admit()
    alpha16, n16 = eng._alpha(0)
    assert alpha16 == pytest.approx(alpha)
    assert n16 == 16 * n
    assert alpha16 + (alpha16 * (1 - alpha16) / n16) ** 0.5 < alpha + 0.03


def test_a_profile_survives_an_engine_that_does_not_calibrate_and_a_new_setting_rewarms():
    import torch

    target, draft = tiny_model(seed=0), tiny_model(seed=1)
    first = Engine(target, draft)
    assert first.calibrator is not None
    first.calibrator.steps = 7  # something learned
    first._save_profile()
    plain = Engine(target, draft, config=EngineConfig(calibrate=False))
    plain.add_request([1, 2, 3], max_new_tokens=2)
    while plain.has_unfinished():
        plain.step()
    later = Engine(target, draft)
    assert later.calibrator is not None
    assert later.calibrator.steps == 7
    threads = torch.get_num_threads()
    calls = [0]
    handle = target.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        torch.set_num_threads(threads + 1)
        Engine(target, draft)  # latencies measured under another thread count: warm up again
        assert calls[0] > 0
    finally:
        torch.set_num_threads(threads)
        handle.remove()


def test_measured_chain_steps_outweigh_a_pessimistic_acceptance_model():
    # a draft level at 0.6 of a target step and a pair acceptance measured at 0.6: the α
    # model alone says plain decoding is faster
    eng = planned(0.6)
    eng._accept_trials[:], eng._accept_hits[:] = 500.0, 300.0
    eng._spec_ratios = [[[1.0] for _ in range(_RATIO_CLASSES)] for _ in range(2)]
    eng._plain_streak = 1
    assert eng._plan_shape(1, 4, 1)[0] == 0
    # ... but recent chains, whose depth followed the draft's confidence, emitted 6 tokens
    # per step for 6 levels: about 1.3x plain decoding at this price
    eng._chain_steps = [6.0 * 10, 6.0 * 10, 10.0]
    assert eng._plan_shape(1, 4, 1)[0] > 0


def test_poor_chain_steps_of_one_prompt_do_not_keep_the_next_ones_plain():
    eng = planned(0.1)  # a cheap draft: the α model says speculate
    eng._plain_streak = 1
    assert eng._plan_shape(1, 4, 1)[0] > 0
    eng._chain_steps = [1.0 * 10, 1.0 * 10, 10.0]  # the last prompt's chains: nothing accepted
    assert eng._plan_shape(1, 4, 1)[0] > 0  # the model (with this request's own α) decides


def test_a_probe_spends_little_on_the_drafts_catch_up(monkeypatch: pytest.MonkeyPatch):
    """A probe (plain decoding expected to win, the acceptance rate's upper bound says a
    chain could) pays the catch-up only up to a share of the plain time still to come."""
    from adaspec.engine import core

    def probe_taken() -> bool:
        eng = planned(0.3, prompt_len=100, max_new_tokens=1000)
        eng._accept_trials[:], eng._accept_hits[:] = 100.0, 30.0
        assert eng._plan_shape(1, 4, 4)[0] == 0  # no probe due yet: plain wins
        eng._plain_streak = eng._probe_every = 4
        eng._catch_up_per_token = 0.003  # 0.3 s over the 100-token prompt; 51 s plain to go
        return eng._plan_shape(1, 4, 4)[0] > 0

    assert probe_taken()
    monkeypatch.setattr(core, "_PROBE_CATCH_UP", 0.005)  # at most 0.26 s
    assert not probe_taken()


def test_a_larger_batch_measures_two_plain_steps_before_it_speculates():
    eng = planned(0.1)  # a cheap draft: at batch 1 it speculates at once
    eng._plain_batch = 1  # plain steps were measured at batch 1 only
    assert eng._plan_shape(1, 4, 1)[0] > 0
    for _ in range(3):
        eng.add_request([5, 6, 7], max_new_tokens=200)
    eng._admit()
    assert eng._plan_shape(4, 4, 1) == (0, 1)  # the latency models rest on batch 1
    eng._plain_step()  # one step's time varies: a second one measures too
    assert eng._plain_batch == 1
    assert eng._plan_shape(4, 4, 1) == (0, 1)
    eng._plain_step()  # measured at 4: good for every batch below 8
    assert eng._plain_batch == 4
    assert 4 in eng._plain_seconds  # (a tiny model's real step: keep the made-up latencies)
    eng._plain_seconds.clear()
    eng._plain_time_ratio = 1.0
    assert eng._plan_shape(4, 4, 1)[0] > 0
    assert eng._plan_shape(3, 4, 1)[0] > 0
    for _ in range(4):
        eng.add_request([5, 6, 7], max_new_tokens=200)
    eng._admit()
    assert eng._plan_shape(8, 4, 1) == (0, 1)


def test_a_closed_batch_speculates_only_where_its_slowest_request_gains():
    """With no request waiting, the batch ends with its last request: a draft that one
    request accepts 97 % of the time and the other 50 % is worth a chain only while others
    wait to take the finished request's place."""

    def plan(waiting: bool) -> int:
        eng = planned(0.3, max_new_tokens=32)
        eng.add_request([5, 6], max_new_tokens=32)
        eng._admit()
        good, poor = eng._active
        good.trials[0], good.hits[0] = 100.0, 97.0
        poor.trials[0], poor.hits[0] = 100.0, 50.0
        eng._plain_streak = 1
        if waiting:
            eng.add_request([7], max_new_tokens=32)  # queued: not admitted yet
        return eng._plan_shape(2, 4, 1)[0]

    assert plan(waiting=True) > 0
    assert plan(waiting=False) == 0


def normal_samples(mean: torch.Tensor, std: torch.Tensor, n: int) -> torch.Tensor:
    """(B, R, n) float64 samples of independent normals N(mean, std²), mean and std (B, R)."""
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(*mean.shape, n, generator=gen, dtype=torch.float64)
    return mean.unsqueeze(-1) + std.unsqueeze(-1) * noise


def test_expected_max_of_normals_matches_sampling() -> None:
    mean = torch.tensor([[10, 11, 9.5, 10.5], [3, 3, 3, 3], [5, 0, 0, 0]], dtype=torch.float64)
    std = torch.tensor([[1, 0.5, 2, 1], [0.3, 0.3, 0.3, 0.3], [0, 0, 0, 0]], dtype=torch.float64)
    sampled = normal_samples(mean, std, 100_000).max(1).values.mean(-1)
    torch.testing.assert_close(_expected_max(mean, std), sampled, rtol=2e-3, atol=0)


def simulated_closed_batch(
    goal: list[int], alphas: list[float], depth: int, fixed: float, per_request: float
) -> float:
    """Mean seconds of 20000 simulated closed batches: each step of r live requests costs
    fixed + per_request r and gives each 1 + min(A, depth) tokens, P(A >= j) = alpha^j."""
    gen = torch.Generator().manual_seed(1)
    runs = 20_000
    left = torch.tensor(goal, dtype=torch.float64).repeat(runs, 1)  # [runs, R]
    log_alpha = torch.tensor(alphas, dtype=torch.float64).log()
    seconds = torch.zeros(runs, dtype=torch.float64)
    while bool((left > 0).any()):
        live = left > 0
        seconds += (fixed + per_request * live.sum(1)) * live.any(1)
        u = torch.rand(left.shape, generator=gen, dtype=torch.float64)
        accepted = (u.log() / log_alpha).floor().clamp(max=depth)  # levels accepted
        left -= (1 + accepted) * live
    return float(seconds.mean())


@pytest.mark.parametrize(
    ("goal", "alphas", "depth"),
    [
        ([29] * 4, [0.93] * 4, 2),
        ([29] * 4, [0.95, 0.95, 0.9, 0.8], 2),
        ([29] * 4, [0.95, 0.95, 0.9, 0.8], 6),
        ([10, 4, 3, 2], [0.8, 0.95, 0.9, 0.96], 3),
        ([29] * 16, [0.9] * 16, 3),
        ([40, 3], [0.6, 0.99], 1),
    ],
)
def test_a_closed_batchs_expected_seconds_match_simulation(
    goal: list[int], alphas: list[float], depth: int
) -> None:
    """The plan's model of a closed batch (each request's steps about normal, the batch
    done with the slowest, smaller batches cheaper) against the process it models."""
    fixed, per_request = 0.12, 0.02
    R = len(goal)
    batch = torch.full((depth + 1,), fixed + per_request * R, dtype=torch.float64)
    single = torch.full((depth + 1,), fixed + per_request, dtype=torch.float64)
    g, a = torch.tensor(goal, dtype=torch.float64), torch.tensor(alphas, dtype=torch.float64)
    modelled = _closed_batch_seconds(g, a, batch, single)
    expected = simulated_closed_batch(goal, alphas, depth, fixed, per_request)
    assert float(modelled[depth]) == pytest.approx(expected, rel=0.03)
    # depth 0 is plain decoding: every request its goal in steps, exactly
    plain = fixed * max(goal) + per_request * sum(goal)
    assert float(modelled[0]) == pytest.approx(plain, rel=1e-9)


def test_a_steps_line_passes_through_the_batchs_cost_and_is_never_negative() -> None:
    seconds = torch.tensor([0.2, 0.2, 0.2], dtype=torch.float64)
    single = torch.tensor([0.11, 0.01, 0.3], dtype=torch.float64)  # [usual, steep, flat]
    fixed, per_request = _step_line(4, seconds, single)
    torch.testing.assert_close(fixed, torch.tensor([0.08, 0.0, 0.3], dtype=torch.float64))
    torch.testing.assert_close(per_request, torch.tensor([0.03, 0.05, 0.0], dtype=torch.float64))
    # a step of all 4 costs what was measured but where one alone cost more (flat)
    torch.testing.assert_close((fixed + 4 * per_request)[:2], seconds[:2])


def test_the_odds_of_being_the_largest_of_normals_match_sampling() -> None:
    mean = torch.tensor([[10, 11, 9.5, 10.5], [3, 3, 3, 3], [5, 6, 4, 1]], dtype=torch.float64)
    std = torch.tensor(
        [[1, 0.5, 2, 1], [0.3, 0.3, 0.3, 0.3], [0.5, 0.2, 1, 2]], dtype=torch.float64
    )
    largest = normal_samples(mean, std, 200_000).argmax(1)  # [3, samples]
    sampled = torch.stack([(largest == i).double().mean(-1) for i in range(4)], -1)
    torch.testing.assert_close(_last_odds(mean, std), sampled, rtol=0, atol=5e-3)
    # no spread: the largest surely, and ties split evenly
    exact = torch.tensor([[5.0, 5.0, 5.0, 1.0], [0.0, 7.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(
        _last_odds(exact, torch.zeros_like(exact)),
        torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0.0], [0.0, 1.0, 0.0, 0.0]], dtype=torch.float64),
    )


@pytest.mark.parametrize(
    ("goal", "alphas", "depth", "atol"),
    [
        ([24] * 4, [0.95, 0.95, 0.9, 0.6], 3, 0.03),
        # (shorter goals: the normal approximation of the steps is rougher)
        ([12, 20, 30, 30], [0.9, 0.9, 0.9, 0.75], 2, 0.1),
        ([30, 30], [0.9, 0.85], 4, 0.05),
    ],
)
def test_a_requests_worth_to_a_closed_batch_matches_simulation(
    goal: list[int], alphas: list[float], depth: int, atol: float
) -> None:
    """What a token of each request saves the batch (relative to the average request):
    against simulated batches (with the same random numbers) whose request i has 4 tokens
    less to go."""
    fixed, per_request = 0.12, 0.02
    R = len(goal)
    batch = torch.full((depth + 1,), fixed + per_request * R, dtype=torch.float64)
    single = torch.full((depth + 1,), fixed + per_request, dtype=torch.float64)
    g, a = torch.tensor(goal, dtype=torch.float64), torch.tensor(alphas, dtype=torch.float64)
    worth = _critical_weights(g, a, fixed + per_request * R, fixed + per_request, depth)
    whole = simulated_closed_batch(goal, alphas, depth, fixed, per_request)
    saved = []
    for i in range(R):
        shorter = list(goal)
        shorter[i] -= 4
        saved.append(whole - simulated_closed_batch(shorter, alphas, depth, fixed, per_request))
    expected = torch.tensor(saved, dtype=torch.float64)
    relative = expected * g.sum() / (g * expected).sum()  # (the average token is worth 1)
    torch.testing.assert_close(worth, relative, rtol=0, atol=atol)
    # alike requests are worth alike: 1 each, at every depth
    for d in range(depth + 1):
        alike = _critical_weights(
            torch.full_like(g, 20.0), torch.full_like(a, 0.9), float(batch[d]), float(single[d]), d
        )
        torch.testing.assert_close(alike, torch.ones_like(alike))


def test_in_a_closed_batch_the_level_rule_weighs_the_request_likely_to_finish_last():
    """Three requests the target accepts ~0.95 a level, one ~0.6: the plan prices the
    batch as done when that one is, and a chain stops where the next level no longer
    pays for it (though the draft is sure of the others' next tokens)."""
    eng = Engine(tiny_model(seed=0), tiny_model(seed=1), config=EngineConfig(warmup=False))
    for _ in range(4):
        eng.add_request([1, 2, 3, 4], max_new_tokens=40)
    eng._admit()
    for n in (1, 2, 4, 8, 16, 32, 64):
        eng.verify_latency.observe(n, 0.050 + 0.001 * n)
        eng.draft_latency.observe(n, 0.1 * (0.050 + 0.001 * n))
    eng._plain_samples, eng._plain_time_ratio, eng._plain_batch = 2, 1.0, 64
    eng._plain_seconds[4] = (0.054, 2)
    eng.calibrator = None
    eng._accept_trials[0], eng._accept_hits[0] = 1000.0, 900.0  # the pair: 0.9
    for request, hits in zip(eng._active, (95.0, 95.0, 95.0, 60.0), strict=True):
        request.trials[0], request.hits[0] = 100.0, hits
    assert eng._plan_shape(4, 4, 1)[0] > 0
    assert eng._worth is not None
    assert int(eng._worth.argmax()) == 3
    assert float(eng._worth.mean()) == pytest.approx(1.0)
    # the draft: sure of three requests' next tokens, not of the fourth's
    f = [[0.95, 0.9, 0.85], [0.95, 0.9, 0.85], [0.95, 0.9, 0.85], [0.5, 0.1, 0.02]]
    logp = torch.tensor([[1.0, *row] for row in f]).log()
    tree = TokenTree(torch.full((4, 4), 7), torch.tensor([[-1, 0, 1, 2]] * 4), logp)
    frontier = torch.tensor([[3]] * 4)
    assert eng._level_rule(4, 1)(tree, frontier)
    eng._worth = None  # all tokens alike (an open batch): the sure ones pay for a level
    assert not eng._level_rule(4, 1)(tree, frontier)


def test_the_level_rule_discounts_a_request_the_target_accepts_less_often_than_the_pair():
    from adaspec.tree import TokenTree

    f = [0.95, 0.9, 0.85, 0.8]  # the draft is confident four levels deep
    tree = TokenTree([7] * 5, [-1, *range(4)], [0.0, *(torch.tensor(f).log().tolist())])
    frontier = torch.tensor([[4]])

    def stops(hits: float, max_new_tokens: int = 200) -> bool:
        eng = planned(0.4, max_new_tokens=max_new_tokens)
        eng.calibrator = None
        eng._accept_trials[0], eng._accept_hits[0] = 1000.0, 900.0  # the pair: 0.9
        request = eng._active[0]
        request.trials[0], request.hits[0] = 100.0, hits
        eng._planned = (0.02, 0.02, 25.0)
        return eng._level_rule(1, 1)(tree, frontier)

    assert not stops(hits=90.0)  # as the pair: a fifth level pays
    assert stops(hits=60.0)  # 0.63 a level: (0.63 / 0.9)^5 of the draft's 0.8
    # one token came from the prefill: 6 left can use a fifth level (5 drafted + a bonus),
    # 5 left cannot
    assert not stops(hits=90.0, max_new_tokens=7)
    assert stops(hits=90.0, max_new_tokens=6)


def test_probes_back_off_only_after_probes_that_did_not_pay():
    eng = planned(1.0)  # a draft as slow as the target: plain decoding wins
    eng._probe_every, eng._plain_streak = _PROBE_EVERY, 0
    eng.stats.steps = 5  # the last step speculated as planned, and no longer pays
    assert eng._plan_shape(1, 4, 1) == (0, 1)
    assert eng._probe_every == _PROBE_EVERY
    eng._probed = True  # ... or was a probe: probe half as often
    assert eng._plan_shape(1, 4, 1) == (0, 1)
    assert eng._probe_every == 2 * _PROBE_EVERY


def test_plain_decoding_that_wins_by_far_skips_the_next_plans_of_the_same_requests():
    eng = planned(1.0)  # a draft as slow as the target: plain decoding wins by far
    eng._plain_streak = 1
    assert eng._plan_shape(1, 4, 1) == (0, 1)
    assert eng._unplanned == 0  # plain decoding is still priced from the latency model
    eng._plain_seconds[1] = (0.051, 2)  # ... as two measured plain steps confirm
    assert eng._plan_shape(1, 4, 1) == (0, 1)
    assert eng._unplanned == _REPLAN_GAP
    # the draft turns cheap (made up: while plain steps run, nothing the plan rests on
    # moves but step times and tokens to go): the skipped plans do not see it
    eng.draft_latency = type(eng.draft_latency)()
    for n in (1, 2, 4, 8, 16, 32, 64):
        eng.draft_latency.observe(n, 0.1 * (0.050 + 0.001 * n))
    for _ in range(_REPLAN_GAP):
        assert eng._plan_shape(1, 4, 1) == (0, 1)
    assert eng._plan_shape(1, 4, 1)[0] > 0  # the next plan does
    # a plan for other requests is made afresh
    eng = planned(1.0)
    eng._plain_streak, eng._plain_seconds[1] = 1, (0.051, 2)
    assert eng._plan_shape(1, 4, 1) == (0, 1)
    assert eng._unplanned == _REPLAN_GAP
    eng.add_request([5, 6, 7], max_new_tokens=200)  # waiting: the batch is no longer closed
    assert eng._plan_shape(1, 4, 1) == (0, 1)
    assert (eng._unplanned, eng._unplanned_for[1]) == (_REPLAN_GAP, True)  # planned anew


def test_only_an_engine_with_a_draft_cache_of_its_own_prices_catch_ups():
    target, draft = tiny_model(seed=0), tiny_model(seed=1)
    # a fixed budget speculates every step (the auto plan need not, with a draft that
    # costs as much as its target: on a loaded CI machine it decoded plainly throughout)
    shared = Engine(target, draft, config=EngineConfig(share_cache=True, budget=16))
    assert shared._draft_state_kept() is False
    assert shared._draft_prefill_per_token is None  # it never catches up: nothing timed
    shared.add_request([1, 2, 3], max_new_tokens=8)
    while shared.has_unfinished():
        shared.step()
    learned = shared._accept_trials.clone()
    assert float(learned.sum()) > 0
    plain = Engine(target, draft, config=EngineConfig(depth=0))
    plain.add_request([1, 2, 3], max_new_tokens=3)
    while plain.has_unfinished():
        plain.step()
        assert plain._draft_state is None  # depth 0 never drafts: no draft cache
    calls = [0]
    handle = target.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        own = Engine(target, draft, config=EngineConfig(share_cache=False))
    finally:
        handle.remove()
    # the pair's profile, plus the catch-up price it lacked (the draft's prefill alone)
    assert own._draft_prefill_per_token is not None
    assert calls[0] == 0
    assert own._accept_trials.tolist() == learned.tolist()


def test_speculative_steps_correct_the_plan_per_class_of_batch_size():
    eng = planned(0.3)
    prior = eng._spec_ratio(0, 1)
    assert eng._spec_ratio(0, 16) == prior  # nothing measured anywhere: the prior
    # batch 16 ran 1.5x its prediction: that class learns it, and classes measured nowhere
    # take the nearest measured class's ratio
    eng._observe_spec_ratio(0, 16, 1.5, 1.0)
    assert eng._spec_ratio(0, 16) == pytest.approx(1.5)
    assert eng._spec_ratio(0, 31) == eng._spec_ratio(0, 16)  # the same class
    assert eng._spec_ratio(0, 1) == eng._spec_ratio(0, 16)  # unmeasured: the nearest class's
    eng._observe_spec_ratio(0, 1, 1.0, 1.0)
    assert eng._spec_ratio(0, 1) == pytest.approx(1.0)
    assert eng._spec_ratio(0, 4) == eng._spec_ratio(0, 1)  # nearest: 1 (class 0) before 16
    assert eng._spec_ratio(1, 16) == prior  # beams learn apart from chains
    for _ in range(3):
        eng._observe_spec_ratio(0, 16, 1.2, 1.0)
    assert eng._spec_ratio(0, 16) == pytest.approx(1.2)
    assert eng._spec_ratio(0, 1) == pytest.approx(1.0)


def test_one_stalled_speculative_step_moves_the_ratio_nowhere():
    """The ratio is the lower median of a class's last steps: a step stalled 3x (a busy
    neighbour) is outvoted at once, where a mean kept the plan plain for many steps."""
    eng = planned(0.3)
    for seconds in (1.05, 3.0, 1.1, 1.0, 3.0):  # measured / predicted 1.0 with two stalls
        eng._observe_spec_ratio(0, 1, seconds, 1.0)
    assert eng._spec_ratio(0, 1) == pytest.approx(1.1)  # the median of 1.0, 1.05, 1.1
    eng._observe_spec_ratio(1, 1, 3.0, 1.0)  # a first step that stalled ...
    eng._observe_spec_ratio(1, 1, 1.0, 1.0)  # ... is outvoted by the next (lower median)
    assert eng._spec_ratio(1, 1) == pytest.approx(1.0)
    for _ in range(10):  # a lasting change is followed within the window
        eng._observe_spec_ratio(0, 1, 1.4, 1.0)
    assert eng._spec_ratio(0, 1) == pytest.approx(1.4)
    assert len(eng._spec_ratios[0][0]) == _RATIO_WINDOW


def test_plain_steps_measured_at_a_batch_size_price_plain_decoding_there():
    eng = planned(0.7)  # speculation ~4 % faster than the model's plain steps: not enough
    eng._accept_trials[:], eng._accept_hits[:] = 100.0, 85.0
    eng._plain_streak = 1
    assert eng._plan_shape(1, 4, 1)[0] == 0
    # plain steps at batch 1 really took twice the model's 51 ms: speculation wins there,
    # and only there
    eng._plain_seconds[1] = (0.102, 2)
    assert eng._plain_rate(1) == pytest.approx(1 / 0.102)
    assert eng._plan_shape(1, 4, 1)[0] > 0
    assert eng._plain_rate(2) == pytest.approx(2 / (0.052 + eng._overhead[0]), rel=0.05)
    # a real plain step records what it took at its batch size
    eng._plain_samples = 5
    eng._plain_seconds.clear()
    eng._plain_step()
    assert list(eng._plain_seconds) == [1]
    seconds, steps = eng._plain_seconds[1]
    assert steps == 1
    assert seconds > 0
    eng._plain_seconds[1] = (1.0, 1)  # (a slow first step after a prefill)
    assert eng._plain_rate(1) != pytest.approx(1.0)  # one step is not yet a price
    eng._plain_step()
    seconds, steps = eng._plain_seconds[1]
    assert steps == 2
    assert seconds < 1.0  # the quicker of the first two
    assert eng._plain_rate(1) == pytest.approx(1 / seconds)
    eng._plain_seconds[1] = (1.0, 2)  # (both steps after a prefill slow)
    eng._plain_step()
    seconds, steps = eng._plain_seconds[1]
    assert steps == 3
    assert seconds < 0.5  # the quickest of the first three (a mean would keep 0.7 of 1 s)
    eng._plain_seconds[1] = (1.0, 3)
    eng._plain_step()
    assert eng._plain_seconds[1][0] > 0.7  # then a decayed mean


def test_the_on_slo_share_counts_the_tokens_of_requests_that_stay_on_their_slo() -> None:
    # two requests, 10 tokens decoded in 1 s, 10 to go; SLOs of 0.12 s a token and none.
    # At 0.1 s a token the first ends at 2 s, well within 0.12 x 20 tokens = 2.4 s: on its
    # SLO; at 0.2 s, 3 s: off it (each 3 or 4 spreads of its remaining time away)
    pace = torch.tensor([[0.1, 0.2], [0.1, 0.2]], dtype=torch.float64)  # [R, shapes]
    args = [torch.tensor(x, dtype=torch.float64) for x in ([1, 1], [10, 10], [10, 10], [0.12, 0])]
    share, worth = _on_slo_share(pace, *args)
    torch.testing.assert_close(
        share, torch.tensor([1.0, 0.55], dtype=torch.float64), atol=2e-3, rtol=0
    )
    torch.testing.assert_close(
        worth, torch.tensor([[1.0, 0.1], [1.0, 1.0]], dtype=torch.float64), atol=2e-3, rtol=0
    )
    # each request's tokens weigh by its pace: a request twice as fast emits twice the share
    pace = torch.tensor([[0.2], [0.1]], dtype=torch.float64)
    share, _ = _on_slo_share(pace, *args)
    torch.testing.assert_close(
        share, torch.tensor([(0.1 * 5 + 10) / 15], dtype=torch.float64), atol=2e-3, rtol=0
    )
    # exactly on its SLO at the end: even odds, halfway between off (0.1) and on (1)
    args[3] = torch.tensor([0.1, 0.0], dtype=torch.float64)
    _, worth = _on_slo_share(torch.tensor([[0.1], [0.1]], dtype=torch.float64), *args)
    assert float(worth[0, 0]) == pytest.approx(0.55)


def slo_plan(draft_cost: float, good_slo: float | None, poor_slo: float | None) -> int:
    """The depth the plan chooses for two requests (one waits to join, so the batch is open):
    the target accepts 97 % of the draft's levels for one and 30 % for the other, each
    with its SLO (seconds per token; plain steps of both take 52 ms)."""
    return slo_engine(draft_cost, good_slo, poor_slo)._plan_shape(2, 4, 1)[0]


def slo_engine(
    draft_cost: float, good_slo: float | None, poor_slo: float | None, poor_hits: float = 30.0
) -> Engine:
    eng = planned(draft_cost, max_new_tokens=64)
    eng.add_request([5, 6], max_new_tokens=64)
    eng._admit()
    good, poor = eng._active
    good.trials[0], good.hits[0] = 100.0, 97.0
    poor.trials[0], poor.hits[0] = 100.0, poor_hits
    good.slo = SLO(good_slo) if good_slo is not None else None
    poor.slo = SLO(poor_slo) if poor_slo is not None else None
    eng._plain_streak = 1
    eng.add_request([7], max_new_tokens=64)
    return eng


def test_with_slos_the_plan_chooses_the_shape_with_the_most_goodput() -> None:
    """Speculation that loses throughput but is the only way the confident request meets
    its SLO (40 ms a token, plain steps take 52) is chosen; speculation that wins
    throughput but takes the other request past its SLO (60 ms a token) is not."""
    assert slo_plan(0.4, None, None) == 0  # plain decoding: the most tokens per second
    assert slo_plan(0.4, 0.040, None) > 0  # ... but only speculation keeps it on its SLO
    assert slo_plan(0.4, 1.0, 1.0) == 0  # SLOs every shape meets leave it to throughput
    # no shape keeps the poorly predicted one on its SLO: its tokens count little, and the
    # other's tokens come fastest in chains
    assert slo_plan(0.4, None, 0.040) > 0
    assert slo_plan(0.3, None, None) > 0  # speculation: the most tokens per second
    assert slo_plan(0.3, None, 0.060) == 0  # ... but it takes the other one off its SLO


def test_the_level_rule_weighs_every_requests_tokens_alike_whatever_its_slo() -> None:
    """The plan chooses a shape for goodput; its levels then grow by tokens per second:
    a request off its SLO (1 ms a token) grows the same chain as one without an SLO."""
    f = [[0.9, 0.8, 0.1], [0.95, 0.9, 0.9]]  # the draft's f along each chain
    logp = torch.tensor([[1.0, *row] for row in f]).log()
    tree = TokenTree(torch.full((2, 4), 7), torch.tensor([[-1, 0, 1, 2]] * 2), logp)
    frontier = torch.tensor([[3]] * 2)
    stops = []
    for slo in (0.001, None):
        eng = slo_engine(0.3, None, slo, poor_hits=97.0)
        eng.calibrator = None
        assert eng._plan_shape(2, 4, 1)[0] > 0
        assert eng._worth is None  # an open batch: no closed batch's weights either
        stops.append(eng._level_rule(2, 1)(tree, frontier))
    assert stops[0] == stops[1]


def test_plain_decoding_is_planned_every_step_while_a_request_may_slide_off_its_slo() -> None:
    def unplanned(slo: float) -> int:
        eng = planned(1.0)  # a draft as slow as the target: plain decoding wins by far
        eng._plain_streak, eng._plain_seconds[1] = 1, (0.051, 2)
        eng._active[0].slo = SLO(slo)
        assert eng._plan_shape(1, 4, 1) == (0, 1)
        return eng._unplanned

    assert unplanned(1.0) == _REPLAN_GAP  # sure to stay on its SLO: plans are skipped
    assert unplanned(1e-4) == _REPLAN_GAP  # sure to miss it: no plan can help
    assert unplanned(0.051) == 0  # plain decoding's own pace: even odds, plan each step

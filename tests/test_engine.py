"""The engine against its oracles: the target's own greedy generate, exact sampling
distributions on a tiny vocabulary, and the cache-length invariant."""

import copy
import itertools
from dataclasses import replace

import pytest
import torch

from adaspec.engine import SLO, Engine, EngineConfig, generate
from adaspec.models import tiny_model

# fixed budget: every step speculates, whatever the latency model measures (deterministic paths)
FIXED = EngineConfig(depth=3, width=2, budget=16, warmup=False, calibrate=False)


def noisy_copy(model: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    """A draft that agrees with the target often but not always."""
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return draft


@pytest.fixture(autouse=True)
def _fresh_profiles():
    """Each test starts with no pair profile (engines of earlier tests leave theirs)."""
    from adaspec.engine.core import _PROFILES

    _PROFILES.clear()
    yield
    _PROFILES.clear()


@pytest.fixture(scope="module")
def pair64():
    target = tiny_model(seed=0).double()
    return target, noisy_copy(target, 0.01, seed=1)


def reference(target, prompt, n):
    out = target.generate(
        torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


PROMPTS = [[5, 9, 14, 3, 77, 21, 8], [42], [7, 7, 1, 60, 2, 33, 90, 11, 4, 4, 19, 70, 3], [88, 13]]
# one much longer prompt: prefilled in a group of its own (see length_groups)
PROMPTS.append([(7 * i + 3) % 97 + 1 for i in range(60)])


@pytest.mark.parametrize(
    "config",
    [
        FIXED,
        replace(FIXED, share_cache=False),
        EngineConfig(depth=4, width=3, budget="auto", calibrate=True, max_batch=2),
        EngineConfig(depth=4, width=3, budget="auto", max_batch=2, share_cache=False),
        EngineConfig(depth=0),
    ],
    ids=[
        "fixed-budget",
        "fixed-budget-own-draft-cache",
        "auto-continuous-batching",
        "auto-own-draft-cache",
        "no-speculation",
    ],
)
def test_greedy_equals_target_generate_exactly_in_float64(pair64, config):
    target, draft = pair64
    out = generate(target, draft, PROMPTS, max_new_tokens=20, config=config)
    for prompt, seq in zip(PROMPTS, out.sequences, strict=True):
        assert seq == reference(target, prompt, 20)
    # verification emitted every token but each request's first (its prefill's), and
    # requests cut at length count fully
    assert out.stats.spec.num_emitted_tokens.item() >= len(PROMPTS) * (20 - 1)
    if config.budget != "auto" and config.depth:  # auto may decide plain steps are faster here
        assert out.stats.spec.num_accepted_tokens.item() > 0, (
            "the noisy draft should be accepted sometimes"
        )


@pytest.mark.parametrize("share_cache", [None, False])
def test_greedy_gemma3_sliding_window(share_cache):
    target = tiny_model("gemma3", sliding_window=4, seed=3).double()
    draft = noisy_copy(target, 0.05, seed=4)
    config = replace(FIXED, share_cache=share_cache)
    out = generate(target, draft, PROMPTS[:3], max_new_tokens=14, config=config)
    for prompt, seq in zip(PROMPTS[:3], out.sequences, strict=True):
        assert seq == reference(target, prompt, 14)


def exact_distribution(model, prompt, length, temperature, top_k, top_p):
    """P(y_1..y_length | prompt) of the target's sampling, by enumeration (the oracle)."""
    from adaspec.acceptance import probs_from_logits

    V = model.config.vocab_size
    dist = {}
    for seq in itertools.product(range(V), repeat=length):
        ids = torch.tensor([prompt + list(seq)])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1].double()
        p = probs_from_logits(logits, temperature, top_k, top_p)
        dist[seq] = float(torch.prod(p[torch.arange(length), torch.tensor(seq)]))
    return dist


@pytest.mark.slow
@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p", "share_cache"),
    [(1.0, None, None, False), (0.7, 3, 0.9, False), (1.0, None, None, True)],
)
def test_sampled_sequences_follow_the_target_distribution(temperature, top_k, top_p, share_cache):
    target = tiny_model(vocab_size=5, seed=5).double()
    draft = noisy_copy(target, 0.3, seed=6)
    prompt, length, n = [1, 3, 2], 2, 3000
    exact = exact_distribution(target, prompt, length, temperature, top_k, top_p)
    engine = Engine(
        target,
        draft,
        config=EngineConfig(
            depth=2, width=2, budget=4 * n, max_batch=n, warmup=False, share_cache=share_cache
        ),
    )
    ids = [
        engine.add_request(
            prompt,
            max_new_tokens=length,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=s,
            stop=[],
        )
        for s in range(n)
    ]
    got: dict[int, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id].extend(out.new_tokens)
    counts: dict[tuple[int, ...], int] = {}
    for seq in got.values():
        counts[tuple(seq)] = counts.get(tuple(seq), 0) + 1
    assert set(counts) <= {s for s, p in exact.items() if p > 0}, (
        "a sequence the target cannot sample"
    )
    tv = 0.5 * sum(abs(counts.get(s, 0) / n - p) for s, p in exact.items())
    # E[TV] <= 0.5 * Σ sqrt(p (1 - p) / n); 4x that bound fails with negligible probability
    bound = 2.0 * sum((p * (1 - p) / n) ** 0.5 for p in exact.values())
    assert tv < bound, f"TV {tv:.4f} vs bound {bound:.4f}"
    assert engine.stats.spec.num_accepted_tokens.item() > 0


def test_same_seed_same_samples(pair64):
    target, draft = pair64
    runs = [
        generate(
            target,
            draft,
            PROMPTS,
            max_new_tokens=8,
            temperature=1.0,
            generator=torch.Generator().manual_seed(3),
            config=FIXED,
        ).sequences
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("share_cache", [False, True])
def test_requests_join_and_finish_mid_run_and_cache_lengths_hold(pair64, share_cache):
    target, draft = pair64
    config = EngineConfig(
        depth=3, width=2, budget=12, max_batch=2, warmup=False, share_cache=share_cache
    )
    engine = Engine(target, draft, config=config)
    assert engine._share_cache is share_cache
    want = {}
    outputs: dict[int, list[int]] = {}
    lengths = [5, 9, 3, 7]
    for p, n in zip(PROMPTS[:2], lengths[:2], strict=True):
        rid = engine.add_request(p, max_new_tokens=n)
        want[rid] = reference(target, p, n)
    steps = 0
    while engine.has_unfinished():
        if steps == 2:  # two more join while the first two run
            for p, n in zip(PROMPTS[2:4], lengths[2:], strict=True):
                rid = engine.add_request(p, max_new_tokens=n)
                want[rid] = reference(target, p, n)
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_tokens)
        steps += 1
        # the invariant: cache = prompt + emitted, minus the root that is not cached yet
        tstate, dstate = engine._target_state, engine._draft_state
        for i, req in enumerate(engine._active):
            assert tstate is not None
            expect = len(req.prompt) - 1 + len(req.output)
            assert int(tstate.lens[i]) == expect
            assert tstate.capacity == int(tstate.lens.max())  # no tree left behind
            if share_cache:  # the draft grows its trees on the target's cache
                assert dstate is None
                continue
            assert dstate is not None
            draft_len = int(dstate.lens[i]) + int((dstate.backlog[i] >= 0).sum())
            assert draft_len == expect
        assert len(engine._active) <= 2
    assert outputs == want
    assert [r.tokens for r in sorted(engine.stats.requests, key=lambda r: r.request_id)] == lengths


def test_stop_token_inside_an_accepted_path_ends_the_request_exactly():
    target = tiny_model(seed=0).double()
    prompt = PROMPTS[0]
    full = reference(target, prompt, 12)
    stop = full[4]
    cut = full[: full.index(stop) + 1]
    # the draft is the target itself, so whole paths are accepted and the stop token sits inside one
    engine = Engine(target, target, config=FIXED)
    rid = engine.add_request(prompt, max_new_tokens=12, stop=[stop])
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    assert [t for o in outs for t in o.new_tokens] == cut
    last = outs[-1]
    assert (last.finished, last.finish_reason, last.request_id) == (True, "stop", rid)
    assert engine.stats.spec.num_accepted_tokens.item() > 0


def test_max_new_tokens_inside_a_path():
    target = tiny_model(seed=0).double()
    out = generate(target, target, [PROMPTS[0]], max_new_tokens=2, config=FIXED)
    assert out.sequences[0] == reference(target, PROMPTS[0], 2)
    assert out.stats.requests[0].tokens == 2


def test_first_token_comes_from_the_prefill_and_may_end_the_request():
    target = tiny_model(seed=0).double()
    full = reference(target, PROMPTS[0], 3)
    engine = Engine(target, target, config=FIXED)
    one = engine.add_request(PROMPTS[0], max_new_tokens=1)
    stopped = engine.add_request(PROMPTS[0], max_new_tokens=5, stop=[full[0]])
    going = engine.add_request(PROMPTS[0], max_new_tokens=3)
    outs = engine.step()
    # one output per request: the two that end at their first token never reach a forward
    assert sorted(o.request_id for o in outs) == [one, stopped, going]
    by_id = {o.request_id: o for o in outs}
    assert (by_id[one].new_tokens, by_id[one].finish_reason) == ([full[0]], "length")
    assert (by_id[stopped].new_tokens, by_id[stopped].finish_reason) == ([full[0]], "stop")
    assert by_id[going].new_tokens == full[: len(by_id[going].new_tokens)]
    assert len(by_id[going].new_tokens) >= 2  # the prefill's token, then this step's
    while engine.has_unfinished():
        engine.step()
    stats = {r.request_id: r for r in engine.stats.requests}
    assert stats[one].tokens == stats[stopped].tokens == 1
    assert stats[one].tpot == 0.0  # no decode phase
    judged = Engine(target, target, config=FIXED)
    judged.add_request(PROMPTS[0], max_new_tokens=1, slo=1e-9)  # any SLO: nothing to judge
    while judged.has_unfinished():
        judged.step()
    assert judged.stats.requests[0].attained is True
    assert stats[going].tokens == 3


def test_impossible_slo_completes_and_is_reported_missed(pair64):
    target, draft = pair64
    out = generate(
        target, draft, PROMPTS[:2], slo=[1e-9, SLO(10.0, "relaxed")], max_new_tokens=6, config=FIXED
    )
    assert out.sequences == [reference(target, p, 6) for p in PROMPTS[:2]]
    first, second = out.stats.requests
    assert first.attained is False
    assert second.attained is True
    assert second.slo is not None
    assert second.slo.name == "relaxed"
    assert out.stats.attainment == 0.5


def test_abort_and_bad_input(pair64):
    target, draft = pair64
    engine = Engine(target, draft, config=FIXED)
    a = engine.add_request([1, 2, 3], max_new_tokens=50)
    b = engine.add_request([4, 5], max_new_tokens=3)
    engine.step()
    assert engine.abort(a)
    assert not engine.abort(12345)
    while engine.has_unfinished():
        engine.step()
    assert sorted(r.request_id for r in engine.stats.requests) == [a, b]
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add_request([])
    with pytest.raises(TypeError, match="no tokenizer"):
        engine.add_request("hello")
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.add_request([1], max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        engine.add_request([1], temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        engine.add_request([1], top_p=0.0)
    with pytest.raises(ValueError, match="tpot"):
        SLO(0.0)
    with pytest.raises(ValueError, match="budget"):
        EngineConfig(budget=0)
    with pytest.raises(ValueError, match="one per prompt"):
        generate(target, draft, [[1], [2]], slo=[0.1])
    with pytest.raises(ValueError, match="single prompt"):
        generate(target, draft, [[1], [2]], streamer=object())
    for bad in ("yes", 0, 1.0):
        with pytest.raises(ValueError, match="share_cache"):
            EngineConfig(share_cache=bad)  # type: ignore[arg-type]


def test_draft_shares_the_target_cache_only_when_its_keys_and_values_match(pair64):
    target, near = pair64
    # a draft close to the target (a noisy copy, like a quantized one) shares by default
    assert Engine(target, near, config=FIXED)._share_cache
    apart = tiny_model(seed=1).double()  # same layout, trained apart: keeps its own cache
    assert not Engine(target, apart, config=FIXED)._share_cache
    # insisting works on any pair with the same layout, and still emits the target's tokens
    insisted = generate(
        target, apart, PROMPTS[:2], max_new_tokens=6, config=replace(FIXED, share_cache=True)
    )
    assert insisted.sequences == [reference(target, p, 6) for p in PROMPTS[:2]]
    other = tiny_model(num_layers=3, seed=0).double()
    with pytest.raises(ValueError, match="laid out"):
        Engine(target, other, config=replace(FIXED, share_cache=True))
    assert not Engine(target, other, config=FIXED)._share_cache


class RecordingStreamer:
    """The streamer protocol of transformers (``put`` / ``end``), recording what it gets."""

    def __init__(self):
        self.chunks: list[list[int]] = []
        self.ended = False

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


def test_streamer_gets_the_prompt_then_every_token(pair64):
    target, draft = pair64
    streamer = RecordingStreamer()
    out = generate(target, draft, [PROMPTS[0]], max_new_tokens=9, streamer=streamer, config=FIXED)
    assert streamer.chunks[0] == PROMPTS[0]
    assert [t for c in streamer.chunks[1:] for t in c] == out.sequences[0]
    assert streamer.ended


def test_transformers_text_streamer_runs(pair64, capsys):
    from transformers import TextStreamer

    class Ids:  # a stand-in tokenizer: token ids as text
        def decode(self, ids, **_):
            return " ".join(map(str, ids))

    target, draft = pair64
    streamer = TextStreamer(Ids(), skip_prompt=True)  # type: ignore[arg-type]
    out = generate(target, draft, [PROMPTS[1]], max_new_tokens=5, streamer=streamer, config=FIXED)
    assert capsys.readouterr().out.split() == [str(t) for t in out.sequences[0]]


def test_prompts_are_prefilled_in_groups_of_similar_length() -> None:
    from adaspec.engine.batching import length_groups

    assert length_groups([100, 12, 14, 96]) == [[1, 2], [3, 0]]
    assert length_groups([7]) == [[0]]
    assert length_groups([50] * 5) == [[0, 1, 2, 3, 4]]
    groups = length_groups([5, 300, 40, 41, 290, 6], slack=8)
    assert sorted(i for g in groups for i in g) == list(range(6))  # each prompt once
    assert groups == [[0, 5], [2, 3], [4, 1]]

"""``python -m adaspec demo``: SLO-customized speculation on a real model pair, next to plain decoding.

Runs a mixed batch of real prompts on a shipped pair (Gemma-3-270m by default):

- coding (HumanEval), tight SLO: 1.2 x this machine's target-only time per token;
- chat (MT-bench), medium SLO: 2.5 x;
- long answers (MT-bench writing/roleplay), relaxed SLO: 6 x;

first with adaspec's engine, then the same batch without speculation, and prints a table
per run. SLOs scale with the measured baseline as in the AdaServe paper. Nothing is
downloaded; the first run converts the model once (about a minute).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from adaspec.engine import SLO, EngineConfig, GenerateOutput, generate


def _baseline_tpot(target: Any, draft: Any, prompt: list[int], tokens: int) -> float:
    """Target-only seconds per output token at batch 1 on this machine."""
    out = generate(
        target,
        draft,
        [prompt],
        max_new_tokens=tokens,
        config=EngineConfig(depth=0),
        stop=[],
        progress=False,
    )
    return out.stats.requests[0].tpot


def _table(title: str, out: GenerateOutput, classes: list[str]) -> None:
    s = out.stats
    print(f"\n{title}")
    print("| # | class | SLO ms/tok | achieved ms/tok | attained | tokens | τ |")
    print("|---|---|---|---|---|---|---|")
    for i, (r, cls) in enumerate(zip(s.requests, classes, strict=True)):
        slo = f"{1e3 * r.slo.tpot:.0f}" if r.slo else "-"
        print(
            f"| {i} | {cls} | {slo} | {1e3 * r.tpot:.0f} | {'yes' if r.attained else 'NO'} | {r.tokens} | {r.tau:.2f} |"
        )
    print(
        f"attainment {s.attainment:.0%}, goodput {s.goodput:.2f} tok/s, throughput {s.throughput:.2f} tok/s, "
        f"τ {s.tau:.2f}, wall {s.wall_time:.1f} s (draft {s.draft_time:.1f}, verify {s.verify_time:.1f}, "
        f"overhead {s.overhead_time:.1f})"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m adaspec demo", description=__doc__)
    ap.add_argument("--pair", default="gemma-3-270m", choices=["gemma-3-270m", "smollm2-135m"])
    ap.add_argument("--per-class", type=int, default=2, help="requests per SLO class")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    from adaspec.models import load_pair
    from adaspec.models.prompts import chat_prompt_ids, humaneval_prompts, mtbench_questions

    t0 = time.perf_counter()
    target, draft, tok = load_pair(args.pair)
    print(f"loaded {args.pair} (target + quantized draft) in {time.perf_counter() - t0:.1f} s")

    k = args.per_class
    coding = [chat_prompt_ids(tok, p) for p in humaneval_prompts(limit=k)]
    questions = mtbench_questions()
    chat = [
        chat_prompt_ids(tok, q["turns"][0])
        for q in questions
        if q["category"] in ("stem", "reasoning")
    ][:k]
    long = [
        chat_prompt_ids(tok, q["turns"][0])
        for q in questions
        if q["category"] in ("writing", "roleplay")
    ][:k]

    base = _baseline_tpot(target, draft, chat[0], 12)
    print(f"baseline: target-only decoding takes {1e3 * base:.0f} ms per token here")
    slos = (
        [SLO(1.2 * base, "coding")] * k
        + [SLO(2.5 * base, "chat")] * k
        + [SLO(6.0 * base, "long")] * k
    )
    prompts = coding + chat + long
    classes = [s.name for s in slos]
    progress = False if args.no_progress else None

    spec = generate(
        target,
        draft,
        prompts,
        slo=slos,
        max_new_tokens=args.max_new_tokens,
        tokenizer=tok,
        progress=progress,
    )
    _table("adaspec (SLO-customized tree speculation, auto budget)", spec, classes)
    plain = generate(
        target, draft, prompts, slo=slos, max_new_tokens=args.max_new_tokens, tokenizer=tok,
        config=EngineConfig(depth=0), progress=progress,
    )  # fmt: skip
    _table("the same batch without speculation", plain, classes)
    same = sum(a == b for a, b in zip(spec.sequences, plain.sequences, strict=True))
    print(
        f"\nadaspec against no speculation: throughput {spec.stats.throughput:.2f} vs "
        f"{plain.stats.throughput:.2f} tok/s ({spec.stats.throughput / plain.stats.throughput:.2f}x), "
        f"SLOs met {spec.stats.attainment:.0%} vs {plain.stats.attainment:.0%}"
    )
    print(f"identical greedy output in {same} of {len(prompts)} requests")
    assert spec.texts is not None
    print(f"first coding answer: {spec.texts[0][:160]!r}")

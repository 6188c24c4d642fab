"""One batch size, many rounds: adaspec against the same engine decoding plainly, in turns.

    python -m benchmarks.bench_paired [--pair gemma-3-270m] [--batch 16] [--rounds 10]
        [--max-new-tokens 32] [--threads 2]

Table 2 of ``bench_generate.py`` runs every batch size and four methods for a few rounds;
this runs one cell of it for longer, where its ratio is close to 1 and the question is
only whether speculation loses: each round runs the plain engine (``depth=0``) and adaspec
(the default config) on the same closed batch of real prompts, greedy, seats swapped every
round, and the summary is the geometric mean of the rounds' own throughput ratios (the
machine's speed drifts between rounds by more than speculation gains at large batches).

It also reports the share of adaspec's wall time spent after the batch's first request
finished (the closed batch's tail, where fewer requests share a step: plain decoding of
equal-length requests has none, speculation some, as requests advance at their own
acceptance rates). Each run starts from the pair's profile the previous one left, so the
first round follows one untimed warm-up run of each engine only. Prints a table, asserts
nothing about time.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from adaspec.engine import Engine, EngineConfig
from benchmarks.bench_generate import prompts_for


def timed_run(
    target: torch.nn.Module,
    draft: torch.nn.Module,
    prompts: list[list[int]],
    n: int,
    eos: int,
    config: EngineConfig | None,
) -> tuple[float, float, float]:
    """(tokens/s, share of the wall time after the first request finished, τ) of one run."""
    engine = Engine(target, draft, config=config)
    for prompt in prompts:
        engine.add_request(prompt, max_new_tokens=n, stop=[eos])
    emitted, first_done = 0, None
    t0 = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            emitted += len(out.new_tokens)
            if out.finished and first_done is None:
                first_done = time.perf_counter()
    wall = time.perf_counter() - t0
    tail = 0.0 if first_done is None else (t0 + wall - first_done) / wall
    return emitted / wall, tail, engine.stats.tau


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--pair", default="gemma-3-270m")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from adaspec.models import load_pair

    target, draft, tok = load_pair(args.pair)
    prompts = prompts_for(tok, args.batch)
    n, eos = args.max_new_tokens, tok.eos_token_id
    engines = {"plain": EngineConfig(depth=0), "adaspec": None}
    for config in engines.values():  # warm-up (the pair's profile), untimed
        timed_run(target, draft, prompts, 4, eos, config)
    runs: dict[str, list[tuple[float, float, float]]] = {k: [] for k in engines}
    print(f"\n## {args.pair}, batch {args.batch}, {n} new tokens, {args.rounds} rounds\n")
    print("| round | plain tok/s | adaspec tok/s | ratio | adaspec tail share | adaspec τ |")
    print("|---|---|---|---|---|---|")
    for r in range(args.rounds):
        order = list(engines) if r % 2 == 0 else list(reversed(engines))
        for key in order:
            runs[key].append(timed_run(target, draft, prompts, n, eos, engines[key]))
        (plain, _, _), (ours, tail, tau) = runs["plain"][-1], runs["adaspec"][-1]
        print(f"| {r} | {plain:.2f} | {ours:.2f} | {ours / plain:.3f} | {tail:.2f} | {tau:.2f} |")
    ratios = [o[0] / p[0] for o, p in zip(runs["adaspec"], runs["plain"], strict=True)]
    geo = math.exp(statistics.mean(math.log(x) for x in ratios))
    tails = [t for _, t, _ in runs["adaspec"]]
    print(
        f"\nadaspec vs plain decoding: geometric mean {geo:.3f}x, median "
        f"{statistics.median(ratios):.3f}x, range {min(ratios):.3f}-{max(ratios):.3f}x; "
        f"tail share median {statistics.median(tails):.2f}"
    )


if __name__ == "__main__":
    main()

"""Median CPU time of the tree layers: select (with and without SLO needs), build_optimal,
and one beam-expansion step at SmolLM2's vocabulary.

    python benchmarks/bench_tree_layers.py [--repeats 50] [--threads 1]

Prints a table; asserts nothing about time. Candidate trees are real beam trees grown from
random draft logits (depth 8, width 8: 1 + 64 nodes, as in AdaServe's setting).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from adaspec.acceptance import expand, grow_tree
from adaspec.select import select, tokens_needed
from adaspec.tree import TokenTree, build_optimal


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def candidates(R: int, nodes: int, vocab: int = 512, seed: int = 0) -> TokenTree:
    """Beam trees of ``nodes`` non-root nodes (depth 8, width nodes / 8) from random logits."""
    g = torch.Generator().manual_seed(seed)
    width = max(1, nodes // 8)
    cand, _ = grow_tree(
        torch.randint(0, vocab, (R,), generator=g),
        lambda gr: torch.randn(R, gr.frontier.shape[1], vocab, generator=g) * 3,
        8,
        width,
        temperature=1.0,
    )
    return cand


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), median of {args.repeats}\n"
    )
    print("| operation | R | candidates / request | budget | median ms |")
    print("|---|---|---|---|---|")
    for R, n, B in [(1, 64, 32), (64, 64, 1024), (256, 64, 2048)]:
        cand = candidates(R, n)
        need = tokens_needed(
            torch.linspace(0.02, 0.2, R), torch.full((R,), 1.0), torch.full((R,), 20.0), 0.05, 8
        )
        ms = median_ms(lambda: select(cand, B), args.repeats)  # noqa: B023 - called at once
        print(f"| select, need=None | {R} | {n} | {B} | {ms:.3f} |")
        ms = median_ms(lambda: select(cand, B, need=need), args.repeats)  # noqa: B023
        print(f"| select, SLO needs | {R} | {n} | {B} | {ms:.3f} |")
        ms = median_ms(lambda: build_optimal(cand, max(1, B // R)), args.repeats)  # noqa: B023
        print(f"| build_optimal | {R} | {n} | {max(1, B // R)} / request | {ms:.3f} |")
    V = 49_152
    for R, F, W in [(1, 8, 8), (16, 8, 8), (64, 8, 8)]:
        logits = torch.randn(R, F, V)
        front = torch.zeros(R, F)
        ms = median_ms(lambda: expand(front, logits, W, temperature=1.0), args.repeats)  # noqa: B023
        soft = median_ms(lambda: logits.log_softmax(-1), args.repeats)  # noqa: B023
        print(
            f"| beam step (V={V}, frontier {F}, width {W}) | {R} | - | - | {ms:.3f} "
            f"({ms / soft:.2f}x a log_softmax) |"
        )


if __name__ == "__main__":
    main()

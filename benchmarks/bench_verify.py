"""Time adaspec.verify next to a softmax over the same logits (CPU).

    python benchmarks/bench_verify.py                       # R=64, N=64, V=49152 and 262144
    python benchmarks/bench_verify.py --vocab 32000 --reps 5

The baseline is ``torch.softmax(target_logits, -1)`` over all R x N x V logits, the least
work any sampled verification that materialises the target distribution would do.
Verification only transforms the rows it walks through (about depth x R of them), so it
can come in under the baseline; the ratio column says by how much. Trees are random
(depth <= 8) and the target is made to favour each node's first child, so paths of
several tokens are accepted, as with a good draft. Prints medians; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from adaspec.tree import TokenTree
from adaspec.verify import VerifyResult, verify


def random_tree(R: int, N: int, max_depth: int, V: int, g: torch.Generator) -> TokenTree:
    """R random trees of exactly N nodes, depth <= max_depth, distinct sibling tokens."""
    parents = torch.full((R, N), -1, dtype=torch.int64)
    depth = torch.zeros(R, N, dtype=torch.int64)
    for i in range(1, N):  # building the benchmark input, not the code under test
        ok = depth[:, :i] < max_depth  # [R, i]
        pick = torch.multinomial(ok.double(), 1, generator=g).squeeze(1)
        parents[:, i] = pick
        depth[:, i] = depth.gather(1, pick.unsqueeze(1)).squeeze(1) + 1
    # node i's token: i + V/2 keeps siblings distinct; the root's token is arbitrary
    tokens = (torch.arange(N) + V // 2).expand(R, N).clone()
    return TokenTree(tokens, parents, -0.1 * depth.float(), depth)


def first_child_bias(tree: TokenTree, logits: Tensor, boost: float) -> None:
    """Raise, in place, the logit of each node's first child token by ``boost``."""
    R, N = tree.tokens.shape
    key = torch.where(tree.parents >= 0, tree.parents, N)  # [R, N]
    first = torch.full((R, N + 1), N, dtype=torch.int64)
    first.scatter_reduce_(1, key, torch.arange(N).expand(R, N), reduce="amin")
    first = first[:, :N]  # [R, N] first child of each node, N if none
    has = first < N
    rows, nodes = has.nonzero(as_tuple=True)
    logits[rows, nodes, tree.tokens[rows, first[rows, nodes]]] += boost


def median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--nodes", type=int, default=64)
    ap.add_argument("--vocab", type=int, nargs="+", default=[49_152, 262_144])
    ap.add_argument("--max-depth", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    R, N = args.requests, args.nodes
    threads = torch.get_num_threads()
    print(f"R={R} requests x N={N} nodes, torch {torch.__version__}, {threads} threads")
    print(f"{'V':>8} {'case':<34} {'median ms':>10} {'x softmax':>10} {'accepted/req':>13}")
    for V in args.vocab:
        bench_vocab(R, N, V, args.max_depth, args.reps)


def bench_vocab(R: int, N: int, V: int, max_depth: int, reps: int) -> None:
    g = torch.Generator().manual_seed(0)
    tree = random_tree(R, N, max_depth, V, g)
    logits = torch.randn(R, N, V, generator=g) * 2.0  # [R, N, V] float32
    first_child_bias(tree, logits, boost=12.0)
    # a draft row per node, shared by the requests (an expanded view: no extra memory)
    draft = torch.softmax(torch.randn(1, N, V, generator=g), -1).expand(R, N, V)
    base = median_ms(lambda: torch.softmax(logits, -1), reps)
    print(f"{V:>8} {'softmax over all logits (baseline)':<34} {base:>10.1f} {1.0:>10.2f}")
    cases: list[tuple[str, Callable[[], VerifyResult]]] = [
        ("greedy", lambda: verify(tree, logits)),
        (
            "sampled, deterministic children",
            lambda: verify(tree, logits, temperature=1.0, generator=g),
        ),
        (
            "  + top_k=50, top_p=0.9",
            lambda: verify(tree, logits, temperature=1.0, top_k=50, top_p=0.9, generator=g),
        ),
        (
            "sampled, drafted children",
            lambda: verify(tree, logits, temperature=1.0, draft_probs=draft, generator=g),
        ),
    ]
    for name, fn in cases:
        ms = median_ms(fn, reps)
        acc = float(fn().num_accepted.double().mean())
        print(f"{V:>8} {name:<34} {ms:>10.1f} {ms / base:>10.2f} {acc:>13.2f}")


if __name__ == "__main__":
    main()

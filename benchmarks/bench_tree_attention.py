"""Tree-attention benchmark: prints a table of median times, TFLOP/s and ratios to a baseline.

CPU (default when no GPU is present): the PyTorch reference ("torch") against eager
FlexAttention ("flex"); the ratio column is time / reference time. ``--check-kernel``
also runs the Triton kernel under Triton's interpreter on a small shape and reports
its error against the reference (correctness only; interpreter times mean nothing).

GPU: the Triton kernel against SDPA with a dense (N x S) bool mask and against SDPA with
no mask over the same keys (flash attention: the best-case dense cost for the same
token count); the ratio column is time / unmasked-SDPA time.

FLOPs (same formula for every method, so TFLOP/s compare directly):
    4 * R * Hq * N * (P + N) * D      (2 for Q K^T, 2 for P V, per query-key pair)

Usage:
    python benchmarks/bench_tree_attention.py                 # CPU, reduced grid
    python benchmarks/bench_tree_attention.py --full          # R in {1,16,64}, N in {16,64,128}
    python benchmarks/bench_tree_attention.py --check-kernel  # + kernel under the interpreter
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

# the interpreter flag must precede the first import of triton (adaspec.kernels does not import it)
if "--check-kernel" in sys.argv and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from adaspec.kernels import tree_attention


def random_tree_mask(R: int, N: int, gen: torch.Generator, device: torch.device) -> Tensor:
    """(R, N, N) ancestor masks of random trees (parent of i uniform in [0, i))."""
    u = torch.rand(R, N, generator=gen, dtype=torch.float64)
    parents = (u * torch.arange(N, dtype=torch.float64)).floor().to(torch.int64)
    parents[:, 0] = -1
    mask = torch.eye(N, dtype=torch.bool).expand(R, N, N).clone()
    # node i's row = its parent's row + itself (parents come first in topological order)
    for i in range(1, N):
        mask[:, i] |= mask[torch.arange(R), parents[:, i]]
    return mask.to(device)


def median_seconds(
    calls: dict[str, Callable[[], object]], methods: list[str], reps: int, device: torch.device
) -> dict[str, float]:
    """Median wall time of each method; methods alternate within every repetition, so load
    from other processes on a shared machine falls on all of them alike."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {m: [] for m in methods}
    for m in methods:
        calls[m]()  # warm-up (compiles, caches)
    for _ in range(reps):
        for m in methods:
            sync()
            t0 = time.perf_counter()
            calls[m]()
            sync()  # launch overhead is inside every method's time alike
            times[m].append(time.perf_counter() - t0)
    return {m: statistics.median(t) for m, t in times.items()}


def dense_visibility(P: int, mask: Tensor) -> Tensor:
    """(R, 1, N, P + N) bool: the whole visibility an SDPA call needs (built outside the timing)."""
    R, N, _ = mask.shape
    full = torch.ones(R, 1, N, P + N, dtype=torch.bool, device=mask.device)
    full[:, 0, :, P:] = mask
    return full


def dense_sdpa(q: Tensor, k: Tensor, v: Tensor, P: int, full: Tensor) -> Tensor:
    """SDPA with the whole (N x (P + N)) visibility materialized as a bool mask."""
    N = q.shape[2]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k[:, :, : P + N], v[:, :, : P + N], attn_mask=full, enable_gqa=True
    )


def make_calls(
    q: Tensor, k: Tensor, v: Tensor, lens: Tensor, mask: Tensor, P: int
) -> dict[str, Callable[[], object]]:
    full = dense_visibility(P, mask)
    return {
        "triton": lambda: tree_attention(q, k, v, lens, mask, backend="triton"),
        "torch": lambda: tree_attention(q, k, v, lens, mask, backend="torch"),
        "flex": lambda: tree_attention(q, k, v, lens, mask, backend="flex"),
        "sdpa_dense_mask": lambda: dense_sdpa(q, k, v, P, full),
        "sdpa_unmasked": lambda: plain_sdpa(q, k, v, P),
    }


def plain_sdpa(q: Tensor, k: Tensor, v: Tensor, P: int) -> Tensor:
    """Unmasked SDPA over the same keys: what the same token count costs with no tree mask."""
    return torch.nn.functional.scaled_dot_product_attention(
        q, k[:, :, : P + q.shape[2]], v[:, :, : P + q.shape[2]], enable_gqa=True
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--full", action="store_true", help="the full grid of the issue (slow on CPU)"
    )
    parser.add_argument("--heads", type=int, default=8, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument(
        "--dtype", default=None, help="float32 (CPU default) / float16 (GPU default) / bfloat16"
    )
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (on a shared machine 1 avoids OpenMP stalls behind other processes)",
    )
    parser.add_argument(
        "--check-kernel", action="store_true", help="run the kernel in the interpreter (CPU)"
    )
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.float16 if device.type == "cuda" else torch.float32)
    )
    Hq, Hkv, D = args.heads, args.kv_heads, args.head_dim
    if args.full or device.type == "cuda":
        grid = [(R, N, P) for R in (1, 16, 64) for N in (16, 64, 128) for P in (512, 4096)]
    else:
        grid = [(R, N, P) for R in (1, 16) for N in (16, 64) for P in (512, 4096)]
    print(
        f"device {device}, dtype {dtype}, Hq {Hq}, Hkv {Hkv}, D {D}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, median of {args.reps}"
    )
    gen = torch.Generator().manual_seed(0)

    if device.type == "cuda":
        methods: list[str] = ["triton", "sdpa_dense_mask", "sdpa_unmasked"]
        baseline = "sdpa_unmasked"
    else:
        methods = ["torch", "flex"]
        baseline = "torch"
    header = (
        "| R | N | prefix | "
        + " | ".join(f"{m} ms | {m} TFLOP/s | {m} / {baseline}" for m in methods)
        + " |"
    )
    print(header)
    print("|" + "---|" * (3 + 3 * len(methods)))
    for R, N, P in grid:
        q = torch.randn(R, Hq, N, D, generator=gen).to(device, dtype)
        k = torch.randn(R, Hkv, P + N, D, generator=gen).to(device, dtype)
        v = torch.randn(R, Hkv, P + N, D, generator=gen).to(device, dtype)
        lens = torch.full((R,), P, dtype=torch.int64, device=device)
        mask = random_tree_mask(R, N, gen, device)
        calls = make_calls(q, k, v, lens, mask, P)
        flops = 4 * R * Hq * N * (P + N) * D
        secs = median_seconds(calls, methods, args.reps, device)
        cells = []
        for m in methods:
            ms, tflops, ratio = secs[m] * 1e3, flops / secs[m] / 1e12, secs[m] / secs[baseline]
            cells.append(f"{ms:.2f} | {tflops:.3f} | {ratio:.2f}")
        print(f"| {R} | {N} | {P} | " + " | ".join(cells) + " |", flush=True)

    if args.check_kernel and device.type == "cpu":
        R, N, P = 2, 33, 37
        q = torch.randn(R, Hq, N, D, generator=gen)
        k = torch.randn(R, Hkv, P + N + 5, D, generator=gen)
        v = torch.randn(R, Hkv, P + N + 5, D, generator=gen)
        lens = torch.tensor([P, 3])
        mask = random_tree_mask(R, N, gen, device)
        t0 = time.perf_counter()
        out = tree_attention(q, k, v, lens, mask, backend="triton")
        took = time.perf_counter() - t0
        ref = tree_attention(q, k, v, lens, mask, backend="torch")
        err = float((out - ref).abs().max())
        print(
            f"kernel under the interpreter (R={R}, N={N}, prefixes {lens.tolist()}): "
            f"max |kernel - reference| = {err:.2e} ({took:.2f} s, interpreter)"
        )


if __name__ == "__main__":
    main()

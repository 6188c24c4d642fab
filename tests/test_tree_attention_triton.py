"""The Triton tree-attention kernel under Triton's interpreter (CPU), against the same oracles.

Triton must see ``TRITON_INTERPRET=1`` when it is first imported. This module sets it at
import time when Triton is not imported yet (pytest imports every test module before
running any test, so that normally holds even in a whole-suite run). If something had
imported Triton earlier without the interpreter, the in-process tests skip and
``test_in_subprocess`` runs this module again in a fresh interpreter-enabled process.

Grids are kept small: the interpreter costs about 0.6 ms per program instance.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from adaspec.kernels import pack_tree_mask, tree_attention, tree_attention_reference  # noqa: E402
from adaspec.tree import ancestor_mask  # noqa: E402
from tests.test_tree_attention import (  # noqa: E402
    LITERAL_TREES,
    causal_oracle,
    dense_oracle,
    make_inputs,
    max_err,
    path_oracle,
    random_parents,
    tree_of,
)

INTERPRETED = isinstance(triton.language.zeros, InterpretedFunction)
pytestmark = pytest.mark.interpreter
in_process = pytest.mark.skipif(
    not INTERPRETED,
    reason="triton was imported without TRITON_INTERPRET=1 here; test_in_subprocess runs these",
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def kernel(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lens: Tensor,
    mask: Tensor,
    block_m: int | None = None,
    block_n: int | None = None,
) -> Tensor:
    """The launcher itself, so tests can shrink the blocks to reach block boundaries cheaply."""
    from adaspec.kernels._triton_tree_attention import tree_attention_triton

    scale = q.shape[-1] ** -0.5
    return tree_attention_triton(
        q, k, v, lens, pack_tree_mask(mask), scale, block_m=block_m, block_n=block_n
    )


def assert_within_budget(
    out: Tensor, q: Tensor, k: Tensor, v: Tensor, lens: Tensor, mask: Tensor
) -> None:
    """Error budget: at most twice the error of the same math done by PyTorch in q's dtype."""
    exact = dense_oracle(q, k, v, lens, mask)
    budget = max_err(tree_attention_reference(q, k, v, lens, mask, compute_dtype=q.dtype), exact)
    err = max_err(out, exact)
    assert out.dtype == q.dtype
    assert err <= 2 * budget + 1e-6, (
        f"kernel error {err:.3g} > 2 x low-precision error {budget:.3g}"
    )


@in_process
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("N", [1, 7, 33])
def test_matches_oracle_mixed_prefixes(N: int, group: int, dtype: torch.dtype) -> None:
    # one batch holds an empty prefix, a one-token prefix and a 37-token prefix
    q, k, v, lens, mask = make_inputs(3, group, 1, N, 16, [0, 1, 37], dtype, seed=N + 100 * group)
    out = tree_attention(q, k, v, lens, mask, backend="triton")
    assert_within_budget(out, q, k, v, lens, mask)


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("N", [15, 16, 17, 33])
def test_small_blocks_at_their_boundaries(N: int, dtype: torch.dtype) -> None:
    # blocks of 16: prefixes and trees one short of, exactly at and one past a block
    q, k, v, lens, mask = make_inputs(4, 4, 2, N, 32, [15, 16, 17, 33], dtype, seed=N)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # strided (R, N, H, D) storage
    out = kernel(q, k, v, lens, mask, block_m=16, block_n=16)
    assert_within_budget(out, q, k, v, lens, mask)


@in_process
@pytest.mark.parametrize("N", [63, 65])
def test_default_blocks_plus_minus_one(N: int) -> None:
    q, k, v, lens, mask = make_inputs(4, 2, 2, N, 64, [63, 64, 65, 0], torch.float16, seed=N)
    out = tree_attention(q, k, v, lens, mask, backend="triton")
    assert_within_budget(out, q, k, v, lens, mask)


@in_process
@pytest.mark.parametrize("head_dim", [128, 256])
def test_wide_heads(head_dim: int) -> None:
    # Gemma-3 shape: 4 query heads on one kv head, head dim 256
    q, k, v, lens, mask = make_inputs(2, 4, 1, 7, head_dim, [5, 130], torch.bfloat16, seed=head_dim)
    out = tree_attention(q, k, v, lens, mask, backend="triton")
    assert_within_budget(out, q, k, v, lens, mask)


@in_process
@pytest.mark.parametrize("N", [256, 300])
def test_large_trees(N: int) -> None:
    q, k, v, lens, mask = make_inputs(1, 1, 1, N, 16, [3], torch.float16, seed=N)
    words = pack_tree_mask(mask)
    out = tree_attention(q, k, v, lens, words, backend="triton")
    assert_within_budget(out, q, k, v, lens, mask)
    assert torch.equal(out, tree_attention(q, k, v, lens, mask, backend="triton"))


@in_process
def test_chain_equals_causal_attention() -> None:
    N = 20
    chain = torch.arange(-1, N - 1).expand(2, N).clone()
    q, k, v, lens, _ = make_inputs(2, 4, 2, N, 32, [0, 41], torch.float32, seed=5)
    out = kernel(q, k, v, lens, ancestor_mask(tree_of(chain)), block_m=16, block_n=16)
    assert max_err(out, causal_oracle(q, k, v, lens)) < 1e-5


@in_process
def test_every_node_equals_attention_over_its_path() -> None:
    gen = torch.Generator().manual_seed(7)
    tree = tree_of(random_parents(2, 19, gen))
    q, k, v, lens, _ = make_inputs(2, 2, 1, 19, 16, [18, 0], torch.float32, seed=3)
    out = kernel(q, k, v, lens, ancestor_mask(tree), block_m=16, block_n=16)
    assert max_err(out, path_oracle(q, k, v, lens, tree)) < 1e-5


@in_process
@pytest.mark.parametrize("case", range(len(LITERAL_TREES)))
def test_literal_trees(case: int) -> None:
    parents, grid = LITERAL_TREES[case]
    N = len(parents)
    tree = tree_of(torch.tensor([parents, parents]))
    mask = torch.tensor(grid, dtype=torch.bool).expand(2, N, N).clone()
    q, k, v, lens, _ = make_inputs(2, 4, 2, N, 16, [0, 5], torch.float32, seed=case)
    out = tree_attention(q, k, v, lens, mask, backend="triton")
    assert max_err(out, path_oracle(q, k, v, lens, tree)) < 1e-5


@in_process
def test_upper_triangle_ignored_and_diagonal_forced() -> None:
    q, k, v, lens, mask = make_inputs(2, 2, 2, 9, 16, [0, 4], torch.float32, seed=12)
    noisy = mask | torch.ones_like(mask).triu(1)  # garbage above the diagonal
    noisy &= ~torch.eye(9, dtype=torch.bool)  # and no diagonal
    out = tree_attention(q, k, v, lens, noisy, backend="triton")
    assert max_err(out, tree_attention(q, k, v, lens, mask, backend="torch")) < 1e-5


@pytest.mark.skipif(
    INTERPRETED, reason="the interpreter is on in this process: the tests ran directly"
)
def test_in_subprocess() -> None:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(Path(__file__).resolve()),
        "-m",
        "interpreter",
        "-q",
        "-p",
        "no:cacheprovider",
    ]
    run = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout

"""Tree attention: the reference and FlexAttention paths against oracles sharing no code with them.

Oracles: a float64 dense-mask attention written per request (`dense_oracle`), plain causal
attention (chains), and attention over each node's own root->node path. The Triton kernel
is checked against the same oracles in test_tree_attention_triton.py (interpreter).
"""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import adaspec.kernels
from adaspec.kernels import (
    available_backends,
    effective_tree_mask,
    pack_tree_mask,
    resolve_backend,
    tree_attention,
    tree_attention_reference,
    unpack_tree_mask,
)
from adaspec.tree import TokenTree, ancestor_mask, path_to

CPU_BACKENDS = ("torch", "flex")


# ------------------------------------------------- helpers shared with the kernel tests
def random_parents(R: int, N: int, gen: torch.Generator) -> Tensor:
    """(R, N) parents of random trees in topological order: parent of i drawn from [0, i)."""
    u = torch.rand(R, N, generator=gen, dtype=torch.float64)
    parents = (u * torch.arange(N, dtype=torch.float64)).floor().to(torch.int64)
    parents[:, 0] = -1
    return parents


def tree_of(parents: Tensor) -> TokenTree:
    R, N = parents.shape
    logp = -0.1 * torch.arange(N, dtype=torch.float32).expand(R, N)  # children below parents
    return TokenTree(
        tokens=torch.zeros(R, N, dtype=torch.int64), parents=parents, logp=logp.clone()
    )


def make_inputs(
    R: int,
    hq: int,
    hkv: int,
    N: int,
    D: int,
    lens: list[int],
    dtype: torch.dtype,
    seed: int,
    spare: int = 3,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Random q, k_cache, v_cache (S = max(lens) + N + spare), cache_lens and a random tree mask.

    Cache slots past each request's tree block are filled with huge values, so reading
    them anywhere would show up as a large error.
    """
    gen = torch.Generator().manual_seed(seed)
    S = max(lens) + N + spare
    q = torch.randn(R, hq, N, D, generator=gen).to(dtype)
    k = torch.randn(R, hkv, S, D, generator=gen)
    v = torch.randn(R, hkv, S, D, generator=gen)
    for r, n in enumerate(lens):
        k[r, :, n + N :] = 1e4
        v[r, :, n + N :] = 1e4
    mask = ancestor_mask(tree_of(random_parents(R, N, gen)))
    return q, k.to(dtype), v.to(dtype), torch.tensor(lens, dtype=torch.int64), mask


def dense_oracle(
    q: Tensor, k: Tensor, v: Tensor, lens: Tensor, mask: Tensor, scale: float | None = None
) -> Tensor:
    """float64 attention with the full (N x S) visibility written out, one request at a time."""
    R, Hq, N, D = q.shape
    G = Hq // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.empty(R, Hq, N, D, dtype=torch.float64)
    for r in range(R):
        n = int(lens[r])
        visible = torch.zeros(N, n + N, dtype=torch.bool)
        visible[:, :n] = True
        visible[:, n:] = mask[r].tril() | torch.eye(N, dtype=torch.bool)
        kr = k[r, :, : n + N].double().repeat_interleave(G, 0)  # [Hq, n+N, D]
        vr = v[r, :, : n + N].double().repeat_interleave(G, 0)
        s = (q[r].double() @ kr.transpose(-1, -2)) * scale  # [Hq, N, n+N]
        s = s.masked_fill(~visible, float("-inf"))
        out[r] = torch.softmax(s, -1) @ vr
    return out


def path_oracle(q: Tensor, k: Tensor, v: Tensor, lens: Tensor, tree: TokenTree) -> Tensor:
    """float64: node i attends, as the last token of causal attention, to prefix + root->i path."""
    R, Hq, N, D = q.shape
    G = Hq // k.shape[1]
    out = torch.empty(R, Hq, N, D, dtype=torch.float64)
    for i in range(N):
        paths = path_to(tree, torch.full((R,), i))  # [R, depth+1] root .. i, -1 padded
        for r in range(R):
            n = int(lens[r])
            nodes = paths[r][paths[r] >= 0]
            slots = torch.cat([torch.arange(n), n + nodes])
            kr = k[r][:, slots].double().repeat_interleave(G, 0)  # [Hq, n+depth+1, D]
            vr = v[r][:, slots].double().repeat_interleave(G, 0)
            out[r, :, i] = F.scaled_dot_product_attention(q[r, :, i : i + 1].double(), kr, vr)[:, 0]
    return out


def causal_oracle(q: Tensor, k: Tensor, v: Tensor, lens: Tensor) -> Tensor:
    """float64 plain causal attention over prefix + the N chain nodes; rows of the chain nodes."""
    R, Hq, N, D = q.shape
    G = Hq // k.shape[1]
    out = torch.empty(R, Hq, N, D, dtype=torch.float64)
    for r in range(R):
        n = int(lens[r])
        qf = torch.zeros(Hq, n + N, D, dtype=torch.float64)
        qf[:, n:] = q[r].double()
        kr = k[r, :, : n + N].double().repeat_interleave(G, 0)
        vr = v[r, :, : n + N].double().repeat_interleave(G, 0)
        out[r] = F.scaled_dot_product_attention(qf, kr, vr, is_causal=True)[:, n:]
    return out


def max_err(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


# ------------------------------------------------------------------ the mask layouts
def test_pack_roundtrip_and_bit_layout() -> None:
    gen = torch.Generator().manual_seed(1)
    for N in (1, 31, 32, 33, 70):
        mask = torch.rand(3, N, N, generator=gen) < 0.5
        words = pack_tree_mask(mask)
        assert words.dtype == torch.int32
        assert words.shape == (3, N, (N + 31) // 32)
        assert torch.equal(unpack_tree_mask(words, N), mask)
    # node 31 is the sign bit of word 0
    m = torch.zeros(1, 32, 32, dtype=torch.bool)
    m[0, 0, 31] = True
    m[0, 1, 0] = True
    assert pack_tree_mask(m)[0, :2, 0].tolist() == [-(2**31), 1]


def test_effective_mask_ignores_upper_triangle_and_forces_diagonal() -> None:
    raw = torch.tensor([[0, 1, 1], [1, 0, 1], [0, 0, 0]], dtype=torch.bool)
    want = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    assert torch.equal(effective_tree_mask(raw), want)


# ------------------------------------------------------------------ tiny trees written out by hand
# Each case: parents, the ancestor mask as a literal 0/1 grid (row = query node, column = key node).
LITERAL_TREES = [
    # root with two children; 1 and 2 are siblings and must not see each other
    ([-1, 0, 0], [[1, 0, 0], [1, 1, 0], [1, 0, 1]]),
    # 0 -> 1 -> 3, 0 -> 2 -> 4, 2 -> 5
    (
        [-1, 0, 0, 1, 2, 2],
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 0, 1, 0, 0, 0],
            [1, 1, 0, 1, 0, 0],
            [1, 0, 1, 0, 1, 0],
            [1, 0, 1, 0, 0, 1],
        ],
    ),
    # a chain of four: lower triangular
    ([-1, 0, 1, 2], [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", range(len(LITERAL_TREES)))
def test_literal_trees(case: int, backend: str) -> None:
    parents, grid = LITERAL_TREES[case]
    N = len(parents)
    tree = tree_of(torch.tensor([parents, parents]))
    mask = torch.tensor(grid, dtype=torch.bool).expand(2, N, N).clone()
    assert torch.equal(ancestor_mask(tree), mask)
    q, k, v, lens, _ = make_inputs(2, 4, 2, N, 16, [0, 5], torch.float32, seed=case)
    out = tree_attention(q, k, v, lens, mask, backend=backend)  # type: ignore[arg-type]
    assert max_err(out, path_oracle(q, k, v, lens, tree)) < 1e-5
    # the literal mask is exactly what makes siblings independent: changing a sibling's key
    # must not change the other sibling's output
    if case == 0:
        k2 = k.clone()
        for r in range(2):
            k2[r, :, int(lens[r]) + 2] = torch.randn(2, 16)  # node 2's key
        out2 = tree_attention(q, k2, v, lens, mask, backend=backend)  # type: ignore[arg-type]
        assert torch.equal(out[:, :, 1], out2[:, :, 1])
        assert not torch.allclose(out[:, :, 2], out2[:, :, 2])


# ------------------------------------------------------------------ reference and flex vs oracles
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("N", [1, 7, 33])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_random_trees_match_dense_oracle(backend: str, N: int, group: int) -> None:
    lens = [0, 1, 37]
    q, k, v, cl, mask = make_inputs(
        3, 2 * group, 2, N, 16, lens, torch.float32, seed=N * 10 + group
    )
    out = tree_attention(q, k, v, cl, mask, backend=backend)  # type: ignore[arg-type]
    assert out.shape == q.shape
    assert out.dtype == q.dtype
    assert max_err(out, dense_oracle(q, k, v, cl, mask)) < 1e-5
    # packed words give the same result as the bool mask
    assert torch.equal(out, tree_attention(q, k, v, cl, pack_tree_mask(mask), backend=backend))  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_node_equals_attention_over_its_path(backend: str) -> None:
    gen = torch.Generator().manual_seed(7)
    parents = random_parents(3, 12, gen)
    tree = tree_of(parents)
    q, k, v, cl, _ = make_inputs(3, 4, 1, 12, 32, [9, 0, 4], torch.float32, seed=3)
    out = tree_attention(q, k, v, cl, ancestor_mask(tree), backend=backend)  # type: ignore[arg-type]
    assert max_err(out, path_oracle(q, k, v, cl, tree)) < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_chain_equals_causal_attention(backend: str) -> None:
    N = 9
    chain = torch.arange(-1, N - 1).expand(2, N).clone()
    q, k, v, cl, _ = make_inputs(2, 6, 3, N, 64, [0, 20], torch.float32, seed=5)
    out = tree_attention(q, k, v, cl, ancestor_mask(tree_of(chain)), backend=backend)  # type: ignore[arg-type]
    assert max_err(out, causal_oracle(q, k, v, cl)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_error_budget(dtype: torch.dtype) -> None:
    q, k, v, cl, mask = make_inputs(2, 4, 2, 20, 64, [13, 0], dtype, seed=11)
    exact = dense_oracle(q, k, v, cl, mask)
    # the same math done entirely in the low precision sets the budget
    budget = max_err(tree_attention_reference(q, k, v, cl, mask, compute_dtype=dtype), exact)
    for backend in CPU_BACKENDS:
        out = tree_attention(q, k, v, cl, mask, backend=backend)  # type: ignore[arg-type]
        assert out.dtype == dtype
        assert max_err(out, exact) <= 2 * budget + 1e-6


def test_scale_argument() -> None:
    q, k, v, cl, mask = make_inputs(1, 2, 2, 5, 16, [3], torch.float32, seed=2)
    out = tree_attention(q, k, v, cl, mask, scale=0.3)
    assert max_err(out, dense_oracle(q, k, v, cl, mask, scale=0.3)) < 1e-5


def test_node_without_visible_ancestors_attends_to_itself() -> None:
    # empty prefix and an all-False mask: the forced diagonal makes each output its own value
    q, k, v, cl, _ = make_inputs(1, 2, 2, 4, 16, [0], torch.float32, seed=4)
    out = tree_attention(q, k, v, cl, torch.zeros(1, 4, 4, dtype=torch.bool))
    assert torch.allclose(out, v[:, :, :4], atol=1e-6)


# ------------------------------------------------------------------ backends, checks, torch.compile
def test_backend_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("flex", "cpu") == "flex"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "triton" not in available_backends("cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        resolve_backend("triton", "cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda", "cpu")


def test_import_without_triton() -> None:
    # a fresh process in which triton cannot be imported still offers the torch backend
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, adaspec.kernels as K\n"
        "assert K.resolve_backend('auto', 'cpu') == 'torch'\n"
        "q = torch.randn(1, 1, 2, 16); k = torch.randn(1, 1, 4, 16)\n"
        "m = torch.ones(1, 2, 2, dtype=torch.bool)\n"
        "print(K.tree_attention(q, k, k, torch.tensor([1]), m).shape)\n"
    )
    src = str(Path(adaspec.kernels.__file__).parents[2])
    env = {**os.environ, "PYTHONPATH": src}
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env
    )
    assert run.returncode == 0, run.stderr
    assert "torch.Size([1, 1, 2, 16])" in run.stdout


def test_bad_inputs_name_the_argument() -> None:
    q, k, v, cl, mask = make_inputs(2, 4, 2, 3, 16, [1, 2], torch.float32, seed=0)
    with pytest.raises(ValueError, match="q must have shape"):
        tree_attention(q[0], k, v, cl, mask)
    with pytest.raises(ValueError, match="multiple of"):
        tree_attention(q[:, :3], k, v, cl, mask)
    with pytest.raises(TypeError, match="k_cache must have q's dtype"):
        tree_attention(q, k.half(), v, cl, mask)
    with pytest.raises(ValueError, match="v_cache must have the shape"):
        tree_attention(q, k, v[:, :1], cl, mask)
    with pytest.raises(ValueError, match="cache_lens must be an"):
        tree_attention(q, k, v, cl.float(), mask)
    with pytest.raises(ValueError, match=r"cache_lens must lie in \[0, S - N\]"):
        tree_attention(q, k, v, torch.tensor([1, 6]), mask)
    with pytest.raises(ValueError, match="tree_mask \\(bool\\) must have shape"):
        tree_attention(q, k, v, cl, mask[:, :2])
    with pytest.raises(ValueError, match="tree_mask \\(packed int32\\)"):
        tree_attention(q, k, v, cl, torch.zeros(2, 3, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="tree_mask must be bool"):
        tree_attention(q, k, v, cl, mask.float())
    with pytest.raises(TypeError, match="q must be float32"):
        tree_attention(q.double(), k.double(), v.double(), cl, mask)


def test_custom_op_traces_under_torch_compile() -> None:
    q, k, v, cl, mask = make_inputs(2, 4, 2, 5, 16, [3, 0], torch.float32, seed=9)
    eager = tree_attention(q, k, v, cl, mask)

    def step(q: Tensor, k: Tensor, v: Tensor, cl: Tensor, mask: Tensor) -> Tensor:
        return tree_attention(q, k, v, cl, mask) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    assert torch.equal(compiled(q, k, v, cl, mask), eager * 2.0)
    torch.library.opcheck(
        torch.ops.adaspec.tree_attention.default, (q, k, v, cl, mask, 0.25, "torch")
    )


def test_reimport_does_not_register_twice() -> None:
    import adaspec.kernels.attention as attention

    q, k, v, cl, mask = make_inputs(1, 2, 1, 4, 16, [2], torch.float32, seed=8)
    before = attention.tree_attention(q, k, v, cl, mask)
    reloaded = importlib.reload(attention)  # registering the op name again would raise here
    assert torch.equal(reloaded.tree_attention(q, k, v, cl, mask), before)


@settings(max_examples=40, deadline=None)
@given(
    R=st.integers(1, 3),
    N=st.integers(1, 12),
    group=st.integers(1, 3),
    hkv=st.integers(1, 2),
    lens=st.lists(st.integers(0, 20), min_size=3, max_size=3),
    lens_dtype=st.sampled_from([torch.int32, torch.int64]),
    seed=st.integers(0, 2**16),
)
def test_reference_property(
    R: int, N: int, group: int, hkv: int, lens: list[int], lens_dtype: torch.dtype, seed: int
) -> None:
    q, k, v, cl, mask = make_inputs(R, group * hkv, hkv, N, 16, lens[:R], torch.float32, seed)
    out = tree_attention(q, k, v, cl.to(lens_dtype), mask)
    assert max_err(out, dense_oracle(q, k, v, cl, mask)) < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_size_batches(backend: str) -> None:
    q, k, v, cl, mask = make_inputs(2, 2, 1, 3, 16, [1, 2], torch.float32, seed=0)
    empty = tree_attention(q[:0], k[:0], v[:0], cl[:0], mask[:0], backend=backend)  # type: ignore[arg-type]
    assert empty.shape == (0, 2, 3, 16)

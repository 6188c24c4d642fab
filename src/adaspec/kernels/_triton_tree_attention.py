# Kernel bodies are Triton DSL (parameters typed by Triton, not Python); the launcher is typed.
# mypy: disable-error-code="no-untyped-def,untyped-decorator"
"""The Triton tree-attention kernel and its launcher.

Imported only when the "triton" backend is used, so ``import adaspec.kernels`` works
without Triton. On a CPU the kernel runs only in Triton's interpreter, which must be
switched on (``TRITON_INTERPRET=1``) before Triton is first imported.

Work split: one program per (block of query rows, request, kv head). The G query heads
that share a kv head are stacked along the row axis (row ``m = g * N + i`` is node i of
query head ``kv_head * G + g``), so small trees still fill a row block and each key
block is loaded once for all G heads.

Per program: the prefix blocks that lie wholly inside ``cache_lens[r]`` are attended
with no mask at all; the remaining keys (the prefix tail and the tree block) are read
with the packed ancestor bitmask. Softmax is online (flash-attention style), in base 2.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2_E = 1.4426950408889634


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    # Triton 3.8's interpreter computes bfloat16 tl.dot wrongly; bf16 x bf16 products are exact
    # in float32, so upcasting first gives what the GPU's fp32-accumulating bf16 dot gives.
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _tree_attention_fwd(
    Q,
    K,
    V,
    O,  # noqa: E741 (the output, named like Q, K and V)
    LENS,
    MASK,
    qk_scale,  # softmax scale * log2(e)
    stride_qr,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kr,
    stride_kh,
    stride_ks,
    stride_kd,
    stride_vr,
    stride_vh,
    stride_vs,
    stride_vd,
    stride_or,
    stride_oh,
    stride_on,
    stride_od,
    stride_mr,
    stride_mn,
    stride_mw,
    N,
    H_KV,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    tl.static_assert(BLOCK_M >= 16, "tl.dot needs at least 16 rows")
    tl.static_assert(BLOCK_N >= 16, "tl.dot needs at least 16 columns")
    tl.static_assert(HEAD_DIM >= 16, "tl.dot needs a head dim of at least 16")
    tl.static_assert((HEAD_DIM & (HEAD_DIM - 1)) == 0, "head dim must be a power of two")
    WORD_BITS: tl.constexpr = 32
    # finite so that a row with no visible key in a block gives exp2(-inf - M_START) = 0, not NaN
    M_START: tl.constexpr = -1.0e30

    pid_m = tl.program_id(0)
    pid_rh = tl.program_id(1)
    # 64-bit offsets: request * stride overflows int32 for caches past 2**31 elements
    r = (pid_rh // H_KV).to(tl.int64)
    h_kv = (pid_rh % H_KV).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # stacked row g * N + i
    row_ok = offs_m < GROUP * N
    g = offs_m // N
    node = offs_m % N
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)

    q_ptrs = (
        Q
        + r * stride_qr
        + (h_kv * GROUP + g)[:, None] * stride_qh
        + node[:, None] * stride_qn
        + offs_d[None, :] * stride_qd
    )
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # [BLOCK_M, HEAD_DIM]
    k_base = K + r * stride_kr + h_kv * stride_kh
    v_base = V + r * stride_vr + h_kv * stride_vh
    mask_base = MASK + r * stride_mr

    prefix_len = tl.load(LENS + r).to(tl.int32)
    # rows of this block see tree nodes up to their own index only (topological order)
    m_first = pid_m * BLOCK_M
    m_last = tl.minimum(m_first + BLOCK_M, GROUP * N) - 1
    tree_hi = tl.where(m_first // N == m_last // N, m_last % N + 1, N)

    m_i = tl.full([BLOCK_M], M_START, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # -- prefix blocks wholly inside the prefix: no mask of any kind
    full_end = (prefix_len // BLOCK_N) * BLOCK_N
    for start in range(0, full_end, BLOCK_N):
        pos = start + offs_n
        kt = tl.load(
            k_base + offs_d[:, None] * stride_kd + pos[None, :] * stride_ks
        )  # [HEAD_DIM, BLOCK_N]
        qk = _dot(q, kt, DOT_PRECISION, UPCAST_DOT) * qk_scale
        # online softmax: rescale what was accumulated to the new running max
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + pos[:, None] * stride_vs + offs_d[None, :] * stride_vd
        )  # [BLOCK_N, HEAD_DIM]
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, UPCAST_DOT)
        m_i = m_new

    # -- prefix tail and tree block: visibility from the key length and the bitmask
    kv_end = prefix_len + tree_hi
    for start in range(full_end, kv_end, BLOCK_N):
        pos = start + offs_n
        key_ok = pos < kv_end
        kt = tl.load(
            k_base + offs_d[:, None] * stride_kd + pos[None, :] * stride_ks,
            mask=key_ok[None, :],
            other=0.0,
        )
        qk = _dot(q, kt, DOT_PRECISION, UPCAST_DOT) * qk_scale
        j = pos - prefix_len  # tree node index of each key (negative inside the prefix)
        in_tree = (j >= 0) & key_ok
        j_safe = tl.maximum(j, 0)
        word = tl.load(
            mask_base + node[:, None] * stride_mn + (j_safe // WORD_BITS)[None, :] * stride_mw,
            mask=row_ok[:, None] & in_tree[None, :],
            other=0,
        )  # [BLOCK_M, BLOCK_N] int32
        bit = ((word >> (j_safe % WORD_BITS)[None, :]) & 1) != 0
        tree_ok = in_tree[None, :] & (
            ((j[None, :] <= node[:, None]) & bit) | (j[None, :] == node[:, None])
        )
        visible = (pos < prefix_len)[None, :] | tree_ok
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + pos[:, None] * stride_vs + offs_d[None, :] * stride_vd,
            mask=key_ok[:, None],
            other=0.0,
        )
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, UPCAST_DOT)
        m_i = m_new

    # padding rows (row_ok False) have l_i = 0; they are never stored
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = (
        O
        + r * stride_or
        + (h_kv * GROUP + g)[:, None] * stride_oh
        + node[:, None] * stride_on
        + offs_d[None, :] * stride_od
    )
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])


def default_blocks(head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for a head dim; wider heads take narrower key blocks."""
    if head_dim <= 128:
        return 64, 64, 4
    return 64, 32, 8


def tree_attention_triton(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_lens: Tensor,
    mask_words: Tensor,
    scale: float,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> Tensor:
    """Launch the kernel; inputs already validated, mask packed as (R, N, W) int32 words."""
    R, Hq, N, D = q.shape
    Hkv = k_cache.shape[1]
    group = Hq // Hkv
    bm, bn, warps = default_blocks(D)
    bm = block_m or bm
    bn = block_n or bn
    out = torch.empty_like(q)
    if R == 0 or N == 0:
        return out
    lens = cache_lens.to(device=q.device, dtype=torch.int32)
    words = mask_words.to(q.device)
    grid = (triton.cdiv(group * N, bm), R * Hkv)
    # float32 stays float32 (no TF32), so "float32" means what it says
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _tree_attention_fwd[grid](
        q,
        k_cache,
        v_cache,
        out,
        lens,
        words,
        scale * LOG2_E,
        *q.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *out.stride(),
        *words.stride(),
        N,
        Hkv,
        GROUP=group,
        HEAD_DIM=D,
        BLOCK_M=bm,
        BLOCK_N=bn,
        DOT_PRECISION=precision,
        UPCAST_DOT=q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
        num_warps=warps,
    )
    return out

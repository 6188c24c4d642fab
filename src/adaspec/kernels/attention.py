"""Tree-masked attention over a KV cache: the public entry point, its checks and its backends.

Layers, outermost first: :func:`tree_attention` (checks, backend choice) -> the custom op
``adaspec::tree_attention`` (opaque to ``torch.compile``, with a fake implementation) ->
one backend: the Triton kernel, the PyTorch reference, or FlexAttention.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Literal

import torch
from torch import Tensor

from adaspec.kernels.flex import tree_attention_flex
from adaspec.kernels.masks import mask_words, pack_tree_mask, unpack_tree_mask
from adaspec.kernels.reference import tree_attention_reference

__all__ = ["Backend", "available_backends", "resolve_backend", "tree_attention"]

Backend = Literal["auto", "triton", "torch", "flex"]
_BACKENDS = ("auto", "triton", "torch", "flex")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Measured on CPU (docs/kernels.md, torch 2.13, float32): eager FlexAttention took 2.2x-20x
# the reference's time at every benchmarked shape, so "auto" off CUDA runs the reference.
_CPU_AUTO: Literal["torch", "flex"] = "torch"


def _triton_installed() -> bool:
    # find_spec, not import: importing triton here would fix its interpreter setting too early
    try:
        return importlib.util.find_spec("triton") is not None
    except ValueError:  # sys.modules["triton"] is None: import blocked on purpose
        return False


def available_backends(device: torch.device | str) -> tuple[str, ...]:
    """Backends that can run on ``device`` in this process (besides "auto").

    "triton" is listed for CUDA when Triton is installed, and for CPU only when
    ``TRITON_INTERPRET=1`` is set (the kernel then runs in Triton's interpreter).
    """
    dev = torch.device(device)
    names = ["torch", "flex"]
    if _triton_installed() and (dev.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        names.insert(0, "triton")
    return tuple(names)


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The concrete backend that ``backend`` (possibly "auto") means on ``device``."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    dev = torch.device(device)
    if backend == "auto":
        if dev.type == "cuda" and _triton_installed():
            return "triton"
        return _CPU_AUTO if dev.type == "cpu" else "torch"
    if backend == "triton":
        if not _triton_installed():
            raise RuntimeError(
                "backend='triton' needs the triton package (pip install adaspec[triton])"
            )
        if dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"backend='triton' on {dev.type} runs only in Triton's interpreter: set "
                "TRITON_INTERPRET=1 before triton is first imported, or use backend='torch'"
            )
    return backend


# ------------------------------------------------------------------ the custom op
def _run_backend(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_lens: Tensor,
    tree_mask: Tensor,
    scale: float,
    backend: str,
) -> Tensor:
    N = q.shape[2]
    if q.numel() == 0:  # no requests, nodes or heads: nothing to attend (flex rejects R = 0)
        return torch.empty_like(q)
    if backend == "triton":
        from adaspec.kernels._triton_tree_attention import tree_attention_triton

        words = tree_mask if tree_mask.dtype == torch.int32 else pack_tree_mask(tree_mask)
        return tree_attention_triton(q, k_cache, v_cache, cache_lens, words, scale)
    dense = unpack_tree_mask(tree_mask, N) if tree_mask.dtype == torch.int32 else tree_mask
    if backend == "flex":
        return tree_attention_flex(q, k_cache, v_cache, cache_lens, dense, scale=scale)
    return tree_attention_reference(q, k_cache, v_cache, cache_lens, dense, scale=scale)


_OP_NAME = "adaspec::tree_attention"


def _register_op() -> object:
    # Registering a name twice raises; a reloaded module reuses the op registered first.
    if hasattr(torch.ops.adaspec, "tree_attention"):
        return torch.ops.adaspec.tree_attention

    @torch.library.custom_op(_OP_NAME, mutates_args=())
    def _op(
        q: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        cache_lens: Tensor,
        tree_mask: Tensor,
        scale: float,
        backend: str,
    ) -> Tensor:
        return _run_backend(q, k_cache, v_cache, cache_lens, tree_mask, scale, backend)

    @_op.register_fake
    def _(
        q: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        cache_lens: Tensor,
        tree_mask: Tensor,
        scale: float,
        backend: str,
    ) -> Tensor:
        return torch.empty_like(q)

    return _op


_tree_attention_op = _register_op()


# ------------------------------------------------------------------ public entry
def tree_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_lens: Tensor,
    tree_mask: Tensor,
    *,
    scale: float | None = None,
    backend: Backend = "auto",
) -> Tensor:
    """Attention of each request's tree nodes to its cached prefix and to their tree ancestors.

    Node i of request r attends to every prefix position ``0 .. cache_lens[r] - 1`` and to
    tree node j (cached at ``cache_lens[r] + j``) iff ``tree_mask[r, i, j]``. Nodes are in
    topological order, so entries above the diagonal are ignored, and a node always sees
    itself (the diagonal is forced visible): no row is empty, even with an empty prefix.
    Cache positions at and past ``cache_lens[r] + N`` are never read.

    Parameters
    ----------
    q : Tensor
        ``(R, Hq, N, D)`` queries of the N tree nodes of each request; float32, float16 or
        bfloat16; D a power of two from 16 to 256 for the Triton backend.
    k_cache, v_cache : Tensor
        ``(R, Hkv, S, D)``, dtype of ``q``; the tree nodes' keys/values already written at
        ``cache_lens[r] .. cache_lens[r] + N - 1``. ``Hq`` must be a multiple of ``Hkv``
        (query head h reads kv head ``h // (Hq // Hkv)``).
    cache_lens : Tensor
        ``(R,)`` integer prefix length of each request, ``0 <= cache_lens[r] <= S - N``.
    tree_mask : Tensor
        ``(R, N, N)`` bool ancestor mask (True = visible), e.g. ``adaspec.tree.ancestor_mask``,
        or the same packed by :func:`pack_tree_mask` into ``(R, N, ceil(N / 32))`` int32.
    scale : float, optional
        Softmax scale; ``1 / sqrt(D)`` by default.
    backend : {"auto", "triton", "torch", "flex"}
        "triton": the kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``); "torch": the
        plain-PyTorch reference (float32 math); "flex": eager FlexAttention; "auto":
        Triton on CUDA when installed, otherwise the reference (faster than eager
        FlexAttention on CPU, see docs/kernels.md).

    Returns
    -------
    Tensor
        ``(R, Hq, N, D)`` in ``q.dtype``.

    Raises
    ------
    TypeError, ValueError
        On a wrong shape, dtype or device, with the argument named. The range of
        ``cache_lens`` is checked when it is on the CPU and not under ``torch.compile``
        (on CUDA that would cost a host sync).

    Examples
    --------
    >>> import torch
    >>> from adaspec.kernels import tree_attention
    >>> R, H, N, D, S = 2, 4, 3, 64, 16
    >>> q = torch.randn(R, H, N, D)
    >>> k, v = torch.randn(R, H, S, D), torch.randn(R, H, S, D)
    >>> lens = torch.tensor([5, 0])
    >>> # node 0 is the root; nodes 1 and 2 are its children (siblings do not see each other)
    >>> mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool).expand(R, N, N)
    >>> tree_attention(q, k, v, lens, mask).shape
    torch.Size([2, 4, 3, 64])
    """
    _check_inputs(q, k_cache, v_cache, cache_lens, tree_mask)
    name = resolve_backend(backend, q.device)
    if name == "triton":
        D = q.shape[3]
        if D < 16 or D > 256 or D & (D - 1):
            raise ValueError(
                f"q: the Triton backend needs a head dim that is a power of two in [16, 256], "
                f"got {D}"
            )
    sm_scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    out = _tree_attention_op(q, k_cache, v_cache, cache_lens, tree_mask, sm_scale, name)  # type: ignore[operator]
    assert isinstance(out, Tensor)
    return out


def _check_inputs(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor, tree_mask: Tensor
) -> None:
    for name, t in (
        ("q", q),
        ("k_cache", k_cache),
        ("v_cache", v_cache),
        ("cache_lens", cache_lens),
        ("tree_mask", tree_mask),
    ):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must have shape (R, Hq, N, D), got {tuple(q.shape)}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"q must be float32, float16 or bfloat16, got {q.dtype}")
    R, Hq, N, D = q.shape
    if k_cache.dim() != 4 or k_cache.shape[0] != R or k_cache.shape[3] != D:
        raise ValueError(
            f"k_cache must have shape (R={R}, Hkv, S, D={D}), got {tuple(k_cache.shape)}"
        )
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"v_cache must have the shape of k_cache {tuple(k_cache.shape)}, "
            f"got {tuple(v_cache.shape)}"
        )
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q's head count {Hq} must be a multiple of k_cache's head count {Hkv}")
    if N > S:
        raise ValueError(f"the cache length S={S} cannot hold the N={N} tree nodes")
    if (
        cache_lens.shape != (R,)
        or cache_lens.dtype.is_floating_point
        or cache_lens.dtype == torch.bool
    ):
        raise ValueError(
            f"cache_lens must be an (R,) = ({R},) integer tensor, "
            f"got {cache_lens.dtype} {tuple(cache_lens.shape)}"
        )
    if tree_mask.dtype == torch.bool:
        if tree_mask.shape != (R, N, N):
            raise ValueError(
                f"tree_mask (bool) must have shape (R, N, N) = ({R}, {N}, {N}), "
                f"got {tuple(tree_mask.shape)}"
            )
    elif tree_mask.dtype == torch.int32:
        W = mask_words(N)
        if tree_mask.shape != (R, N, W):
            raise ValueError(
                f"tree_mask (packed int32) must have shape (R, N, ceil(N/32)) = ({R}, {N}, {W}), "
                f"got {tuple(tree_mask.shape)}"
            )
    else:
        raise TypeError(
            f"tree_mask must be bool (R, N, N) or packed int32 (R, N, ceil(N/32)), "
            f"got {tree_mask.dtype}"
        )
    if tree_mask.device != q.device:
        raise ValueError(f"tree_mask must be on q's device {q.device}, got {tree_mask.device}")
    # a value check reads the tensor: skipped on CUDA (a host sync) and while tracing
    if cache_lens.device.type == "cpu" and R > 0 and not torch.compiler.is_compiling():
        lo, hi = int(cache_lens.min()), int(cache_lens.max())
        if lo < 0 or hi + N > S:
            raise ValueError(
                f"cache_lens must lie in [0, S - N] = [0, {S - N}], got values in [{lo}, {hi}]"
            )

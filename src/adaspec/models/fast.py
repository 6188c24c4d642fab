"""Linear layers that run the fastest measured way for each row count, on CPU.

Speculative decoding assumes that a forward of a few tokens costs about as much as a
forward of one. On the 2-core CI CPUs, ``F.linear`` (MKL) breaks that: a 2048 x 640
float32 layer takes 0.10 ms for 1 row and 0.19 ms for 2, and Gemma-3 270M's 262,144 x 640
output layer takes 54 ms for 1 row, 126 ms for 2 and 147 ms for 16. oneDNN with the weight
packed once into its blocked layout (what ``torch.compile`` does for CPU linears) takes
0.09 ms for 1 or 2 rows of the small layer and 40 / 49 / 61 ms for 1 / 2 / 16 rows of the
large one; a contiguous transposed copy streams a single row of the large one in 30 ms
(``python benchmarks/bench_models.py --linear``).

:func:`optimize_for_cpu` replaces every ``nn.Linear`` of a model by a :class:`FastLinear`
sharing the same parameters (tied embeddings stay tied, ``state_dict`` keys do not change).
A FastLinear times the candidate ways once per (shape, dtype, row-count bucket), on first
use, and then always takes the fastest. Every way computes the same dot products; only
the float summation order differs (~1e-6 relative), as between any two BLAS libraries.
Apply it to the target and the baseline alike: the engine's plain decoding and
transformers' ``generate`` both run on the optimized model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FastLinear",
    "Int4Linear",
    "Int8Linear",
    "int4_linears",
    "int8_linears",
    "optimize_for_cpu",
    "plain_linears",
    "tunings",
]

Way = Literal["linear", "packed", "blocked", "transposed"]

_BLOCK = 4096  # output rows per block of the "blocked" way
_LARGE = 1 << 22  # weights with at least this many elements also try blocked / transposed
_MAX_TUNED_ROWS = 32  # more rows: a compute-bound GEMM, where oneDNN's packed one is taken
_TRANSPOSED_MAX_ROWS = 3  # measured: the transposed layout loses from 4 rows on
# measured: torch's int8 and int4 weight-only kernels lose to oneDNN bf16 from 8 rows
_QUANT_MAX_ROWS = 4
_INT4_KERNEL = hasattr(torch, "_weight_int4pack_mm_for_cpu")  # torch >= 2.6
_PLANS: dict[tuple[int, int, torch.dtype, bool, int], Way] = {}  # shared by equal shapes
_TUNINGS = [0]


def tunings() -> int:
    """How many (shape, row-count) plans have been timed so far in this process.

    A forward during which this grew took longer than it will again: latency models
    (the engine's) skip such measurements.
    """
    return _TUNINGS[0]


def _bucket(rows: int) -> int:
    """Row counts that share a tuned way: 1..8 exactly, then 16 and 32."""
    return rows if rows <= 8 else 1 << (rows - 1).bit_length()


_ONEDNN = bool(torch.backends.mkldnn.is_available())  # type: ignore[no-untyped-call]
_ONEDNN_BF16 = _ONEDNN and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _packable(dtype: torch.dtype) -> bool:
    return (_ONEDNN and dtype == torch.float32) or (_ONEDNN_BF16 and dtype == torch.bfloat16)


class FastLinear(nn.Module):
    """A drop-in ``nn.Linear`` for CPU inference that picks its kernel per row count.

    Parameters
    ----------
    linear : nn.Linear
        The layer to wrap; its ``weight`` (out, in) and ``bias`` (out,) Parameters are
        shared, not copied.
    transposed_copy : bool
        Allow, for large weights, a contiguous (in, out) copy that streams 1-3 rows fastest
        (one more weight's worth of memory while a plan uses it).

    ``forward(x)``: (..., in) -> (..., out) in x's dtype, like ``F.linear``; x is cast to
    the weight's dtype first, so bfloat16 weights serve a float32 model (the draft of
    :func:`~adaspec.models.make_draft`). With autograd recording, on a non-CPU device, or
    for dtypes oneDNN does not take (float64), it is ``F.linear``.
    The packed oneDNN copy of the weight (the same size again) is made on first use and
    rebuilt when the weight changes in place.
    """

    def __init__(self, linear: nn.Linear, *, transposed_copy: bool = True) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.transposed_copy = transposed_copy
        self._copies: dict[str, Tensor] = {}
        self._source: tuple[int, torch.dtype, int, int] | None = None  # what _copies are of
        self._chosen: dict[int, Way] = {}  # rows (<= _MAX_TUNED_ROWS) -> way, for this weight

    def __getstate__(self) -> dict[str, object]:
        state = dict(super().__getstate__())  # type: ignore[no-untyped-call]
        state["_copies"], state["_source"] = {}, None  # copies are rebuilt on first use
        state["_chosen"] = {}
        return state

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if (
            w.device.type != "cpu"
            or not _packable(w.dtype)
            or not x.dtype.is_floating_point
            or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            # a weight made under torch.inference_mode() has no version counter: its
            # in-place edits could not be seen, so no copy of it is kept
            or w.is_inference()
        ):
            if not x.dtype.is_floating_point:
                return F.linear(x, w, self.bias)  # torch's own error for integer inputs
            return F.linear(x.to(w.dtype), w, self.bias).to(x.dtype)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must end in {self.in_features} features, got {tuple(x.shape)}")
        source = (id(w), w.dtype, w.data_ptr(), w._version)
        if source != self._source:  # a new, moved, cast or updated weight: copies are stale
            self._copies, self._source, self._chosen = {}, source, {}
        rows = x.numel() // max(x.shape[-1], 1)
        if rows == 0:  # (no packed copy for nothing: the engine's greedy forwards)
            return x.new_empty(*x.shape[:-1], self.out_features)
        way = self._chosen.get(rows)
        if way is None:
            way = self._plan(rows) if 0 < rows <= _MAX_TUNED_ROWS else "packed"
            if rows <= _MAX_TUNED_ROWS:
                self._chosen[rows] = way
        xw = x.to(w.dtype)  # bf16 weights: bf16 activations
        y = (
            self._packed(xw)
            if way == "packed"
            else self._linear(xw)
            if way == "linear"
            else self._ways()[way](xw)
        )
        return y.to(x.dtype)

    # the ways -----------------------------------------------------------------------

    def _ways(self) -> dict[Way, Callable[[Tensor], Tensor]]:
        return {
            "linear": self._linear,
            "packed": self._packed,
            "blocked": self._blocked,
            "transposed": self._transposed,
        }

    def _copy(self, name: str, make: Callable[[Tensor], Tensor]) -> Tensor:
        if name not in self._copies:
            self._copies[name] = make(self.weight.detach())
        return self._copies[name]

    def _linear(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def _packed(self, x: Tensor) -> Tensor:
        packed = self._copy("packed", torch.ops.mkldnn._reorder_linear_weight)
        out: Tensor = torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")
        return out

    def _blocked(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features).t()  # [in, M]
        out = torch.empty(self.out_features, flat.shape[1], dtype=x.dtype)  # [out, M]
        w = self.weight.detach()
        for start in range(0, self.out_features, _BLOCK):
            torch.mm(w[start : start + _BLOCK], flat, out=out[start : start + _BLOCK])
        y = out.t().reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def _transposed(self, x: Tensor) -> Tensor:
        wt = self._copy("transposed", lambda w: w.t().contiguous())  # [in, out]
        y = x @ wt
        return y if self.bias is None else y + self.bias

    # tuning -------------------------------------------------------------------------

    def _key(self, bucket: int) -> tuple[int, int, torch.dtype, bool, int]:
        large = self.weight.numel() >= _LARGE
        return (
            self.out_features,
            self.in_features,
            self.weight.dtype,
            large and self.transposed_copy,
            bucket,
        )

    def _plan(self, rows: int) -> Way:
        key = self._key(_bucket(rows))
        if key not in _PLANS:
            _PLANS[key] = self._fastest(key[4], self.weight.numel() >= _LARGE)
            _TUNINGS[0] += 1
            used = set(self.plan().values())
            for name in [n for n in self._copies if n not in used]:
                del self._copies[name]  # made while timing, not worth its memory
        return _PLANS[key]

    def _fastest(self, rows: int, large: bool) -> Way:
        candidates: list[Way] = ["linear", "packed"]
        if large:
            candidates.append("blocked")
            if self.transposed_copy and rows <= _TRANSPOSED_MAX_ROWS:
                candidates.append("transposed")
        x = torch.randn(rows, self.in_features, dtype=self.weight.dtype)
        ways = self._ways()
        best: tuple[float, Way] = (float("inf"), "linear")
        repeats = 2 if large else 5
        for name in candidates:
            try:
                ways[name](x)  # warm up (and make the copy)
            except RuntimeError:  # e.g. a oneDNN build without this dtype: not a candidate
                self._copies.pop(name, None)
                continue
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                ways[name](x)
                times.append(time.perf_counter() - start)
            best = min(best, (min(times), name))
        return best[1]

    def plan(self) -> dict[int, Way]:
        """The tuned way per row-count bucket so far, for layers of this shape and dtype."""
        mine = self._key(0)[:4]
        return {k[4]: way for k, way in _PLANS.items() if k[:4] == mine}


class _WeightOnlyLinear(nn.Module):
    """A linear layer with low-bit weights for drafts: a quantized kernel for a few rows.

    Decoding a few tokens on a CPU streams every weight once per forward, so fewer weight
    bytes is a quicker draft. Up to ``_QUANT_MAX_ROWS`` rows run torch's weight-only
    kernel of the subclass (bfloat16 activations); more rows, where those kernels lose to
    oneDNN, run a :class:`FastLinear` over the dequantized weights in bfloat16 (kept
    beside the quantized ones, with oneDNN's packed copy once more rows run). Both compute
    with the same quantized weights, up to bfloat16 rounding of the dequantized copy, so a
    token's logits may differ in the last bits with the number of tokens forwarded
    alongside it (harmless in a draft: verification is exact). Off the CPU, or with
    autograd recording, it runs ``F.linear`` on the dequantized weights.
    """

    def __init__(self, linear: nn.Linear, dequantized: Tensor, kernel: bool) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        with torch.no_grad():
            dense = nn.Linear(
                self.in_features,
                self.out_features,
                bias=linear.bias is not None,
                dtype=torch.bfloat16,
                device=dequantized.device,
            )
            dense.weight.copy_(dequantized)
            if linear.bias is not None and dense.bias is not None:
                dense.bias.copy_(linear.bias.detach())
        dense.requires_grad_(False)
        self.dense = FastLinear(dense)
        self._kernel = kernel

    def _matmul(self, x: Tensor) -> Tensor:
        """(rows, in) bfloat16 -> (rows, out) bfloat16 with the quantized weights."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must end in {self.in_features} features, got {tuple(x.shape)}")
        rows = x.numel() // max(x.shape[-1], 1)
        if (
            self._kernel
            and 0 < rows <= _QUANT_MAX_ROWS
            and x.device.type == "cpu"
            and x.dtype.is_floating_point
            and not (torch.is_grad_enabled() and x.requires_grad)
        ):
            y = self._matmul(x.reshape(rows, self.in_features).to(torch.bfloat16).contiguous())
            if self.dense.bias is not None:
                y = y + self.dense.bias
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        out: Tensor = self.dense(x)
        return out


def _check_linear(linear: object) -> nn.Linear:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
    return linear


def _int8_quantize(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Symmetric int8 per output channel: (q (out, in) int8, scales (out,) bfloat16,
    the dequantized weights (out, in) float32)."""
    w = weight.detach().float()
    scales = (w.abs().amax(1) / 127).clamp(min=1e-12).to(torch.bfloat16)  # [out]
    q = (w / scales.float().unsqueeze(1)).round().clamp(-127, 127).to(torch.int8)
    return q, scales, q.float() * scales.float().unsqueeze(1)


def _int4_quantize(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric int4 per group of ``group_size`` inputs (min/max grid), as torch's int4
    CPU kernel reads it, ``w = (q - 8) * scale + zero``: (q (out, in) int32 in [0, 15],
    scales and zeros (in / group_size, out, 2) bfloat16, the dequantized weights (out, in)
    float32, bfloat16 rounding of scale and zero included)."""
    out_f, in_f = weight.shape
    w = weight.detach().float().reshape(out_f, in_f // group_size, group_size)  # [O, G, g]
    low, high = w.amin(-1), w.amax(-1)  # [O, G]
    scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    q = ((w - low.unsqueeze(-1)) / scale.unsqueeze(-1)).round().clamp(0, 15)  # [O, G, g]
    scale_zero = torch.stack([scale, low + 8 * scale], -1).to(torch.bfloat16)  # [O, G, 2]
    s, z = scale_zero.float().unbind(-1)
    dequantized = (q - 8) * s.unsqueeze(-1) + z.unsqueeze(-1)
    return (
        q.reshape(out_f, in_f).to(torch.int32),
        scale_zero.transpose(0, 1).contiguous(),
        dequantized.reshape(out_f, in_f),
    )


class Int8Linear(_WeightOnlyLinear):
    """A linear layer with int8 weights, one bfloat16 scale per output channel (for drafts).

    int8 halves the bytes streamed per forward of bfloat16. Up to 4 rows run
    ``torch._weight_int8pack_mm`` (layers whose sizes are multiples of 32), more rows a
    bfloat16 :class:`FastLinear` over the dequantized weights (see ``_WeightOnlyLinear``).

    Parameters
    ----------
    linear : nn.Linear
        The layer to quantize (symmetric, per output channel: scale = max |w| / 127); it is
        not modified.

    ``forward(x)``: (..., in) -> (..., out) in x's dtype.

    Example
    -------
    >>> torch.manual_seed(0) and None
    >>> lin = nn.Linear(64, 32)
    >>> q = Int8Linear(lin)
    >>> q.qweight.dtype, tuple(q.scales.shape)
    (torch.int8, (32,))
    >>> x = torch.randn(2, 64)
    >>> with torch.no_grad():
    ...     err = (q(x) - lin(x)).abs().max() / lin(x).abs().max()
    >>> bool(err < 0.02)
    True
    """

    def __init__(self, linear: nn.Linear) -> None:
        linear = _check_linear(linear)
        with torch.no_grad():
            q, scales, dequantized = _int8_quantize(linear.weight)
        # torch's int8 kernel returns garbage for some shapes (e.g. 24 output channels):
        # it is used only where both sizes are multiples of 32, as in every shipped model
        kernel = linear.in_features % 32 == 0 and linear.out_features % 32 == 0
        super().__init__(linear, dequantized, kernel)
        self.qweight: Tensor
        self.scales: Tensor
        self.register_buffer("qweight", q)  # [out, in] int8
        self.register_buffer("scales", scales)  # [out] bfloat16

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"

    def _matmul(self, x: Tensor) -> Tensor:
        scales = self.scales.to(torch.bfloat16)  # (a no-op unless the module was cast)
        return torch._weight_int8pack_mm(x, self.qweight, scales)  # [rows, out]


class Int4Linear(_WeightOnlyLinear):
    """A linear layer with int4 weights, a bfloat16 scale and zero per group of inputs.

    Half the weight bytes of :class:`Int8Linear`. Weights dequantized from a 4-bit GGUF
    file with groups of 32, a scale and a minimum each (Q4_1, every layer of the shipped
    SmolLM2; not the symmetric Q4_0, whose groups need not span their grid) lie exactly on
    this grid, so the draft computes with the target's
    own weights, up to bfloat16 rounding of each group's scale and zero. Up to 4 rows
    run ``torch._weight_int4pack_mm_for_cpu``, more rows a bfloat16 :class:`FastLinear`
    over the dequantized weights.

    Parameters
    ----------
    linear : nn.Linear
        The layer to quantize (per group of ``group_size`` inputs: scale = (max - min) / 15,
        ``w = (q - 8) * scale + zero``, q in [0, 15]); it is not modified.
    group_size : int
        Inputs per group; ``linear.in_features`` must be a multiple of it.

    ``forward(x)``: (..., in) -> (..., out) in x's dtype.

    Example
    -------
    >>> torch.manual_seed(0) and None
    >>> lin = nn.Linear(64, 32)
    >>> q = Int4Linear(lin)
    >>> tuple(q.packed.shape), tuple(q.scales_and_zeros.shape)
    ((32, 32), (2, 32, 2))
    >>> x = torch.randn(2, 64)
    >>> with torch.no_grad():
    ...     err = (q(x) - lin(x)).abs().max() / lin(x).abs().max()
    >>> bool(err < 0.1)
    True
    """

    def __init__(self, linear: nn.Linear, group_size: int = 32) -> None:
        linear = _check_linear(linear)
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
        if linear.in_features % group_size:
            raise ValueError(
                f"linear.in_features ({linear.in_features}) must be a multiple of group_size "
                f"({group_size})"
            )
        with torch.no_grad():
            q, scale_zero, dequantized = _int4_quantize(linear.weight, group_size)
        # torch's CPU kernel (2.6 and later) packs two 4-bit values per byte in tiles of
        # 16 outputs and takes groups of 32-256 inputs; multiples of 32 outputs were tested
        # here, as for the int8 kernel. Other shapes run the dense bfloat16 copy only
        kernel = (
            _INT4_KERNEL
            and linear.out_features % 32 == 0
            and linear.in_features % 32 == 0
            and group_size in (32, 64, 128, 256)
            and q.device.type == "cpu"
        )
        super().__init__(linear, dequantized, kernel)
        self.group_size = group_size
        packed = (
            torch._convert_weight_to_int4pack_for_cpu(q, 1)
            if kernel
            else torch.zeros(0, dtype=torch.uint8)
        )
        self.packed: Tensor
        self.scales_and_zeros: Tensor
        self.register_buffer("packed", packed)  # [out, in / 2] uint8 (kernel layout)
        self.register_buffer("scales_and_zeros", scale_zero)  # [in / group, out, 2] bfloat16

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"int4 weights, group_size={self.group_size}"
        )

    def _matmul(self, x: Tensor) -> Tensor:
        return torch._weight_int4pack_mm_for_cpu(
            x, self.packed, self.group_size, self.scales_and_zeros.to(torch.bfloat16)
        )  # [rows, out]


def optimize_for_cpu(model: nn.Module, *, transposed_copy: bool = True) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` by a :class:`FastLinear`, in place.

    Parameters
    ----------
    model : nn.Module
        A model on CPU (float32 or bfloat16 linears benefit; others run ``F.linear``).
    transposed_copy : bool
        Passed to each FastLinear (large output layers may keep a transposed copy).

    Returns
    -------
    nn.Module
        The same model. Memory: every linear weight gains a packed copy of the same size
        (and a large output layer possibly a transposed one).

    Example
    -------
    >>> from adaspec.models import tiny_model
    >>> model = tiny_model(seed=0)
    >>> ids = torch.tensor([[1, 2, 3]])
    >>> with torch.no_grad():
    ...     before = model(ids).logits
    ...     after = optimize_for_cpu(model)(ids).logits
    >>> type(model.lm_head).__name__, torch.allclose(before, after, atol=1e-5)
    ('FastLinear', True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    devices = {p.device.type for p in model.parameters()}
    if devices - {"cpu"}:
        raise ValueError(f"model must be on the CPU, got parameters on {sorted(devices)}")
    return wrap_linears(model, transposed_copy=transposed_copy)


def wrap_linears(model: nn.Module, *, transposed_copy: bool = True) -> nn.Module:
    """:func:`optimize_for_cpu` without the device check (off the CPU a FastLinear is
    ``F.linear`` with a cast to the weight's dtype, which a bfloat16-weight draft needs)."""
    for name, child in list(model.named_children()):
        if type(child) is nn.Linear:
            setattr(model, name, FastLinear(child, transposed_copy=transposed_copy))
        else:
            wrap_linears(child, transposed_copy=transposed_copy)
    return model


def int8_linears(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` by an :class:`Int8Linear`, in place.

    Tied weights are untied (each layer keeps its own int8 copy). Returns the same model.
    """
    for name, child in list(model.named_children()):
        if type(child) is nn.Linear:
            setattr(model, name, Int8Linear(child))
        else:
            int8_linears(child)
    return model


def int4_linears(model: nn.Module, group_size: int = 32) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` by an :class:`Int4Linear` where int4 groups
    hold its weights at least as accurately as int8 per channel, else by an
    :class:`Int8Linear`, in place.

    Weights dequantized from 4-bit groups with a scale and a minimum (Q4_1 GGUF files) are
    exact in int4 and take it; 5- to 8-bit ones (Q5_0, Q8_0: Gemma-3's most layers, both
    shipped output layers) and Q4_0 / Q4_K ones (whose groups need not span a min/max
    grid) are closer in int8 and keep it. The comparison is the mean squared error of the
    dequantized weights, bfloat16 rounding of scales and zeros included. Without torch's
    int4 CPU kernel (torch < 2.6) every layer takes int8. Tied weights are untied.
    Returns the same model.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    for name, child in list(model.named_children()):
        if type(child) is nn.Linear:
            setattr(model, name, _lower_bits(child, group_size))
        else:
            int4_linears(child, group_size)
    return model


def _lower_bits(linear: nn.Linear, group_size: int) -> nn.Module:
    """The int4 layer when it is at least as accurate as the int8 one, else the int8 one."""
    if not _INT4_KERNEL or linear.in_features % group_size:
        return Int8Linear(linear)
    w = linear.weight.detach().float()
    with torch.no_grad():
        int4 = _int4_quantize(w, group_size)[2]
        int8 = _int8_quantize(w)[2]
    if float((int4 - w).square().mean()) <= float((int8 - w).square().mean()):
        return Int4Linear(linear, group_size)
    return Int8Linear(linear)


def plain_linears(model: nn.Module) -> nn.Module:
    """Undo :func:`optimize_for_cpu` in place: every FastLinear back to an ``nn.Linear``.

    The parameters are shared, not copied. Returns the same model.
    """
    for name, child in list(model.named_children()):
        if isinstance(child, FastLinear):
            linear = nn.Linear(
                child.in_features, child.out_features, bias=child.bias is not None, device="meta"
            )
            linear.weight = child.weight
            linear.bias = child.bias
            setattr(model, name, linear)
        else:
            plain_linears(child)
    return model

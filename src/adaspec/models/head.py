"""The output projection (LM head) of a causal LM, computed the fastest way for each row count.

On a CPU the LM head of a small model with a large vocabulary dominates a forward: Gemma-3
270M's is a 262,144 x 640 float32 matrix (670 MB) that a decode step streams through once.
How fast the BLAS streams it depends on the row count M (tree nodes x requests) in ways
the library cannot know in advance. On the 2-core CI machines, one ``F.linear`` of M = 1
row takes 57 ms, M = 2 takes 130 ms and M = 4 takes 105 ms, while a contiguous transposed
copy gives 30 ms for M = 1 and the vocabulary cut in 4,096-row blocks gives 34 ms for M = 2
and 44 ms for M = 4 (``benchmarks/bench_models.py --head``). A tree forward of a handful of
nodes then costs barely more than a single-token decode, which is what speculation needs.

:func:`output_head` wraps a model's head as an :class:`OutputHead` that times the candidate
ways once per row-count bucket (on first use, a few passes over the weight) and then always
uses the fastest. Every way computes the same dot products (only the float summation order
differs, ~1e-6 relative). On CUDA it is plain ``F.linear``.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["OutputHead", "output_head"]

Way = Literal["linear", "blocked", "transposed"]

_BLOCK = 4096  # vocabulary rows per block of the "blocked" way
_TUNE_MIN_ELEMENTS = 1 << 22  # smaller heads are cheap: always F.linear
_TUNE_MAX_ROWS = 64  # more rows: a GEMM is compute bound and F.linear is as good as any
_TRANSPOSED_MAX_ROWS = 3  # measured: the transposed layout loses from 4 rows on
_HEADS: weakref.WeakKeyDictionary[nn.Module, OutputHead] = weakref.WeakKeyDictionary()


def _bucket(rows: int) -> int:
    """Row counts that share a tuned way: 1..8 exactly, then powers of two."""
    return rows if rows <= 8 else 1 << (rows - 1).bit_length()


class OutputHead:
    """``logits = softcap(hidden @ weight.T + bias)``, the fastest measured way per row count.

    Parameters
    ----------
    weight : Tensor
        (V, H) the output embedding (shared with the model, never copied unless
        ``transposed_copy``).
    bias : Tensor, optional
        (V,).
    softcap : float, optional
        Gemma-2 style final logit soft-capping ``c * tanh(logits / c)``.
    transposed_copy : bool
        Allow the ``"transposed"`` way, which keeps a contiguous (H, V) copy of the weight
        (one more weight's worth of memory) because it streams fastest for 1-3 rows on CPU.
    tune : bool
        Time the ways per row-count bucket; False (the default on CUDA) always uses
        ``F.linear``.

    ``__call__(hidden)``: (..., H) -> (..., V) in the weight's dtype.
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None = None,
        softcap: float | None = None,
        *,
        transposed_copy: bool = True,
        tune: bool = True,
    ) -> None:
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError(f"weight must be a (V, H) tensor, got {type(weight).__name__}")
        self.weight = weight
        self.bias = bias
        self.softcap = softcap
        self.transposed_copy = transposed_copy
        self.tune = tune and weight.device.type == "cpu" and weight.numel() >= _TUNE_MIN_ELEMENTS
        self.plan: dict[int, Way] = {}  # row-count bucket -> chosen way
        self._transposed: Tensor | None = None
        self._version = weight._version

    def __call__(self, hidden: Tensor) -> Tensor:
        V, H = self.weight.shape
        if hidden.shape[-1] != H:
            raise ValueError(f"hidden must end in {H} features, got {tuple(hidden.shape)}")
        if self.weight._version != self._version:  # updated in place: the copy is stale
            self._transposed, self.plan, self._version = None, {}, self.weight._version
        x = hidden.reshape(-1, H).to(self.weight.dtype)
        logits = self._way(x.shape[0])(x)
        if self.bias is not None:
            logits = logits + self.bias
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.reshape(*hidden.shape[:-1], V)

    def _way(self, rows: int) -> Callable[[Tensor], Tensor]:
        if not self.tune or rows == 0 or rows > _TUNE_MAX_ROWS:
            return self._linear
        bucket = _bucket(rows)
        if bucket not in self.plan:
            self.plan[bucket] = self._fastest(bucket)
            if "transposed" not in self.plan.values():
                self._transposed = None  # built while timing, not worth its memory
        return self._ways()[self.plan[bucket]]

    def _ways(self) -> dict[Way, Callable[[Tensor], Tensor]]:
        return {"linear": self._linear, "blocked": self._blocked, "transposed": self._by_copy}

    def _fastest(self, rows: int) -> Way:
        candidates: list[Way] = ["linear", "blocked"]
        if self.transposed_copy and rows <= _TRANSPOSED_MAX_ROWS:
            candidates.append("transposed")
        x = torch.randn(rows, self.weight.shape[1], dtype=self.weight.dtype)
        ways = self._ways()
        best: tuple[float, Way] = (float("inf"), "linear")
        for name in candidates:
            ways[name](x)  # warm (and build the copy)
            elapsed = []
            for _ in range(2):
                start = time.perf_counter()
                ways[name](x)
                elapsed.append(time.perf_counter() - start)
            best = min(best, (min(elapsed), name))
        return best[1]

    def _linear(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def _blocked(self, x: Tensor) -> Tensor:
        V = self.weight.shape[0]
        out = torch.empty(V, x.shape[0], dtype=x.dtype, device=x.device)  # [V, M]
        xt = x.t()
        for start in range(0, V, _BLOCK):
            torch.mm(self.weight[start : start + _BLOCK], xt, out=out[start : start + _BLOCK])
        return out.t()

    def _by_copy(self, x: Tensor) -> Tensor:
        if self._transposed is None:
            self._transposed = self.weight.detach().t().contiguous()  # [H, V]
        return x @ self._transposed


def _plain_head(model: nn.Module) -> tuple[nn.Linear, float | None] | None:
    """The model's output Linear and soft-cap when its forward is decoder -> Linear only."""
    get_out = getattr(model, "get_output_embeddings", None)
    get_dec = getattr(model, "get_decoder", None)
    if get_out is None or get_dec is None:
        return None
    head = get_out()
    if type(head) is not nn.Linear:  # quantized or otherwise special heads run as they are
        return None
    config: Any = model.config
    for scale in ("logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(config, scale, None) not in (None, 1, 1.0):
            return None
    softcap = getattr(config, "final_logit_softcapping", None)
    return head, float(softcap) if softcap is not None else None


def output_head(model: nn.Module, *, transposed_copy: bool | None = None) -> OutputHead | None:
    """The :class:`OutputHead` adaspec uses for ``model`` (made on first call, then reused).

    Returns None when the model's forward is not "decoder, then a plain ``nn.Linear``"
    (e.g. a dynamically quantized head): the adapter then runs the model's own forward.
    ``transposed_copy`` (default True) allows the extra (H, V) copy on CPU; passing it
    rebuilds the head with that setting.

    Example
    -------
    >>> from adaspec.models import tiny_model
    >>> model = tiny_model(seed=0)
    >>> head = output_head(model)
    >>> hidden = torch.randn(3, model.config.hidden_size)
    >>> torch.allclose(head(hidden), model.lm_head(hidden))
    True
    """
    head = _HEADS.get(model)
    plain = _plain_head(model)
    if plain is None:
        return None
    linear, softcap = plain
    if (
        head is None
        or head.weight is not linear.weight
        or (transposed_copy is not None and transposed_copy != head.transposed_copy)
    ):
        head = OutputHead(
            linear.weight,
            linear.bias,
            softcap,
            transposed_copy=True if transposed_copy is None else transposed_copy,
        )
        _HEADS[model] = head
    return head

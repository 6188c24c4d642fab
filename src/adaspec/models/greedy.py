"""The exact greedy choice of a float32 output layer, from a bfloat16 pass and an error bound.

Greedy verification reads one number per node of a tree: the argmax of the target's logits.
Computing every logit in float32 is most of a small model's forward on a CPU (Gemma-3
270M's 262,144 x 640 output layer is 36-52 % of a target forward at 1-32 requests), and
a bfloat16 pass streams half the bytes. Its logits are off by up to about 0.2, which
would change the argmax at near-ties, so :class:`GreedyHead` bounds that error rigorously
per row, keeps every token whose bfloat16 logit lies within the bound of the best, and
recomputes those few in float32 (a median of 1 and at most 10 tokens per row on real Gemma
decoding). The token chosen is the argmax of the float32 logits (ties: the lowest id), as
for the full projection, up to float32 summation order: two float32 kernels may already
disagree on a tie within ~1e-6 relative, as any two BLAS libraries do.

The bound, for a row h and a token's weights w (h', w': their bfloat16 roundings; V
tokens of H features; u = 2^-8 the unit roundoff of bfloat16, g = 2H * 2^-24 that of a
float32 sum of H products)::

    |h.w - h'.w'| <= |h - h'| |w| + |h'| |w - w'| + g |h'| |w'|          (= C, Cauchy-Schwarz)
    |y - h'.w'|   <= u / (1 - u) |y|      y: the bfloat16 output         (= r |y|)

so every logit z = h.w lies within r |y| + C of its proxy y. With T the largest proxy,
L = T - r |T| - C is at most the best logit, and a token can reach L only if
y >= L - (r |L| + C) / (1 - r): those are the candidates. The bound uses each row's norms
and the largest weight norms, and is widened further by the float32 error of the exact
recomputation and of the reference logits themselves.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["GreedyHead", "greedy_head"]

_U = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
_U32 = 2.0**-24  # of float32
_CHUNK = 1024  # vocabulary slice whose maximum screens it for candidates
_MAX_CANDIDATES = 4096  # more in a row: project it in full (recomputing one costs ~3 us)


def finite_argmax(logits: Tensor) -> Tensor:
    """(..., V) -> (...) int64 each row's argmax (ties: the lowest id); -1 for a row with a
    NaN or +inf, or all -inf (no token can be chosen)."""
    top, best = logits.max(-1)
    bad = torch.isnan(logits).any(-1) | ~torch.isfinite(top)
    return best.masked_fill(bad, -1)


class GreedyHead:
    """Exact argmax of ``hidden @ weight.T`` for a float32 (V, H) weight, via bfloat16.

    Parameters
    ----------
    weight : Tensor
        (V, H) float32 output-layer weights (no bias), finite. Read once: the bfloat16 copy
        and the norms are made here (a changed weight needs a new GreedyHead;
        :func:`greedy_head` rebuilds its cached one when the weight changes).
    project : callable, optional
        (M, H) float32 -> (M, V) float32 logits, for the rare row with too many candidates
        to recompute one by one (a nearly flat row, or a hidden state of unusual norm: the
        bound grows with it): the layer itself, whose kernels stream a few rows quicker
        than ``hidden @ weight.T`` does. Default: that product.

    ``head(hidden)``: (..., H) float -> (...) int64, the index of each row's largest logit
    (ties: the lowest); -1 for a row that is not finite.

    Attributes
    ----------
    rows, candidates, full_rows : int
        Rows chosen so far, float32 logits recomputed for them, rows projected in full.

    Example
    -------
    >>> torch.manual_seed(0) and None
    >>> w = torch.randn(5000, 64)
    >>> h = torch.randn(3, 64)
    >>> head = GreedyHead(w)
    >>> bool(torch.equal(head(h), (h @ w.T).argmax(-1)))
    True
    """

    def __init__(self, weight: Tensor, project: Callable[[Tensor], Tensor] | None = None) -> None:
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise TypeError("weight must be a 2-D torch.Tensor of shape (V, H)")
        if weight.dtype != torch.float32:
            raise TypeError(f"weight must be float32, got {weight.dtype}")
        from adaspec.models.fast import FastLinear

        with torch.no_grad():
            w = weight.detach()
            if not bool(torch.isfinite(w).all()):
                raise ValueError("weight must be finite")
            self.weight = w  # [V, H] float32, shared with the model
            self._project = project if project is not None else self._product
            V, H = w.shape
            # (made outside inference mode, the copy keeps a version counter and its
            # FastLinear its packed copies, when the head is built under inference mode)
            with torch.inference_mode(False):
                low = w.to(torch.bfloat16)
                lin = nn.Linear(H, V, bias=False, dtype=torch.bfloat16, device=w.device)
                lin.weight = nn.Parameter(low, requires_grad=False)
            self._proxy = FastLinear(lin)
            # (norms in float64: float32 ones of extreme weights under- or overflow)
            w_norm = w.double().norm(dim=1).max()
            low_norm = low.double().norm(dim=1).max()
            err_norm = (w.double() - low.double()).norm(dim=1).max()
            self._norms = (float(w_norm), float(low_norm), float(err_norm))
        self.rows = self.candidates = self.full_rows = 0

    def __call__(self, hidden: Tensor) -> Tensor:
        V, H = self.weight.shape
        if not isinstance(hidden, Tensor) or not hidden.dtype.is_floating_point:
            raise TypeError("hidden must be a floating torch.Tensor of shape (..., H)")
        if hidden.shape[-1] != H:
            raise ValueError(f"hidden must end in {H} features, got {tuple(hidden.shape)}")
        lead = hidden.shape[:-1]
        x = hidden.detach().reshape(-1, H).float()  # [M, H]
        M = x.shape[0]
        out = torch.full((M,), -1, dtype=torch.int64, device=x.device)
        if M == 0:
            return out.reshape(lead)
        with torch.no_grad():
            finite = torch.isfinite(x).all(1)  # [M]
            x = torch.where(finite.unsqueeze(1), x, 0.0)
            low = x.to(torch.bfloat16)
            y = self._proxy(low)  # [M, V] bfloat16
            # each chunk's maximum screens it: candidates lie in chunks that reach the bar
            pad = (-V) % _CHUNK
            padded = torch.nn.functional.pad(y, (0, pad), value=float("-inf")) if pad else y
            chunk_max = padded.view(M, -1, _CHUNK).amax(2).double()  # [M, V / CHUNK]
            top = chunk_max.amax(1)  # [M]
            bar = self._bar(x, low, top)  # [M] float64
            rows, chunks = (chunk_max >= bar.unsqueeze(1)).nonzero(as_tuple=True)
            block = padded.view(M, -1, _CHUNK)[rows, chunks].double()  # [B, CHUNK]
            b, offset = (block >= bar[rows].unsqueeze(1)).nonzero(as_tuple=True)
            cand_row = rows[b]
            cand_tok = chunks[b] * _CHUNK + offset  # [K]
            counts = torch.bincount(cand_row, minlength=M)
            # rows with too many candidates, or whose proxy or bound is not finite (an
            # overflow): projected in full
            full = (counts > _MAX_CANDIDATES) | ~torch.isfinite(bar)
            keep = ~full[cand_row] & (cand_tok < V)  # (never the last chunk's padding)
            cand_row, cand_tok = cand_row[keep], cand_tok[keep]
            exact = (self.weight[cand_tok] * x[cand_row]).sum(1)  # [K] float32
            best = torch.full((M,), float("-inf"), device=x.device)
            best = best.scatter_reduce(0, cand_row, exact, "amax")
            winner = torch.where(exact == best[cand_row], cand_tok, V)
            pick = torch.full((M,), V, dtype=torch.int64, device=x.device)
            pick = pick.scatter_reduce(0, cand_row, winner, "amin")
            # as for the full logits: no choice where the best logit is not finite
            pick = torch.where(torch.isfinite(best), pick, -1)
            if bool(full.any()):
                where = full.nonzero().squeeze(1)
                pick[where] = finite_argmax(self._project(x[where]).float())
            out = torch.where(finite, pick, out)
            self.rows += M
            self.candidates += int(cand_tok.numel())
            self.full_rows += int(full.sum())
        return out.reshape(lead)

    def _product(self, x: Tensor) -> Tensor:
        return x @ self.weight.T

    def _bar(self, x: Tensor, low: Tensor, top: Tensor) -> Tensor:
        """(M,) float64 the smallest bfloat16 logit a row's argmax can have (see the module
        doc), in float64: float32 norms of tiny or huge rows under- or overflow."""
        w_norm, low_norm, err_norm = self._norms
        H = x.shape[1]
        g = 2 * H * _U32 / (1 - 2 * H * _U32)
        xd, lowd = x.double(), low.double()
        x_norm, low_x, err_x = xd.norm(dim=1), lowd.norm(dim=1), (xd - lowd).norm(dim=1)
        # the proxy's error, and (2 g |x| |w|) the float32 error of the recomputed logits
        # and of the reference's own, so that near-ties are screened as the bound says
        c = err_x * w_norm + low_x * err_norm + g * low_x * low_norm + 2 * g * x_norm * w_norm
        c = c * (1 + 1e-3) + 1e-30  # (slack: this arithmetic's rounding, flushed denormals)
        r = _U / (1 - _U) * (1 + 1e-3)
        least = top - r * top.abs() - c
        bar: Tensor = least - (r * least.abs() + c) / (1 - r)
        return bar


_HEADS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, int, int], GreedyHead]] = (
    weakref.WeakKeyDictionary()
)


def greedy_head(module: nn.Module) -> GreedyHead | None:
    """The :class:`GreedyHead` of a model's output layer, made on first use and kept.

    Returns None where the shortcut does not apply: a layer that is not a linear one
    (``nn.Linear`` or :class:`~adaspec.models.fast.FastLinear`), has a bias, is not
    float32, is not on the CPU (the bound assumes float32 accumulation, which GPU
    bfloat16 GEMMs may reduce), or whose weight was made under ``torch.inference_mode()``
    (it keeps no version counter). The kept head is rebuilt when the weight is replaced or
    changed in place by a tracked operation (an edit through ``weight.data`` bypasses
    the version counter it checks, as it does for autograd).
    """
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    from adaspec.models.fast import FastLinear

    if (
        not isinstance(module, (nn.Linear, FastLinear))
        or not isinstance(weight, Tensor)
        or bias is not None
        or weight.dtype != torch.float32
        or weight.dim() != 2
        or weight.device.type != "cpu"
        or weight.is_inference()  # (no version counter: an in-place edit would go unseen)
    ):
        return None
    source = (id(weight), weight.data_ptr(), weight._version)
    kept = _HEADS.get(module)
    if kept is None or kept[0] != source:
        layer = weakref.ref(module)  # (a strong one would keep the key alive)

        def project(x: Tensor) -> Tensor:
            alive = layer()
            assert alive is not None  # (the head is only reached through its layer)
            out: Tensor = alive(x)
            return out

        kept = (source, GreedyHead(weight, project=project))
        _HEADS[module] = kept
    return kept[1]

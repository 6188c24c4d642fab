"""Step-latency model: seconds of a forward pass as a function of the tokens it processes."""

from __future__ import annotations

import bisect
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["LatencyModel"]

_DEFAULT_GRID = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048)


class LatencyModel:
    """Piecewise-linear latency over token counts, fitted online from measured steps.

    Token counts are grouped into buckets around a grid (1, 2, 4, ..., 2048 by default);
    each bucket keeps an exponential moving average of the token counts and seconds
    observed in it, and when one bucket's average moves by a factor, the others move by the
    same factor: costs of all sizes drift together as contexts grow or the machine gets
    busier, while only the sizes in use are measured. A sample more than 3x away from its
    bucket's average counts as a 3x one (a stalled forward should not swing the plan). :meth:`predict` interpolates linearly between the bucket averages,
    made non-decreasing, and extrapolates past the last bucket with the last segment's
    slope (or proportionally, with a single bucket). AdaServe profiles the target the same
    way (a table of verified tokens -> latency, interpolated).

    Args:
        grid: ascending token counts that centre the buckets.
        decay: weight of a new observation in its bucket's moving average (0 < decay <= 1).
    """

    def __init__(self, grid: Iterable[int] = _DEFAULT_GRID, decay: float = 0.3) -> None:
        self.grid = sorted({int(g) for g in grid})
        if not self.grid or self.grid[0] < 1:
            raise ValueError(f"grid must hold token counts >= 1, got {self.grid}")
        if not 0 < decay <= 1:
            raise ValueError(f"decay must lie in (0, 1], got {decay}")
        self.decay = decay
        self._tokens: dict[int, float] = {}
        self._seconds: dict[int, float] = {}
        self._fit: tuple[list[float], list[float]] | None = None

    def _bucket(self, tokens: float) -> int:
        i = bisect.bisect_left(self.grid, tokens)
        if i == len(self.grid):
            return len(self.grid) - 1
        if i > 0 and tokens - self.grid[i - 1] < self.grid[i] - tokens:
            return i - 1
        return i

    @property
    def observed(self) -> bool:
        """Whether any step has been observed."""
        return bool(self._seconds)

    def observe(self, tokens: int, seconds: float) -> None:
        """Record one measured forward of ``tokens`` tokens that took ``seconds``."""
        if tokens < 1 or not seconds >= 0:
            raise ValueError(f"need tokens >= 1 and seconds >= 0, got {tokens}, {seconds}")
        b = self._bucket(tokens)
        if b in self._seconds:
            a = self.decay
            old = self._seconds[b]
            # one stalled forward (first use of a shape, a busy machine) moves the average
            # at most as much as a 3x sample would
            seconds = min(max(seconds, old / 3), 3 * old)
            self._tokens[b] = (1 - a) * self._tokens[b] + a * tokens
            self._seconds[b] = (1 - a) * old + a * seconds
            if old > 0:
                # forwards of every size drift together (longer contexts, more requests,
                # a busier machine): the buckets not measured now follow this one's change
                ratio = self._seconds[b] / old
                for k in self._seconds:
                    if k != b:
                        self._seconds[k] *= ratio
        else:
            self._tokens[b] = float(tokens)
            self._seconds[b] = float(seconds)
        self._fit = None

    def _points(self) -> tuple[list[float], list[float]]:
        if self._fit is None:
            keys = sorted(self._seconds)
            xs = [self._tokens[k] for k in keys]
            ys: list[float] = []
            for k in keys:  # a forward of more tokens never costs less
                ys.append(max(self._seconds[k], ys[-1] if ys else 0.0))
            self._fit = (xs, ys)
        return self._fit

    def predict(self, tokens: float | Tensor) -> Tensor:
        """Predicted seconds for each token count (float64 tensor of the same shape)."""
        if not self.observed:
            raise ValueError("the latency model has no observations yet; call observe() first")
        xs_l, ys_l = self._points()
        t = torch.as_tensor(tokens, dtype=torch.float64)
        xs = torch.tensor(xs_l, dtype=torch.float64)
        ys = torch.tensor(ys_l, dtype=torch.float64)
        if len(xs_l) == 1:
            return ys[0] * t.clamp(min=1) / xs[0] if xs_l[0] > 0 else ys[0].expand_as(t)
        i = torch.searchsorted(xs, t.contiguous()).clamp(1, len(xs_l) - 1)  # right end of segment
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        slope = (y1 - y0) / (x1 - x0).clamp(min=1e-9)
        out = y0 + slope * (t - x0)
        # below the first point: never less than 0; between points: the interpolation
        return out.clamp(min=0.0)

    def state_dict(self) -> dict[str, object]:
        return {
            "grid": list(self.grid),
            "decay": self.decay,
            "tokens": dict(self._tokens),
            "seconds": dict(self._seconds),
        }

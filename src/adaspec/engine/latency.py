"""Step-latency model: seconds of a forward pass as a function of the tokens it processes."""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["LatencyModel"]

_DEFAULT_GRID = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048)


def _interpolate(t: float, xs: list[float], ys: list[float]) -> float:
    """:meth:`LatencyModel.predict` of one token count, in the same float64 arithmetic."""
    if len(xs) == 1:
        return ys[0] * max(t, 1.0) / xs[0] if xs[0] > 0 else ys[0]
    i = min(max(bisect.bisect_left(xs, t), 1), len(xs) - 1)  # right end of the segment
    slope = (ys[i] - ys[i - 1]) / max(xs[i] - xs[i - 1], 1e-9)
    return max(ys[i - 1] + slope * (t - xs[i - 1]), 0.0)


class LatencyModel:
    """Piecewise-linear latency over token counts, fitted online from measured steps.

    Token counts are grouped into buckets around a grid (1, 2, 4, ..., 2048 by default);
    each bucket keeps its last ``window`` samples and stands for their mean token count and
    the lower median of their seconds: one stalled forward (first use of a shape, a busy
    neighbour) moves nothing, as long as most recent samples are normal. (A moving average
    moved 1.6x on one 3x stall; on a draft that is timed only while speculating, the plan
    then decoded plainly and never re-measured it.) When one bucket's median moves by a
    factor, the buckets not measured in the last ``4 * window`` observations move with it
    (by the mean log-change of the buckets in use): costs of all sizes drift together as
    contexts grow or the machine gets busier, while only the sizes in use are measured.
    (Buckets in use keep their own measurements: at batch 16 the first verifications of
    32 tokens took 4x the warm-up's single-prompt forward, and moving the plain steps'
    bucket along priced plain decoding at half its speed.)
    :meth:`predict` interpolates linearly between the buckets, made non-decreasing, and
    extrapolates past the last bucket with the last segment's slope (or proportionally,
    with a single bucket); ``predict(n, best=True)`` does the same over the lowest value
    each bucket has stood for so far: an optimistic price, for exploring a forward that
    has not run lately (a draft timed during a stall, and used only when it looks cheap,
    is otherwise never timed again; a bucket a workload rarely reaches keeps a stall's
    samples: after a burst of busy neighbours, Gemma's 16-token verifications stood at
    530 ms for the rest of a run, against ~100, and priced every chain past 7 levels
    out). AdaServe profiles the target the same way (a table of verified tokens ->
    latency, interpolated).

    Args:
        grid: ascending token counts that centre the buckets.
        window: recent samples each bucket keeps (>= 1; 1 follows the last sample).

    Example:
        >>> lat = LatencyModel()
        >>> for seconds in (0.020, 0.021, 0.090, 0.019):  # one stalled forward
        ...     lat.observe(1, seconds)
        >>> lat.observe(16, 0.040)
        >>> round(float(lat.predict(1)), 3), round(float(lat.predict(8.5)), 3)
        (0.02, 0.03)
    """

    def __init__(self, grid: Iterable[int] = _DEFAULT_GRID, window: int = 5) -> None:
        self.grid = sorted({int(g) for g in grid})
        if not self.grid or self.grid[0] < 1:
            raise ValueError(f"grid must hold token counts >= 1, got {self.grid}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        self.window = window
        self._samples: dict[int, deque[tuple[float, float]]] = {}  # bucket -> (tokens, s)
        self._observations = 0
        self._last: dict[int, int] = {}  # bucket -> the observation that last measured it
        self._best: dict[int, float] = {}  # bucket -> the lowest seconds it has stood for
        self._fits: dict[bool, tuple[list[float], list[float]]] = {}  # best -> points

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
        return bool(self._samples)

    def _seconds(self, b: int) -> float:
        """The lower median of bucket ``b``'s samples (of two, the quicker)."""
        times = sorted(s for _, s in self._samples[b])
        return times[(len(times) - 1) // 2]

    def observe(self, tokens: int, seconds: float) -> None:
        """Record one measured forward of ``tokens`` tokens that took ``seconds``."""
        if tokens < 1 or not 0 <= seconds < math.inf:
            raise ValueError(f"need tokens >= 1 and finite seconds >= 0, got {tokens}, {seconds}")
        b = self._bucket(tokens)
        samples = self._samples.setdefault(b, deque(maxlen=self.window))
        old = self._seconds(b) if samples else 0.0
        samples.append((float(tokens), float(seconds)))
        self._observations += 1
        stale = self._observations - 4 * self.window  # last measured at or before: stale
        was_stale = self._last.get(b, 0) <= stale
        self._last[b] = self._observations
        new = self._seconds(b)
        self._best[b] = min(self._best.get(b, math.inf), new)
        if old > 0 and new != old and not was_stale:
            # forwards of every size drift together (longer contexts, more requests, a
            # busier machine): the buckets not measured lately follow the buckets in use,
            # each in-use bucket's change weighing 1 / (buckets in use) in log space (a
            # shared drift reaches them once, not once per bucket in use). A bucket back
            # from staleness is corrected by its own samples and moves no other
            in_use = sum(1 for k in self._samples if self._last[k] > stale)
            factor = (new / old) ** (1 / in_use)
            for k, other in self._samples.items():
                if self._last[k] <= stale:
                    self._samples[k] = deque(((t, s * factor) for t, s in other), other.maxlen)
        self._fits.clear()

    def _points(self, best: bool) -> tuple[list[float], list[float]]:
        if best not in self._fits:
            keys = sorted(self._samples)
            xs = [sum(t for t, _ in self._samples[k]) / len(self._samples[k]) for k in keys]
            ys: list[float] = []
            for k in keys:
                seconds = self._seconds(k)
                if best:
                    seconds = min(self._best.get(k, math.inf), seconds)
                # a forward of more tokens never costs less (not "nor more per token": the
                # buckets mix plain steps and tree forwards, whose costs per token differ)
                ys.append(max(seconds, ys[-1]) if ys else seconds)
            self._fits[best] = (xs, ys)
        return self._fits[best]

    def predict(self, tokens: float | Tensor, *, best: bool = False) -> Tensor:
        """Predicted seconds for each token count (float64 tensor of the same shape); with
        ``best``, from the lowest value each bucket has stood for."""
        if not self.observed:
            raise ValueError("the latency model has no observations yet; call observe() first")
        xs_l, ys_l = self._points(best)
        if not isinstance(tokens, Tensor):  # one count (most calls): plain floats, the same
            return torch.tensor(_interpolate(float(tokens), xs_l, ys_l), dtype=torch.float64)
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
        """The grid, window, every bucket's samples and the lowest seconds each bucket has
        stood for (plain numbers)."""
        return {
            "grid": list(self.grid),
            "window": self.window,
            "samples": {k: list(v) for k, v in self._samples.items()},
            "best": dict(self._best),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> LatencyModel:
        """A latency model restored from :meth:`state_dict` (also after a JSON round trip,
        which turns the bucket keys into strings). Every restored bucket counts as in use:
        the first new observations correct it and move no other.

        Example:
            >>> lat = LatencyModel()
            >>> lat.observe(4, 0.02)
            >>> back = LatencyModel.from_state_dict(lat.state_dict())
            >>> float(back.predict(4))
            0.02
        """
        if not isinstance(state, Mapping):
            raise TypeError(
                f"state must be a mapping from state_dict(), got {type(state).__name__}"
            )
        try:
            model = cls(state["grid"], state["window"])
            samples = state["samples"]
        except KeyError as e:
            raise ValueError(f"state is missing the key {e}") from None
        if not isinstance(samples, Mapping):
            raise TypeError(f"state['samples'] must be a mapping, got {type(samples).__name__}")
        for key, pairs in samples.items():
            b = int(key)
            if not 0 <= b < len(model.grid):
                raise ValueError(f"state['samples'] has bucket {key!r}, grid has {len(model.grid)}")
            kept: deque[tuple[float, float]] = deque(maxlen=model.window)
            for tokens, seconds in pairs:
                if not (tokens >= 1 and 0 <= seconds < math.inf):
                    raise ValueError(
                        f"state['samples'][{key!r}] needs tokens >= 1 and finite seconds >= 0, "
                        f"got {tokens}, {seconds}"
                    )
                kept.append((float(tokens), float(seconds)))
            if kept:
                model._samples[b] = kept
                model._last[b] = 0
                model._best[b] = model._seconds(b)
        best = state.get("best", {})  # (older states have none)
        if not isinstance(best, Mapping):
            raise TypeError(f"state['best'] must be a mapping, got {type(best).__name__}")
        for key, seconds in best.items():
            b = int(key)
            if b not in model._samples or not 0 <= seconds < math.inf:
                raise ValueError(
                    f"state['best'] needs finite seconds >= 0 for buckets with samples, "
                    f"got {seconds!r} for bucket {key!r}"
                )
            model._best[b] = min(model._best[b], float(seconds))
        return model

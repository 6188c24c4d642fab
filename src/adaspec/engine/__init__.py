"""The speculative generation loop: a step-level :class:`Engine` and :func:`generate`."""

from adaspec.engine.core import SLO, Engine, EngineConfig, RequestOutput, RequestStats, RunStats
from adaspec.engine.latency import LatencyModel
from adaspec.engine.loop import GenerateOutput, generate

__all__ = [
    "SLO",
    "Engine",
    "EngineConfig",
    "GenerateOutput",
    "LatencyModel",
    "RequestOutput",
    "RequestStats",
    "RunStats",
    "generate",
]

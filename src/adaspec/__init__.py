"""adaspec: speculative-decoding primitives after AdaServe.

Layers, each importable alone (lower layers never import higher ones):

- :mod:`adaspec.tree`: the token-tree format, optimal trees under a budget, masks, positions.
- :mod:`adaspec.acceptance`: logits transforms, path probabilities, beam trees, calibration.
- :mod:`adaspec.select`: SLO-customized budgeted selection across requests.
- :mod:`adaspec.verify`: lossless greedy and sampled tree verification, telemetry counters.
- :mod:`adaspec.kernels`: tree-masked attention (Triton + PyTorch reference), KV compaction.
- :mod:`adaspec.models`: the transformers adapter, shipped model pairs, prompt sets.
- :mod:`adaspec.engine`: the step-level :class:`Engine` and :func:`generate`.

``adaspec.generate``, ``adaspec.Engine``, ``adaspec.EngineConfig`` and ``adaspec.SLO`` are
loaded on first use, so ``import adaspec`` does not import transformers.
"""

from typing import TYPE_CHECKING, Any

from adaspec.tree import SubTree, TokenTree, build_optimal
from adaspec.verify import SpecStats, VerifyResult

if TYPE_CHECKING:
    from adaspec.engine import SLO, Engine, EngineConfig, generate

# `verify` the function is not re-exported here: it would shadow the module adaspec.verify
__all__ = [
    "SLO",
    "Engine",
    "EngineConfig",
    "SpecStats",
    "SubTree",
    "TokenTree",
    "VerifyResult",
    "build_optimal",
    "generate",
]
__version__ = "0.1.0"

_ENGINE_NAMES = {"SLO", "Engine", "EngineConfig", "generate"}


def __getattr__(name: str) -> Any:
    if name in _ENGINE_NAMES:
        import adaspec.engine

        return getattr(adaspec.engine, name)
    raise AttributeError(f"module 'adaspec' has no attribute {name!r}")

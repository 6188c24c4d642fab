"""adaspec: speculative-decoding primitives after AdaServe.

Layers, each importable alone (lower layers never import higher ones):

- :mod:`adaspec.tree`: the token-tree format, optimal trees under a budget, masks, positions.
- :mod:`adaspec.acceptance`: logits transforms, path probabilities, beam trees, calibration.
- :mod:`adaspec.select`: SLO-customized budgeted selection across requests.
- :mod:`adaspec.verify`: lossless greedy and sampled tree verification, telemetry counters.
- :mod:`adaspec.kernels`: tree-masked attention (Triton + PyTorch reference), KV compaction.
"""

from adaspec.tree import SubTree, TokenTree, build_optimal
from adaspec.verify import SpecStats, VerifyResult

# `verify` the function is not re-exported here: it would shadow the module adaspec.verify
__all__ = ["SpecStats", "SubTree", "TokenTree", "VerifyResult", "build_optimal"]
__version__ = "0.1.0"

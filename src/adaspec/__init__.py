"""adaspec: speculative-decoding primitives after AdaServe.

Layers, each importable alone (lower layers never import higher ones):

- :mod:`adaspec.tree`: the token-tree format, optimal trees under a budget, masks, positions.
- :mod:`adaspec.acceptance`: logits transforms, path probabilities, beam trees, calibration.
- :mod:`adaspec.select`: SLO-customized budgeted selection across requests.
"""

from adaspec.tree import SubTree, TokenTree, build_optimal

__all__ = ["SubTree", "TokenTree", "build_optimal"]
__version__ = "0.1.0"

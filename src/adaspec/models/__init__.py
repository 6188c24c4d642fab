"""Transformers adapter (tree forward, commit, draft trees), real model pairs, prompt sets.

Importing this package needs ``transformers`` (``pip install 'adaspec[models]'``); the
rest of adaspec does not.
"""

try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "adaspec.models needs transformers, gguf and accelerate; install them with: "
        "pip install 'adaspec[models]'"
    ) from e

from adaspec.models.adapter import KVState, commit, prefill, tree_argmax, tree_forward
from adaspec.models.draft import (
    DraftTree,
    commit_draft,
    grow_draft_tree,
    map_accepted,
    share_prefix,
    shares_cache,
)
from adaspec.models.greedy import GreedyHead
from adaspec.models.loading import (
    PAIRS,
    MissingModelPackageError,
    ModelPair,
    cache_dir,
    converted_dir,
    load_pair,
    make_draft,
)
from adaspec.models.tiny import tiny_model

__all__ = [
    "PAIRS",
    "DraftTree",
    "GreedyHead",
    "KVState",
    "MissingModelPackageError",
    "ModelPair",
    "cache_dir",
    "commit",
    "commit_draft",
    "converted_dir",
    "grow_draft_tree",
    "load_pair",
    "make_draft",
    "map_accepted",
    "prefill",
    "share_prefix",
    "shares_cache",
    "tiny_model",
    "tree_argmax",
    "tree_forward",
]

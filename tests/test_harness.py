"""The test harness itself: every session gets its own model cache, and the CI hypothesis profile repeats itself."""

import os
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from cola_theory.lm.models import smollm2_cache_dir


def test_the_model_cache_is_the_sessions_own_folder(empty_model_cache):
    assert os.environ["COLA_CACHE"] == empty_model_cache
    home_cache = Path.home() / ".cache" / "cola"
    assert not smollm2_cache_dir().is_relative_to(home_cache)
    assert smollm2_cache_dir().parent == Path(empty_model_cache)


def _examples() -> list:
    seen = []

    @settings(settings.get_profile("ci"), max_examples=25)
    @given(st.lists(st.integers(), max_size=5), st.floats(allow_nan=False))
    def record(xs, f):
        seen.append((tuple(xs), f))

    record()
    return seen


def test_the_ci_profile_draws_the_same_examples_every_run():
    assert settings.get_profile("ci").derandomize and settings.get_profile("ci").database is None
    first, second = _examples(), _examples()
    assert len(first) > 1 and first == second

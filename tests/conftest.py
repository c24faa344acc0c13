"""Test-wide settings: one torch thread per pytest worker (CI runs `-n 2` on 2 cores; oversubscription made tiny
models ~40x slower), offline hub, the `gpu` marker skipped without CUDA, an empty model cache per session, and a
derandomized hypothesis profile under CI (a red run repeats with the same examples)."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub (CI has no internet)

# "ci": the same examples on every run (no random seed, no example database): set by .ci/run via CI=1, or pick a
# profile explicitly with HYPOTHESIS_PROFILE=ci|default
settings.register_profile("ci", derandomize=True, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default"))


@pytest.fixture(scope="session", autouse=True)
def empty_model_cache(tmp_path_factory) -> str:
    """COLA_CACHE -> a fresh empty folder for the whole session (each xdist worker has its own session), so the
    first SmolLM2 load of a run takes the cold path (expand the GGUF, write the cache) and no test reads or writes
    ~/.cache/cola. Subprocesses (run_all, benchmarks) and notebook kernels inherit it through os.environ."""
    before = os.environ.get("COLA_CACHE")
    path = str(tmp_path_factory.mktemp("cola_cache"))
    os.environ["COLA_CACHE"] = path
    yield path
    if before is None:
        os.environ.pop("COLA_CACHE", None)
    else:
        os.environ["COLA_CACHE"] = before


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

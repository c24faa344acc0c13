"""Test-wide settings: one torch thread per pytest worker (CI runs `-n 2` on 2 cores; oversubscription made tiny
models ~40x slower), offline hub, and the `gpu` marker skipped without CUDA."""

import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub (CI has no internet)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

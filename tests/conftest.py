"""Test-wide settings: one torch thread per pytest worker (CI runs `-n 2` on 2 cores; oversubscription made tiny
models ~40x slower), and the `gpu` marker skipped without CUDA."""

import pytest
import torch

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

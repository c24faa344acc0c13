"""The second LR rule: one LR per (task, method) on the mean dev accuracy over the paired seeds."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paper_repro.lm import lr_rule, stats  # noqa: E402

# (variant, seed, lr, dev, test)
PLANTED = [
    # LoRA: seed 0's own dev prefers 1e-3 by one point, but the mean over seeds 0-2 prefers 5e-4 (72 vs 70.3)
    ("LoRA", 0, 1e-3, 71.0, 50.0), ("LoRA", 1, 1e-3, 70.0, 50.0), ("LoRA", 2, 1e-3, 70.0, 50.0),
    ("LoRA", 0, 5e-4, 70.0, 60.0), ("LoRA", 1, 5e-4, 73.0, 61.0), ("LoRA", 2, 5e-4, 73.0, 62.0),
    # COLA-3: 1e-3 and 5e-4 tie on the mean (72) -> the lower LR, 5e-4; 8e-4 (dev 90) is missing at seed 2 and
    # LoRA never tried it: not a candidate
    ("COLA-3", 0, 1e-3, 72.0, 99.0), ("COLA-3", 1, 1e-3, 72.0, 99.0), ("COLA-3", 2, 1e-3, 72.0, 99.0),
    ("COLA-3", 0, 5e-4, 71.0, 63.0), ("COLA-3", 1, 5e-4, 72.0, 60.0), ("COLA-3", 2, 5e-4, 73.0, 64.0),
    ("COLA-3", 0, 8e-4, 90.0, 1.0), ("COLA-3", 1, 8e-4, 90.0, 1.0),
    # seed 3 has LoRA only: not paired, and its LRs do not count
    ("LoRA", 3, 1e-3, 99.0, 50.0), ("LoRA", 3, 5e-4, 10.0, 50.0),
]


@pytest.fixture(scope="module")
def runs() -> pd.DataFrame:
    return pd.DataFrame([{"task": "cb", "variant": v, "seed": s, "lr": lr, "dev_acc": d, "test_acc": t}
                         for v, s, lr, d, t in PLANTED])


def test_one_lr_per_task_and_method(runs):
    sel = lr_rule.select_lr_per_task(runs, "COLA-3", "LoRA", ("cb", "rte"))
    assert set(sel["seed"]) == {0, 1, 2}
    assert set(sel[sel["variant"] == "LoRA"]["lr"]) == {5e-4}  # mean dev, not seed 0's own pick
    assert set(sel[sel["variant"] == "COLA-3"]["lr"]) == {5e-4}  # tie on the mean -> lower LR; 8e-4 excluded
    comp, lrs = lr_rule.compare(runs, "COLA-3", "LoRA", ("cb",))
    assert lrs == {"cb": (5e-4, 5e-4)}
    row = comp[comp["task"] == "cb"].iloc[0]
    assert row["n_pairs"] == 3 and row["mean_diff"] == pytest.approx(((63 - 60) + (60 - 61) + (64 - 62)) / 3)
    # the per-seed rule on the same runs differs: seed 0's LoRA takes 1e-3 (its own best dev)
    per_seed = stats.select_lr_per_seed(runs)
    assert per_seed[(per_seed["variant"] == "LoRA") & (per_seed["seed"] == 0)]["lr"].iloc[0] == 1e-3


def test_report_line(runs):
    comp, _ = lr_rule.compare(runs, "COLA-3", "LoRA", ("cb",))
    assert "no task has pairs" in lr_rule.line(pd.DataFrame(), "COLA-3", "LoRA")
    # one task with 3 pairs: its row and a pooled row of that one task
    text = lr_rule.line(comp, "COLA-3", "LoRA")
    assert "cb +1.33" in text and "not the verdict" in text

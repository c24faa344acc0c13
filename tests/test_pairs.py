"""The per-seed pairs table shows the very choices behind each paired difference."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from paper_repro.lm import pairs, stats, study  # noqa: E402
from paper_repro.lm.profiles import REAL_TASKS  # noqa: E402

KNOT = 1.66  # the chain's first knot (epochs)
# (variant, seed, lr, dev, test, best epoch)
PLANTED = [
    # seed 0: LoRA's dev peaks at 5e-4; the chain's dev ties at 1e-3 / 5e-4 -> the lower LR, 5e-4, past its knot
    ("LoRA", 0, 1e-3, 70.0, 60.0, 2), ("LoRA", 0, 5e-4, 72.0, 61.0, 2),
    ("COLA-3", 0, 1e-3, 74.0, 99.0, 4), ("COLA-3", 0, 5e-4, 74.0, 64.0, 3),
    # seed 1: the chain's best dev is at 8e-4, an LR LoRA has not tried: both are chosen on {1e-3, 5e-4}
    ("LoRA", 1, 1e-3, 71.0, 62.5, 1), ("LoRA", 1, 5e-4, 70.0, 10.0, 2),
    ("COLA-3", 1, 1e-3, 73.0, 62.0, 1), ("COLA-3", 1, 5e-4, 72.0, 11.0, 3), ("COLA-3", 1, 8e-4, 90.0, 5.0, 5),
    # seed 2: one arm only -> no pair; seed 3: best epoch unknown
    ("LoRA", 2, 1e-3, 71.0, 62.0, 1),
    ("LoRA", 3, 1e-3, 71.0, 63.0, None), ("COLA-3", 3, 1e-3, 71.0, 63.5, None),
]


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    runs = pd.DataFrame([{"task": "cb", "variant": v, "seed": s, "lr": lr, "dev_acc": dev, "test_acc": test,
                          "best_epoch": ep, "first_knot_epoch": math.inf if v == "LoRA" else KNOT}
                         for v, s, lr, dev, test, ep in PLANTED])
    return pairs.pair_table(runs, stats.select_lr_per_seed(runs), "COLA-3", "LoRA", ("sst2", "cb")).set_index("seed")


def test_choices_ties_and_common_grid(table):
    assert list(table.index) == [0, 1, 3]  # seed 2 has no chain run
    s0 = table.loc[0]
    assert (s0["LoRA LR"], s0["LoRA dev"], s0["LoRA test"], s0["LoRA epoch"]) == (5e-4, 72.0, 61.0, 2.0)
    assert (s0["COLA-3 LR"], s0["COLA-3 test"], s0["COLA-3 epoch"]) == (5e-4, 64.0, 3.0)  # tie -> lower LR
    assert s0["after first knot"] is True and s0["diff (pp)"] == pytest.approx(3.0)
    s1 = table.loc[1]  # 8e-4 (dev 90) is not on LoRA's grid: never chosen
    assert (s1["LRs both tried"], s1["COLA-3 LR"], s1["LoRA LR"]) == (2, 1e-3, 1e-3)
    assert s1["after first knot"] is False and s1["diff (pp)"] == pytest.approx(-0.5)
    assert table.loc[3, "after first knot"] is None and math.isnan(table.loc[3, "COLA-3 epoch"])


def test_display_form(table):
    shown = pairs.shown(table.reset_index()).set_index("seed")
    assert shown.loc[0, "COLA-3 LR"] == "5e-4" and shown.loc[1, "LoRA LR"] == "1e-3"
    assert shown.loc[0, "diff (pp)"] == "+3.00" and shown.loc[1, "diff (pp)"] == "-0.50"
    assert [shown.loc[s, "after first knot"] for s in (0, 1, 3)] == ["yes", "no: before its knot", "unknown"]
    assert shown.loc[3, "COLA-3 epoch"] == "-" and shown.loc[0, "LoRA epoch"] == "2"


def test_the_pairs_average_to_the_committed_comparisons():
    # on the committed `real` results: each task's mean difference over the rows equals the paired difference
    # that the verdicts use (the same rule, the same pairs)
    runs, _ = study.load_study(ROOT / "paper_repro" / "results", warn=lambda m: None)
    if runs.empty:
        pytest.skip("no committed real results")
    sel = stats.select_lr_per_seed(runs)
    p = pairs.pair_table(runs, sel, stats.COLA3, stats.LORA, REAL_TASKS)
    comp = stats.compare(sel, stats.COLA3, stats.LORA, REAL_TASKS, n_resamples=10)
    per_task = comp[comp["task"] != "pooled"].set_index("task")
    means = p.groupby("task")["diff (pp)"].agg(["mean", "size"])
    assert set(means.index) == set(per_task.index)
    for task, row in per_task.iterrows():
        assert means.loc[task, "mean"] == pytest.approx(row["mean_diff"], abs=1e-9)
        assert means.loc[task, "size"] == row["n_pairs"]

"""paper_repro.lm.stats on planted data: LR selection on dev, paired differences, bootstrap, sign test, verdicts."""

from __future__ import annotations

import math
import sys
from math import comb
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from paper_repro.lm import stats  # noqa: E402


def runs_from(diffs: dict[str, list[float]], base: float = 70.0) -> pd.DataFrame:
    """LoRA at `base` + seed, COLA-3 = LoRA + the planted difference; one LR, dev accuracy = test accuracy."""
    rows = []
    for task, ds in diffs.items():
        for seed, d in enumerate(ds):
            for variant, acc in (("LoRA", base + seed), ("COLA-3", base + seed + d)):
                rows.append({"task": task, "variant": variant, "seed": seed, "lr": 1e-3, "dev_acc": acc,
                             "test_acc": acc})
    return pd.DataFrame(rows)


def test_lr_is_chosen_on_dev_with_ties_to_the_lower_lr():
    nan = math.nan
    runs = pd.DataFrame([  # task, variant, seed, lr, dev, test
        ("rte", "LoRA", 0, 1e-3, 60.0, 50.0), ("rte", "LoRA", 0, 1e-4, 58.0, 90.0),  # best test is NOT chosen
        ("rte", "LoRA", 1, 1e-3, 61.0, 70.0), ("rte", "LoRA", 1, 5e-4, 61.0, 72.0),  # tie -> 5e-4
        ("rte", "LoRA", 1, 8e-4, 61.0, 71.0),
        ("rte", "LoRA", 2, 1e-3, nan, nan), ("rte", "LoRA", 2, 8e-4, 55.0, 65.0),  # a failed run is skipped
        ("rte", "COLA-3", 0, 1e-3, nan, 66.0),  # no dev, one LR: kept
        ("rte", "COLA-3", 1, 1e-3, nan, 66.0), ("rte", "COLA-3", 1, 8e-4, nan, 67.0),  # no dev, 2 LRs: dropped
    ], columns=["task", "variant", "seed", "lr", "dev_acc", "test_acc"])
    sel = stats.select_lr_per_seed(runs).set_index(["variant", "seed"])
    assert sel.loc[("LoRA", 0), "lr"] == 1e-3 and sel.loc[("LoRA", 0), "test_acc"] == 50.0
    assert sel.loc[("LoRA", 1), "lr"] == 5e-4 and "tie of 3" in sel.loc[("LoRA", 1), "selected_by"]
    assert sel.loc[("LoRA", 2), "lr"] == 8e-4 and sel.loc[("LoRA", 2), "lrs_tried"] == 2
    assert sel.loc[("COLA-3", 0), "selected_by"] == "single LR"
    assert ("COLA-3", 1) not in sel.index
    assert stats.select_lr_per_seed(runs.iloc[:0]).empty


def test_arms_that_tried_different_lrs_are_compared_on_their_common_grid():
    runs = pd.DataFrame([  # task, variant, seed, lr, dev, test
        ("rte", "LoRA", 0, 1e-3, 60.0, 61.0), ("rte", "LoRA", 0, 1e-4, 70.0, 75.0),  # LoRA alone picks 1e-4
        ("rte", "COLA-3", 0, 1e-3, 65.0, 64.0),  # the chain tried 1e-3 only: LoRA is chosen again on {1e-3}
        ("rte", "LoRA", 1, 1e-3, 60.0, 62.0), ("rte", "LoRA", 1, 1e-4, 70.0, 73.0),
        ("rte", "COLA-3", 1, 1e-3, 61.0, 66.0), ("rte", "COLA-3", 1, 1e-4, 69.0, 70.0),  # same grid: own choices
        ("rte", "LoRA", 2, 1e-3, 60.0, 60.0), ("rte", "COLA-3", 2, 8e-4, 60.0, 90.0),  # no common LR: left out
    ], columns=["task", "variant", "seed", "lr", "dev_acc", "test_acc"])
    sel = stats.select_lr_per_seed(runs)
    assert sel.set_index(["variant", "seed"]).loc[("LoRA", 0), "lr"] == 1e-4  # the cell's own choice is kept
    pairs = stats.paired(sel, "COLA-3").set_index("seed")
    assert list(pairs.index) == [0, 1]
    assert pairs.loc[0, "control"] == 61.0 and pairs.loc[0, "diff"] == pytest.approx(3.0) and pairs.loc[0, "regridded"]
    assert pairs.loc[1, "diff"] == pytest.approx(70.0 - 73.0) and not pairs.loc[1, "regridded"]
    comp = stats.compare(sel, "COLA-3").set_index("task")
    assert comp.loc["rte", "n_pairs"] == 2 and comp.loc["rte", "n_regridded"] == 1
    assert comp.loc["pooled", "n_regridded"] == 1 and "1 pair(s) on their common LR grid" in stats.describe(
        comp.loc["pooled"].to_dict() | {"task": "pooled"})
    assert "(2 pairs over 1 task;" in stats.describe(comp.loc["pooled"].to_dict() | {"task": "pooled"})
    # a frame of runs at one LR (no grid column) is paired as it is
    plain = stats.paired(runs[runs["lr"] == 1e-3].drop(columns="lr"), "COLA-3")
    assert list(plain["diff"]) == pytest.approx([3.0, 4.0]) and not plain["regridded"].any()


def test_paired_differences_are_exact_and_seed_matched():
    planted = {"rte": [1.0, 2.0, -0.5, 3.0, 0.5], "wsc": [4.0, 4.0, 4.0]}
    sel = stats.select_lr_per_seed(runs_from(planted))
    sel = sel[~((sel["task"] == "wsc") & (sel["variant"] == "LoRA") & (sel["seed"] == 2))]  # one arm only
    pairs = stats.paired(sel, "COLA-3")
    assert list(pairs[pairs["task"] == "rte"]["diff"]) == pytest.approx(planted["rte"])
    assert list(pairs[pairs["task"] == "wsc"]["seed"]) == [0, 1]
    comp = stats.compare(sel, "COLA-3", tasks=("wsc", "rte", "cb")).set_index("task")
    assert list(comp.index) == ["wsc", "rte", "pooled"]  # order kept, a task without pairs left out
    assert comp.loc["rte", "mean_diff"] == pytest.approx(1.2)
    assert comp.loc["pooled", "mean_diff"] == pytest.approx((1.2 + 4.0) / 2)  # mean of task means
    assert comp.loc["pooled", "n_pairs"] == 7 and comp.loc["pooled", "n_tasks"] == 2
    # constant differences: every resample has the same mean -> a degenerate interval at it
    assert (comp.loc["wsc", "ci_lo"], comp.loc["wsc", "ci_hi"]) == pytest.approx((4.0, 4.0))


def test_interval_excludes_zero_when_every_seed_gains_and_verdicts_follow_it():
    comp = stats.compare(stats.select_lr_per_seed(runs_from({"sst2": [2.0, 3.0, 2.5, 3.5, 2.8]})), "COLA-3")
    row = comp.set_index("task").loc["sst2"]
    assert 2.0 <= row["ci_lo"] < row["mean_diff"] < row["ci_hi"] <= 3.5 and row["verdict"] == "supported"
    worse = stats.compare(stats.select_lr_per_seed(runs_from({"sst2": [-2.0, -3.0, -1.0, -2.5, -4.0]})), "COLA-3")
    assert worse.iloc[0]["ci_hi"] < 0 and worse.iloc[0]["verdict"] == "not supported"
    mixed = stats.compare(stats.select_lr_per_seed(runs_from({"sst2": [-2.0, 3.0, -1.0, 2.5, 0.5]})), "COLA-3")
    assert mixed.iloc[0]["ci_lo"] < 0 < mixed.iloc[0]["ci_hi"]
    assert mixed.iloc[0]["verdict"] == "inconclusive at this scale"
    one = stats.compare(stats.select_lr_per_seed(runs_from({"sst2": [5.0]})), "COLA-3")
    assert one.iloc[0]["verdict"] == "insufficient data" and math.isnan(one.iloc[0]["ci_lo"])
    assert "pooled" not in set(one["task"])  # no task with 2+ pairs: nothing to pool
    assert stats.verdict(math.nan, math.nan, 5) == "insufficient data"


def test_a_single_pair_gets_no_interval_and_stays_out_of_the_pool():
    # one seed resamples to itself: a zero-width interval would claim a certainty no seed spread supports
    assert stats.bootstrap_ci([[3.0]]) == pytest.approx((math.nan, math.nan), nan_ok=True)
    assert stats.bootstrap_ci([[1.0, 2.0], [3.0]]) == pytest.approx((math.nan, math.nan), nan_ok=True)
    planted = {"sst2": [1.0, -1.0, 0.5], "rte": [6.0]}
    comp = stats.compare(stats.select_lr_per_seed(runs_from(planted)), "COLA-3")
    rte, pooled, sst2 = ({r["task"]: r for _, r in comp.iterrows()}[t] for t in ("rte", "pooled", "sst2"))
    assert rte["n_pairs"] == 1 and rte["mean_diff"] == pytest.approx(6.0) and math.isnan(rte["ci_lo"])
    assert rte["verdict"] == "insufficient data"
    # the pool is SST-2 alone: its mean, its interval, its sign test, one task
    assert pooled["n_tasks"] == 1 and pooled["n_pairs"] == 3 and pooled["mean_diff"] == pytest.approx(0.5 / 3)
    assert (pooled["ci_lo"], pooled["ci_hi"]) == pytest.approx((sst2["ci_lo"], sst2["ci_hi"]))
    assert (pooled["n_pos"], pooled["n_neg"]) == (2, 1) and pooled["verdict"] == sst2["verdict"]
    assert "no interval" in stats.describe(rte)


def test_bootstrap_is_seeded_and_matches_scipy_percentile():
    from scipy.stats import bootstrap

    d = np.random.default_rng(7).normal(1.0, 1.5, size=12)
    a = stats.bootstrap_ci([d])
    assert a == stats.bootstrap_ci([d]) and a != stats.bootstrap_ci([d], seed=1)  # seeded
    ref = bootstrap((d,), np.mean, n_resamples=10_000, method="percentile", confidence_level=0.95,
                    random_state=np.random.default_rng(123)).confidence_interval
    assert a == pytest.approx((ref.low, ref.high), abs=0.08)
    # pooled: seeds resampled within tasks; a task of constant differences only shifts the interval
    pooled = stats.bootstrap_ci([d, np.full(3, 4.0)])
    assert pooled == pytest.approx(((a[0] + 4) / 2, (a[1] + 4) / 2), abs=1e-9)
    assert stats.bootstrap_ci([]) == pytest.approx((math.nan, math.nan), nan_ok=True)


def test_sign_test_drops_ties_and_matches_the_hand_computed_binomial():
    s = stats.sign_test([1.0, 2.0, 0.5, 3.0, 0.1, 0.2, -1.0, 0.0])  # 6 positive, 1 negative, 1 tie
    assert (s.n_pos, s.n_neg, s.n_ties) == (6, 1, 1)
    hand = 2 * (comb(7, 6) + comb(7, 7)) / 2**7  # P(X >= 6) doubled, X ~ Bin(7, 1/2) = 0.125
    assert s.p == pytest.approx(hand) == pytest.approx(0.125)
    assert stats.sign_test([1.0] * 5).p == pytest.approx(2 / 2**5)
    assert math.isnan(stats.sign_test([0.0, 0.0]).p) and stats.sign_test([0.0, 0.0]).n_ties == 2
    comp = stats.compare(stats.select_lr_per_seed(runs_from({"cb": [1.0, 0.0, 2.0, 0.0, -1.0]})), "COLA-3")
    row = comp.iloc[0]
    assert (row["n_pos"], row["n_neg"], row["n_ties"]) == (2, 1, 2) and row["sign_p"] == pytest.approx(1.0)
    assert "2 tie(s) dropped" in stats.describe(row) and "+0.40 pp" in stats.describe(row)


def test_paired_t_interval_matches_scipy_and_flags_a_fragile_verdict():
    from scipy.stats import ttest_1samp, ttest_ind

    d = np.array([-1.44, 2.17, 2.17])  # the shape of a 3-seed task: the bootstrap interval is its range
    ref = ttest_1samp(d, 0.0).confidence_interval(0.95)
    assert stats.t_ci([d]) == pytest.approx((ref.low, ref.high))
    lo, hi = stats.bootstrap_ci([d])
    assert stats.t_ci([d])[0] < lo and hi < stats.t_ci([d])[1]  # with 3 seeds the t interval is much wider
    # pooled over two tasks = (mean a + mean b) / 2: Welch's interval of mean(a) - mean(-b), halved
    a, b = np.array([0.1, 0.5, -0.2, 0.3]), np.array([2.0, -1.0, 1.5])
    welch = ttest_ind(a, -b, equal_var=False).confidence_interval(0.95)
    assert stats.t_ci([a, b]) == pytest.approx((welch.low / 2, welch.high / 2))
    assert stats.t_ci([[4.0, 4.0], [1.0, 1.0, 1.0]]) == pytest.approx((2.5, 2.5))  # no spread: zero width
    assert stats.t_ci([[1.0, 2.0], [3.0]]) == pytest.approx((math.nan, math.nan), nan_ok=True)  # one pair
    # every seed gains a little but one gains a lot: the bootstrap says supported, the t interval contains 0
    comp = stats.compare(stats.select_lr_per_seed(runs_from({"sst2": [0.1, 0.2, 6.0]})), "COLA-3")
    row = comp.iloc[0]
    assert row["verdict"] == "supported" and row["t_lo"] < 0 < row["t_hi"]
    assert "fragile: the t interval contains 0" in stats.describe(row)
    steady = stats.compare(stats.select_lr_per_seed(runs_from({"sst2": [2.0, 3.0, 2.5, 3.5, 2.8]})), "COLA-3")
    assert steady.iloc[0]["t_lo"] > 0 and "fragile" not in stats.describe(steady.iloc[0])
    assert "paired t [" in stats.describe(steady.iloc[0])


def test_minimum_detectable_effect_has_its_power_in_simulation():
    """`mde` against an independent check: draw paired differences with the planted spread and mean = mde, run
    scipy's t test on each draw; the rejection rate is the promised power. Large n: the normal approximation."""
    from scipy.stats import norm, ttest_1samp, ttest_ind

    d = np.array([-1.0, 0.5, 2.0])  # sample sd 1.5
    delta = stats.mde([d])
    rng = np.random.default_rng(0)
    draws = rng.normal(delta, d.std(ddof=1), size=(40_000, d.size))
    assert (ttest_1samp(draws, 0.0, axis=1).pvalue < 0.05).mean() == pytest.approx(0.80, abs=0.01)
    assert stats.mde([d], power=0.5) < delta < stats.mde([d], power=0.9)
    # pooled over two tasks with different spreads: the Welch statistic, whose df is approximate
    a, b = np.array([0.1, 0.5, -0.2, 0.3, 0.9]), np.array([2.0, -1.0, 1.5])
    pooled = stats.mde([a, b])
    xa = rng.normal(pooled, a.std(ddof=1), size=(40_000, a.size))
    xb = rng.normal(pooled, b.std(ddof=1), size=(40_000, b.size))
    # mean(a) + mean(b) over 2 > 0  <=>  mean(a) - mean(-b) > 0: Welch's two-sample test of xa against -xb
    assert (ttest_ind(xa, -xb, axis=1, equal_var=False).pvalue < 0.05).mean() == pytest.approx(0.80, abs=0.03)
    big = rng.normal(0, 2.0, 400)
    z = (norm.ppf(0.975) + norm.ppf(0.8)) * big.std(ddof=1) / math.sqrt(big.size)
    assert stats.mde([big]) == pytest.approx(z, rel=0.01)
    assert math.isnan(stats.mde([[4.0, 4.0]])) and math.isnan(stats.mde([[1.0, 2.0], [3.0]]))  # no spread; 1 pair
    # the projection reproduces mde where the grid and the spread are what was observed, and shrinks with the grid
    e = np.array([1.0, -0.5, 2.0])
    eq = [e, e - e.mean() + 0.3]  # same spread in both tasks
    assert stats.projected_mde(eq, n_seeds=3, n_tasks=2) == pytest.approx(stats.mde(eq), rel=1e-9)
    assert stats.projected_mde(eq, 5, 7) < stats.projected_mde(eq, 3, 2)
    comp = stats.compare(stats.select_lr_per_seed(runs_from({"sst2": list(d), "cb": list(e)})), "COLA-3")
    assert comp.set_index("task").loc["sst2", "mde"] == pytest.approx(delta)
    assert comp.set_index("task").loc["pooled", "mde"] == pytest.approx(stats.mde([d, e]))


def test_learned_rule_is_blind_to_the_difference_and_pools_only_the_learned_tasks():
    # LoRA at 70 + seed everywhere; the untrained model is at 50 on sst2 / cb but at 72 on wsc (not learned there)
    planted = {"sst2": [1.0, 2.0, 1.5], "cb": [-1.0, 0.5, 0.0], "wsc": [-8.0, -6.0, -7.0]}
    sel = stats.select_lr_per_seed(runs_from(planted))
    untrained = {"sst2": 50.0, "cb": 50.0, "wsc": 72.0}
    ok = stats.learned_tasks(sel, "COLA-3", "LoRA", untrained).set_index("task")
    # by hand: mean over seeds of (LoRA + COLA-3) / 2 - untrained = 71 + mean(d) / 2 - untrained
    for task, ds in planted.items():
        assert ok.loc[task, "gain"] == pytest.approx(71 + np.mean(ds) / 2 - untrained[task]), task
    assert dict(ok["learned"]) == {"sst2": True, "cb": True, "wsc": False}
    # blind to the sign of the difference: swapping the arms changes nothing
    swapped = stats.learned_tasks(sel, "LoRA", "COLA-3", untrained).set_index("task")
    pd.testing.assert_frame_equal(ok, swapped)
    # the sensitivity row is compare's pooled row over sst2 and cb alone
    row = stats.learned_only(sel, "COLA-3", "LoRA", untrained).iloc[0]
    two = stats.compare(stats.select_lr_per_seed(runs_from({k: planted[k] for k in ("sst2", "cb")})), "COLA-3")
    ref = two[two["task"] == "pooled"].iloc[0]
    assert row["task"] == stats.LEARNED and row["n_tasks"] == 2 and row["n_pairs"] == 6
    for col in ("mean_diff", "ci_lo", "ci_hi", "t_lo", "t_hi", "sign_p", "mde"):
        assert row[col] == pytest.approx(ref[col]), col
    assert "6 pairs over 2 tasks" in stats.describe(row)
    # a caller's learned_tasks frame (here in another task order) gives the same row as computing it inside
    given = stats.learned_tasks(sel, "COLA-3", "LoRA", untrained, tasks=("sst2", "wsc", "cb"))
    pd.testing.assert_frame_equal(stats.learned_only(sel, "COLA-3", "LoRA", untrained, learned=given),
                                  stats.learned_only(sel, "COLA-3", "LoRA", untrained))
    # every task learned, or fewer than two learned, or no untrained accuracy for a task: no second reading
    assert stats.learned_only(sel, "COLA-3", "LoRA", {**untrained, "wsc": 50.0}).empty
    assert stats.learned_only(sel, "COLA-3", "LoRA", {**untrained, "cb": 90.0}).empty
    assert not stats.learned_tasks(sel, "COLA-3", "LoRA", {"sst2": 50.0}).set_index("task").loc["cb", "learned"]
    # the resolution line counts the per-task rows only, not the learned row's copy of their pairs
    comp = pd.concat([stats.compare(sel, "COLA-3"), stats.learned_only(sel, "COLA-3", "LoRA", untrained)])
    assert stats.resolution(comp, "COLA-3", "LoRA", 5, 7) == stats.resolution(stats.compare(sel, "COLA-3"),
                                                                              "COLA-3", "LoRA", 5, 7)

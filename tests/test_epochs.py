"""Where a chain can differ from LoRA (paper_repro.lm.epochs): knots in epochs, selected epochs, per-epoch gaps."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cola_theory.lm.run_config import LMRunConfig  # noqa: E402
from cola_theory.results import save_result  # noqa: E402
from paper_repro.lm import epochs, study  # noqa: E402
from paper_repro.lm.profiles import jobs_for  # noqa: E402


def test_knot_epochs_are_the_chain_schedules_knots_over_the_steps_per_epoch():
    for cfg in (LMRunConfig(task="sst2", method="cola", n_links=3, epochs=5.0),
                LMRunConfig(task="sst2", method="cola", n_links=5, epochs=5.0),
                LMRunConfig(task="rte", method="cola", rank=(8, 2), link_epochs=(3.0, 2.0), epochs=5.0)):
        for spe in (125, 7):
            want = tuple(k / spe for k in cfg.chain_config(spe).knots)  # independent: the engine's own schedule
            assert epochs.knot_epochs(cfg.to_dict(), spe) == pytest.approx(want)
    assert epochs.knot_epochs(LMRunConfig(task="sst2", method="cola", n_links=3).to_dict(), 125) == \
        pytest.approx((208 / 125, 417 / 125))  # round(5/3 * 125), round(10/3 * 125)
    assert epochs.knot_epochs(LMRunConfig(task="sst2", method="lora").to_dict(), 125) == ()
    assert epochs.first_knot_epoch(LMRunConfig(task="sst2", method="lora").to_dict(), 125) == math.inf
    assert math.isnan(epochs.first_knot_epoch(LMRunConfig(task="sst2", method="cola", n_links=3).to_dict(), None))


def _runs(rows: list[tuple]) -> pd.DataFrame:
    """(task, variant, seed, lr, best_epoch, dev losses, first knot) -> the columns `study.load_study` gives."""
    return pd.DataFrame([{"task": t, "variant": v, "seed": s, "lr": lr, "best_epoch": b, "dev_loss_per_epoch": d,
                          "first_knot_epoch": k} for t, v, s, lr, b, d, k in rows])


def test_best_epoch_table_counts_the_selected_epochs_and_the_runs_that_equal_lora():
    inf = math.inf
    runs = _runs([("rte", "LoRA", 0, 1e-3, 1, [1.0] * 5, inf), ("rte", "LoRA", 1, 1e-3, 4, [1.0] * 5, inf),
                  ("rte", "COLA-3", 0, 1e-3, 1, [1.0] * 5, 5 / 3), ("rte", "COLA-3", 1, 1e-3, 2, [1.0] * 5, 5 / 3),
                  ("rte", "COLA-3", 2, 1e-3, 5, [1.0] * 5, 5 / 3), ("rte", "COLA-5", 0, 1e-3, 1, [1.0] * 5, 1.0),
                  ("wsc", "LoRA", 0, 1e-3, None, None, inf)])  # no best-dev selection: left out
    t = epochs.best_epoch_table(runs, ("LoRA", "COLA-3", "COLA-5"), ("rte", "wsc")).set_index("variant")
    assert list(t.index) == ["LoRA", "COLA-3", "COLA-5"]  # wsc has no best-dev run
    assert t.loc["LoRA", ["epoch 1", "epoch 2", "epoch 3", "epoch 4", "epoch 5"]].tolist() == [1, 0, 0, 1, 0]
    assert t.loc["LoRA", "selected ≤ first knot"] == "-"
    assert t.loc["COLA-3", ["runs", "epoch 1", "epoch 2", "epoch 5"]].tolist() == [3, 1, 1, 1]
    assert t.loc["COLA-3", "selected ≤ first knot"] == "1 of 3" and t.loc["COLA-3", "first knot (epoch)"] == "1.67"
    assert t.loc["COLA-5", "selected ≤ first knot"] == "1 of 1"  # epoch 1 ends exactly at the knot: same model


def test_dev_loss_gaps_pair_same_seed_and_lr_and_treat_a_seed_as_one_unit():
    base = np.array([0.5, 0.4, 0.45, 0.5, 0.55])
    planted = np.array([0.0, 0.01, -0.02, -0.04, -0.06])  # COLA-3 - LoRA at each epoch
    rows = []
    for seed, lift in ((0, 0.0), (1, 0.1), (2, -0.05)):
        for lr, extra in ((1e-3, 0.0), (5e-4, 0.02)):
            c = base + lift + extra
            t = c + planted + (0.01 * (seed - 1) if lr == 1e-3 else 0.0)  # seed-level noise on one LR
            rows += [("sst2", "LoRA", seed, lr, 1, list(c), math.inf), ("sst2", "COLA-3", seed, lr, 1, list(t), 5 / 3)]
    rows.append(("sst2", "COLA-3", 3, 1e-4, 1, [9.0] * 5, 5 / 3))  # no LoRA pair: left out
    rows.append(("sst2", "LoRA", 2, 1e-4, 1, [9.0] * 5, math.inf))  # no COLA-3 pair at this LR: left out
    g = epochs.dev_loss_gaps(_runs(rows), "COLA-3", "LoRA", ("sst2", "rte"))
    assert list(g["task"].unique()) == ["sst2"] and list(g["epoch"]) == [1, 2, 3, 4, 5]
    assert (g["n_pairs"] == 6).all() and (g["n_seeds"] == 3).all()
    assert list(g["after_first_knot"]) == [False, True, True, True, True]
    # per seed: mean over its 2 LRs = planted + 0.005 * (seed - 1); over seeds 0, 1, 2 the noise averages to 0
    np.testing.assert_allclose(g["mean_diff"], planted, atol=1e-12)
    units = np.array([[p + 0.005 * (s - 1) for s in range(3)] for p in planted])
    for (_, r), u in zip(g.iterrows(), units):
        assert r["ci_lo"] >= u.min() - 1e-12 and r["ci_hi"] <= u.max() + 1e-12  # a bootstrap of the seed means
    assert g["ci_hi"].iloc[0] - g["ci_lo"].iloc[0] > 0.002  # seeds, not pairs, are resampled: spread is kept
    half = 4.302652729749464 * 0.005 / math.sqrt(3)  # t_{0.975, 2} * sd(seed units) / sqrt(3 seeds)
    np.testing.assert_allclose(g["t_lo"], planted - half, atol=1e-12)
    np.testing.assert_allclose(g["t_hi"], planted + half, atol=1e-12)
    table = epochs.gap_table(g, "COLA-3", "LoRA")
    assert list(table.columns) == ["task", "pairs (seeds)", "epoch 1", "epoch 2*", "epoch 3*", "epoch 4*", "epoch 5*"]
    assert table["pairs (seeds)"].iloc[0] == "6 (3)" and table["epoch 5*"].iloc[0].startswith("-0.060 [")


def test_dev_loss_gaps_by_lr_keep_opposite_gaps_apart_that_pooling_cancels():
    """Under-fitting LR: the chain's dev loss stays above LoRA's after the knot; over-fitting LR: below. Pooled over
    the two LRs the gap is 0; kept apart, each LR shows its own planted gap, one pair per seed."""
    base = np.array([0.5, 0.45, 0.44, 0.46, 0.5])
    rows = []
    for seed in (0, 1, 2):
        for lr, gap in ((1e-3, -0.03), (1e-4, +0.03)):
            c = base + 0.01 * seed
            t = c + np.array([0.0, gap / 3, gap / 2, gap, gap]) + 0.002 * (seed - 1)
            rows += [("rte", "LoRA", seed, lr, 1, list(c), math.inf), ("rte", "COLA-3", seed, lr, 1, list(t), 5 / 3)]
    runs = _runs(rows)
    pooled = epochs.dev_loss_gaps(runs, "COLA-3", "LoRA", ("rte",))
    np.testing.assert_allclose(pooled["mean_diff"], 0.0, atol=1e-12)
    assert pooled["lr"].isna().all()
    split = epochs.dev_loss_gaps(runs, "COLA-3", "LoRA", ("rte",), by_lr=True)
    assert list(split["lr"].unique()) == [1e-3, 1e-4] and (split["n_pairs"] == 3).all()
    for lr, gap in ((1e-3, -0.03), (1e-4, +0.03)):
        last = split[(split["lr"] == lr) & (split["epoch"] == 5)].iloc[0]
        assert last["mean_diff"] == pytest.approx(gap, abs=1e-12)
        assert gap - 0.002 - 1e-12 <= last["ci_lo"] < last["ci_hi"] <= gap + 0.002 + 1e-12  # the seeds' spread
        assert (last["ci_lo"] > 0) == (gap > 0) and (last["ci_hi"] < 0) == (gap < 0)  # the interval keeps the sign
    table = epochs.gap_table(split, "COLA-3", "LoRA")
    assert list(table["LR"]) == ["0.001", "0.0001"] and "LR" not in epochs.gap_table(pooled, "COLA-3", "LoRA")
    assert table["epoch 5*"].tolist()[1].startswith("+0.030 [")


def test_variant_gaps_stack_each_ablation_variant_against_lora_with_its_own_knots():
    """Planted: without the reset the chain still fits more slowly than LoRA at the small LR (+0.02 from its knot
    on); the restart variant is 0.05 above LoRA everywhere; COLA-5 has no LoRA pair and is left out."""
    base = np.array([0.5, 0.42, 0.40, 0.39, 0.38])
    rows = []
    for seed in (0, 1, 2):
        c = base + 0.01 * seed
        rows += [("cb", "LoRA", seed, 1e-4, 5, list(c), math.inf),
                 ("cb", "no reset", seed, 1e-4, 5, list(c + np.array([0, 0.02, 0.02, 0.02, 0.02])), 5 / 3),
                 ("cb", "restart", seed, 1e-4, 5, list(c + 0.05), 5 / 3),
                 ("cb", "COLA-5", seed, 1e-3, 5, list(c), 1.0)]
    g = epochs.variant_gaps(_runs(rows), ("no reset", "restart", "COLA-5"), "LoRA", ("cb", "rte"))
    assert list(g["treatment"].unique()) == ["no reset", "restart"] and (g["n_pairs"] == 3).all()
    np.testing.assert_allclose(g[g["treatment"] == "no reset"]["mean_diff"], [0, 0.02, 0.02, 0.02, 0.02], atol=1e-12)
    np.testing.assert_allclose(g[g["treatment"] == "restart"]["mean_diff"], 0.05, atol=1e-12)
    # each variant's rows are its own dev_loss_gaps against the control
    alone = epochs.dev_loss_gaps(_runs(rows), "restart", "LoRA", ("cb",), by_lr=True)
    np.testing.assert_allclose(g[g["treatment"] == "restart"]["ci_lo"], alone["ci_lo"], atol=1e-12)
    table = epochs.variant_gap_table(g, "LoRA")
    assert list(table.columns[:3]) == ["treatment", "task", "LR"] and list(table["treatment"]) == ["no reset", "restart"]
    assert table["epoch 2"].iloc[0].startswith("+0.020 [") and table["epoch 1"].iloc[1].startswith("+0.050 [")
    assert table["epoch 2"].iloc[0].endswith("]*") and table["epoch 1"].iloc[1].endswith("]")  # knots per cell
    assert [c for c in table.columns if c.startswith("epoch")] == [f"epoch {e}" for e in range(1, 6)]
    assert epochs.variant_gaps(_runs(rows), ("COLA-5",), "LoRA", ("cb",)).empty
    assert epochs.variant_gap_table(pd.DataFrame(), "LoRA").empty


def test_the_report_section_shows_both_diagnostics_from_result_files(tmp_path):
    """Through the real loader: per-epoch dev losses and steps per epoch from the metrics, the knots from the config."""
    results, fig = tmp_path / "results", tmp_path / "fig"
    n = 0
    for job in jobs_for("real"):
        c = job.cfg
        if c.task != "sst2" or study.variant_label(c.to_dict()) not in ("LoRA", "COLA-3") or c.seed > 2:
            continue
        cola = c.method == "cola"
        losses = [0.40, 0.42 - 0.01 * cola, 0.45 - 0.02 * cola, 0.5 - 0.03 * cola, 0.55 - 0.04 * cola]
        best = 1 if c.lr >= 5e-4 else 3  # small LRs peak later: after COLA-3's first knot
        test = 0.8 + (0.01 if cola and best == 3 else 0.0)  # the chain wins only where it can differ
        m = {"status": "finished", "test_acc": test, "dev_acc": 0.8, "best_epoch": best, "steps_per_epoch": 125,
             "dev_loss_per_epoch": losses}
        save_result(job.result_path(results), config={**c.to_dict(), "chain": {}}, history=[], metrics=m,
                    meta={"created_at": "2026-12-01T00:00:00Z", "device": "test"})
        n += 1
    assert n == 2 * 3 * 5  # 2 variants x 3 seeds x 5 LRs
    files: list[Path] = []
    (_, text), = study.report_section(results, fig, files, log=lambda m: None)[0]
    assert "| sst2 | COLA-3 | 15 | 9 | 0 | 6 | 0 | 0 | 1.66 | 9 of 15 |" in text
    assert "| sst2 | 15 (3) | +0.000 [+0.000, +0.000] | -0.010 [-0.010, -0.010] |" in text
    gaps = pd.read_csv(fig / "tables" / "table_real_dev_loss_gaps.csv")
    np.testing.assert_allclose(gaps["mean_diff"], [0.0, -0.01, -0.02, -0.03, -0.04], atol=1e-12)
    by_lr = pd.read_csv(fig / "tables" / "table_real_dev_loss_gaps_by_lr.csv")
    assert len(by_lr) == 5 * 5 and (by_lr["n_pairs"] == 3).all()  # 5 LRs x 5 epochs, one pair per seed
    assert "| sst2 | 0.0005 | 3 (3) | +0.000 [+0.000, +0.000] | -0.010 [-0.010, -0.010] |" in text
    assert (fig / "fig_real_dev_loss_per_epoch.png").stat().st_size > 1000
    assert "| sst2 | 0.001 | 3 | 80.00 | 80.00 | +0.00 [+0.00, +0.00] | [+0.00, +0.00] | 0/0/3 | 0 of 3 |" in text
    assert "| sst2 | 0.0001 | 3 | 80.00 | 81.00 | +1.00 [+1.00, +1.00] | [+1.00, +1.00] | 3/0/0 | 3 of 3 |" in text
    assert "### Dev loss per epoch, each ablation variant - LoRA" in text  # no ablation runs here
    assert not (fig / "tables" / "table_real_ablation_dev_loss.csv").exists()
    fixed = pd.read_csv(fig / "tables" / "table_real_fixed_lr.csv")
    assert list(fixed["lr"]) == [1e-3, 8e-4, 5e-4, 1e-4, 5e-5] and (fixed["n_pairs"] == 3).all()


def test_fixed_lr_gaps_compare_each_lr_alone_and_count_the_runs_that_can_differ():
    rows = []
    for seed in (0, 1, 2):
        for lr, effect, best in ((1e-3, 0.0, 1), (1e-4, 2.0 + seed, 4)):
            rows.append({"task": "rte", "variant": "LoRA", "seed": seed, "lr": lr, "test_acc": 60.0 + seed,
                         "best_epoch": best, "first_knot_epoch": math.inf})
            rows.append({"task": "rte", "variant": "COLA-3", "seed": seed, "lr": lr, "test_acc": 60.0 + seed + effect,
                         "best_epoch": best if seed else 1, "first_knot_epoch": 5 / 3})
    rows.append({"task": "rte", "variant": "COLA-3", "seed": 3, "lr": 1e-4, "test_acc": 99.0, "best_epoch": 5,
                 "first_knot_epoch": 5 / 3})  # no LoRA pair: left out, also from the counts
    rows.append({"task": "rte", "variant": "LoRA", "seed": 4, "lr": 1e-4, "test_acc": math.nan, "best_epoch": 5,
                 "first_knot_epoch": math.inf})  # did not finish: left out
    g = epochs.fixed_lr_gaps(pd.DataFrame(rows), "COLA-3", "LoRA", ("rte",)).set_index("lr")
    assert list(g.index) == [1e-3, 1e-4] and (g["n_pairs"] == 3).all()
    assert g.loc[1e-3, "mean_diff"] == 0.0 and g.loc[1e-3, "n_ties"] == 3 and g.loc[1e-3, "after_knot"] == "0 of 3"
    assert g.loc[1e-4, "mean_diff"] == pytest.approx(3.0) and g.loc[1e-4, "n_pos"] == 3
    assert g.loc[1e-4, "ci_lo"] >= 2.0 and g.loc[1e-4, "ci_hi"] <= 4.0  # the bootstrap of the seeds' 2, 3, 4
    half = 4.302652729749464 / math.sqrt(3)  # t_{0.975, 2} * s / sqrt(n), s = 1
    assert (g.loc[1e-4, "t_lo"], g.loc[1e-4, "t_hi"]) == pytest.approx((3.0 - half, 3.0 + half))
    table = epochs.fixed_lr_table(g.reset_index(), "COLA-3", "LoRA")
    assert table["paired t 95% CI"].tolist() == ["[+0.00, +0.00]", f"[{3 - half:+.2f}, {3 + half:+.2f}]"]
    assert g.loc[1e-4, "after_knot"] == "2 of 3"  # seed 0's chain was selected at epoch 1
    assert g.loc[1e-4, "control_acc"] == pytest.approx(61.0) and g.loc[1e-4, "treatment_acc"] == pytest.approx(64.0)
    one = epochs.fixed_lr_gaps(pd.DataFrame(rows[:2]), "COLA-3", "LoRA", ("rte",))  # one pair: no interval
    assert one["n_pairs"].tolist() == [1] and math.isnan(one["ci_lo"].iloc[0])
    assert epochs.fixed_lr_table(one, "COLA-3", "LoRA")["COLA-3 - LoRA [95% CI]"].tolist() == ["+0.00"]
    assert epochs.fixed_lr_table(one, "COLA-3", "LoRA")["paired t 95% CI"].tolist() == ["-"]


def test_fixed_lr_variants_stack_each_step_down_against_lora_at_each_lr():
    rows = []
    for seed in (0, 1):
        rows.append({"task": "sst2", "variant": "LoRA", "seed": seed, "lr": 1e-4, "test_acc": 80.0 + seed,
                     "best_epoch": 5, "first_knot_epoch": math.inf})
        for r, effect in ((2, -1.0), (8, 0.5)):
            rows.append({"task": "sst2", "variant": f"step-down 8→{r}", "seed": seed, "lr": 1e-4,
                         "test_acc": 80.0 + seed + effect, "best_epoch": 5, "first_knot_epoch": 3.0})
    rows.append({"task": "sst2", "variant": "step-down 8→4", "seed": 0, "lr": 8e-4, "test_acc": 90.0,
                 "best_epoch": 2, "first_knot_epoch": 3.0})  # no LoRA run at 8e-4: no row
    variants = tuple(f"step-down 8→{r}" for r in (2, 4, 6, 8))
    shown, numeric = epochs.fixed_lr_variants(pd.DataFrame(rows), variants, "LoRA", ("sst2",))
    assert numeric["variant"].tolist() == ["step-down 8→2", "step-down 8→8"]
    assert numeric["mean_diff"].tolist() == pytest.approx([-1.0, 0.5]) and (numeric["n_pairs"] == 2).all()
    assert list(shown.columns[:3]) == ["task", "LR", "variant"] and "step-down - LoRA [95% CI]" in shown.columns
    assert shown["step-down selected after its first knot"].tolist() == ["2 of 2", "2 of 2"]
    assert all(len(f) == 0 for f in epochs.fixed_lr_variants(pd.DataFrame(rows[:1]), variants, "LoRA", ("sst2",)))


def test_engine_noise_pairs_only_models_that_are_the_same_mathematically():
    base = {"task": "sst2", "lr": 1e-4, "first_knot_epoch": 5 / 3, "lr_schedule": "linear"}
    rows = [{**base, "variant": "LoRA", "seed": s, "best_epoch": 1, "test_acc": 80.0, "engine": "packed (3)"}
            for s in (0, 1, 2, 3)]
    rows[0]["first_knot_epoch"] = rows[1]["first_knot_epoch"] = math.inf
    rows[2]["best_epoch"] = 2  # seed 2: both at epoch 2, after COLA-3's knot (1.66): not the same model
    rows += [{**base, "variant": "COLA-3", "seed": 0, "best_epoch": 1, "test_acc": 80.0, "engine": "packed (3)"},
             {**base, "variant": "COLA-3", "seed": 1, "best_epoch": 1, "test_acc": 79.9, "engine": "sequential"},
             {**base, "variant": "COLA-3", "seed": 2, "best_epoch": 2, "test_acc": 70.0, "engine": "packed (3)"},  # after
             {**base, "variant": "COLA-3, LR restart per link", "seed": 3, "best_epoch": 1, "test_acc": 60.0,
              "engine": "packed (3)", "lr_schedule": "restart"},  # another schedule from step 0
             {**base, "variant": "step-down 8→2", "seed": 3, "best_epoch": 1, "test_acc": 80.0,
              "engine": "packed (3), forked", "first_knot_epoch": 3.0}]
    t = epochs.engine_noise(pd.DataFrame(rows), "LoRA", ("sst2",))
    assert t[["same engine", "pairs", "exact ties"]].values.tolist() == [[True, 2, 2], [False, 1, 0]]
    assert t["largest absolute difference (pp)"].tolist() == pytest.approx([0.0, 0.1])
    assert t["different epoch picked"].tolist() == [0, 0] and t["largest dev-loss gap before the knot"].isna().all()
    # both picked at or before the chain's knot (epoch 3) but different epochs: rounding moved the pick, still the
    # same model mathematically; the dev-loss gap counts the 3 epochs before the knot only. LoRA picked after the
    # knot (seed 6): excluded, as the chain never had that model
    knot3 = {**base, "first_knot_epoch": 3.0, "engine": "packed (2)"}
    more = [{**knot3, "variant": "LoRA", "seed": 5, "best_epoch": 3, "test_acc": 80.0,
             "dev_loss_per_epoch": [0.5, 0.47, 0.46, 0.5, 0.6]},
            {**knot3, "variant": "step-down 8→2", "seed": 5, "best_epoch": 2, "test_acc": 81.5, "engine": "packed (3)",
             "dev_loss_per_epoch": [0.5, 0.38, 0.39, 9.0, 9.0]},
            {**knot3, "variant": "LoRA", "seed": 6, "best_epoch": 4, "test_acc": 80.0},
            {**knot3, "variant": "step-down 8→2", "seed": 6, "best_epoch": 2, "test_acc": 85.0}]
    t = epochs.engine_noise(pd.DataFrame(rows + more), "LoRA", ("sst2",))
    assert t[["same engine", "pairs", "exact ties", "different epoch picked"]].values.tolist() == [
        [True, 2, 2, 0], [False, 2, 0, 1]]
    assert t["largest absolute difference (pp)"].tolist() == pytest.approx([0.0, 1.5])
    assert t["largest dev-loss gap before the knot"].iloc[1] == pytest.approx(0.09)

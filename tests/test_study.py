"""The `real` study (paper_repro.lm.study) from synthetic result payloads: selection, verdicts, figures, report."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cola_theory.results import save_result  # noqa: E402
from paper_repro.lm import stats, study  # noqa: E402
from paper_repro.lm.profiles import jobs_for  # noqa: E402

TASKS = ("wsc", "rte")  # the study's tests use two tasks of the real profile (all its variants)
BEST_LR = 5e-4  # dev peaks here; every other LR has a worse dev and a (decoy) better test accuracy
EFFECT = {"LoRA": 0.0, "COLA-3": 2.0, "COLA-2": 1.0, "COLA-5": 2.5, study.RESTART: 1.5, study.JAGGED: -3.0,
          study.NO_RESET: 0.0, "step-down 8→2": 0.5, "step-down 8→4": 1.0, "step-down 8→6": 1.5,
          "step-down 8→8": -1.0}


def planted(task: str, variant: str, seed: int) -> float:
    """Test accuracy (%) at the best LR: a seed level shared by all variants (pairing) + effect + noise."""
    noise = 0.4 * (((seed * 7 + len(variant)) % 3) - 1) if variant != "LoRA" else 0.0
    return 60.0 + 3 * seed + (5.0 if task == "rte" else 0.0) + EFFECT[variant] + noise


def write_results(root: Path, tasks=TASKS) -> int:
    n = 0
    for job in jobs_for("real"):
        c = job.cfg
        if c.task not in tasks:
            continue
        v = study.variant_label(c.to_dict())
        dev, test = (70.0 + EFFECT[v], planted(c.task, v, c.seed)) if c.lr == BEST_LR else (50.0, 99.0)
        m = {"status": "finished", "test_acc": test / 100, "dev_acc": dev / 100, "best_epoch": 4}
        if c.zero_shot:
            m["zero_shot_test_acc"] = 0.5
        pack = {"packed": {"size": 3, "index": n % 3}} if c.task == "rte" else {}  # rte "ran" in packs of 3
        save_result(job.result_path(root), config={**c.to_dict(), "chain": {}}, history=[], metrics=m,
                    meta={"created_at": "2026-12-01T00:00:00Z", "device": "test", **pack})
        n += 1
    return n


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("real")
    write_results(root)
    return root


@pytest.fixture(scope="module")
def loaded(results):
    runs, cov = study.load_study(results, warn=lambda m: None)
    sel = stats.select_lr_per_seed(runs)
    return runs, cov, sel, study.comparisons(sel, ("sst2", "wsc", "rte"))


def test_variant_labels_come_from_the_config_alone():
    labels = {study.variant_label(j.cfg.to_dict()) for j in jobs_for("real")}
    assert labels == set(EFFECT)  # one label per variant, the same on every task


def test_loading_coverage_and_dev_selection(loaded):
    runs, cov, sel, _ = loaded
    n_jobs = len([j for j in jobs_for("real") if j.cfg.task in TASKS])
    assert len(runs) == n_jobs
    assert study.coverage_line(cov) == f"not run yet: {n_jobs} of 1525 runs present"
    assert study.coverage_line(cov, "real_fig3") == "not run yet: 250 of 375 runs present"  # sst2 missing
    assert (sel["lr"] == BEST_LR).all() and (sel["test_acc"] < 99).all()  # chosen on dev, never on test
    row = sel[(sel["task"] == "rte") & (sel["variant"] == "COLA-3") & (sel["seed"] == 2)].iloc[0]
    assert row["test_acc"] == pytest.approx(planted("rte", "COLA-3", 2))


def test_comparisons_recover_the_planted_effects(loaded):
    _, _, _, comp = loaded
    pooled = comp[comp["task"] == "pooled"].set_index(["treatment", "control"])
    for variant, effect in EFFECT.items():
        if variant == "LoRA":
            continue
        noise = sum(0.4 * (((s * 7 + len(variant)) % 3) - 1) for s in range(5)) / 5
        assert pooled.loc[(variant, "LoRA"), "mean_diff"] == pytest.approx(effect + noise), variant
    assert pooled.loc[("COLA-3", "LoRA"), "verdict"] == "supported"
    assert pooled.loc[(study.JAGGED, "LoRA"), "verdict"] == "not supported"
    assert pooled.loc[(study.NO_RESET, "LoRA"), "verdict"] == "inconclusive at this scale"
    assert pooled.loc[(study.RESTART, "COLA-3"), "mean_diff"] < 0  # restart: +1.5 vs COLA-3's +2
    assert pooled.loc[("COLA-3", "COLA-2"), "mean_diff"] == pytest.approx(1.0, abs=0.5)
    assert set(comp[comp["treatment"] == "step-down 8→2"]["task"]) == {"wsc", "rte", "pooled"}
    # the resolution line: the pooled mde now, and projected to 5 seeds x 7 tasks from the within-task spread
    line, now = stats.resolution(comp, "COLA-3", "LoRA", 5, 7), pooled.loc[("COLA-3", "LoRA"), "mde"]
    mine = comp[(comp["treatment"] == "COLA-3") & (comp["control"] == "LoRA") & (comp["task"] != "pooled")]
    full = stats.projected_mde(list(mine["diffs"]), 5, 7)
    assert f"detects a true difference of {now:.2f} pp" in line and f"would detect {full:.2f} pp" in line
    assert 0 < full < now and stats.resolution(comp, "COLA-9", "LoRA", 5, 7) == ""


def test_forest_figure_reads_back_the_plotted_values(loaded):
    import matplotlib.pyplot as plt

    _, _, _, comp = loaded
    fig = study.forest_figure(comp, study.VS_LORA)
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title().split("\n")[0] for ax in axes] == list(study.VS_LORA)
    labels = [t.get_text() for t in axes[0].get_yticklabels()]
    assert labels == ["wsc", "rte", "pooled"]
    ticks = dict(zip(axes[0].get_yticks(), labels))
    for ax in axes:
        rows = comp[(comp["treatment"] == ax.get_title().split("\n")[0]) & (comp["control"] == "LoRA")]
        bars = ax.containers[0]
        xs = bars.lines[0].get_xdata()
        assert list(xs) == pytest.approx(list(rows["mean_diff"]))
        (segments,) = [c.get_segments() for c in bars.lines[2]]
        assert [s[0][0] for s in segments] == pytest.approx(list(rows["ci_lo"]))
        assert [s[1][0] for s in segments] == pytest.approx(list(rows["ci_hi"]))
        assert [ticks[y] for y in bars.lines[0].get_ydata()] == list(rows["task"])
    plt.close(fig)


def test_table4_and_fig3_analogues(loaded):
    _, _, sel, _ = loaded
    t4 = study.table4(sel, ("sst2", "wsc", "rte")).set_index("task")
    assert list(t4.index) == ["wsc", "rte"]  # a task without results has no row
    mean = lambda v, t: sum(planted(t, v, s) for s in range(5)) / 5  # noqa: E731
    assert t4.loc["rte", "mean_length 3"] == pytest.approx(mean("COLA-3", "rte"))
    assert t4.loc["wsc", "mean_length 1"] == pytest.approx(mean("LoRA", "wsc"))
    assert t4.loc["rte", "length 5"].endswith("(n=5)") and " ± " in t4.loc["rte", "length 5"]
    f3 = study.fig3_table(sel, ("rte",), (2, 8)).set_index("task")
    assert f3.loc["rte", "mean_r=8"] == pytest.approx(mean("step-down 8→8", "rte"))
    assert f3.loc["rte", "mean_LoRA r=8"] == pytest.approx(mean("LoRA", "rte"))


def test_table4_rows_are_balanced_over_the_runs_every_length_has(tmp_path):
    # COLA-2 has only seeds 0-2 and lacks the LR that dev prefers (5e-4): every column of the row, LoRA's too, is
    # taken on seeds 0-2 and chosen on the 4 LRs every length tried (dev ties there -> the lower LR, decoy test 99)
    write_results(tmp_path, tasks=("wsc",))
    for job in jobs_for("real"):
        c = job.cfg
        if c.task == "wsc" and study.variant_label(c.to_dict()) == "COLA-2" and (c.seed > 2 or c.lr == BEST_LR):
            job.result_path(tmp_path).unlink()
    runs, _ = study.load_study(tmp_path, warn=lambda m: None)
    t4 = study.table4(stats.select_lr_per_seed(runs), ("wsc",)).set_index("task")
    for n in (1, 2, 3, 5):
        assert t4.loc["wsc", f"mean_length {n}"] == pytest.approx(99.0)
        assert t4.loc["wsc", f"length {n}"].endswith("(n=3)")
    assert t4.loc["wsc", study.COMMON] == "seeds 0, 1, 2; LRs 1e-3, 8e-4, 1e-4, 5e-5"
    # the pairwise comparisons are unaffected for the pairs that do not involve COLA-2
    comp = study.comparisons(stats.select_lr_per_seed(runs), ("wsc",))
    assert stats.pair_rows(comp, "COLA-3", "LoRA").iloc[0]["n_pairs"] == 5


def test_report_section_tables_and_verdicts(results, tmp_path):
    files: list[Path] = []
    sections, verdicts = study.report_section(results, tmp_path, files, log=lambda m: None)
    (title, text), = sections
    assert "SmolLM2-135M" in title and "not run yet:" in text and "--profile real-cpu" in text
    assert "instead of OPT-1.3B / Llama-2-7B" in text and "tasks with results: wsc, rte (2 of 7)" in text
    n = len([j for j in jobs_for("real") if j.cfg.task in TASKS])
    assert f"Provenance: {n} runs; engine: packed (3) {n // 2}, sequential {n // 2}; device: test {n}" in text
    by_claim = {v.claim: v for v in verdicts}
    assert by_claim["cola_ge_lora"].status == "supported"
    assert by_claim["chain_length"].status == "supported"  # 2 > 1 and 3 > 2 planted
    assert by_claim["step_down"].status == "not supported"  # r=8 planted below LoRA
    assert "not OPT-1.3B / Llama-2-7B" in by_claim["cola_ge_lora"].detail
    assert "not run yet" in by_claim["cola_ge_lora"].detail
    names = {p.name for p in files}
    for stem in ("table_real_main", "table_real_comparisons", "table_real_table4", "fig3_real_rank_stepdown",
                 "table_real_cost"):
        assert {f"{stem}.md", f"{stem}.tex", f"{stem}.csv"} <= names, stem
    for stem in ("fig_real_forest", "fig_real_forest_vs_cola3", "fig_real_table4", "fig3_real_rank_stepdown"):
        assert (tmp_path / f"{stem}.png").stat().st_size > 1000 and (tmp_path / f"{stem}.pdf").exists()
    csv = pd.read_csv(tmp_path / "tables" / "table_real_comparisons.csv")
    row = csv[(csv["treatment"] == "COLA-3") & (csv["control"] == "LoRA") & (csv["task"] == "pooled")].iloc[0]
    assert row["ci_lo"] > 0 and row["n_pairs"] == 10 and row["verdict"] == "supported"
    assert "| wsc |" in (tmp_path / "tables" / "table_real_main.md").read_text()
    assert "not supported: it is worse than COLA-3" in text  # jagged cosine vs COLA-3
    assert "Resolution: with 10 pairs over 2 tasks, the pooled COLA-3 - LoRA comparison detects" in text
    assert row["mde"] > 0 and "detectable at 80% power (pp)" in (tmp_path / "tables" / "table_real_comparisons.md"
                                                                 ).read_text()


def test_nothing_run_yet_degrades_gracefully(tmp_path):
    files: list[Path] = []
    sections, verdicts = study.report_section(tmp_path / "none", tmp_path / "fig", files, log=lambda m: None)
    assert "not run yet: 0 of 1525 runs present" in sections[0][1] and not files
    assert [v.status for v in verdicts] == ["not run"] * 3


def test_full_report_has_the_section_and_keeps_the_real_runs_out_of_the_cpu_table(results, tmp_path):
    from paper_repro.make_figures import build

    build(results, tmp_path, log=lambda m: None)
    report = (tmp_path / "REPORT.md").read_text()
    assert "## Real model at the paper's protocol" in report
    assert "| real: SmolLM2-135M, COLA-3 vs LoRA pooled over tasks | **supported** |" in report
    assert not (tmp_path / "tables" / "table_cpu_smollm2.md").exists()  # real results are not the cpu profile's
    assert not math.isnan(pd.read_csv(tmp_path / "tables" / "table_real_table4.csv")["mean_length 2"].iloc[0])


def test_deviations_say_when_some_cells_lack_an_lr():
    runs = pd.DataFrame([{"task": "sst2", "variant": v, "seed": s, "lr": lr, "best_epoch": 1}
                         for v in ("LoRA", "COLA-3") for s in (0, 1) for lr in ((1e-3, 1e-4) if s == 0 else (1e-3,))])
    assert "only 2 of 4 (task, variant, seed) cells have every LR of {0.001, 0.0001}" in study.deviations(runs)
    assert "2 of 4 cells have every LR" in study.deviations(runs, short=True)
    even = runs[runs["lr"] == 1e-3]
    assert not any("cells have every LR" in d for d in study.deviations(even))


def test_deviations_say_when_some_cells_lack_a_seed():
    runs = pd.DataFrame([{"task": t, "variant": v, "seed": s, "lr": 1e-3, "best_epoch": 1}
                         for t, n in (("sst2", 5), ("rte", 3)) for v in ("LoRA", "COLA-3") for s in range(n)])
    assert ("seeds 0, 1, 2, 3, 4, but only 2 of 4 (task, variant) cells have all 5 (paper: 5 seeds, values [U])"
            in study.deviations(runs))
    assert "2 of 4 cells have 5 seeds" in study.deviations(runs, short=True)
    five = runs[runs["task"] == "sst2"]
    assert "seeds 0, 1, 2, 3, 4 (paper: 5 seeds, values [U])" in study.deviations(five)
    assert not any("seeds" in d for d in study.deviations(five, short=True))
    three = runs[runs["seed"] < 3]  # every cell has the same 3 seeds: the older wording
    assert "seeds 0, 1, 2 only" in study.deviations(three, short=True)


def test_learned_tasks_sensitivity_row_in_comparisons_forest_and_report(results, tmp_path):
    import matplotlib.pyplot as plt

    # three tasks, LoRA at 70 + seed, COLA-3 one point lower on sst2 / cb and eight lower on wsc, whose untrained
    # accuracy (75) the fine-tuned models do not beat: the second reading pools sst2 and cb only
    rows = [{"task": t, "variant": v, "seed": s, "lr": 1e-3, "dev_acc": 70.0 + s - d, "test_acc": 70.0 + s - d}
            for t, lower in (("sst2", 1.0), ("cb", 1.0), ("wsc", 8.0)) for s in range(3)
            for v, d in (("LoRA", 0.0), ("COLA-3", lower + 0.1 * s))]
    sel = stats.select_lr_per_seed(pd.DataFrame(rows))
    untrained = {"sst2": 50.0, "cb": 50.0, "wsc": 75.0}
    comp = study.comparisons(sel, ("sst2", "cb", "wsc"), untrained)
    c3 = stats.pair_rows(comp, "COLA-3", "LoRA").set_index("task")
    assert list(c3.index) == ["sst2", "cb", "wsc", "pooled", stats.LEARNED]
    assert c3.loc["pooled", "mean_diff"] == pytest.approx(-(1.1 + 1.1 + 8.1) / 3)
    assert c3.loc[stats.LEARNED, "mean_diff"] == pytest.approx(-1.1) and c3.loc[stats.LEARNED, "n_tasks"] == 2
    assert study.comparisons(sel, ("sst2", "cb", "wsc"))["task"].ne(stats.LEARNED).all()  # only with untrained
    fig = study.forest_figure(comp, study.VS_LORA)
    ax = [a for a in fig.axes if a.get_title()][0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["sst2", "cb", "wsc", "pooled", stats.LEARNED]
    plt.close(fig)
    learned = stats.learned_tasks(sel, "COLA-3", "LoRA", untrained, ("sst2", "cb", "wsc", "rte"))
    assert list(learned["task"]) == ["sst2", "cb", "wsc"]  # in the order asked; rte has no pairs
    line = study.sensitivity_line(comp, learned)
    assert "without the tasks not learned (wsc;" in line and "6 pairs over 2 tasks" in line
    assert "**not supported**" in line  # -1.1 in every pair of sst2 and cb
    assert list(study.learned_table(learned)["learned"]) == ["yes", "yes", "no"]
    # a task whose untrained accuracy was never measured cannot be shown learned: left out, and said so
    partial = {"sst2": 50.0, "wsc": 75.0}
    line = study.sensitivity_line(study.comparisons(sel, ("sst2", "cb", "wsc"), partial),
                                  stats.learned_tasks(sel, "COLA-3", "LoRA", partial))
    assert "not learned: wsc; no untrained accuracy, so left out too: cb; fewer than two" in line
    shown = study.learned_table(stats.learned_tasks(sel, "COLA-3", "LoRA", partial, ("cb",))).iloc[0]
    assert (shown["untrained (%)"], shown["gain [95% CI] (pp)"], shown["learned"]) == ("-", "-", "no")
    # the planted study: both tasks beat the untrained 50%, so the report says there is no second reading
    sections, _ = study.report_section(results, tmp_path, [], log=lambda m: None)
    assert "Sensitivity: every task with pairs is learned" in sections[0][1]
    assert "| wsc | 5 | 50.00 |" in (tmp_path / "tables" / "table_real_learned.md").read_text()


def test_lr_coverage_is_the_grid_every_cell_tried():
    from paper_repro.lm.tables import lr_coverage

    grid = (1e-3, 8e-4, 5e-4)
    rows = [("a", v, s, lr) for v in ("LoRA", "COLA-3") for s in (0, 1) for lr in grid]  # task a: every cell, all 3
    rows += [("b", v, s, lr) for v in ("LoRA", "COLA-3") for s in (0, 1) for lr in (1e-3, 8e-4)]
    rows += [("b", "LoRA", 0, 5e-4), ("b", "COLA-5", 1, 5e-4)]  # one cell has 5e-4; another variant does not count
    rows += [("c", v, 0, lr) for v in ("LoRA", "COLA-3") for lr in (1.5e-4, 2e-5)]  # off-grid LRs keep their digits
    runs = pd.DataFrame(rows, columns=["task", "variant", "seed", "lr"])
    assert lr_coverage(runs, ("LoRA", "COLA-3"), grid) == {"a": "all 3", "b": "2 of 3: 1e-3, 8e-4",
                                                           "c": "2 of 3: 1.5e-4, 2e-5"}


def test_main_table_arms_use_the_lrs_both_tried(tmp_path):
    # LoRA lacks the LR that dev prefers (its 5e-4 runs "not landed yet"); COLA-3 has it. The main table's two
    # columns must describe the pairs beside them: both arms chosen on the 4 LRs both tried (decoy test 99.0 there).
    write_results(tmp_path, tasks=("wsc",))
    for p in (tmp_path / "lm").rglob("lora-L1-*lr0.0005-*.json"):
        p.unlink()
    files: list[Path] = []
    study.report_section(tmp_path, tmp_path / "fig", files, log=lambda m: None)
    main = pd.read_csv(tmp_path / "fig" / "tables" / "table_real_main.csv").set_index("task")
    assert main.loc["wsc", "mean_LoRA"] == pytest.approx(99.0) and main.loc["wsc", "mean_COLA-3"] == pytest.approx(99.0)
    assert main.loc["wsc", "COLA-3 - LoRA [95% CI]"].startswith("+0.00")
    assert main.loc["wsc", "LRs in every cell"].startswith("4 of 5")

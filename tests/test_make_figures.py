"""Figures, tables, verdicts and REPORT.md from the fixture result files (made-up numbers, see regenerate.py)."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from paper_repro import report  # noqa: E402
from paper_repro.lm import plots, tables  # noqa: E402
from paper_repro.make_figures import build  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "results"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("figs")
    results = base / "res"
    shutil.copytree(FIXTURES, results)
    summary = build(results, base / "fig", log=lambda m: None)
    return results, base / "fig", summary


def test_lr_is_selected_on_dev_not_test():
    sel = tables.select_lr(tables.load_lm_results(FIXTURES))
    lora = sel[(sel["model"] == "opt-1.3b") & (sel["method"] == "lora")].iloc[0]
    # 1e-4 has the better test accuracy (80) but the worse dev accuracy: 1e-3 must be chosen
    assert lora["lr"] == 1e-3 and lora["selected_by"] == "best mean dev"
    assert lora["test_mean"] == pytest.approx(72.0) and lora["test_std"] == pytest.approx(math.sqrt(2))
    cpu = sel[(sel["model"] == "smollm2-135m") & (sel["method"] == "lora")].iloc[0]
    assert cpu["selected_by"] == "single LR" and cpu["zero_shot_mean"] == pytest.approx(55.0)


def test_tables_written_with_reference_values(built):
    _, figs, summary = built
    tdir = figs / "tables"
    for name in ("table1_opt13b", "table4_chain_length", "fig3_rank_stepdown", "table_compute", "table_cpu_smollm2"):
        for ext in ("md", "tex", "csv"):
            assert (tdir / f"{name}.{ext}").stat().st_size > 0, name
    t1 = (tdir / "table1_opt13b.md").read_text()
    assert "72.00 ± 1.41" in t1 and "74.50 ± 0.71" in t1 and "+2.50" in t1
    assert "LoRA paper (reference)" in t1 and "72.49 [D]" in t1 and "74.15 [D]" in t1
    assert r"$\pm$" in (tdir / "table1_opt13b.tex").read_text()
    cpu = (tdir / "table_cpu_smollm2.md").read_text()
    assert "Q4_1" in cpu and "paper (reference)" not in cpu.split("\n", 2)[2]  # no paper numbers for SmolLM2
    t4 = pd.read_csv(tdir / "table4_chain_length.csv")
    row = t4[t4["model"] == "opt-1.3b"].iloc[0]
    assert [row["mean_1"], row["mean_2"], row["mean_3"]] == pytest.approx([72.0, 73.0, 74.5])
    assert not summary.bound_violated


def test_compute_table_flops_and_params():
    sel = tables.select_lr(tables.load_lm_results(FIXTURES))
    comp = tables.compute_table(sel)
    lora = comp[(comp["model"] == "opt-1.3b") & (comp["method"] == "lora")].iloc[0]
    assert lora["trainable params per link (analytic, max)"] == 1_572_864  # = the paper's [D] count
    n = tables.MODEL_DIMS["opt-1.3b"][0]
    assert lora["GFLOPs/token (analytic)"] * 1e9 == pytest.approx(4 * n + 3 * 1_572_864 * 2)
    step = comp[comp["ranks"] == "8-2"].iloc[0]
    assert step["FLOPs vs LoRA"] < 1.0  # rank step-down saves (a little)


def test_figures_and_report(built):
    results, figs, summary = built
    for stem in ("fig3_rank_stepdown", "fig_chain_length", "fig_cpu_smollm2_lora_vs_cola"):
        assert (figs / f"{stem}.png").stat().st_size > 1000 and (figs / f"{stem}.pdf").exists()
    text = (figs / "REPORT.md").read_text()
    assert "## Verdicts" in text and "## Environment" in text and "## Paper numbers (paper (reference))" in text
    assert "not run: `python paper_repro/run_all.py --profile gpu --only lm`" in text  # Table 2 has no results
    assert "not run (t1_summary.md missing)" in text  # theory part absent from the fixtures
    assert "| T1 | **holds** |" in text and "| Table 1: OPT-1.3B | **holds** |" in text
    assert "| Table 2: Llama-2-7B | **not run** |" in text
    assert "| Figure 3: opt-1.3b | **holds** |" in text  # one point below LoRA = the paper's "except one"
    assert "git commit" in text and "fixture" in text
    assert str(figs / "REPORT.md") in summary.text


def test_verdicts_fail_when_claims_fail():
    main = pd.DataFrame({"task": ["rte", "wsc"], "lora_mean": [70.0, 60.0], "cola_mean": [71.0, 59.0]})
    (v,) = report.cola_vs_lora_verdicts({"Table 1": main})
    assert v.status == "fails" and "wsc (-1.00)" in v.detail
    chain = pd.DataFrame({"model": ["m"], "task": ["rte"], "increases": [False]})
    assert report.chain_length_verdicts(chain)[0].status == "fails"
    step = pd.DataFrame({"model": ["m"], "task": ["rte"], "lora_mean": [70.0], "mean_r2": [60.0], "mean_r4": [65.0]})
    assert report.stepdown_verdicts(step)[0].status == "fails"


def test_theorem_verdict_violation_and_absence(tmp_path):
    assert report.theorem41_verdict(tmp_path).status == "not run"
    (tmp_path / "theory").mkdir()
    src = (FIXTURES / "theory" / "theorem41.csv").read_text().splitlines()
    (tmp_path / "theory" / "theorem41.csv").write_text("\n".join(src) + "\n")
    assert report.theorem41_verdict(tmp_path).status == "holds"
    bad = src[1].rsplit(",", 1)[0] + ",False"  # holds column flipped
    (tmp_path / "theory" / "theorem41.csv").write_text("\n".join([src[0], bad, *src[2:]]) + "\n")
    v = report.theorem41_verdict(tmp_path)
    assert v.status == "violated" and "1 of 8 points" in v.detail


def test_corrupt_result_is_reported_and_left_out(tmp_path):
    shutil.copytree(FIXTURES, tmp_path / "res")
    victim = sorted((tmp_path / "res" / "lm").rglob("*.json"))[0]
    victim.write_text(victim.read_text().replace('"test_acc": 0.', '"test_acc": 0.9', 1))
    warnings = []
    df = tables.load_lm_results(tmp_path / "res", warn=warnings.append)
    assert len(df) == len(list((FIXTURES / "lm").rglob("*.json"))) - 1
    assert any(str(victim) in w and "sha256" in w for w in warnings)


def test_empty_results_dir_gives_a_report_of_not_run_parts(tmp_path):
    summary = build(tmp_path / "res", tmp_path / "fig", log=lambda m: None)
    text = (tmp_path / "fig" / "REPORT.md").read_text()
    assert text.count("not run") >= 8 and not summary.bound_violated


def _bars(ax) -> dict[str, list[float]]:
    """legend label -> heights of that bar series."""
    from matplotlib.container import BarContainer

    return {c.get_label(): [r.get_height() for r in c] for c in ax.containers if isinstance(c, BarContainer)}


def _errorbar_lines(ax) -> list[tuple[list[float], list[float]]]:
    from matplotlib.container import ErrorbarContainer

    return [(list(c.lines[0].get_xdata()), list(c.lines[0].get_ydata())) for c in ax.containers
            if isinstance(c, ErrorbarContainer)]


def test_lora_vs_cola_figure_shows_the_result_files_accuracies(built):
    """Bars are the mean test accuracy per method and the dots every seed's, read straight from the JSON files."""
    results, _, _ = built
    acc: dict[str, list[float]] = {}
    for path in sorted((results / "lm" / "smollm2-135m" / "sst2").glob("*.json")):
        payload = json.loads(path.read_text())
        acc.setdefault(payload["config"]["method"], []).append(100 * payload["metrics"]["test_acc"])
    main = tables.main_table(tables.select_lr(tables.load_lm_results(results)), "smollm2-135m")
    fig = plots.lora_vs_cola_figure(main, "SmolLM2")
    ax = fig.axes[0]
    bars = _bars(ax)
    assert sorted(bars) == ["COLA-3 (mean)", "LoRA (mean)"]
    assert bars["LoRA (mean)"] == pytest.approx([sum(acc["lora"]) / len(acc["lora"])])
    assert bars["COLA-3 (mean)"] == pytest.approx([sum(acc["cola"]) / len(acc["cola"])])
    dots = sorted(round(float(y), 9) for c in ax.collections for y in c.get_offsets()[:, 1])
    zero_shot = [100 * json.loads(p.read_text())["metrics"]["zero_shot_test_acc"]
                 for p in (results / "lm" / "smollm2-135m" / "sst2").glob("lora-*.json")]
    assert dots == sorted(round(v, 9) for v in [*acc["lora"], *acc["cola"], sum(zero_shot) / len(zero_shot)])


def test_lm_figures_plot_the_tables_values(built):
    """Chain length and rank step-down figures show the numbers of the tables written next to them."""
    _, figs, _ = built
    t4 = pd.read_csv(figs / "tables" / "table4_chain_length.csv")
    fig = plots.chain_length_figure(t4)
    drawn = sorted(tuple(round(float(v), 6) for v in y) for ax in fig.axes for _, y in _errorbar_lines(ax))
    lengths = sorted(int(c[5:]) for c in t4.columns if c.startswith("mean_"))
    expected = sorted(tuple(round(row[f"mean_{n}"], 6) for n in lengths if not pd.isna(row[f"mean_{n}"]))
                      for _, row in t4.iterrows())
    assert drawn and drawn == expected
    step = pd.read_csv(figs / "tables" / "fig3_rank_stepdown.csv")
    fig = plots.stepdown_figure(step)
    assert len(fig.axes) == len(step)
    for ax, (_, row) in zip(fig.axes, step.iterrows()):
        ((ranks, means),) = _errorbar_lines(ax)
        assert means == pytest.approx([row[f"mean_r{r}"] for r in ranks]) and len(ranks) >= 2
        lora = [line.get_ydata()[0] for line in ax.get_lines() if line.get_label() == "LoRA r=8"]
        assert lora == pytest.approx([row["lora_mean"]])


def test_report_names_the_results_folder_relative_to_the_repository(built, tmp_path):
    """A report built from the repository's results names them relative to the root (no machine's path in the
    committed report); results elsewhere keep their absolute path."""
    results, figs, _ = built
    assert report.shown_path(ROOT / "paper_repro" / "results") == "paper_repro/results"
    assert report.shown_path(results) == str(results.resolve())
    assert f"from the result files in `{results.resolve()}`" in (figs / "REPORT.md").read_text()
    inside = ROOT / "paper_repro" / "results" / "theory"  # committed results, read only
    report.write_report(tmp_path / "REPORT.md", sections=[], verdicts=[], metas=[], git=("abc", False),
                        results_dir=inside)
    text = (tmp_path / "REPORT.md").read_text()
    assert "from the result files in `paper_repro/results/theory`" in text and str(ROOT) not in text

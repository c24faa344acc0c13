"""README's generated verdict table: current with the committed tables, and a faithful function of them."""

from __future__ import annotations

import pandas as pd
import pytest

from paper_repro import readme_sync as rs


def test_committed_readme_table_is_current():
    # Fails whenever figures/tables were rebuilt (new results) and the README block was not: run readme_sync.py.
    assert rs.sync(rs.README, rs.TABLES, check=True), "stale: run `python paper_repro/readme_sync.py`"


def _tables(tmp_path, t_lo: float, verdict: str, learned: bool):
    pd.DataFrame({"task": ["rte"], "LoRA": ["64.48 ± 2.80 (n=5)"], "COLA-3": ["63.47 ± 2.11 (n=5)"],
                  "LRs in every cell": ["3 of 5: 1e-3, 8e-4, 1e-4"]}).to_csv(
        tmp_path / "table_real_main.csv", index=False)
    pd.DataFrame({"task": ["rte"], "n_pairs": [5], "untrained": [46.6], "gain": [17.4], "ci_lo": [15.7],
                  "ci_hi": [19.2], "learned": [learned]}).to_csv(tmp_path / "table_real_learned.csv", index=False)
    rows = [dict(task=task, treatment=tr, control="LoRA", n_pairs=5, n_tasks=1, mean_diff=-1.25, ci_lo=-2.5,
                 ci_hi=-0.5, t_lo=t_lo, t_hi=0.4, n_pos=1, n_neg=4, n_ties=0, sign_p=0.375, verdict=verdict, mde=3.2)
            for task, tr in (("rte", "COLA-3"), ("rte", "COLA-5"))]
    pd.DataFrame(rows).to_csv(tmp_path / "table_real_comparisons.csv", index=False)


@pytest.mark.parametrize(("t_lo", "fragile"), [(-3.0, True), (0.1, False)])
def test_table_rows_follow_the_csvs(tmp_path, t_lo, fragile):
    _tables(tmp_path, t_lo=t_lo, verdict="not supported", learned=True)
    lines = rs.table(tmp_path).splitlines()
    assert len(lines) == 3  # header, rule, one COLA-3 vs LoRA row (the COLA-5 row is not the headline)
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert len(cells) == lines[0].count("|") - 1 == len(lines[1].split("|")) - 2
    assert cells[:6] == ["RTE", "5", "3 of 5: 1e-3, 8e-4, 1e-4", "64.48 ± 2.80", "63.47 ± 2.11",
                         "−1.25 [−2.50, −0.50]"]
    assert ("fragile" in cells[8]) is fragile and cells[8].startswith("**not supported**")
    assert cells[10] == "yes, +17.40 [+15.70, +19.20]"
    assert cells[11] == "+1.66 [S]"  # the paper's OPT-1.3B RTE gain, labelled as a reference value


def test_render_replaces_only_the_block_and_is_idempotent(tmp_path):
    _tables(tmp_path, t_lo=-3.0, verdict="inconclusive at this scale", learned=False)
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\nbefore\n{rs.BEGIN}\nold numbers\n{rs.END}\nafter\n")
    assert rs.sync(readme, tmp_path, check=True) is False  # stale, and check mode leaves it alone
    assert "old numbers" in readme.read_text()
    assert rs.sync(readme, tmp_path) is False
    text = readme.read_text()
    assert text.startswith("# title\nbefore\n") and text.endswith(f"{rs.END}\nafter\n") and "old numbers" not in text
    assert "no, +17.40" in text and "fragile" not in text  # an inconclusive verdict is never "fragile"
    assert rs.sync(readme, tmp_path) is True and readme.read_text() == text


def test_bad_inputs_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="run_all.py --only figures"):
        rs.table(tmp_path)
    _tables(tmp_path, t_lo=-3.0, verdict="not supported", learned=True)
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    with pytest.raises(ValueError, match="exactly one"):
        rs.sync(readme, tmp_path)
    assert rs.main(["--readme", str(readme), "--tables-dir", str(tmp_path)]) == 2
    readme.write_text(f"{rs.BEGIN}\nstale\n{rs.END}\n")
    assert rs.main(["--check", "--readme", str(readme), "--tables-dir", str(tmp_path)]) == 1
    assert rs.main(["--readme", str(readme), "--tables-dir", str(tmp_path)]) == 0
    assert rs.main(["--check", "--readme", str(readme), "--tables-dir", str(tmp_path)]) == 0


def _cost(tmp_path):
    pd.DataFrame([
        {"task": "wsc", "device": "cpu", "runs measured": 3, "min per run: median [range]": "6.0 [5.0, 10.0]",
         "run-hours spent": 0.36, "missing runs": 222, "projected hours (one process)": 22.2,
         "with forks": 19.0, "not projected (no run measured)": ""},
        {"task": "rte", "device": "-", "runs measured": 0, "min per run: median [range]": "-",
         "run-hours spent": 0.0, "missing runs": 245, "projected hours (one process)": float("nan"),
         "with forks": float("nan"), "not projected (no run measured)": ""},
        {"task": "all", "device": "cpu", "runs measured": 3, "min per run: median [range]": "-",
         "run-hours spent": 0.36, "missing runs": 467, "projected hours (one process)": 22.2,
         "with forks": 19.04, "not projected (no run measured)": "rte"},
    ]).to_csv(tmp_path / "table_real_cost.csv", index=False)


def test_cost_block_follows_its_csv_and_is_rewritten_only_where_its_markers_are(tmp_path):
    _tables(tmp_path, t_lo=-3.0, verdict="not supported", learned=True)
    with pytest.raises(FileNotFoundError, match="table_real_cost.csv is missing"):
        rs.cost_block(tmp_path)
    _cost(tmp_path)
    lines = rs.cost_block(tmp_path).splitlines()
    assert lines[2] == "| WSC | cpu | 3 | 6.0 [5.0, 10.0] | 0.4 | 222 | 22.2 | 19.0 |"
    assert lines[3] == "| RTE | – | 0 | – | 0.0 | 245 | – | – |"
    assert lines[4] == "| **all** | cpu | 3 | – | 0.4 | 467 | 22.2 (not projected, no run measured: RTE) | 19.0 |"
    readme = tmp_path / "README.md"
    readme.write_text(f"{rs.BEGIN}\nx\n{rs.END}\nmid\n{rs.COST_BEGIN}\nold cost\n{rs.COST_END}\nend\n")
    assert rs.sync(readme, tmp_path) is False
    text = readme.read_text()
    assert "old cost" not in text and "| **all** | cpu |" in text and text.endswith(f"{rs.COST_END}\nend\n")
    assert "\nmid\n" in text and rs.sync(readme, tmp_path, check=True) is True


def test_second_reading_block_follows_its_csv_with_each_arms_one_lr(tmp_path):
    _tables(tmp_path, t_lo=-3.0, verdict="not supported", learned=True)
    with pytest.raises(FileNotFoundError, match="table_real_lr_per_task.csv is missing"):
        rs.lr_rule_block(tmp_path)
    base = dict(treatment="COLA-3", control="LoRA", n_tasks=1, ci_lo=0.36, ci_hi=1.79, t_lo=-0.14, t_hi=2.29,
                n_pos=3, n_neg=0, n_ties=2, sign_p=0.25, verdict="supported", mde=1.65)
    pd.DataFrame([{**base, "task": "cb", "n_pairs": 5, "mean_diff": 1.07, "lr_control": 5e-4, "lr_treatment": 8e-4},
                  {**base, "task": "pooled", "n_pairs": 25, "mean_diff": -0.69, "verdict": "inconclusive at this scale",
                   "lr_control": float("nan"), "lr_treatment": float("nan")}]).to_csv(
        tmp_path / "table_real_lr_per_task.csv", index=False)
    lines = rs.lr_rule_block(tmp_path).splitlines()
    assert lines[2] == ("| CB | 5e-4 / 8e-4 | 5 | +1.07 [+0.36, +1.79] | [−0.14, +2.29] | 3/0/2 (0.25) | "
                        "**supported** (fragile: t interval contains 0) |")
    assert lines[3].startswith("| **pooled** | – | 25 | −0.69 [+0.36, +1.79] |")
    readme = tmp_path / "README.md"
    readme.write_text(f"{rs.BEGIN}\nx\n{rs.END}\n{rs.LR_BEGIN}\nold\n{rs.LR_END}\nend\n")
    assert rs.sync(readme, tmp_path) is False
    text = readme.read_text()
    assert "\nold\n" not in text and "| CB | 5e-4 / 8e-4 |" in text and rs.sync(readme, tmp_path, check=True)

"""The cost table is a faithful function of the wall times the result files record."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cola_theory.results import save_result  # noqa: E402
from paper_repro.lm import cost, study  # noqa: E402
from paper_repro.lm.profiles import REAL_TASKS, jobs_for  # noqa: E402

# (task, device, wall seconds, threads, pack size, forked at step): three WSC runs on a cpu trained from step 0 and
# one forked from a family member's knot (its 60 s are spent, not a run's cost), two CB runs on a GPU
PLANTED = [("wsc", "cpu", 300.0, 1, 3, None), ("wsc", "cpu", 360.0, 1, 3, None), ("wsc", "cpu", 600.0, 2, 1, None),
           ("cb", "cuda", 30.0, 4, 25, None), ("cb", "cuda", 90.0, 4, 25, None), ("wsc", "cpu", 60.0, 1, 3, 21)]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    root = tmp_path_factory.mktemp("cost")
    jobs = {t: [j for j in jobs_for("real") if j.cfg.task == t] for t in ("wsc", "cb")}
    for i, (task, device, wall, threads, pack, forked) in enumerate(PLANTED):
        job = jobs[task][i]
        meta = {"created_at": "2026-12-01T00:00:00Z", "device": device, "wall_time_s": wall,
                "torch_threads": threads, **({"packed": {"size": pack, "index": 0}} if pack > 1 else {})}
        save_result(job.result_path(root), config={**job.cfg.to_dict(), "chain": {}}, history=[],
                    metrics={"status": "finished", "test_acc": 0.5, "dev_acc": 0.5,
                             **({"forked_at_step": forked} if forked else {})}, meta=meta)
    runs, cov = study.load_study(root, warn=lambda m: None)
    return cost.cost_table(runs, cov, REAL_TASKS), cov


def test_measured_minutes_hours_and_projection(table):
    t, cov = table
    total = cov[cov["group"] == "all"].set_index("task")["total"]
    wsc = t[(t["task"] == "wsc")].iloc[0]
    assert (wsc["device"], wsc["runs measured"], wsc["threads"], wsc["pack sizes"]) == ("cpu", 4, "1, 2", "1, 3")
    # the forked run's minute is not a run's cost: median and range of the 3 runs trained from step 0
    assert wsc["median_min"] == pytest.approx(6.0) and wsc["min per run: median [range]"] == "6.0 [5.0, 10.0]"
    assert wsc["run-hours spent"] == pytest.approx(1320 / 3600)
    assert wsc["missing runs"] == total["wsc"] - 4
    assert wsc["projected hours (one process)"] == pytest.approx(6.0 * (total["wsc"] - 4) / 60)
    # with the forks to come: scaled by the share of their steps the missing runs train (WSC: 7 steps an epoch,
    # 5 epochs; the step-down and no-reset runs that fork skip their first link)
    left = cov[cov["group"] == "all"].set_index("task").loc["wsc"]
    assert left["steps_left"] == 35 * (total["wsc"] - 4) and 0.5 < left["forked_steps_left"] / left["steps_left"] < 1
    assert wsc["with forks"] == pytest.approx(wsc["projected hours (one process)"] * left["forked_steps_left"]
                                              / left["steps_left"])
    cb = t[(t["task"] == "cb")].iloc[0]
    assert (cb["device"], cb["median_min"], cb["pack sizes"]) == ("cuda", pytest.approx(1.0), "25")
    rte = t[t["task"] == "rte"].iloc[0]  # nothing measured: the missing count, no projection
    assert rte["runs measured"] == 0 and rte["missing runs"] == total["rte"]
    assert math.isnan(rte["projected hours (one process)"])


def test_one_total_per_device_names_what_it_cannot_project(table):
    t, cov = table
    totals = t[t["task"] == "all"].set_index("device")
    assert set(totals.index) == {"cpu", "cuda"}
    n_missing = int((cov[cov["group"] == "all"]["total"] - cov[cov["group"] == "all"]["present"]).sum())
    assert (totals["missing runs"] == n_missing).all()
    for col in ("projected hours (one process)", "with forks"):
        assert totals.loc["cpu", col] == pytest.approx(float(t[(t["task"] == "wsc")][col].iloc[0]))
    assert "cb" in totals.loc["cpu", "not projected (no run measured)"].split(", ")
    assert "wsc" in totals.loc["cuda", "not projected (no run measured)"].split(", ")
    shown = cost.shown(t)
    assert "median_min" not in shown and (shown[shown["task"] == "rte"]["projected hours (one process)"] == "-").all()


def test_no_results_is_a_table_of_missing_runs(tmp_path):
    runs, cov = study.load_study(tmp_path / "none", warn=lambda m: None)
    t = cost.cost_table(runs, cov, REAL_TASKS)
    assert (t[t["task"] != "all"]["runs measured"] == 0).all()
    assert t[t["task"] == "all"]["missing runs"].iloc[0] == 1525


def test_fork_bench_compares_forked_runs_with_runs_from_step_0(tmp_path):
    """benchmarks/fork_bench.py on planted step-down results: median minutes per run of each kind, the ratio, the
    fraction of steps a forked run trains (its first knot after 3 of 5 epochs), and the BENCHMARKS.md goal row."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import fork_bench
    import make_benchmarks_md

    pick = lambda r: [j for j in jobs_for("real") if j.cfg.task == "sst2" and j.cfg.rank == (8, r)  # noqa: E731
                      and j.cfg.link_epochs == (3.0, 2.0) and j.cfg.lr == 1e-3]
    jobs = pick(4)[:3] + pick(6)[3:]  # 8->4 from step 0, 8->6 forked: one kind, the step-downs cost the same
    for job, wall, forked in zip(jobs, (600.0, 720.0, 900.0, 240.0, 300.0), (None, None, None, 375, 375)):
        meta = {"created_at": "2026-12-07T00:00:00Z", "device": "cpu", "wall_time_s": wall, "torch_threads": 1,
                "packed": {"size": 2, "index": 0}}
        save_result(job.result_path(tmp_path), config={**job.cfg.to_dict(), "chain": {}}, history=[],
                    metrics={"status": "finished", "test_acc": 0.5, "dev_acc": 0.5, "steps_per_epoch": 125,
                             **({"forked_at_step": forked} if forked else {})}, meta=meta)
    rep = fork_bench.measure(tmp_path)
    (row,) = rep["rows"]
    assert (row["variant"], row["runs from step 0"], row["forked runs"]) == ("step-down 8→r", 3, 2)
    assert row["min per run from step 0"] == pytest.approx(12.0) and row["min per forked run"] == pytest.approx(4.5)
    assert row["ratio"] == pytest.approx(4.5 / 12.0) and row["steps trained by a forked run"] == pytest.approx(0.4)
    section = "\n".join(make_benchmarks_md.fork_section(rep))
    assert "| 0.38x | met |" in section and "2.12" in section  # a family of 4: 1 + 3 x 0.375 runs' worth
    with pytest.raises(SystemExit, match="no forked run"):
        fork_bench.measure(tmp_path / "empty")

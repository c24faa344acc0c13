"""run_all's packs: a profile's jobs cut into packs (`runner.plan_packs`), run and resumed per run
(`runner.run_lm_jobs`), deferred by a time budget, and the prepared GPU window (`paper_repro/device_study.sh`).
The packed engine itself is checked against the sequential one in test_packed.py."""

import dataclasses

from lm_fixtures import DATA_DIR, needs_data

from cola_theory.lm.train import LMRunConfig


# -- run_all: packs of a profile's jobs ------------------------------------------------------------------------------
def _grid_jobs():
    from paper_repro.lm.profiles import LMJob

    base = LMRunConfig(model="tiny-llama", task="sst2", method="cola", n_links=2, epochs=2.0, batch_size=4,
                       eval_batch_size=8, num_train=8, num_dev=4, num_test=8, max_length=64, rank=4)
    grid = [LMJob(dataclasses.replace(base, lr=lr, seed=s), ("t",)) for lr in (1e-2, 1e-3) for s in (0, 1, 2)]
    other = LMJob(dataclasses.replace(base, method="lora", lr=1e-3), ("t",))  # another chain shape: its own unit
    return grid, other


def test_plan_packs_groups_what_can_share_a_pack_into_balanced_stable_units():
    from paper_repro.lm.runner import plan_packs

    grid, other = _grid_jobs()
    units = plan_packs([other, *reversed(grid)], 4)
    sizes = sorted(len(u) for u in units)
    assert sizes == [1, 3, 3]  # 6 grid jobs -> 2 packs of 3 (not 4 + 2); the LoRA job alone
    assert all(len({dict(__import__("cola_theory.lm.packed_train", fromlist=["pack_key"]).pack_key(j.cfg))["n_links"]
                    for j in u}) == 1 for u in units)
    assert plan_packs(grid, 4) == plan_packs(list(reversed(grid)), 4)  # the cut depends on the job list only
    assert [len(u) for u in plan_packs(grid, 0)] == [1] * 6
    # a token cap: batch 4 x max_length 64 = 256 tokens per run, so 600 tokens hold 2 runs -> 3 packs of 2
    assert sorted(len(u) for u in plan_packs(grid, 4, max_tokens=600)) == [2, 2, 2]
    assert sorted(len(u) for u in plan_packs(grid, 4, max_tokens=100)) == [1] * 6  # at least one run


@needs_data
def test_runner_packs_resume_per_run_and_match_the_sequential_runner(tmp_path):
    from cola_theory.results import load_result
    from paper_repro.lm.runner import run_lm_jobs

    grid, other = _grid_jobs()
    jobs = [*grid, other]
    seq = run_lm_jobs(jobs, tmp_path / "seq", data_dir=DATA_DIR, device="cpu", pack=0, log=lambda m: None)
    assert seq.count("ran") == 7
    pk = run_lm_jobs(jobs, tmp_path / "pk", data_dir=DATA_DIR, device="cpu", pack=3, log=lambda m: None)
    assert pk.count("ran") == 7
    for job in jobs:
        a, b = (load_result(job.result_path(tmp_path / d)) for d in ("seq", "pk"))
        assert a["metrics"]["test_acc"] == b["metrics"]["test_acc"] and a["config"] == b["config"]
        assert ("packed" in b["meta"]) == (job is not other)
    job = grid[4]
    job.result_path(tmp_path / "pk").unlink()  # one run of a pack lost: only it runs again
    again = run_lm_jobs(jobs, tmp_path / "pk", data_dir=DATA_DIR, device="cpu", pack=3, log=lambda m: None)
    assert again.count("ran") == 1 and again.count("skipped") == 6
    assert load_result(job.result_path(tmp_path / "pk"))["metrics"]["test_acc"] == \
        load_result(job.result_path(tmp_path / "seq"))["metrics"]["test_acc"]
    assert not any(p.is_file() for p in (tmp_path / "pk" / "lm" / "checkpoints").rglob("*"))  # removed after results


@needs_data
def test_runner_budget_defers_units_that_would_overrun_and_a_rerun_takes_them(tmp_path):
    from paper_repro.lm.runner import run_lm_jobs

    grid, _ = _grid_jobs()
    first = run_lm_jobs(grid, tmp_path, data_dir=DATA_DIR, device="cpu", pack=3, budget_s=0.05, log=lambda m: None)
    assert first.count("ran") == 3 and first.count("deferred") == 3  # the first pack ran, the second would not fit
    again = run_lm_jobs(grid, tmp_path, data_dir=DATA_DIR, device="cpu", pack=3, log=lambda m: None)
    assert again.count("skipped") == 3 and again.count("ran") == 3


@needs_data
def test_device_study_script_runs_a_window_and_packs_its_results(tmp_path):
    """paper_repro/device_study.sh (the prepared GPU window) at smoke size on the CPU: runs, tars, lists missing."""
    import os
    import subprocess
    import tarfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path / "out"), "COLA_DATA_DIR": str(DATA_DIR)}
    res = subprocess.run(["bash", "paper_repro/device_study.sh", "--profile", "smoke", "--device", "cpu", "--groups",
                          "smoke", "--pack", "2", "--budget-s", "120", "--results-dir", str(tmp_path / "res")],
                         cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    with tarfile.open(tmp_path / "out" / "real_results.tar.gz") as tar:
        names = [n for n in tar.getnames() if n.endswith(".json")]
    assert len(names) == 2 and all(n.startswith("lm/tiny-opt/sst2/") for n in names)
    assert "nothing is missing" in (tmp_path / "out" / "missing.txt").read_text()

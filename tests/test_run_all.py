"""End to end: `python paper_repro/run_all.py --profile smoke` in a temporary directory, resume, bad input.

The LM part of the smoke profile reads a few real SST-2 rows (COLA_DATA_DIR or ../shared/data); tests that
need it are skipped when the data is absent, and one test checks that the rest still runs without it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from lm_fixtures import needs_data

ROOT = Path(__file__).resolve().parents[1]
RUN_ALL = ROOT / "paper_repro" / "run_all.py"
FIXTURES = ROOT / "tests" / "fixtures" / "results"


HANG_GUARD_S = 600  # only a guard against a hung subprocess (speed lives in benchmarks/): a loaded 2-core machine
# took over 120 s for the smoke profile


def run_all(*args: str, timeout: float = HANG_GUARD_S) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, str(RUN_ALL), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


def lm_results(results: Path) -> dict[str, dict]:
    """job path -> metrics that must not depend on timing / interruption."""
    out = {}
    for path in sorted((results / "lm").rglob("*.json")):
        if "checkpoints" not in path.parts:
            payload = json.loads(path.read_text())
            m = payload["metrics"]
            losses = [h["loss"] for h in payload["history"] if h.get("event") == "step"]
            out[str(path.relative_to(results))] = {"test_acc": m.get("test_acc"), "dev_acc": m.get("dev_acc"),
                                                   "status": m["status"], "losses": losses}
    return out


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    base = tmp_path_factory.mktemp("smoke")
    proc = run_all("--profile", "smoke", "--results-dir", str(base / "res"), "--figures-dir", str(base / "fig"))
    return base / "res", base / "fig", proc


def test_smoke_profile_end_to_end(smoke):
    """Theory, figures and the report: these run with or without the benchmark data."""
    results, figures, proc = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (results / "theory" / "theorem41.csv").exists()
    assert list(figures.glob("*.png")) and list(figures.glob("*.pdf"))
    report = (figures / "REPORT.md").read_text()
    assert "## Verdicts" in report and "Theorem 4.1" in report and "paper (reference)" in report
    assert "| T1 | **holds** |" in report


@needs_data
def test_smoke_profile_runs_the_lm_jobs(smoke):
    """With the data present (CI) the LM part must really run: 2 finished results, their table, no checkpoints."""
    results, figures, proc = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = lm_results(results)
    assert len(runs) == 2 and all(r["status"] == "finished" and r["losses"] for r in runs.values()), runs
    assert (figures / "tables" / "table_smoke_tiny.md").exists()
    assert "smoke: tiny-opt (random weights)" in proc.stdout and "LM part skipped" not in proc.stdout
    assert not (results / "lm" / "checkpoints").exists() or not any((results / "lm" / "checkpoints").rglob("*.json"))


def test_second_run_skips_finished_work_and_recomputes_a_corrupted_result(smoke):
    results, figures, first = smoke
    assert first.returncode == 0
    jsons = sorted(p for p in results.rglob("*.json") if "checkpoints" not in p.parts)
    victim = jsons[0]  # an LM result when the data exists, else a theory result
    victim.write_text(victim.read_text()[:200])  # a half-written file
    before = {p: p.stat().st_mtime_ns for p in jsons if p != victim}
    proc = run_all("--profile", "smoke", "--results-dir", str(results), "--figures-dir", str(figures))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = next(line for line in proc.stdout.splitlines() if line.startswith("[run_all]") and "jobs:" in line)
    n_jobs = int(summary.split()[1])
    assert f"1 ran, {n_jobs - 1} skipped" in summary, summary
    assert str(victim) in proc.stdout and "recomputing" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing else was rewritten
    assert json.loads(victim.read_text())["sha256"]


# run_all with KnotCheckpointer.save patched to SIGKILL its own process right after the first checkpoint that is
# written once a finished result exists: the kill always lands at the same point (one job done, the next one
# half done with a checkpoint on disk), however fast or slow the machine is
KILLING_RUN_ALL = """
import os, runpy, signal, sys
from pathlib import Path
from cola_theory.lm.checkpoint import KnotCheckpointer

results, save = Path(sys.argv[2]), KnotCheckpointer.save

def save_then_die(self, *args, **kwargs):
    path = save(self, *args, **kwargs)
    if path is not None and list((results / "lm").glob("*/*/*.json")):
        os.kill(os.getpid(), signal.SIGKILL)
    return path

KnotCheckpointer.save = save_then_die
sys.argv = [sys.argv[1], "--profile", "smoke", "--only", "lm", "--results-dir", str(results)]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@needs_data
def test_killed_run_resumes_to_the_same_results(smoke, tmp_path):
    """SIGKILL after the first result exists and the next job has written a checkpoint; the rerun resumes the
    half-done job from that checkpoint and ends with the same metrics and losses as the uninterrupted run."""
    reference, _, first = smoke
    assert first.returncode == 0
    results = tmp_path / "res"
    killed = subprocess.run([sys.executable, "-c", KILLING_RUN_ALL, str(RUN_ALL), str(results)], capture_output=True,
                            text=True, timeout=HANG_GUARD_S, cwd=ROOT, env={**os.environ, "TQDM_DISABLE": "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    ckpts = results / "lm" / "checkpoints"
    assert len(list((results / "lm").glob("*/*/*.json"))) == 1 and list(ckpts.rglob("manifest.json"))
    resumed = run_all("--profile", "smoke", "--only", "lm", "--results-dir", str(results))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "1 ran, 1 skipped" in resumed.stdout and "resumed from" in resumed.stdout, resumed.stdout[-3000:]
    assert lm_results(results) == lm_results(reference)
    assert not list(ckpts.rglob("manifest.json"))  # checkpoints are deleted after success


def test_runner_reports_failed_and_missing_data_jobs_and_runs_the_rest(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT))
    from cola_theory.lm import train
    from cola_theory.lm.train import LMRunConfig
    from cola_theory.results import save_result
    from paper_repro.lm import runner
    from paper_repro.lm.profiles import LMJob

    data = tmp_path / "data" / "sst2"
    data.mkdir(parents=True)
    rows = "".join(json.dumps({"sentence": f"film {i} ", "label": i % 2, "idx": i}) + "\n" for i in range(8))
    (data / "train.jsonl").write_text(rows)
    (data / "val.jsonl").write_text(rows)
    (tmp_path / "data" / "cb").mkdir()
    (tmp_path / "data" / "cb" / "train.jsonl").write_text("{not json\n")
    small = dict(model="tiny-opt", num_train=4, num_dev=2, num_test=2, epochs=1.0)
    jobs = [LMJob(LMRunConfig(task="sst2", method="lora", **small), ("t",)),
            LMJob(LMRunConfig(task="sst2", method="cola", n_links=2, **small), ("t",)),
            LMJob(LMRunConfig(task="rte", method="lora", **small), ("t",)),
            LMJob(LMRunConfig(task="cb", method="lora", **small), ("t",))]
    loads = []

    def fake_run_lm(cfg, path, **kw):
        assert kw["model_bundle"] == ("model", "tok", "note") and kw["checkpoint_dir"].name.startswith(cfg.method)
        if cfg.method == "cola":  # runs first: jobs are sorted by id
            raise RuntimeError("boom")
        save_result(path, config={**cfg.to_dict(), "chain": {}}, history=[], metrics={"status": "finished"})

    monkeypatch.setattr(train, "run_lm", fake_run_lm)
    monkeypatch.setattr(runner, "load_bundle", lambda *a: loads.append(a) or ("model", "tok", "note"))
    out = runner.run_lm_jobs(jobs, tmp_path / "res", data_dir=tmp_path / "data", log=lambda m: None)
    ids = [j.job_id for j in jobs]
    assert [out.status[i] for i in ids] == ["ran", "failed", "no-data", "no-data"]
    assert "boom" in out.reasons[ids[1]]
    assert "rte" in out.reasons[ids[2]] and "--data-dir" in out.reasons[ids[2]]
    assert "cb" in out.reasons[ids[3]] and "COLA_DATA_DIR" in out.reasons[ids[3]]
    assert len(loads) == 2  # reloaded after the failure (the shared model may be half-modified)
    again = runner.run_lm_jobs(jobs[:1], tmp_path / "res", data_dir=tmp_path / "data", log=lambda m: None)
    assert again.status[ids[0]] == "skipped" and len(loads) == 2


def test_unknown_profile_and_part_list_the_choices():
    proc = run_all("--profile", "tpu")
    assert proc.returncode == 2 and "smoke" in proc.stderr and "gpu" in proc.stderr
    proc = run_all("--only", "theory,plots")
    assert proc.returncode == 2 and "plots" in proc.stderr and "theory, lm, figures" in proc.stderr


def test_unwritable_results_dir_fails_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run_all("--profile", "smoke", "--results-dir", str(blocker / "res"), "--figures-dir", str(tmp_path))
    assert proc.returncode == 2
    assert "--results-dir" in proc.stderr and "not writable" in proc.stderr
    assert "[theory" not in proc.stdout and "[cola]" not in proc.stdout


def test_missing_data_skips_lm_and_runs_the_rest(smoke, tmp_path):
    reference, _, first = smoke
    assert first.returncode == 0
    results = tmp_path / "res"
    shutil.copytree(reference / "theory", results / "theory")
    proc = run_all("--profile", "smoke", "--only", "theory,lm", "--results-dir", str(results),
                   "--data-dir", str(tmp_path / "no-such-data"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LM part skipped" in proc.stdout and "--data-dir" in proc.stdout and "COLA_DATA_DIR" in proc.stdout
    assert "5 skipped" in proc.stdout and "2 no-data" in proc.stdout  # theory: valid results reused
    assert not (results / "lm").exists()


def test_violated_bound_gives_nonzero_exit(tmp_path):
    results = tmp_path / "res"
    shutil.copytree(FIXTURES, results)
    csv = results / "theory" / "theorem41.csv"
    lines = csv.read_text().splitlines()
    head = lines[0].split(",")
    row = lines[1].split(",")
    row[head.index("avg_fw_gap")] = "9.0"
    row[head.index("holds")] = "False"
    csv.write_text("\n".join([lines[0], ",".join(row), *lines[2:]]) + "\n")
    proc = run_all("--only", "figures", "--results-dir", str(results), "--figures-dir", str(tmp_path / "fig"))
    assert proc.returncode == 1
    assert "Theorem 4.1 bound violated" in proc.stderr and "avg_fw_gap=9.0" in proc.stderr
    assert "| T1 | **violated** |" in (tmp_path / "fig" / "REPORT.md").read_text()


def test_shards_partition_the_job_list_and_dry_run_prints_it():
    sys.path.insert(0, str(ROOT))
    from paper_repro.run_all import job_list, shard

    jobs, problems = job_list("gpu", ("theory", "lm"))
    assert not problems and len(jobs) == len({j.job_id for j in jobs}) == 5 + 1175
    parts = [shard(jobs, i, 4) for i in range(4)]
    assert sorted(j.job_id for p in parts for j in p) == sorted(j.job_id for j in jobs)
    assert shard(jobs, 1, 4) == shard(job_list("gpu", ("theory", "lm"))[0], 1, 4)  # deterministic
    proc = run_all("--profile", "cpu", "--dry-run", "--shard", "0/1")
    assert proc.returncode == 0 and "smollm2-135m/sst2/cola-L3" in proc.stdout and "projected" in proc.stdout
    assert run_all("--shard", "4/4", "--dry-run").returncode == 2


def _dry_run_marks(stdout: str) -> dict[str, str]:
    """job id -> 'run' | 'skip' from the job lines of `--dry-run`."""
    marks = {}
    for line in stdout.splitlines():
        parts = line.split()
        if line.startswith("  ") and len(parts) >= 2 and parts[0] in ("run", "skip"):
            marks[parts[1]] = parts[0]
    return marks


def test_dry_run_skips_what_a_real_run_skips(smoke, tmp_path):
    """After the smoke run every job is up to date; a corrupted theory result and --force make jobs run again."""
    reference, _, first = smoke
    assert first.returncode == 0
    results = tmp_path / "res"
    shutil.copytree(reference, results)
    args = ("--profile", "smoke", "--dry-run", "--results-dir", str(results))
    marks = _dry_run_marks(run_all(*args).stdout)
    lm_done = "skip" if len(lm_results(results)) == 2 else "run"  # no LM results when the data is absent
    assert len(marks) == 5 + 2  # smoke: T1-T5 and 2 LM jobs
    assert marks == {j: "skip" if j.startswith("theory/") else lm_done for j in marks}
    victim = results / "theory" / "theorem41.json"
    victim.write_text(victim.read_text()[:100])
    after = _dry_run_marks(run_all(*args).stdout)
    assert after["theory/T1"] == "run" and {j: m for j, m in after.items() if j != "theory/T1"} == {
        j: m for j, m in marks.items() if j != "theory/T1"}
    assert set(_dry_run_marks(run_all(*args, "--force").stdout).values()) == {"run"}
    assert victim.read_text() == reference.joinpath("theory", "theorem41.json").read_text()[:100]  # read only


def test_dry_run_projects_the_time_of_the_jobs_that_would_run_only(tmp_path, capsys):
    sys.path.insert(0, str(ROOT))
    from cola_theory.results import save_result
    from paper_repro.lm.profiles import projected_seconds
    from paper_repro.run_all import dry_run, job_list

    jobs = job_list("cpu", ("lm",))[0]
    lm = [j.lm for j in jobs]
    done = lm[0]
    save_result(done.result_path(tmp_path), config={**done.cfg.to_dict(), "chain": {}}, history=[],
                metrics={"status": "finished"})
    dry_run(jobs, "cpu", (0, 1), tmp_path, force=False)
    out = capsys.readouterr().out
    assert _dry_run_marks(out) == {j.job_id: "skip" if j.lm is done else "run" for j in jobs}
    assert f"{projected_seconds(lm[1:]) / 60:.1f} min" in out
    assert projected_seconds(lm[1:]) < projected_seconds(lm)  # the skipped job's time is not projected
    dry_run(jobs, "cpu", (0, 1), tmp_path, force=True)
    assert f"{projected_seconds(lm) / 60:.1f} min" in capsys.readouterr().out

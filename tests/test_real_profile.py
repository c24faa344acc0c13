"""The `real` / `real-cpu` profiles follow the paper's protocol; existing job ids are unchanged; --missing, --dry-run."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
from lm_fixtures import DATA_DIR, needs_data

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cola_theory.results import save_result  # noqa: E402
from paper_repro import run_all  # noqa: E402
from paper_repro.lm import profiles  # noqa: E402
from paper_repro.lm.profiles import LR_GRID, PAPER_SEEDS, PAPER_TASKS, jobs_for  # noqa: E402


@pytest.fixture(scope="module")
def real():
    return jobs_for("real")


def test_real_profile_is_the_paper_protocol(real):
    assert len(real) == len({j.job_id for j in real}) == 1525
    for job in real:
        c = job.cfg
        assert (c.model, c.epochs, c.batch_size, c.alpha, c.target_modules) == (
            "smollm2-135m", 5.0, 8, 16.0, ("q_proj", "v_proj"))
        assert (c.num_train, c.num_dev, c.num_test) == (1000, 100 if c.task == "cb" else 500, 1000)
        assert c.dtype == "float32" and c.eval_dev and c.best_dev and c.weight_decay == 0.0
        assert c.max_length == profiles.REAL_MAX_LENGTH[c.task]
        assert c.zero_shot == (c.method == "lora" and c.lr == LR_GRID[0])
        if c.link_epochs:  # Figure 3: rank 8 for 3 epochs, then r for 2
            assert c.link_epochs == (3.0, 2.0) and c.rank[0] == 8 and c.task in profiles.STEPDOWN_TASKS
        else:
            assert c.rank == 8
    # every (task, variant) has the full grid x seeds: 25 runs
    cells = Counter((j.cfg.task, j.cfg.method, j.cfg.n_links, str(j.cfg.rank), j.cfg.lr_schedule,
                     j.cfg.optimizer_reset) for j in real)
    assert set(cells.values()) == {len(LR_GRID) * len(PAPER_SEEDS)}
    assert {(j.cfg.lr, j.cfg.seed) for j in real} == {(lr, s) for lr in LR_GRID for s in PAPER_SEEDS}
    assert {j.cfg.task for j in real} == set(PAPER_TASKS)
    groups = Counter(g for j in real for g in j.groups)
    assert groups == {"real_main": 350, "real_table4": 525, "real_fig3": 375, "real_ablation": 1225}
    links = {j.cfg.n_links for j in real if "real_ablation" in j.groups}
    assert links == {1, 2, 3, 5}
    jag = [j.cfg for j in real if j.cfg.lr_schedule == "jagged_cosine"]
    assert len(jag) == 175 and all(c.n_links == 3 and c.optimizer_reset == "full" for c in jag)
    warm = {c.task: dict(c.chain_overrides)["restart_warmup_steps"] for c in jag}
    assert warm["sst2"] == 21 and warm["wsc"] == 1 and warm["cb"] == 3  # 10% of a link, >= 1 step
    assert {j.cfg.optimizer_reset for j in real} == {"full", "none"}
    assert {j.cfg.lr_schedule for j in real} == {"linear", "restart", "jagged_cosine"}
    for c in jag:  # the override is a valid ChainConfig for the task's real step count
        c.chain_config(profiles.steps_per_epoch(c.task))


def test_real_cpu_is_a_labelled_subset_of_real(real):
    cpu = jobs_for("real-cpu")
    assert len(cpu) == 5 * 5 * 3 * 2 and {j.job_id for j in cpu} <= {j.job_id for j in real}
    assert {(j.cfg.task, j.cfg.method, j.cfg.n_links) for j in cpu} == {
        (t, m, n) for t in ("sst2", "rte", "cb", "wsc", "wic") for m, n in (("lora", 1), ("cola", 3))}
    assert {j.cfg.seed for j in cpu} == set(PAPER_SEEDS) and {j.cfg.lr for j in cpu} == {1e-3, 8e-4, 1e-4}
    assert all(j.groups == ("real_cpu",) for j in cpu)
    assert "FALLBACK" in profiles.real_cpu_jobs.__doc__


def test_real_cpu_ablation_is_the_real_ablation_on_sst2_and_cb(real):
    abl = jobs_for("real-cpu-ablation")
    by_id = {j.job_id: j for j in real}
    assert len(abl) == 2 * 5 * 3 * 3 and len({j.job_id for j in abl}) == len(abl)
    assert all(j.job_id in by_id and "real_ablation" in by_id[j.job_id].groups for j in abl)  # counts towards real
    assert {j.cfg.task for j in abl} == {"sst2", "cb"}
    assert {j.cfg.seed for j in abl} == {0, 1, 2} and {j.cfg.lr for j in abl} == {1e-3, 8e-4, 1e-4}
    # every ablation cell of `real` for those tasks / seeds / LRs, and nothing that `real-cpu` already has
    want = {j.job_id for j in real if "real_ablation" in j.groups and j.cfg.task in ("sst2", "cb")
            and j.cfg.seed in (0, 1, 2) and j.cfg.lr in (1e-3, 8e-4, 1e-4)} - {j.job_id for j in jobs_for("real-cpu")}
    assert {j.job_id for j in abl} == want
    per_group = Counter(g for j in abl for g in j.groups)
    assert per_group == {"real_cpu_ablation": 90, **{g: 18 for g in profiles.ABLATION_GROUPS.values()}}
    restart = [j.cfg for j in abl if "abl_restart" in j.groups]
    assert all(c.lr_schedule == "restart" and c.n_links == 3 and c.optimizer_reset == "full" for c in restart)
    no_reset = [j.cfg for j in abl if "abl_no_reset" in j.groups]
    assert all(c.optimizer_reset == "none" and c.lr_schedule == "linear" for c in no_reset)
    assert {j.cfg.n_links for j in abl if {"abl_cola2", "abl_cola5"} & set(j.groups)} == {2, 5}
    assert "FALLBACK" in profiles.real_cpu_ablation_jobs.__doc__


def test_group_runs_one_ablation_variant(tmp_path, capsys):
    assert run_all.main(["--profile", "real-cpu-ablation", "--only", "lm", "--group", "abl_restart", "--dry-run",
                         "--results-dir", str(tmp_path)]) == 0
    listed = [ln for ln in capsys.readouterr().out.splitlines() if "smollm2-135m/" in ln]
    assert len(listed) == 18 and all("abl_restart" in ln for ln in listed)


def test_existing_profiles_job_ids_are_unchanged():
    committed = {str(p.relative_to(ROOT / "paper_repro" / "results" / "lm").with_suffix(""))
                 for p in (ROOT / "paper_repro" / "results" / "lm").rglob("*.json") if "checkpoints" not in p.parts}
    cpu, real = {j.job_id for j in jobs_for("cpu")}, {j.job_id for j in jobs_for("real")}
    assert len(cpu) == 13 and cpu <= committed  # the cpu profile's files still carry its ids
    assert committed <= cpu | real and not cpu & real  # every other committed result is a run of the real study
    assert len(jobs_for("gpu")) == 1175 and len(jobs_for("smoke")) == 2


@needs_data
def test_effective_train_sizes_and_max_lengths_match_the_data():
    from cola_theory.lm.data import load_split, protocol_indices

    for task in PAPER_TASKS:
        val = load_split(task, "validation", DATA_DIR, source="local")
        n_train = len(val) if task in profiles.VALIDATION_AS_TRAIN else len(
            load_split(task, "train", DATA_DIR, source="local"))
        idx = protocol_indices(n_train, len(val), 0, 1000, 100 if task == "cb" else 500, 1000,
                               task in profiles.VALIDATION_AS_TRAIN, name=task)
        assert len(idx["train"]) == min(1000, profiles.EFFECTIVE_TRAIN.get(task, 1000)), task
    assert profiles.projected_gpu_seconds(jobs_for("real")) == pytest.approx(
        10 * sum(profiles.steps_per_epoch(j.cfg.task) * 5 for j in jobs_for("real")) / 625)


def _present(results: Path, jobs) -> None:
    for job in jobs:
        save_result(job.result_path(results), config={**job.cfg.to_dict(), "chain": {}}, history=[],
                    metrics={"status": "finished", "test_acc": 0.6, "dev_acc": 0.6}, meta={"created_at": "x"})


def test_missing_lists_counts_and_shards(tmp_path, capsys):
    cpu = sorted(jobs_for("real-cpu"), key=lambda j: j.job_id)
    _present(tmp_path, [j for j in cpu if j.cfg.task == "sst2"])
    assert run_all.main(["--profile", "real-cpu", "--only", "lm", "--missing", "--results-dir", str(tmp_path),
                         "--shard", "0/2"]) == 0
    out = capsys.readouterr().out
    assert "150 LM jobs, 30 present, 120 missing" in out
    assert "| real_cpu | 30/30 | 0/30 | 0/30 | 0/30 | 0/30 | 30/150 |" in out  # tasks in the paper's order
    assert "| group | sst2 | wsc | cb | wic | rte | all |" in out
    lines = out.splitlines()
    listed = [ln.strip() for ln in lines if ln.startswith("  smollm2-135m/")]
    assert sorted(listed) == sorted(j.job_id for j in cpu if j.cfg.task != "sst2")
    shard_heads = [ln for ln in lines if ln.startswith("shard ")]
    assert [h.split(":")[0] for h in shard_heads] == ["shard 0/2", "shard 1/2"]
    assert (f"`python paper_repro/run_all.py --profile real-cpu --only lm --results-dir={tmp_path} --shard 1/2`"
            in shard_heads[1])
    assert sum(int(h.split(": ")[1].split()[0]) for h in shard_heads) == 120
    ids = {j.lm.job_id for j in run_all.shard(run_all.job_list("real-cpu", ("lm",))[0], 1, 2)}
    in_shard1 = [m.strip() for m in lines[lines.index(shard_heads[1]) + 1:] if m.startswith("  ")]
    assert in_shard1 and set(in_shard1) <= ids  # listed under the shard that runs them
    _present(tmp_path, cpu)
    assert run_all.main(["--profile", "real-cpu", "--only", "lm", "--missing", "--results-dir", str(tmp_path)]) == 0
    assert "nothing is missing" in capsys.readouterr().out


def test_dry_run_projects_gpu_time(tmp_path, capsys):
    assert run_all.main(["--profile", "real", "--only", "lm", "--dry-run", "--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    hours = profiles.projected_gpu_seconds(jobs_for("real")) / 3600
    assert "1525 jobs" in out and f"projected GPU time of those 1525 LM jobs: {hours:.1f} h" in out
    from paper_repro.lm.runner import trained_steps

    steps = trained_steps(jobs_for("real"))  # --pack auto on a CPU: one run at a time, forking
    forked = sum(steps[j.job_id] < profiles.run_steps(j.cfg) for j in jobs_for("real"))
    assert 0 < forked < 1525 and sum(steps.values()) < sum(profiles.run_steps(j.cfg) for j in jobs_for("real"))
    with_forks = profiles.projected_gpu_seconds(jobs_for("real"), steps) / 3600
    assert f"{with_forks:.1f} h with forks ({forked} runs start from a shared first-knot checkpoint" in out
    assert "real_ablation" in out and "smollm2-135m/boolq/" in out
    # a step-down family of 4 (one LR and seed) with one member present: of the 3 that run, the first trains its
    # first link and 2 fork (the present run made no trunk); the LoRA run of the group forks from nothing
    sel = ["--group", "real_fig3", "--where", "task=sst2", "--where", "lr=1e-3", "--where", "seed=0"]
    family = [j for j in jobs_for("real") if "real_fig3" in j.groups and j.cfg.task == "sst2" and j.cfg.lr == 1e-3
              and j.cfg.seed == 0]
    assert len(family) == 5
    _present(tmp_path, [j for j in family if j.cfg.rank == (8, 2)])  # the first of the family in run order
    assert run_all.main(["--profile", "real", "--only", "lm", "--dry-run", "--results-dir", str(tmp_path),
                         *sel]) == 0
    assert "(2 runs start from a shared first-knot checkpoint" in capsys.readouterr().out


def test_missing_commands_repeat_the_selection(tmp_path, capsys):
    """A shard's printed command runs that shard of the same --group/--where/--set selection (pasting it back
    with --missing lists exactly the jobs printed under it), not of the whole profile."""
    import shlex

    flags = ["--profile", "real", "--only", "lm", "--group", "real_fig3", "--where", "task=sst2", "--where",
             "lr=5e-4", "--where", "rank=(8, 2)", "--where", "rank=(8, 8)", "--set", "warmup_steps=3",
             "--results-dir", str(tmp_path)]
    assert run_all.main([*flags, "--missing", "--shard", "1/2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = next(ln for ln in lines if ln.startswith("shard 1/2"))
    listed = [m.strip() for m in lines[lines.index(head) + 1:] if m.startswith("  ")]
    assert listed and all("/sst2/" in m and "lr0.0005" in m for m in listed)
    argv = shlex.split(head.split("`")[1])
    assert argv[:2] == ["python", "paper_repro/run_all.py"] and argv[-2:] == ["--shard", "1/2"]
    assert run_all.main([*argv[2:-2], "--missing"]) == 0  # the command's selection, one shard: the same jobs
    again = [m.strip() for m in capsys.readouterr().out.splitlines() if m.startswith("  ")]
    assert set(listed) <= set(again) and len(again) == 2 * 5 and len(listed) < len(again)

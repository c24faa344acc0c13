"""run_all's job filters (--group, --where) and the time budget, through --dry-run (no training)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dry(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "paper_repro/run_all.py", "--only", "lm", "--dry-run", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def lm_lines(out: str) -> list[str]:
    return [ln.split()[1] for ln in out.splitlines() if ln.strip().startswith(("run ", "skip ")) and "lm/" in ln]


def test_group_and_where_select_exactly_the_matching_jobs():
    from paper_repro.lm.profiles import jobs_for

    jobs = jobs_for("real")
    out = dry("--profile", "real", "--group", "real_fig3", "--where", "task=wsc", "--where", "seed=1")
    want = {f"lm/{j.job_id}" for j in jobs if "real_fig3" in j.groups and j.cfg.task == "wsc" and j.cfg.seed == 1}
    assert out.returncode == 0 and set(lm_lines(out.stdout)) == want and len(want) == 5 * 5  # 5 LRs x (LoRA + 4)


def test_where_on_one_field_twice_takes_either_value():
    from paper_repro.lm.profiles import jobs_for

    out = dry("--profile", "real", "--group", "real_main", "--where", "task=wic", "--where", "seed=0",
              "--where", "seed=2", "--where", "lr=1e-3", "--where", "lr=0.0001")
    want = {f"lm/{j.job_id}" for j in jobs_for("real") if "real_main" in j.groups and j.cfg.task == "wic"
            and j.cfg.seed in (0, 2) and j.cfg.lr in (1e-3, 1e-4)}
    assert out.returncode == 0 and set(lm_lines(out.stdout)) == want and len(want) == 2 * 2 * 2  # LoRA + COLA-3


def test_bad_filters_name_the_problem():
    out = dry("--profile", "real", "--group", "nope")
    assert out.returncode == 2 and "unknown group(s) ['nope']" in out.stderr and "real_main" in out.stderr
    out = dry("--profile", "real", "--where", "warmup_steps=3")
    assert out.returncode == 2 and "must be an LMRunConfig field" in out.stderr
    out = dry("--profile", "real", "--pack", "0")
    assert out.returncode == 2 and "--pack '0'" in out.stderr


def test_shards_partition_the_jobs_keep_each_family_and_each_seed_together():
    """`run_all.shard`: the n shards partition the job list, a family of chains that may share a first-knot trunk
    (the four step-downs of one LR and seed) is never split, a shard holds contiguous (task, seed) blocks, and the
    parts are near-equal."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "paper_repro"))
    import run_all

    from cola_theory.lm.fork import family
    from paper_repro.lm.profiles import jobs_for

    lm = [j for j in jobs_for("real") if j.cfg.task in ("sst2", "wsc") and "real_fig3" in j.groups]
    jobs = sorted([run_all.Job("theory", "T1"), *(run_all.Job("lm", j.job_id, j) for j in lm)],
                  key=lambda j: j.job_id)
    for n in (1, 2, 3, 7):
        parts = [run_all.shard(jobs, i, n) for i in range(n)]
        assert sorted(j.job_id for p in parts for j in p) == sorted(j.job_id for j in jobs)
        assert max(map(len, parts)) - min(map(len, parts)) <= 4 + 1  # a family of 4 step-downs (+ its LoRA)
        where = {j.job_id: i for i, p in enumerate(parts) for j in p}
        for p in parts:
            assert [j.job_id for j in p] == [j.job_id for j in jobs if where[j.job_id] == parts.index(p)]
        fams: dict = {}
        for j in jobs:
            if j.kind == "lm":
                fams.setdefault(family(j.lm.cfg), set()).add(where[j.job_id])
        assert all(len(s) == 1 for s in fams.values())
        # (task, seed) blocks in order: shard index never decreases along the (task, seed) order
        order = sorted((j.lm.cfg.task, j.lm.cfg.seed, where[j.job_id]) for j in jobs if j.kind == "lm")
        assert [s for *_, s in order] == sorted(s for *_, s in order)
    step = [j for j in jobs if j.kind == "lm" and j.lm.cfg.link_epochs == (3.0, 2.0)]
    assert len({family(j.lm.cfg) for j in step}) == len(step) // 4  # the four step-downs of one LR and seed

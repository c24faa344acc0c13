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

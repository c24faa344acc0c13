"""`run_all.py --set FIELD=VALUE`: any LMRunConfig field or chain setting for every LM job of a profile, validated
with the configs' own errors and recorded in the result files."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lm_fixtures import DATA_DIR, needs_data

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from paper_repro.run_all import job_list, main, parse_setting  # noqa: E402


def test_parse_setting():
    assert parse_setting("warmup_steps=10") == ("warmup_steps", 10)
    assert parse_setting("optimizer=adam") == ("optimizer", "adam")  # not a literal: a string
    assert parse_setting("betas=(0.8, 0.99)") == ("betas", (0.8, 0.99))
    assert parse_setting("fp32_master=None") == ("fp32_master", None)
    assert parse_setting("lr=1e-4") == ("lr", 1e-4)
    for bad in ("warmup=3", "lr"):
        with pytest.raises(argparse.ArgumentTypeError, match="FIELD=VALUE .*warmup_steps"):
            parse_setting(bad)


def test_settings_change_every_lm_job_and_its_id():
    plain, _ = job_list("smoke", ("lm",))
    jobs, _ = job_list("smoke", ("lm",), {"warmup_steps": 1, "best_dev": True, "eval_batch_size": 4})
    assert len(jobs) == len(plain)
    for job in jobs:
        cfg = job.lm.cfg
        assert dict(cfg.chain_overrides) == {"warmup_steps": 1} and cfg.best_dev and cfg.eval_batch_size == 4
    assert not {j.job_id for j in jobs} & {j.job_id for j in plain}


def test_dry_run_lists_the_changed_jobs(capsys):
    assert main(["--profile", "smoke", "--only", "lm", "--dry-run", "--set", "init=gaussian"]) == 0
    out = capsys.readouterr().out
    ids = [j.job_id for j in job_list("smoke", ("lm",), {"init": "gaussian"})[0]]
    assert all(i in out for i in ids)


@pytest.mark.parametrize("argv, words", [
    (["--set", "warmup=3"], ["--set 'warmup=3'", "warmup_steps", "best_dev"]),
    (["--set", "optimizer=lion"], ["optimizer='lion'", "ChainConfig.optimizer='lion'", "adamw"]),
    (["--set", "lr_schedule=cosine"], ["lr_schedule='cosine'", "ChainConfig.lr_schedule='cosine'"]),
    (["--set", "best_dev=yes"], ["LMRunConfig.best_dev='yes'"]),
    (["--set", "epochs=0"], ["LMRunConfig.epochs=0"]),
    (["--set", "lr=1e-3", "--set", "lr=1e-4"], ["given twice"]),
])
def test_bad_settings_are_argument_errors(capsys, argv, words):
    with pytest.raises(SystemExit) as exc:
        main(["--profile", "smoke", "--only", "lm", "--dry-run", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (word, err)


@needs_data
def test_smoke_lm_with_settings_records_them(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", "COLA_DATA_DIR": str(DATA_DIR)}
    proc = subprocess.run([sys.executable, str(ROOT / "paper_repro" / "run_all.py"), "--profile", "smoke", "--only",
                           "lm", "--results-dir", str(tmp_path), "--set", "warmup_steps=2", "--set", "best_dev=True",
                           "--set", "optimizer_reset=none"], capture_output=True, text=True, timeout=300, env=env,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    files = sorted((tmp_path / "lm").rglob("*.json"))
    assert len(files) == 2
    for path in files:
        payload = json.loads(path.read_text())
        cfg, m = payload["config"], payload["metrics"]
        assert cfg["chain_overrides"] == {"warmup_steps": 2} and cfg["best_dev"] is True
        assert cfg["optimizer_reset"] == "none" and cfg["chain"]["warmup_steps"] == 2
        assert m["best_epoch"] == 1 + m["dev_loss_per_epoch"].index(m["best_dev_loss"])
        assert [h["lr"] for h in payload["history"] if h["event"] == "step"][0] == 0.0  # warm-up from 0

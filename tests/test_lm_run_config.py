"""LMRunConfig: chain overrides (any ChainConfig setting for an LM run), the float32-fold default, and job ids of
the committed results staying valid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cola_theory.lm.run_config import CHAIN_OVERRIDES, LMRunConfig, fold_mode, resolve_dtype
from paper_repro.lm.profiles import LATE_FIELDS, jobs_for

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "paper_repro" / "results" / "lm"
SMOKE_IDS = {"tiny-opt/sst2/lora-L1-r4-lr0.001-s0-39d39aa0", "tiny-opt/sst2/cola-L2-r4-lr0.001-s0-bc0df2e8"}


def test_job_ids_of_smoke_and_cpu_profiles_are_unchanged():
    """The committed cpu results keep their names and stay valid (the runner would skip them), smoke ids too."""
    from paper_repro.lm.runner import existing_result

    committed = {str(p.relative_to(COMMITTED).with_suffix("")) for p in COMMITTED.rglob("*.json")
                 if "checkpoints" not in p.parts}
    jobs = jobs_for("cpu")
    cpu = {j.job_id for j in jobs}
    assert len(cpu) == 13 and cpu <= committed  # every cpu result keeps its name
    assert committed - cpu <= {j.job_id for j in jobs_for("real")}  # the rest are runs of the real study
    for job in jobs:
        assert existing_result(job, COMMITTED.parent, log=print) is not None, job.job_id
    assert {j.job_id for j in jobs_for("smoke")} == SMOKE_IDS


def test_late_fields_at_default_and_round_trip():
    defaults = LMRunConfig().to_dict()
    assert {k: defaults[k] for k in LATE_FIELDS} == LATE_FIELDS
    cfg = LMRunConfig(chain_overrides={"warmup_steps": 3, "betas": [0.8, 0.99]})
    d = json.loads(json.dumps(cfg.to_dict()))  # as stored in a result file
    assert d["chain_overrides"] == {"betas": [0.8, 0.99], "warmup_steps": 3}
    assert LMRunConfig(chain_overrides=d["chain_overrides"]) == cfg  # a stored value builds the same run


def test_chain_overrides_reach_the_chain_config():
    cfg = LMRunConfig(chain_overrides={"warmup_steps": 2, "optimizer": "adam", "init": "gaussian",
                                       "init_std": 0.01, "fresh_init": False, "frozen_factor": "A",
                                       "min_lr_ratio": 0.1, "betas": (0.8, 0.9), "restart_warmup_steps": 1},
                      lr_schedule="jagged_cosine", optimizer_reset="none")
    assert [k for k, _ in cfg.chain_overrides] == sorted(CHAIN_OVERRIDES)
    chain = cfg.chain_config(steps_per_epoch=10)
    assert (chain.warmup_steps, chain.optimizer, chain.init, chain.init_std, chain.fresh_init) == (
        2, "adam", "gaussian", 0.01, False)
    assert (chain.frozen_factor, chain.min_lr_ratio, chain.betas, chain.restart_warmup_steps) == ("A", 0.1, (0.8, 0.9), 1)
    assert (chain.lr_schedule, chain.optimizer_reset) == ("jagged_cosine", "none")
    assert LMRunConfig(chain_overrides=(("init", "gaussian"), ("warmup_steps", 1))) == LMRunConfig(
        chain_overrides={"warmup_steps": 1, "init": "gaussian"})


@pytest.mark.parametrize("overrides, words", [
    ({"lr": 1e-3}, ["chain_overrides['lr']", "LMRunConfig.lr"]),
    ({"rank": 4}, ["LMRunConfig.rank"]),
    ({"knots": (3,)}, ["LMRunConfig.link_epochs"]),
    ({"total_steps": 5}, ["LMRunConfig.epochs"]),
    ({"optimiser": "adam"}, ["'optimiser'", "warmup_steps"]),
    ({"optimizer": "lion"}, ["ChainConfig.optimizer='lion'", "adamw"]),
    ({"init": "xavier"}, ["ChainConfig.init='xavier'", "kaiming"]),
    ({"frozen_factor": "C"}, ["ChainConfig.frozen_factor='C'"]),
    ({"warmup_steps": -1}, ["ChainConfig.warmup_steps=-1", "integer >= 0"]),
    ({"warmup_steps": 1.5}, ["ChainConfig.warmup_steps=1.5"]),
    ({"min_lr_ratio": 2.0}, ["ChainConfig.min_lr_ratio=2.0"]),
    ({"min_lr_ratio": "x"}, ["ChainConfig.min_lr_ratio='x'"]),
    ({"init_std": 0.0}, ["ChainConfig.init_std=0.0"]),
    ({"fresh_init": "no"}, ["ChainConfig.fresh_init='no'", "True or False"]),
    ({"betas": (0.9,)}, ["ChainConfig.betas=(0.9,)", "two numbers"]),
    ("warmup_steps=3", ["chain_overrides='warmup_steps=3'", "dict"]),
])
def test_bad_chain_overrides_name_the_field(overrides, words):
    with pytest.raises(ValueError) as err:
        LMRunConfig(chain_overrides=overrides)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_step_counts_are_checked_against_the_run_length():
    cfg = LMRunConfig(epochs=1.0, chain_overrides={"warmup_steps": 10})
    with pytest.raises(ValueError, match=r"ChainConfig.warmup_steps=10 .*total_steps=10"):
        cfg.chain_config(steps_per_epoch=10)


def test_override_sets_own_fields_and_chain_settings():
    cfg = LMRunConfig(chain_overrides={"init": "gaussian"})
    new = cfg.override({"lr": 1e-4, "warmup_steps": 4, "best_dev": True})
    assert (new.lr, new.best_dev, dict(new.chain_overrides)) == (1e-4, True, {"init": "gaussian", "warmup_steps": 4})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['warmup'\].*warmup_steps"):
        cfg.override({"warmup": 4})
    with pytest.raises(ValueError, match="LMRunConfig.best_dev='yes'"):
        cfg.override({"best_dev": "yes"})


def test_fold_mode_auto():
    assert fold_mode(None, torch.bfloat16) == (True, "float32 master copy")
    assert fold_mode(None, torch.float16) == (True, "float32 master copy")
    assert fold_mode(None, torch.float32) == (False, "float32 weights")
    assert fold_mode(False, torch.bfloat16) == (False, "in place bfloat16")
    assert fold_mode(True, torch.float32) == (True, "float32 master copy")
    assert resolve_dtype("auto", "cuda:0") == torch.bfloat16 and resolve_dtype("auto", "cpu") == torch.float32
    with pytest.raises(ValueError, match="LMRunConfig.fp32_master='auto'"):
        LMRunConfig(fp32_master="auto")


def test_gpu_profile_folds_in_float32_and_cpu_profiles_are_float32():
    """Every profile that trains on a bf16/fp16 base (dtype auto on a GPU) folds into a float32 master copy; the
    smoke / cpu profiles train float32 weights on a CPU (fp32_master=False there only keeps their job ids)."""
    for job in jobs_for("gpu"):
        assert job.cfg.fp32_master is None
        assert fold_mode(job.cfg.fp32_master, resolve_dtype(job.cfg.dtype, "cuda")) == (True, "float32 master copy")
    for job in jobs_for("smoke") + jobs_for("cpu"):
        assert fold_mode(job.cfg.fp32_master, resolve_dtype(job.cfg.dtype, "cpu")) == (False, "float32 weights")

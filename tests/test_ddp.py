"""Data-parallel chains on CPU (gloo, 2 processes): knots bitwise identical on every rank, 2 ranks == 1 process,
rank-0 checkpoints resume exactly, FSDP2 / FSDP1 knots; torchrun launch of the same worker.

Tolerance (2 ranks with global batch 8 vs 1 process with batch 8): the ranks' gradients are averaged by DDP, so
the runs differ only in float32 summation order; measured max |W_2 - W_1| = 1.6e-7 and |loss_2 - loss_1| = 4.8e-7
after 9 steps; asserted: atol 1e-5 + rtol 1e-4 on W, A, B and 1e-5 on the step losses.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import _workers as w
import pytest
import torch
from lm_fixtures import tiny_model
from safetensors.torch import load_file

from cola_theory.chain import run_chain
from cola_theory.config import ChainConfig
from cola_theory.lm.backend import PeftChainBackend
from cola_theory.lm.collectives import (
    all_reduce_mean,
    gather_rng_states,
    init_from_env,
    replicas_identical,
    shard_batch,
    shard_batch_fn,
)
from cola_theory.lm.fsdp import Fsdp2ChainBackend

ATOL, RTOL, LOSS_TOL = 1e-5, 1e-4, 1e-5
ROOT = Path(__file__).resolve().parent.parent


def one_process(cfg: ChainConfig):
    b = PeftChainBackend(tiny_model("opt"), cfg, w.global_batch_fn(), w.lm_loss, target_modules=w.TARGETS)
    return b, run_chain(b, cfg)


def launch_ok(fn, world, out, **kw):
    codes = w.launch(fn, world, out, timeout=90, **kw)
    assert codes == [0] * world, (codes, w.errors(out))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    launch_ok("ddp", 2, out)
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_every_knot_is_bitwise_identical_on_both_ranks_and_matches_one_process(ddp_run):
    out, ranks = ddp_run
    for r in ranks:  # knots after links 0, 1 (8 -> 2 rank step-down: new tensors, DDP re-wrapped) and the final one
        assert [c["t"] for c in r["checks"]] == [3, 6, 9] and all(c["identical"] for c in r["checks"]), r["checks"]
        assert r["wrapped"] and r["graphs"] == 0  # eager
    assert ranks[0]["digest"] == ranks[1]["digest"] and ranks[0]["history"] == ranks[1]["history"]

    ref_backend, ref = one_process(w.ddp_config())
    expect, got = w.chain_tensors(ref_backend.model), load_file(str(out / "final.safetensors"))
    assert expect.keys() == got.keys()
    diff = max(float((expect[k] - got[k]).abs().max()) for k in expect)
    print(f"2 ranks vs 1 process: max |delta| over W, A, B = {diff:.2e}")
    for k in expect:
        torch.testing.assert_close(got[k], expect[k], atol=ATOL, rtol=RTOL, msg=k)
    steps = [(a, b) for a, b in zip(ref.history, ranks[0]["history"]) if a["event"] == "step"]
    assert len(steps) == 9 and [h["event"] for h in ref.history] == [h["event"] for h in ranks[0]["history"]]
    assert all(a["lr"] == b["lr"] and a["link"] == b["link"] for a, b in steps)  # schedule in step
    assert max(abs(a["loss"] - b["loss"]) for a, b in steps) < LOSS_TOL
    drop = lambda h: {k: v for k, v in h.items() if k != "loss"}
    assert [drop(h) for h in ref.history] == [drop(h) for h in ranks[0]["history"]]  # knots, resets, lrs, evals
    knots = [h for h in ranks[0]["history"] if h["event"] == "knot"]
    assert [h["reset_fraction"] for h in knots] == [0.0, 1.0]  # rank 4 -> 2: a new optimizer; 2 -> 2: full reset


def test_compiled_model_under_ddp_matches_one_eager_process(tmp_path):
    """torch.compile (aot_eager graph capture) inside the DDP wrapper: the same chain as one eager process."""
    launch_ok("ddp", 2, tmp_path, compile="default")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(c["identical"] for r in ranks for c in r["checks"]) and ranks[0]["digest"] == ranks[1]["digest"]
    assert all(r["graphs"] >= 1 for r in ranks), "the workers did not compile"
    ref_backend, _ = one_process(w.ddp_config())
    expect, got = w.chain_tensors(ref_backend.model), load_file(str(tmp_path / "final.safetensors"))
    for k in expect:
        torch.testing.assert_close(got[k], expect[k], atol=ATOL, rtol=RTOL, msg=k)


def test_resume_from_rank0_checkpoints_is_exact_even_past_a_corrupt_one(ddp_run, tmp_path):
    _, ranks = ddp_run
    launch_ok("ddp", 2, tmp_path, stop_at=5)  # checkpoints at t=2, 3 (knot), 4; stopped after step 5
    ckpts = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert ckpts == ["step-000000004"], ckpts  # rank 0 alone wrote; keep=1
    (tmp_path / "ckpt" / "step-000000005").mkdir()  # a newer, empty (hence corrupt) one: rank 0 must skip it
    launch_ok("ddp", 2, tmp_path, resume=True)
    assert (tmp_path / "ckpt" / "corrupt-step-000000005").is_dir()  # moved aside once, by rank 0
    resumed = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert resumed[0]["digest"] == resumed[1]["digest"] == ranks[0]["digest"]  # bitwise the uninterrupted run
    assert resumed[0]["history"] == ranks[0]["history"]


def test_torchrun_launch_runs_the_same_chain(ddp_run, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(w.free_port()), str(ROOT / "tests" / "_workers.py"), "ddp",
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got[0]["digest"] == got[1]["digest"] == ddp_run[1][0]["digest"]
    assert all(c["identical"] for g in got for c in g["checks"])


def test_run_lm_on_two_ranks_matches_one_process(tmp_path):
    from cola_theory.lm.train import run_lm

    launch_ok("lm_run", 2, tmp_path)
    hist = [json.loads((tmp_path / f"lm-rank{r}.json").read_text()) for r in (0, 1)]
    assert hist[0] == hist[1]
    written = json.loads((tmp_path / "res.json").read_text())
    assert written["history"] == hist[0] and (tmp_path / "ck").is_dir()
    ref = run_lm(w.lm_config(), data_dir=str(ROOT / "tests" / "fixtures" / "superglue"),
                 model_bundle=w.lm_bundle())
    steps = [(a, b) for a, b in zip(ref["history"], hist[0]) if a["event"] == "step"]
    assert len(steps) == ref["metrics"]["total_steps"] == 6
    assert max(abs(a["loss"] - b["loss"]) for a, b in steps) < LOSS_TOL  # uneven shares weighted exactly
    assert written["metrics"]["test_acc"] == ref["metrics"]["test_acc"]


def test_ranks_that_differ_are_named(tmp_path):
    launch_ok("mismatch", 2, tmp_path)
    for r in (0, 1):
        res = json.loads((tmp_path / f"mismatch-{r}.json").read_text())
        assert res["probe"] == ["w"] and res["same"] is True
        assert "tensors differ between ranks" in res["error"] and "q_proj.W" in res["error"]
        assert "same base model" in res["error"]


def test_fsdp2_chain_is_sharded_and_matches_one_process(tmp_path):
    launch_ok("fsdp2", 2, tmp_path)
    meta = json.loads((tmp_path / "fsdp2.json").read_text())
    assert set(meta["local_rows"].values()) == {16}  # each rank holds half of every 32-row W
    b, ref = one_process(ChainConfig(total_steps=6, n_links=3, rank=4, alpha=8.0, lr=2e-2, seed=5))
    expect = {k[:-2]: v for k, v in w.chain_tensors(b.model).items() if k.endswith(".W")}
    got = load_file(str(tmp_path / "fsdp2.safetensors"))
    assert expect.keys() == got.keys()
    w0 = tiny_model("opt").state_dict()
    for k in expect:
        torch.testing.assert_close(got[k], expect[k], atol=ATOL, rtol=RTOL, msg=k)
        assert (got[k] - w0[k.removeprefix("base_model.model.") + ".weight"]).abs().max() > 1e-3  # W moved
    steps = [(a, b) for a, b in zip(ref.history, meta["history"]) if a["event"] == "step"]
    assert len(steps) == 6 and max(abs(a["loss"] - b["loss"]) for a, b in steps) < LOSS_TOL


def test_fsdp1_fold_inside_summon_full_params(tmp_path):
    launch_ok("fsdp1", 2, tmp_path)
    for r in (0, 1):
        res = json.loads((tmp_path / f"fsdp1-rank{r}.json").read_text())
        assert res["fold_err"] < 1e-5 and res["logit_err"] < 1e-5 and res["b_zero"], res


def test_fsdp2_backend_refuses_what_it_cannot_do():
    for kw, field in [({"optimizer_reset": "magnitude:0.5"}, "optimizer_reset"), ({"rank": (4, 2)}, "rank")]:
        cfg = ChainConfig(total_steps=4, n_links=2, **kw)
        with pytest.raises(ValueError, match=field):
            Fsdp2ChainBackend(tiny_model("opt"), cfg, w.global_batch_fn(), w.lm_loss, target_modules=w.TARGETS)
    with pytest.raises(ValueError, match="fp32_master"):
        Fsdp2ChainBackend(tiny_model("opt"), ChainConfig(total_steps=2), w.global_batch_fn(), w.lm_loss,
                          fp32_master=True)


def test_single_process_helpers(monkeypatch):
    batch = w.global_batch_fn()(0)
    halves = [shard_batch(batch, r, 2) for r in (0, 1)]
    assert torch.equal(torch.cat([h["input_ids"] for h in halves]), batch["input_ids"])
    assert halves[1]["input_ids"].shape == (4, 12)
    with pytest.raises(ValueError, match="8 rows cannot be split evenly over 3 processes.*e.g. 6"):
        shard_batch(batch, 0, 3)
    assert torch.equal(shard_batch_fn(w.global_batch_fn())(0)["input_ids"], batch["input_ids"])  # world 1
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    me = init_from_env()
    assert (me.rank, me.world_size, me.is_main) == (0, 1, True)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match=r"missing env variables \['WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'\]"):
        init_from_env()
    assert all_reduce_mean(2.5) == 2.5 and replicas_identical(tiny_model("opt"))
    assert set(gather_rng_states()) >= {"rng/rank0/cpu"}
    with pytest.raises(ValueError, match="ddp=True needs an initialised torch.distributed process group"):
        PeftChainBackend(tiny_model("opt"), ChainConfig(total_steps=2), w.global_batch_fn(), w.lm_loss, ddp=True)


@pytest.mark.gpu
def test_ddp_on_a_gpu_with_nccl(tmp_path):
    """Two ranks on two GPUs where they exist (one rank on a one-GPU machine: then the CUDA code path of DDP and
    FSDP2 - device_ids, nccl, the all-reduced tensor loss - is checked against the plain backend, not the
    sharding; the sharding is checked on the CPU with gloo in the tests above)."""
    import multiprocessing as mp

    world = min(2, torch.cuda.device_count())
    ctx = mp.get_context("spawn")  # no fork after CUDA
    port = w.free_port()
    procs = [ctx.Process(target=w._child, args=("gpu_ddp", r, world, port, str(tmp_path), {})) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0] * world, w.errors(tmp_path)
    res = json.loads((tmp_path / "gpu.json").read_text())
    assert res["world"] == world and res["fsdp2_sharded"], res
    tol = 1e-6 if world == 1 else 1e-5  # two ranks: float summation order only (as gloo on the CPU: ~1e-7)
    assert res["weight_diff"] < tol and res["loss_diff"] < tol, res
    assert res["fsdp2_diff"] < ATOL, res

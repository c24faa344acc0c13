"""Best-dev-loss selection (LMRunConfig.best_dev, MeZO's load_best_model_at_end): the best epoch's model is the
final one, the losses are recorded, a killed run resumes to the same result; plus run_lm with chain overrides
and the fold mode it records."""

from __future__ import annotations

import dataclasses
import math
import shutil

import pytest
import torch
from lm_fixtures import DATA_DIR, batch_fn, lm_loss, logits, needs_data, tiny_model

from cola_theory.chain import run_chain
from cola_theory.config import ChainConfig, link_plan, lr_at
from cola_theory.lm.backend import PeftChainBackend
from cola_theory.lm.best_dev import BestDev
from cola_theory.lm.checkpoint import KnotCheckpointer
from cola_theory.lm.train import LMRunConfig

SPE = 3  # steps per epoch of the unit tests


class Killed(Exception):
    pass


def probe_loss(model) -> float:
    """A deterministic function of the model that GROWS as training lowers the LM loss, so the best epoch is an
    early one (the restore path is exercised)."""
    was = model.training
    model.eval()
    with torch.no_grad():
        loss = -float(lm_loss(model, batch_fn(seed=99)(0)))
    model.train(was)
    return loss


def make(cfg, *, master=False, dtype=torch.float32, loss_fn=probe_loss, tracker=True):
    b = PeftChainBackend(tiny_model("opt", dtype=dtype), cfg, batch_fn(), lm_loss, target_modules=["q_proj", "v_proj"],
                         fp32_master=master)
    seen: list[torch.Tensor] = []  # the probe logits at every dev evaluation

    def fn(m):
        seen.append(logits(m))
        return loss_fn(m)

    best = BestDev(b, fn, SPE, cfg.total_steps) if tracker else None
    if best is not None:
        b.extra_state["best_dev"] = best
    return b, best, seen


def state(b):
    return {k: v.detach().clone() for k, v in b.model.state_dict().items()}


@pytest.mark.parametrize("master, dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_the_best_epochs_model_is_restored_across_a_rank_step_down(master, dtype):
    """Epoch 2 (the end of link 0, rank 4) is the best; the final model is that epoch's, folded, at rank 4."""
    cfg = ChainConfig(total_steps=4 * SPE, knots=(2 * SPE,), rank=(4, 2), alpha=8.0, lr=2e-2, seed=1)
    script = iter([3.0, 1.0, 2.0, 1.0])  # a tie with epoch 2 at epoch 4: the earlier epoch wins (as HF)
    b, best, seen = make(cfg, master=master, dtype=dtype, loss_fn=lambda m: next(script))
    run_chain(b, cfg, on_step=best)
    assert best.losses == [3.0, 1.0, 2.0, 1.0] and best.best_epoch == 2 and best.best_loss == 1.0
    assert best.restore_best() is True
    assert not b.active and b.rank == 4 and [r["rank"] for r in b.links] == [4]  # link 0 tied, link 1 dropped
    final = logits(b.model)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    torch.testing.assert_close(final, seen[1], **tol)
    assert not torch.allclose(final, seen[3], atol=1e-3)  # not the last epoch's model
    assert best.metrics() == {"best_epoch": 2, "best_dev_loss": 1.0, "dev_loss_per_epoch": [3.0, 1.0, 2.0, 1.0]}


def test_last_epoch_best_changes_nothing():
    """Dev evaluation draws no random numbers and a best last epoch restores nothing: the same run, bit for bit."""
    cfg = ChainConfig(total_steps=3 * SPE, n_links=3, rank=4, alpha=8.0, lr=2e-2, seed=2)
    torch.manual_seed(0)
    ref, _, _ = make(cfg, tracker=False)
    ref_res = run_chain(ref, cfg)
    torch.manual_seed(0)
    script = iter([3.0, 2.0, 1.0])
    b, best, _ = make(cfg, loss_fn=lambda m: next(script))
    res = run_chain(b, cfg, on_step=best)
    assert best.restore_best() is False and best.best_epoch == 3
    assert res.history == ref_res.history
    a, c = state(ref), state(b)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_partial_last_epoch_and_nan():
    cfg = ChainConfig(total_steps=2 * SPE + 1, n_links=1, rank=2, alpha=4.0, lr=1e-2)
    script = iter([float("nan"), 2.0, 5.0])
    b, best, _ = make(cfg, loss_fn=lambda m: next(script))
    run_chain(b, cfg, on_step=best)
    assert best.losses[1:] == [2.0, 5.0] and math.isnan(best.losses[0])  # the partial 3rd epoch is evaluated
    assert best.best_epoch == 2


def test_killed_run_resumes_to_the_same_best(tmp_path):
    cfg = ChainConfig(total_steps=4 * SPE, n_links=2, rank=4, alpha=8.0, lr=3e-2, seed=4)
    torch.manual_seed(0)
    ref, ref_best, _ = make(cfg)
    run_chain(ref, cfg, on_step=ref_best)
    assert ref_best.best_epoch < len(ref_best.losses)  # an early epoch wins: the restore path is exercised
    assert ref_best.restore_best()

    torch.manual_seed(0)
    first, first_best, _ = make(cfg)

    def kill(t, link):
        first_best(t, link)
        if t == 2 * SPE + 2:
            raise Killed(t)

    with pytest.raises(Killed):
        run_chain(first, cfg, checkpointer=KnotCheckpointer(tmp_path, every_steps=SPE + 1, log=lambda s: None),
                  on_step=kill)
    torch.manual_seed(123)
    again, again_best, _ = make(cfg)
    run_chain(again, cfg, checkpointer=KnotCheckpointer(tmp_path, every_steps=SPE + 1, log=lambda s: None),
              on_step=again_best)
    assert again_best.losses == ref_best.losses and again_best.best_epoch == ref_best.best_epoch
    assert again_best.restore_best()
    a, c = state(ref), state(again)
    assert all(torch.equal(a[k], c[k]) for k in a), [k for k in a if not torch.equal(a[k], c[k])][:3]


def test_checkpoint_without_the_best_dev_state_is_refused(tmp_path):
    cfg = ChainConfig(total_steps=2 * SPE, n_links=2, rank=2, alpha=4.0, lr=1e-2)
    b, _, _ = make(cfg, tracker=False)
    run_chain(b, cfg, checkpointer=KnotCheckpointer(tmp_path, log=lambda s: None))
    other, best, _ = make(cfg)
    with pytest.raises(ValueError, match=r"best_dev"):
        run_chain(other, cfg, checkpointer=KnotCheckpointer(tmp_path, log=lambda s: None), on_step=best)


# -- run_lm on real SST-2 rows with tiny-opt -----------------------------------------------------------------
def tiny_run(cfg, tmp_path, dtype=torch.float32):
    from cola_theory.lm.models import load_model
    from cola_theory.lm.train import run_lm
    from paper_repro.lm.runner import tiny_tokenizer

    model, _, _ = load_model(cfg.model, device="cpu", dtype=dtype, tiny_vocab=128)
    return run_lm(cfg, tmp_path / "r.json", data_dir=str(DATA_DIR), model_bundle=(model.eval(), tiny_tokenizer(),
                  "tiny"), device="cpu")


TINY = dict(model="tiny-opt", task="sst2", num_train=16, num_dev=8, num_test=8, batch_size=8, eval_batch_size=8,
            max_length=64, rank=4, fp32_master=None)


@needs_data
def test_run_lm_best_dev_on_sst2(tmp_path, monkeypatch):
    """best_epoch is the argmin of the recorded dev losses, and the tested model's dev loss (recomputed when the
    test accuracy is taken) is the recorded minimum; the training itself is that of best_dev=False."""
    from cola_theory.lm import scoring
    from cola_theory.lm.best_dev import dev_loss
    from cola_theory.lm.data import sample_protocol
    from paper_repro.lm.runner import tiny_tokenizer

    cfg = dict(TINY, method="cola", n_links=2, epochs=4.0, lr=0.2, seed=1)  # measured: dev loss lowest at epoch 2
    plain = tiny_run(LMRunConfig(**cfg), tmp_path)
    dev = sample_protocol("sst2", seed=1, num_train=16, num_dev=8, num_test=8, data_dir=str(DATA_DIR))["dev"]
    recomputed = []
    real = scoring.evaluate_accuracy

    def spy(model, tok, examples, *a, **kw):
        if not recomputed:  # the test split, right after training: the final model
            recomputed.append(dev_loss(model, tiny_tokenizer(), dev, 8, 64))
        return real(model, tok, examples, *a, **kw)

    monkeypatch.setattr(scoring, "evaluate_accuracy", spy)
    payload = tiny_run(LMRunConfig(**cfg, best_dev=True), tmp_path)
    m = payload["metrics"]
    losses = m["dev_loss_per_epoch"]
    assert len(losses) == 4 and m["best_epoch"] == 1 + losses.index(min(losses)) and m["best_dev_loss"] == min(losses)
    assert recomputed[0] == pytest.approx(min(losses), abs=1e-5)
    assert m["best_epoch"] < 4 and m["best_dev_restored"]  # an earlier epoch's model is the one tested
    steps = lambda p: [h["loss"] for h in p["history"] if h["event"] == "step"]  # noqa: E731
    assert steps(payload) == steps(plain)
    assert payload["config"]["best_dev"] is True and "best_epoch" not in plain["metrics"]


@needs_data
def test_run_lm_best_dev_needs_dev_examples(tmp_path):
    with pytest.raises(ValueError, match="best_dev=True .* num_dev=0"):
        tiny_run(LMRunConfig(**dict(TINY, num_dev=0), best_dev=True), tmp_path)


@needs_data
def test_run_lm_chain_overrides_reach_the_backend(tmp_path):
    """warmup, a jagged cosine with re-warm-up after each knot, Adam without a reset: the lrs of the history are
    lr_at of that schedule, the knots reset nothing, and the result records the overrides."""
    cfg = LMRunConfig(**dict(TINY, method="cola", n_links=3, epochs=6.0, lr=1e-2), lr_schedule="jagged_cosine",
                      optimizer_reset="none", chain_overrides={"warmup_steps": 2, "restart_warmup_steps": 1,
                                                               "optimizer": "adam", "min_lr_ratio": 0.1})
    payload = tiny_run(cfg, tmp_path)
    chain = ChainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in payload["config"]["chain"].items()})
    assert (chain.warmup_steps, chain.restart_warmup_steps, chain.optimizer, chain.min_lr_ratio) == (2, 1, "adam", 0.1)
    assert payload["config"]["chain_overrides"] == {"min_lr_ratio": 0.1, "optimizer": "adam",
                                                    "restart_warmup_steps": 1, "warmup_steps": 2}
    plan = link_plan(chain)
    steps = [h for h in payload["history"] if h["event"] == "step"]
    assert len(steps) == chain.total_steps == 12
    for h in steps:
        assert h["lr"] == lr_at(chain, h["t"] - 1, plan[h["link"]])
    lrs = [h["lr"] for h in steps]
    assert lrs[0] == 0.0 and lrs[plan[1].start] == 0.0 and lrs[plan[2].start] == 0.0  # warm-up, re-warm-ups
    knots = [h for h in payload["history"] if h["event"] == "knot"]
    assert len(knots) == 2 and all(k["reset_fraction"] == 0.0 for k in knots)


@needs_data
@pytest.mark.parametrize("fp32_master, fold", [(None, "float32 master copy"), (False, "in place bfloat16")])
def test_run_lm_records_the_fold(tmp_path, fp32_master, fold):
    cfg = LMRunConfig(**dict(TINY, method="cola", n_links=2, epochs=2.0, lr=1e-2, fp32_master=fp32_master))
    if fp32_master is False:
        with pytest.warns(UserWarning, match="every knot rounds W to bfloat16"):
            payload = tiny_run(cfg, tmp_path, dtype=torch.bfloat16)
    else:
        payload = tiny_run(cfg, tmp_path, dtype=torch.bfloat16)
    assert payload["metrics"]["fold"] == fold and payload["metrics"]["status"] == "finished"
    assert tiny_run(dataclasses.replace(cfg, fp32_master=None), tmp_path)["metrics"]["fold"] == "float32 weights"


@needs_data
def test_run_lm_best_dev_killed_and_resumed(tmp_path, monkeypatch, capsys):
    """run_lm with a checkpoint directory, killed after epoch 3 of 4 (best epoch 2, measured): the resumed run
    writes the same result as an uninterrupted one (losses, best epoch, history, accuracies)."""
    from cola_theory.lm import best_dev as mod
    from cola_theory.lm.models import load_model
    from cola_theory.lm.train import run_lm
    from paper_repro.lm.runner import tiny_tokenizer

    cfg = LMRunConfig(**dict(TINY, method="cola", n_links=2, epochs=4.0, lr=0.2, seed=1), best_dev=True,
                      checkpoint_every=1)

    def run(out):
        model, _, _ = load_model(cfg.model, device="cpu", tiny_vocab=128)
        return run_lm(cfg, tmp_path / out, data_dir=str(DATA_DIR), checkpoint_dir=tmp_path / "ck",
                      model_bundle=(model.eval(), tiny_tokenizer(), "tiny"), device="cpu")

    ref = run("ref.json")
    shutil.rmtree(tmp_path / "ck")  # the killed run starts from scratch
    real_call = mod.BestDev.__call__

    def dying(self, t, link=None):
        real_call(self, t, link)
        if t == 3 * 2 + 1:  # 2 steps per epoch: in epoch 4, after the checkpoint of step 6
            raise Killed(t)

    monkeypatch.setattr(mod.BestDev, "__call__", dying)
    with pytest.raises(Killed):
        run("killed.json")
    monkeypatch.setattr(mod.BestDev, "__call__", real_call)
    capsys.readouterr()
    again = run("again.json")
    assert "after 6 steps" in capsys.readouterr().out  # resumed from the checkpoint of step 6
    keys = ("dev_loss_per_epoch", "best_epoch", "best_dev_loss", "best_dev_restored", "test_acc", "dev_acc")
    assert {k: again["metrics"][k] for k in keys} == {k: ref["metrics"][k] for k in keys}
    assert ref["metrics"]["best_epoch"] < 4 and again["history"] == ref["history"]

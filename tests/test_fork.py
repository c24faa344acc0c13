"""Forked runs (`cola_theory.lm.fork`): a chain that starts from a family member's first-knot checkpoint writes the
result its unforked run writes, in both engines; the key separates runs whose first links differ."""

import dataclasses
import shutil

import pytest
from lm_fixtures import DATA_DIR, needs_data

from cola_theory.lm.fork import trunk_key
from cola_theory.lm.train import LMRunConfig

TINY = dict(model="tiny-llama", task="sst2", epochs=3.0, batch_size=4, eval_batch_size=8, num_train=16, num_dev=8,
            num_test=16, max_length=64, best_dev=True)
STEP = LMRunConfig(method="cola", link_epochs=(2.0, 1.0), rank=(4, 2), lr=1e-2, **TINY)  # a rank step-down 4 -> 2


def _key(*cfgs, engine="sequential", steps_per_epoch=4):
    return trunk_key(cfgs, [c.chain_config(steps_per_epoch) for c in cfgs], engine, "cpu")


# -- the key ------------------------------------------------------------------------------------------------------------
def test_the_key_joins_runs_that_agree_up_to_the_first_knot_and_only_those():
    other_rank = dataclasses.replace(STEP, rank=(4, 1))
    step, key = _key(STEP)
    assert step == 8 and _key(other_rank) == (step, key)  # 4 -> 2 and 4 -> 1: the same first link
    cola3 = LMRunConfig(method="cola", n_links=3, rank=4, lr=1e-2, **TINY)
    assert _key(dataclasses.replace(cola3, optimizer_reset="none")) == _key(cola3)  # the reset acts at the knot
    assert _key(dataclasses.replace(cola3, zero_shot=True)) == _key(cola3)  # evaluated before training only
    differs = [dataclasses.replace(STEP, lr=3e-3), dataclasses.replace(STEP, seed=1),
               dataclasses.replace(STEP, rank=(2, 2)), dataclasses.replace(STEP, link_epochs=(1.0, 2.0)),
               dataclasses.replace(STEP, lr_schedule="restart"),  # link 1 decays to 0 by its own end
               dataclasses.replace(STEP, chain_overrides={"warmup_steps": 2}),
               dataclasses.replace(STEP, chain_overrides={"init": "gaussian"}),
               dataclasses.replace(STEP, weight_decay=0.1), dataclasses.replace(STEP, num_train=12),
               dataclasses.replace(STEP, best_dev=False), dataclasses.replace(STEP, epochs=4.0, link_epochs=(2.0, 2.0))]
    assert len({_key(c) for c in differs} | {(step, key)}) == len(differs) + 1
    assert _key(cola3, engine="packed") != _key(cola3)  # a pack forks from a pack only
    assert _key(STEP, STEP, engine="packed") != _key(STEP, dataclasses.replace(STEP, seed=1), engine="packed")
    assert _key(LMRunConfig(method="lora", rank=4, **TINY)) is None  # no knot: no trunk
    assert _key(STEP, cola3, engine="packed") is None  # first knots at different steps
    # jagged cosine differs from the global linear decay from the first step (compared by values)
    assert _key(dataclasses.replace(cola3, lr_schedule="jagged_cosine")) != _key(cola3)


# -- whole runs: forked == unforked -----------------------------------------------------------------------------------
def _bundle():
    from cola_theory.lm.models import load_model
    from paper_repro.lm.runner import tiny_tokenizer

    model, _, _ = load_model("tiny-llama", device="cpu", tiny_vocab=128)
    return model.eval(), tiny_tokenizer(), "tiny"


def _same(a, b):
    assert a["history"] == b["history"]
    keys = ("test_acc", "dev_acc", "best_epoch", "dev_loss_per_epoch", "best_dev_restored", "status")
    assert {k: a["metrics"].get(k) for k in keys} == {k: b["metrics"].get(k) for k in keys}
    assert a["config"] == b["config"]


@needs_data
def test_a_forked_sequential_run_writes_what_its_unforked_run_writes(tmp_path, capsys):
    from cola_theory.lm.train import run_lm

    bundle, trunks = _bundle(), tmp_path / "trunks"
    kw = dict(data_dir=str(DATA_DIR), model_bundle=bundle, device="cpu")
    down1 = dataclasses.replace(STEP, rank=(4, 1), lr=0.2)  # lr 0.2: an earlier epoch wins (the restore path runs)
    first = run_lm(dataclasses.replace(down1, rank=(4, 2)), checkpoint_dir=tmp_path / "a", trunk_root=trunks, **kw)
    assert "forked_at_step" not in first["metrics"] and len(list(trunks.iterdir())) == 1
    capsys.readouterr()
    forked = run_lm(down1, checkpoint_dir=tmp_path / "b", trunk_root=trunks, **kw)
    assert "forked from trunk" in capsys.readouterr().out and forked["metrics"]["forked_at_step"] == 8
    alone = run_lm(down1, **kw)
    _same(forked, alone)
    assert [e["t"] for e in forked["history"] if e["event"] == "knot"] == [8]
    # a run of another family (another LR) makes its own trunk and does not fork
    other = run_lm(dataclasses.replace(down1, lr=3e-3), checkpoint_dir=tmp_path / "c", trunk_root=trunks, **kw)
    assert "forked_at_step" not in other["metrics"] and len(list(trunks.iterdir())) == 2


@needs_data
def test_no_optimizer_reset_forks_from_the_full_reset_chain_and_a_corrupt_trunk_is_not_used(tmp_path, capsys):
    from cola_theory.lm.train import run_lm

    bundle, trunks = _bundle(), tmp_path / "trunks"
    kw = dict(data_dir=str(DATA_DIR), model_bundle=bundle, device="cpu")
    cola3 = LMRunConfig(method="cola", n_links=3, rank=4, lr=1e-2, **TINY)
    none = dataclasses.replace(cola3, optimizer_reset="none")
    full = run_lm(cola3, checkpoint_dir=tmp_path / "a", trunk_root=trunks, **kw)
    forked = run_lm(none, checkpoint_dir=tmp_path / "b", trunk_root=trunks, **kw)
    assert forked["metrics"]["forked_at_step"] == 4
    _same(forked, run_lm(none, **kw))
    # the knot record says which policy this run applied (its own, not the trunk's)
    fractions = lambda p: [e["reset_fraction"] for e in p["history"] if e["event"] == "knot"]  # noqa: E731
    assert fractions(forked) == [0.0, 0.0] and fractions(full) == [1.0, 1.0]
    (tensors,) = trunks.rglob("tensors.safetensors")
    tensors.write_bytes(tensors.read_bytes()[:-7])  # truncated: fails its sha256
    capsys.readouterr()
    again = run_lm(none, checkpoint_dir=tmp_path / "c", trunk_root=trunks, **kw)
    assert "not used" in capsys.readouterr().out and "forked_at_step" not in again["metrics"]
    _same(again, forked)


@needs_data
def test_a_forked_pack_writes_what_its_unforked_pack_writes(tmp_path):
    from cola_theory.lm.packed_train import run_lm_packed

    bundle, trunks = _bundle(), tmp_path / "trunks"
    kw = dict(data_dir=str(DATA_DIR), model_bundle=bundle, device="cpu")
    pack = lambda rank: [dataclasses.replace(STEP, rank=rank, lr=lr, seed=s)  # noqa: E731
                         for lr, s in ((1e-2, 0), (3e-3, 1), (0.2, 1))]
    run_lm_packed(pack((4, 2)), checkpoint_dir=tmp_path / "a", trunk_root=trunks, **kw)
    forked = run_lm_packed(pack((4, 1)), checkpoint_dir=tmp_path / "b", trunk_root=trunks, **kw)
    alone = run_lm_packed(pack((4, 1)), **kw)
    for f, a in zip(forked, alone):
        assert f["metrics"]["forked_at_step"] == 8
        _same(f, a)
    # the same runs in another order are another pack: no fork
    shutil.rmtree(tmp_path / "b")
    again = run_lm_packed(pack((4, 1))[::-1], checkpoint_dir=tmp_path / "b", trunk_root=trunks, **kw)
    assert all("forked_at_step" not in p["metrics"] for p in again)


@needs_data
def test_the_runner_forks_the_step_down_family_and_results_equal_an_unforked_runner(tmp_path):
    from cola_theory.results import load_result
    from paper_repro.lm.profiles import LMJob, run_steps
    from paper_repro.lm.runner import run_lm_jobs, trained_steps

    jobs = [LMJob(dataclasses.replace(STEP, rank=(4, r), seed=s), ("t",)) for r in (1, 2, 3, 4) for s in (0, 1)]
    jobs.append(LMJob(dataclasses.replace(STEP, lr=3e-3), ("t",)))  # a family of one: run without a trunk
    quiet = dict(data_dir=DATA_DIR, device="cpu", log=lambda m: None)
    forked = run_lm_jobs(jobs, tmp_path / "f", pack=2, **quiet)
    plain = run_lm_jobs(jobs, tmp_path / "p", pack=2, fork=False, **quiet)
    assert forked.count("ran") == plain.count("ran") == 9
    n_forked = 0
    for job in jobs:
        a, b = (load_result(job.result_path(tmp_path / d)) for d in ("f", "p"))
        _same(a, b)
        n_forked += "forked_at_step" in a["metrics"]
        assert "forked_at_step" not in b["metrics"]
    assert n_forked == 6  # one pack of each (lr, seed) family trains the first link, the other three fork
    # the projection's step count (runner.trained_steps) names the runs that forked and the steps they trained
    steps = trained_steps(jobs, pack=2)
    for job in jobs:
        at = load_result(job.result_path(tmp_path / "f"))["metrics"].get("forked_at_step", 0)
        assert steps[job.job_id] == run_steps(job.cfg) - at == 12 - at
    assert set(trained_steps(jobs, pack=2, fork=False).values()) == {12}
    # with results present a pack runs only its members without one, and forks only from the same members: seed 1
    # of 4->2 and of 4->3 again -> two one-run units, the first trains its first link, the second forks from it
    again = [j for j in jobs if j.cfg.seed == 1 and j.cfg.rank in ((4, 2), (4, 3))]
    for job in again:
        job.result_path(tmp_path / "f").unlink()
    done = {j.job_id for j in jobs} - {j.job_id for j in again}
    steps = trained_steps(jobs, pack=2, done=done)
    assert set(steps) == {j.job_id for j in again} and sorted(steps.values()) == [4, 12]
    assert run_lm_jobs(jobs, tmp_path / "f", pack=2, **quiet).count("ran") == 2
    for job in again:
        at = load_result(job.result_path(tmp_path / "f"))["metrics"].get("forked_at_step", 0)
        assert steps[job.job_id] == 12 - at
    trunks = [tmp_path / d / "lm" / "checkpoints" / "trunks" for d in ("f", "p")]
    assert trunks[0].is_dir() and not any(trunks[0].iterdir())  # used, then deleted after the family's last unit
    assert not trunks[1].exists()


@needs_data
def test_a_run_killed_after_its_first_knot_shares_that_checkpoint_when_it_resumes(tmp_path, monkeypatch, capsys):
    """A run killed after its first-knot checkpoint (e.g. started before forking existed) resumes from it and leaves
    it as the trunk; a family member then forks from it and still writes its unforked result."""
    from cola_theory.lm import best_dev as mod
    from cola_theory.lm.train import run_lm

    bundle, trunks = _bundle(), tmp_path / "trunks"
    kw = dict(data_dir=str(DATA_DIR), model_bundle=bundle, device="cpu")
    real_call = mod.BestDev.__call__

    def dying(self, t, link=None):
        real_call(self, t, link)
        if t == 9:  # one step after the first knot (step 8), whose checkpoint is on disk
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(mod.BestDev, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        run_lm(STEP, checkpoint_dir=tmp_path / "a", **kw)  # no trunk_root: as a run of the old code
    monkeypatch.setattr(mod.BestDev, "__call__", real_call)
    assert not trunks.exists()
    kw["model_bundle"] = _bundle()  # the killed run left the shared model wrapped (the runner reloads it too)
    capsys.readouterr()
    resumed = run_lm(STEP, checkpoint_dir=tmp_path / "a", trunk_root=trunks, **kw)
    out = capsys.readouterr().out
    assert "resumed from" in out and "trunk of step 8 saved" in out and "forked_at_step" not in resumed["metrics"]
    other = dataclasses.replace(STEP, rank=(4, 1))
    forked = run_lm(other, checkpoint_dir=tmp_path / "b", trunk_root=trunks, **kw)
    assert forked["metrics"]["forked_at_step"] == 8
    _same(forked, run_lm(other, **kw))

"""Bad input, one table: configs (ChainConfig, LMRunConfig, checkpointer, backend), `run_all.py` arguments, data
files, model paths and resumes with a changed config. Every case must fail with a message that names the field or
file, the bad value and the fix, and must leave a finished result in the results directory untouched.
Plus property-based checks (hypothesis) of config validation and of the knot schedule."""

import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lm_fixtures import batch_fn, lm_loss, tiny_model

from cola_theory.chain import run_chain
from cola_theory.config import ChainConfig, link_plan, lr_at
from cola_theory.lm.backend import PeftChainBackend
from cola_theory.lm.checkpoint import KnotCheckpointer
from cola_theory.lm.collectives import shard_batch
from cola_theory.lm.train import LMRunConfig, run_lm
from cola_theory.results import save_result

FIXTURES = Path(__file__).parent / "fixtures" / "superglue"
RTE_ROW = {"premise": "A cat sat.", "hypothesis": "A cat.", "label": "entailment", "idx": 0}
NAN = float("nan")


def _chain(env, **kw):
    ChainConfig(**kw)


def _lm(env, **kw):
    LMRunConfig(**kw)


def _lm_chain(env, **kw):  # LMRunConfig defers lr/rank/schedule checks to the chain it builds
    LMRunConfig(**kw).chain_config(steps_per_epoch=10)


def _backend(env, **kw):
    PeftChainBackend(tiny_model("opt"), ChainConfig(total_steps=2), batch_fn(), lm_loss, **kw)


def _run_backend(env, cfg=None, **kw):
    cfg = cfg or ChainConfig(total_steps=2, rank=4)
    run_chain(PeftChainBackend(tiny_model("opt"), cfg, batch_fn(), lm_loss, **kw), cfg)


def _ckpt(env, **kw):
    KnotCheckpointer(env["results"] / "ck", **kw)


def _cli(env, *argv):
    from paper_repro.run_all import main

    argv = [a.format(**{k: str(v) for k, v in env.items()}) for a in argv]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = exc.code
    text = out.getvalue() + err.getvalue()
    if code == 2 or "skipped" in text:
        raise ValueError(f"exit {code}: {text}")
    return text


def _data(env, task, text):
    """run_lm on a data dir whose <task>/train.jsonl holds `text` (bytes, str, rows, or None = missing)."""
    data = env["tmp"] / "data"
    shutil.copytree(FIXTURES / task, data / task)
    path = data / task / "train.jsonl"
    if text is None:
        path.unlink()
    else:
        if isinstance(text, list):
            text = "\n".join(json.dumps(r) for r in text) + "\n"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    _run_lm(env, data_dir=str(data), task=task)


def _run_lm(env, data_dir=None, **kw):
    cfg = LMRunConfig(**{"model": "tiny-opt", "task": "rte", "num_train": 4, "num_dev": 0, "num_test": 2,
                         "epochs": 1.0, "n_links": 1, **kw})
    run_lm(cfg, env["results"] / "new.json", data_dir=data_dir or str(FIXTURES),
           checkpoint_dir=env["results"] / "ck-new")


class _Stop(Exception):
    pass


def _stop_at(k):
    def on_step(t, link):
        if t == k:
            raise _Stop(t)
    return on_step


def _resume_changed(env, **changed):
    """A run stopped after 3 steps (checkpoints kept), resumed with a config that differs in `changed`."""
    base = {"total_steps": 4, "n_links": 2, "rank": 2, "alpha": 4.0, "lr": 1e-2}
    ck = env["tmp"] / "ck"
    first = ChainConfig(**base)
    with pytest.raises(_Stop):
        b = PeftChainBackend(tiny_model("opt"), first, batch_fn(), lm_loss, target_modules=["q_proj"])
        run_chain(b, first, checkpointer=KnotCheckpointer(ck, every_steps=1, log=lambda s: None),
                  on_step=_stop_at(3))
    cfg = ChainConfig(**{**base, **changed})
    before = {p: p.read_bytes() for p in ck.rglob("*") if p.is_file()}
    try:
        b = PeftChainBackend(tiny_model("opt"), cfg, batch_fn(), lm_loss, target_modules=["q_proj"])
        run_chain(b, cfg, checkpointer=KnotCheckpointer(ck, every_steps=1, log=lambda s: None))
    finally:
        assert {p: p.read_bytes() for p in ck.rglob("*") if p.is_file()} == before  # the checkpoint is kept


CASES = [  # (id, function, args, kwargs, substrings the message must contain)
    # -- ChainConfig: field=value, and what is allowed
    ("chain-total-steps", _chain, (), {"total_steps": 0}, ["ChainConfig.total_steps=0", "integer >= 1"]),
    ("chain-n-links-0", _chain, (), {"total_steps": 5, "n_links": 0}, ["ChainConfig.n_links=0", "at least 1 link"]),
    ("chain-links>steps", _chain, (), {"total_steps": 4, "n_links": 9}, ["n_links=9", "more links than steps"]),
    ("chain-knots-order", _chain, (), {"total_steps": 10, "knots": (6, 3)},
     ["ChainConfig.knots=(6, 3)", "strictly increasing steps inside (0, 10)"]),
    ("chain-rank-0", _chain, (), {"total_steps": 4, "rank": 0}, ["ChainConfig.rank=0", "positive integers"]),
    ("chain-ranks-per-link", _chain, (), {"total_steps": 9, "n_links": 2, "rank": (8, 2, 2)},
     ["ChainConfig.rank=(8, 2, 2)", "one rank or one per link (2 links)"]),
    ("chain-lr-negative", _chain, (), {"total_steps": 4, "lr": -0.1}, ["ChainConfig.lr=-0.1", "finite number > 0"]),
    ("chain-lr-nan", _chain, (), {"total_steps": 4, "lr": NAN}, ["ChainConfig.lr=nan", "finite number > 0"]),
    ("chain-alpha-0", _chain, (), {"total_steps": 4, "alpha": 0.0}, ["ChainConfig.alpha=0.0", "finite number > 0"]),
    ("chain-optimizer", _chain, (), {"total_steps": 4, "optimizer": "lion"},
     ["ChainConfig.optimizer='lion'", "allowed values are ('adamw', 'adam', 'sgd')"]),
    ("chain-schedule", _chain, (), {"total_steps": 4, "lr_schedule": "cosine"},
     ["ChainConfig.lr_schedule='cosine'", "'jagged_cosine'"]),
    ("chain-reset", _chain, (), {"total_steps": 4, "optimizer_reset": "magnitude:2"},
     ["optimizer_reset='magnitude:2'", "0 <= p <= 1", "'full' for COLA"]),
    ("chain-frozen", _chain, (), {"total_steps": 4, "frozen_factor": "C"},
     ["ChainConfig.frozen_factor='C'", "('none', 'A', 'B')"]),
    ("chain-warmup", _chain, (), {"total_steps": 10, "warmup_steps": 10},
     ["ChainConfig.warmup_steps=10", "[0, total_steps=10)"]),
    ("chain-min-lr", _chain, (), {"total_steps": 4, "min_lr_ratio": 1.5}, ["min_lr_ratio=1.5", "0 <= min_lr_ratio <= 1"]),
    ("chain-wd", _chain, (), {"total_steps": 4, "weight_decay": -0.1}, ["weight_decay=-0.1", "need >= 0"]),
    ("chain-init", _chain, (), {"total_steps": 4, "init": "xavier"}, ["ChainConfig.init='xavier'", "'kaiming'"]),
    ("chain-init-std", _chain, (), {"total_steps": 4, "init_std": 0.0}, ["init_std=0.0", "> 0 or None"]),
    # -- LMRunConfig
    ("lm-method", _lm, (), {"method": "full"}, ["LMRunConfig.method='full'", "('lora', 'cola')"]),
    ("lm-batch", _lm, (), {"batch_size": 0}, ["LMRunConfig.batch_size=0", "must be >= 1"]),
    ("lm-max-length", _lm, (), {"max_length": 0}, ["LMRunConfig.max_length=0", "must be >= 1"]),
    ("lm-epochs", _lm, (), {"epochs": 0.0}, ["LMRunConfig.epochs=0.0", "must be > 0"]),
    ("lm-link-epochs", _lm, (), {"epochs": 5.0, "link_epochs": (3.0, 1.0)},
     ["LMRunConfig.link_epochs=(3.0, 1.0)", "must sum to epochs=5.0"]),
    ("lm-dtype", _lm, (), {"dtype": "int8"}, ["LMRunConfig.dtype='int8'", "auto, float32, bfloat16 or float16"]),
    ("lm-compile", _lm, (), {"compile": "fast"}, ["LMRunConfig.compile='fast'", "'off' or a torch.compile mode",
                                                   "'reduce-overhead'"]),
    ("lm-pad", _lm, (), {"pad_to_multiple_of": -8}, ["LMRunConfig.pad_to_multiple_of=-8", ">= 0 (0 = no padding)"]),
    ("lm-lr", _lm_chain, (), {"lr": -1.0}, ["ChainConfig.lr=-1.0", "finite number > 0"]),
    ("lm-reset", _lm_chain, (), {"optimizer_reset": "half"}, ["optimizer_reset='half'", "use one of"]),
    # -- checkpointer, backend, data-parallel shards
    ("ckpt-every", _ckpt, (), {"every_steps": -1}, ["every_steps=-1", "integer >= 0 (0 = only at knots)"]),
    ("ckpt-keep", _ckpt, (), {"keep": 0}, ["keep=0", "integer >= 1"]),
    ("backend-clip", _backend, (), {"max_grad_norm": 0.0}, ["max_grad_norm=0.0", "> 0 or None"]),
    ("backend-autocast", _backend, (), {"autocast_dtype": torch.float64},
     ["autocast_dtype=torch.float64", "torch.bfloat16, torch.float16"]),
    ("backend-compile", _backend, (), {"compile": True}, ["compile=True is invalid", "None (eager)", "'default'"]),
    ("backend-ddp-no-group", _backend, (), {"ddp": True}, ["ddp=True", "torchrun", "init_from_env()"]),
    ("backend-rank>layer", _run_backend, (ChainConfig(total_steps=2, rank=64),), {},
     ["rank=64 exceeds min(m, n) = 32", "use a smaller rank"]),
    ("backend-targets", _run_backend, (), {"target_modules": ["nope_proj"]}, ["nope_proj", "not found"]),
    ("shard-uneven", lambda env: shard_batch(torch.zeros(7, 2), 0, 2), (), {},
     ["7 rows cannot be split evenly over 2 processes", "divisible by the world size (e.g. 6)"]),
    # -- run_all.py arguments (in-process main(); exit code 2 with the message)
    ("cli-profile", _cli, ("--profile", "huge"), {}, ["--profile", "invalid choice: 'huge'", "'smoke', 'cpu', 'gpu'"]),
    ("cli-only", _cli, ("--only", "foo"), {}, ["unknown part(s) ['foo']", "choose from theory, lm, figures"]),
    ("cli-shard-range", _cli, ("--shard", "3/2"), {}, ["--shard '3/2'", "0 <= i < n"]),
    ("cli-shard-format", _cli, ("--shard", "x"), {}, ["--shard 'x'", "use i/n, e.g. 0/4"]),
    ("cli-unknown-flag", _cli, ("--epochs", "3"), {}, ["unrecognized arguments: --epochs 3"]),
    ("cli-results-dir-is-file", _cli, ("--profile", "smoke", "--only", "theory", "--results-dir", "{results}/finished.json"),
     {}, ["--results-dir", "finished.json is not writable", "choose another directory with --results-dir"]),
    ("cli-data-dir", _cli, ("--profile", "smoke", "--only", "lm", "--results-dir", "{results}", "--data-dir",
                            "{tmp}/no-data"), {}, ["no-data' is not a directory", "--data-dir DIR"]),
    # -- data files (run_lm fails before writing anything)
    ("data-missing-file", _data, ("rte", None), {}, ["rte/train.jsonl does not exist", "put the labelled train.jsonl"]),
    ("data-empty", _data, ("rte", b""), {}, ["train.jsonl is empty", "replace it with the official file"]),
    ("data-latin1", _data, ("rte", json.dumps(RTE_ROW).replace("cat", "chat\xe9").encode("latin-1")), {},
     ["train.jsonl:1 is not valid UTF-8", "byte b'\\xe9'", "re-encode the file as UTF-8"]),
    ("data-utf16", _data, ("rte", json.dumps(RTE_ROW).encode("utf-16")), {}, ["is not valid UTF-8", "re-encode"]),
    ("data-missing-column", _data, ("rte", [{k: v for k, v in RTE_ROW.items() if k != "hypothesis"}]), {},
     ["train.jsonl:1: missing field 'hypothesis'", "the official format is SuperGLUE v2 RTE.zip"]),
    ("data-bad-label", _data, ("rte", [{**RTE_ROW, "label": "maybe"}]), {},
     ["field 'label' = \"maybe\" is not one of \"entailment\", \"not_entailment\"", "use the official file"]),
    ("data-label-type", _data, ("sst2", [{"sentence": "good", "label": "1", "idx": 0}]), {},
     ["field 'label' = \"1\" is not one of 0, 1"]),
    ("data-not-json", _data, ("rte", "{premise: oops}\n"), {}, ["train.jsonl:1 is not valid JSON", "one JSON object"]),
    ("data-array-row", _data, ("rte", "[1, 2]\n"), {}, ["train.jsonl:1 holds a JSON list", "one object per line"]),
    ("data-dir-missing", _run_lm, (), {"data_dir": "/nonexistent/cola-data"},
     ["data_dir='/nonexistent/cola-data' is not a directory", "<task>/train.jsonl"]),
    ("data-unknown-task", _run_lm, (), {"task": "mnli"}, ["unknown task 'mnli'", "use one of sst2, rte"]),
    # -- model paths (offline)
    ("model-missing-path", _run_lm, (), {"model": "/nonexistent/opt-1.3b"},
     ["no such directory", "model '/nonexistent/opt-1.3b'", "--model /path/to/a/local/copy"]),
    ("model-unknown-name", _run_lm, (), {"model": "tiny-gpt"}, ["model 'tiny-gpt'", "--model /path/to/a/local/copy"]),
    # -- resuming with another config than the checkpoint's
    ("resume-changed-lr", _resume_changed, (), {"lr": 2e-2},
     ["checkpoint was written with ChainConfig.lr=0.01 but this run has 0.02", "use the same config to resume"]),
    ("resume-changed-rank", _resume_changed, (), {"rank": 4}, ["ChainConfig.rank=2 but this run has 4"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_named_and_loses_nothing(case, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # model cases: no network retries
    name, fn, args, kwargs, expected = case
    results = tmp_path / "results"
    finished = results / "finished.json"
    save_result(finished, config={"task": "rte"}, history=[{"t": 1, "loss": 0.5}], metrics={"acc": 0.9},
                meta={"kept": True})
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in results.rglob("*")}
    env = {"tmp": tmp_path, "results": results}
    with pytest.raises((ValueError, FileNotFoundError, RuntimeError)) as info:
        fn(env, *args, **kwargs)
    message = str(info.value)
    missing = [s for s in expected if s not in message]
    assert not missing, f"{name}: {missing} not in: {message}"
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in results.rglob("*")}
    assert after == before, f"{name} changed the results directory"


def test_there_are_at_least_30_cases_over_every_kind():
    kinds = {c[0].split("-")[0] for c in CASES}
    assert len(CASES) >= 30 and kinds >= {"chain", "lm", "cli", "data", "model", "resume"}, (len(CASES), kinds)


# -- properties ----------------------------------------------------------------------------------------------
valid_ints = st.integers(min_value=1, max_value=60)


@settings(max_examples=80, deadline=None)
@given(T=valid_ints, data=st.data())
def test_any_valid_config_gives_a_plan_that_tiles_the_budget(T, data):
    m = data.draw(st.integers(1, T))
    ranks = data.draw(st.one_of(st.integers(1, 16), st.lists(st.integers(1, 16), min_size=m, max_size=m).map(tuple)))
    sched = data.draw(st.sampled_from(["linear", "restart", "jagged_cosine", "constant"]))
    w = data.draw(st.integers(0, T - 1))
    cfg = ChainConfig(total_steps=T, n_links=m, rank=ranks, lr_schedule=sched, warmup_steps=w,
                      restart_warmup_steps=data.draw(st.integers(0, T - 1)), lr=data.draw(st.floats(1e-6, 1.0)))
    plan = link_plan(cfg)
    assert [lk.index for lk in plan] == list(range(m)) and plan[0].start == 0 and plan[-1].end == T
    assert all(a.end == b.start and a.start < a.end for a, b in zip(plan, plan[1:])) and plan[-1].start < T
    assert [lk.rank for lk in plan] == list(cfg.ranks())
    for lk in plan:
        for t in range(lk.start, lk.end):
            lr = lr_at(cfg, t, lk)
            assert math.isfinite(lr) and 0.0 <= lr <= cfg.lr * (1 + 1e-12)
    # the chain driver runs exactly the plan: one knot record per link boundary
    assert sum(lk.end - lk.start for lk in plan) == T


@settings(max_examples=80, deadline=None)
@given(T=valid_ints, knots=st.lists(st.integers(-3, 70), max_size=6))
def test_explicit_knots_are_accepted_iff_strictly_inside(T, knots):
    ok = knots == sorted(set(knots)) and all(0 < k < T for k in knots)
    try:
        cfg = ChainConfig(total_steps=T, knots=tuple(knots))
    except ValueError as exc:
        assert not ok and "ChainConfig.knots=" in str(exc) and str(T) in str(exc)
        return
    assert ok
    plan = link_plan(cfg)
    assert tuple(lk.start for lk in plan[1:]) == tuple(knots) and cfg.n_links == len(knots) + 1


@settings(max_examples=100, deadline=None)
@given(field=st.sampled_from(["lr", "alpha"]), value=st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5)))
def test_lr_and_alpha_accepted_iff_finite_positive(field, value):
    ok = math.isfinite(value) and value > 0
    try:
        ChainConfig(total_steps=3, **{field: value})
    except ValueError as exc:
        assert not ok and f"ChainConfig.{field}={value!r}" in str(exc)
        return
    assert ok


@settings(max_examples=60, deadline=None)
@given(policy=st.text(alphabet="fulnoemagitdr:0123456789.", max_size=14))
def test_reset_policies_accepted_iff_documented(policy):
    kind, _, p = policy.partition(":")
    try:
        frac = float(p) if p else None
    except ValueError:
        frac = None
    ok = (kind in ("full", "none") and not p) or (kind in ("magnitude", "random") and frac is not None
                                                  and 0 <= frac <= 1)
    try:
        ChainConfig(total_steps=3, optimizer_reset=policy)
    except ValueError as exc:
        assert not ok and f"optimizer_reset={policy!r}" in str(exc)
        return
    assert ok

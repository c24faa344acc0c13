"""Faults: a chain run SIGKILLed at seeded random points (inside a step, inside a knot, in the middle of a
checkpoint file, inside the result's atomic write) and restarted until done ends bitwise identical to an
uninterrupted run, and every resumed segment retraces the uninterrupted one step for step; corrupt results and
checkpoints are named; a non-finite loss stops the run with its step and link recorded."""

import math
import os
import random
import subprocess
import sys
from pathlib import Path

import _workers as w
import pytest
from lm_fixtures import batch_fn, lm_loss, tiny_model

from cola_theory.chain import run_chain
from cola_theory.config import ChainConfig
from cola_theory.lm.backend import PeftChainBackend
from cola_theory.lm.checkpoint import KnotCheckpointer, verify
from cola_theory.results import CorruptResultError, load_if_valid, load_result, save_result

T = w.fault_config().total_steps  # 12 steps, knots before steps 4 and 8, the final knot after step 12
KNOTS = (4, 8, 12)
ROOT = Path(__file__).resolve().parent.parent


def progress(out: Path) -> int:
    """Steps done according to the newest finished checkpoint (0 if none)."""
    names = [p.name for p in (out / "ckpt").glob("step-*")] if (out / "ckpt").is_dir() else []
    return max((int(n.split("-")[1]) for n in names), default=0)


def step_log(out: Path, pid_files_before: set[str]) -> list[tuple[int, str]]:
    new = sorted(set(os.listdir(out)) - pid_files_before)
    logs = [n for n in new if n.startswith("steps-")]
    assert len(logs) <= 1, logs
    if not logs:
        return []
    return [(int(t), h) for t, h in (line.split() for line in (out / logs[0]).read_text().splitlines())]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    assert w.launch("chain", 1, out, timeout=60) == [0], w.errors(out)
    log = step_log(out, set())
    assert [t for t, _ in log] == list(range(1, T + 1))
    return dict(log), load_result(out / "result.json")


def choose_kill(rng: random.Random, kind: str, done: int) -> str:
    """A kill point of `kind` at most a few steps ahead of `done`, so that the schedule spans the whole run."""
    ahead = min(3, T - done)
    if kind == "step" and ahead:
        return f"step:{done + rng.randrange(ahead)}"
    if kind == "ckpt" and ahead:  # 3 files per checkpoint go through _write (optimizer.pt, state.json, manifest)
        return f"ckpt:{rng.randint(1, 3 * ahead)}"
    if kind in ("knot", "step", "ckpt"):  # a checkpoint at a knot step resumes before that knot is tied
        return "knot:1"
    return "result"


@pytest.mark.parametrize("seed", [2401_04151, 7])
def test_sigkill_at_random_points_loses_nothing(tmp_path, reference, seed):
    ref_steps, ref_result = reference
    rng = random.Random(seed)
    kinds = [rng.choice(["step", "ckpt", "knot"]) for _ in range(12)] + ["result"]
    tried, identical, report = 0, 0, []
    for kind in kinds:
        done, before = progress(tmp_path), set(os.listdir(tmp_path))
        kill = choose_kill(rng, kind, done)
        code = w.launch("chain", 1, tmp_path, timeout=60, kill=kill)[0]
        assert code == -9, (kill, code, w.errors(tmp_path))  # it really died by SIGKILL
        tried += 1
        log = step_log(tmp_path, before)
        # the segment after the restart starts right after the checkpoint and retraces the reference
        ok = all(ref_steps[t] == h for t, h in log) and (not log or log[0][0] == done + 1)
        identical += ok
        report.append(f"{kill}@{done}->{progress(tmp_path)}{'' if ok else ' MISMATCH'}")
    done, before = progress(tmp_path), set(os.listdir(tmp_path))
    assert w.launch("chain", 1, tmp_path, timeout=60) == [0], w.errors(tmp_path)
    log = step_log(tmp_path, before)
    assert all(ref_steps[t] == h for t, h in log) and done == T  # the result write was the last thing left
    result = load_result(tmp_path / "result.json")
    assert result["history"] == ref_result["history"] and result["metrics"] == ref_result["metrics"]
    print(f"kill points tried: {tried}, resumed identically: {identical} ({'; '.join(report)})")
    assert identical == tried == len(kinds)


def test_a_fresh_interpreter_killed_in_a_knot_resumes_identically(tmp_path, reference):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "_workers.py"), "chain", str(tmp_path),
                           "--kill", "knot:2"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILL inside the second knot (t = 8)
    assert progress(tmp_path) == 8 and not (tmp_path / "result.json").exists()
    assert w.launch("chain", 1, tmp_path, timeout=60) == [0], w.errors(tmp_path)
    result = load_result(tmp_path / "result.json")
    assert result["history"] == reference[1]["history"] and result["metrics"] == reference[1]["metrics"]


def test_corrupt_result_and_checkpoint_are_named(tmp_path):
    path = tmp_path / "res.json"
    save_result(path, config={"a": 1}, history=[{"t": 1, "loss": 0.5}], meta={"m": 0})
    text = path.read_text()
    path.write_text(text.replace('"loss": 0.5', '"loss": 0.25'))
    with pytest.raises(CorruptResultError, match=f"result file {path} fails its sha256 check"):
        load_result(path)
    warned = []
    assert load_if_valid(path, warn=warned.append) is None and str(path) in warned[0]
    path.write_text(text[: len(text) // 2])  # torn
    with pytest.raises(CorruptResultError, match=f"result file {path} is unreadable"):
        load_result(path)

    cfg = ChainConfig(total_steps=4, n_links=2, rank=2, alpha=4.0, lr=1e-2)
    b = PeftChainBackend(tiny_model("opt"), cfg, batch_fn(), lm_loss, target_modules=["q_proj"])
    ckpt = KnotCheckpointer(tmp_path / "ck", every_steps=1, keep=2, log=lambda s: None)
    run_chain(b, cfg, checkpointer=ckpt)
    newest = ckpt.checkpoints()[0]
    target = newest / "tensors.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(CorruptResultError, match=f"file {target} fails its sha256 check"):
        verify(newest)
    logs = []
    b2 = PeftChainBackend(tiny_model("opt"), cfg, batch_fn(), lm_loss, target_modules=["q_proj"])
    restored = KnotCheckpointer(tmp_path / "ck", every_steps=1, keep=2, log=logs.append).restore(b2)
    assert restored is not None and restored[0] == 3 and str(target) in logs[0]  # fell back to step 3


@pytest.mark.parametrize("how", ["nan_at_step", "exploding_lr"])
def test_non_finite_loss_stops_the_lm_run_with_step_and_link(how):
    if how == "nan_at_step":
        cfg = ChainConfig(total_steps=9, n_links=3, rank=2, alpha=4.0, lr=1e-2)
        state = {"t": 0}

        def loss_fn(model, batch):
            loss = lm_loss(model, batch)
            state["t"] += 1
            return loss * float("nan") if state["t"] == 5 else loss  # the 5th step (t = 4, link 1)
    else:
        cfg = ChainConfig(total_steps=30, n_links=3, rank=2, alpha=4.0, lr=1e12, optimizer="sgd")
        loss_fn = lm_loss
    b = PeftChainBackend(tiny_model("opt"), cfg, batch_fn(), loss_fn, target_modules=["q_proj", "v_proj"])
    res = run_chain(b, cfg)
    assert res.status == "diverged"
    assert not math.isfinite(float(res.diverged["loss"]))
    steps = [h for h in res.history if h["event"] == "step"]
    assert all(math.isfinite(h["loss"]) for h in steps) and len(steps) == res.diverged["step"]
    if how == "nan_at_step":
        assert res.diverged == {"step": 4, "link": 1, "loss": "nan"}
    else:
        k = res.diverged["step"]
        assert res.diverged["link"] == min(k // 10, 2) and k < 30


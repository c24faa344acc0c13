"""KnotCheckpointer: a run killed after k steps and resumed on a NEW model ends bit-identical to an uninterrupted
run (weights and history); corrupted checkpoints are detected, named, and skipped."""

import json

import pytest
import torch
from lm_fixtures import batch_fn, lm_loss, logits, tiny_model

from cola_theory.chain import run_chain
from cola_theory.config import ChainConfig
from cola_theory.lm.backend import PeftChainBackend
from cola_theory.lm.checkpoint import KnotCheckpointer, verify
from cola_theory.results import CorruptResultError


class Killed(Exception):
    pass


def backend(cfg, **kw):
    # dropout > 0 (model and LoRA): a resumed run is exact only if the torch RNG state is restored too
    return PeftChainBackend(tiny_model("opt", dropout=0.1), cfg, batch_fn(), lm_loss,
                            eval_fn=lambda m: {"probe": float(logits(m).mean())}, target_modules=["q_proj", "v_proj"],
                            lora_dropout=0.1, **kw)


def kill_at(k):
    def on_step(t, link):
        if t == k:
            raise Killed(t)
    return on_step


def final_state(b):
    return {k: v.detach().clone() for k, v in b.model.state_dict().items()}


@pytest.mark.parametrize("stop, rank, master", [(5, 4, False), (7, (4, 2, 2), False), (4, 4, True)])
def test_resume_is_exact(tmp_path, stop, rank, master):
    cfg = ChainConfig(total_steps=9, n_links=3, rank=rank, alpha=8.0, lr=2e-2, warmup_steps=1, seed=3,
                      optimizer_reset="magnitude:0.5" if master else "full")
    torch.manual_seed(0)
    ref = backend(cfg, fp32_master=master)
    ref_res = run_chain(ref, cfg)

    torch.manual_seed(0)
    ckpt = KnotCheckpointer(tmp_path, every_steps=2, log=lambda s: None)
    first = backend(cfg, fp32_master=master)
    with pytest.raises(Killed):
        run_chain(first, cfg, checkpointer=ckpt, on_step=kill_at(stop))  # the save of step `stop` never happens
    assert len(ckpt.checkpoints()) == 1  # only the latest is kept
    torch.manual_seed(12345)  # a different process state: everything needed must come from the checkpoint
    resumed = backend(cfg, fp32_master=master)  # a NEW model, built from the original base
    res = run_chain(resumed, cfg, checkpointer=KnotCheckpointer(tmp_path, every_steps=2, log=lambda s: None))

    assert res.history == ref_res.history
    a, b = final_state(ref), final_state(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    assert [r["rank"] for r in resumed.links] == [r["rank"] for r in ref.links]
    for r1, r2 in zip(ref.links, resumed.links):
        assert all(torch.equal(r1["factors"][n][0], r2["factors"][n][0]) for n in r1["factors"])


def test_checkpoint_layout_and_atomic_keep(tmp_path):
    cfg = ChainConfig(total_steps=6, n_links=2, rank=2, alpha=4.0, lr=1e-2)
    ckpt = KnotCheckpointer(tmp_path, every_steps=1, keep=2, log=lambda s: None)
    run_chain(backend(cfg), cfg, checkpointer=ckpt)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["step-000000005", "step-000000006"]  # keep=2, no temporary directories left
    manifest = verify(tmp_path / names[-1])
    assert set(manifest["files"]) == {"tensors.safetensors", "optimizer.pt", "state.json"}
    state = json.loads((tmp_path / names[-1] / "state.json").read_text())
    assert state["t"] == 6 and state["backend"]["link"] == 1 and state["backend"]["rank"] == 2


def corrupt(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("keep", [1, 2])
def test_corrupted_checkpoint_is_detected_and_skipped(tmp_path, keep):
    cfg = ChainConfig(total_steps=6, n_links=2, rank=2, alpha=4.0, lr=1e-2)
    ckpt = KnotCheckpointer(tmp_path, every_steps=2, keep=keep, log=lambda s: None)
    with pytest.raises(Killed):
        run_chain(backend(cfg), cfg, checkpointer=ckpt, on_step=kill_at(5))
    newest = ckpt.checkpoints()[0]
    assert newest.name == "step-000000004"
    corrupt(newest / "tensors.safetensors")
    with pytest.raises(CorruptResultError, match="tensors.safetensors"):
        verify(newest)
    messages = []
    ckpt = KnotCheckpointer(tmp_path, every_steps=2, keep=keep, log=messages.append)
    b = backend(cfg)
    restored = ckpt.restore(b)
    assert any("sha256" in m and "tensors.safetensors" in m for m in messages)
    if keep == 1:  # nothing older: start fresh, with a message
        assert restored is None and any("starting fresh" in m for m in messages)
    else:  # falls back to the previous checkpoint
        assert restored is not None and restored[0] == 3 and b.t == 3
    assert (tmp_path / "corrupt-step-000000004").is_dir()  # set aside, never loaded again


def test_missing_file_and_config_mismatch(tmp_path):
    cfg = ChainConfig(total_steps=4, n_links=2, rank=2, alpha=4.0, lr=1e-2)
    ckpt = KnotCheckpointer(tmp_path, log=lambda s: None)
    run_chain(backend(cfg), cfg, checkpointer=ckpt)
    path = ckpt.checkpoints()[0]
    other = ChainConfig(total_steps=4, n_links=2, rank=2, alpha=4.0, lr=5e-3)
    with pytest.raises(ValueError, match="ChainConfig.lr"):
        ckpt.restore(backend(other))
    (path / "optimizer.pt").unlink()
    with pytest.raises(CorruptResultError, match="optimizer.pt is missing"):
        verify(path)
    with pytest.raises(ValueError, match="every_steps"):
        KnotCheckpointer(tmp_path, every_steps=-1)

"""torch.compile (and CUDA graphs) under the chain: same losses and weights as eager, and knots recompile nothing.

A knot folds W <- W + (alpha/r) B A and re-draws A, zeroes B IN PLACE, so the compiled graph (which takes W, A, B
as inputs) is reused across links and CUDA graphs replay over the same addresses. A compiled model that had baked
the weights in as constants would give stale outputs after a knot: the fold-invariance test below would fail.
Most tests use the "aot_eager" backend (the same graph capture and autograd as inductor, no C++ build); one runs
inductor itself.
"""

import dataclasses

import pytest
import torch
from lm_fixtures import DATA_DIR, batch_fn, lm_loss, logits, needs_data, tiny_model
from torch._dynamo.utils import counters

from cola_theory.chain import run_chain
from cola_theory.config import ChainConfig, link_plan, lr_at
from cola_theory.lm.backend import PeftChainBackend
from cola_theory.lm.checkpoint import KnotCheckpointer
from cola_theory.lm.lora_ops import ADAPTER, lora_layers

TARGETS = ["q_proj", "v_proj"]
CFG = ChainConfig(total_steps=9, n_links=3, rank=4, alpha=8.0, lr=2e-2)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def run(cfg, kind="opt", compile=None, backend="aot_eager", **kw):
    b = PeftChainBackend(tiny_model(kind), cfg, batch_fn(), lm_loss, target_modules=TARGETS, compile=compile,
                         compile_backend=backend)
    seen: list[int] = []
    res = run_chain(b, cfg, log_every=1, on_step=lambda t, link: seen.append(graphs()), **kw)
    return b, res, seen


def losses(res) -> list[float]:
    return [h["loss"] for h in res.history if h["event"] == "step"]


def weights(b) -> dict[str, torch.Tensor]:
    return {n: layer.get_base_layer().weight.detach().clone() for n, layer in lora_layers(b.model)}


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_compiled_chain_equals_eager_and_knots_never_recompile(kind):
    eager, res_e, _ = run(CFG, kind)
    comp, res_c, seen = run(CFG, kind, compile="default")
    assert res_c.status == "finished" and len(losses(res_c)) == CFG.total_steps
    torch.testing.assert_close(losses(res_c), losses(res_e), rtol=1e-5, atol=1e-6)
    for n, W in weights(comp).items():
        torch.testing.assert_close(W, weights(eager)[n], rtol=1e-5, atol=1e-5)  # inductor fuses the fold differently
    assert seen[0] >= 1, "the model was not compiled"
    assert seen == [seen[0]] * len(seen), f"graphs per step {seen}: a knot recompiled"
    assert not any("_orig_mod" in k for k in comp.model.state_dict())  # checkpoints / export see the same keys


def test_compiled_knot_folds_in_place_and_preserves_outputs():
    """Inductor: the compiled forward before a knot (W + s B A) equals the one after it (W' = W + s B A, B = 0)."""
    cfg = ChainConfig(total_steps=4, n_links=2, rank=4, alpha=8.0, lr=5e-2)
    b = PeftChainBackend(tiny_model("opt"), cfg, batch_fn(), lm_loss, target_modules=TARGETS, compile="default")
    first, second = link_plan(cfg)
    b.extend(first)
    for t in range(first.start, first.end):
        b.step(lr_at(cfg, t, first))
    assert any(layer.lora_B[ADAPTER].weight.abs().max() > 0 for _, layer in lora_layers(b.model))
    ptrs = [p.data_ptr() for p in [*weights_live(b), *b.link_parameters()]]
    before = logits(b.model)
    b.tie_knot()
    b.reset_optimizer(cfg.optimizer_reset)
    b.extend(second)
    after = logits(b.model)  # B = 0 now: the output is W' alone
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    assert [p.data_ptr() for p in [*weights_live(b), *b.link_parameters()]] == ptrs  # no copies, same addresses
    assert all(layer.lora_B[ADAPTER].weight.abs().max() == 0 for _, layer in lora_layers(b.model))
    for t in range(second.start, second.end):
        b.step(lr_at(cfg, t, second))
    b.tie_knot()
    eager = PeftChainBackend(tiny_model("opt"), cfg, batch_fn(), lm_loss, target_modules=TARGETS)
    run_chain(eager, cfg)
    for n, W in weights(b).items():
        torch.testing.assert_close(W, weights(eager)[n], rtol=1e-4, atol=1e-5)


def weights_live(b) -> list[torch.Tensor]:
    return [layer.get_base_layer().weight for _, layer in lora_layers(b.model)]


def test_compiled_rank_step_down_matches_eager():
    cfg = ChainConfig(total_steps=6, n_links=2, rank=(4, 2), alpha=8.0, lr=2e-2)
    eager, res_e, _ = run(cfg, "llama")
    comp, res_c, seen = run(cfg, "llama", compile="default")
    torch.testing.assert_close(losses(res_c), losses(res_e), rtol=1e-5, atol=1e-6)
    assert [rec["rank"] for rec in comp.links] == [4, 2]
    assert seen[-1] > seen[0]  # new factor shapes: the one recompilation a chain may need


def test_compiled_run_killed_and_resumed_equals_uninterrupted_eager(tmp_path):
    _, ref, _ = run(CFG)

    def stop(t, link):
        if t == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        b = PeftChainBackend(tiny_model("opt"), CFG, batch_fn(), lm_loss, target_modules=TARGETS,
                             compile="default", compile_backend="aot_eager")
        run_chain(b, CFG, checkpointer=KnotCheckpointer(tmp_path, every_steps=2, log=lambda s: None), on_step=stop)
    assert KnotCheckpointer(tmp_path).checkpoints(), "the killed run left no checkpoint"
    said: list[str] = []
    resumed, res, _ = run(CFG, compile="default", checkpointer=KnotCheckpointer(tmp_path, every_steps=2,
                                                                                 log=said.append))
    assert any("resumed from" in line and "after 4 steps" in line for line in said), said  # not a fresh start
    torch.testing.assert_close(losses(res), losses(ref), rtol=1e-5, atol=1e-6)


@needs_data
def test_run_lm_compiled_and_padded_matches_eager(tmp_path):
    """run_lm(compile=..., pad_to_multiple_of=16): same losses and accuracy as eager with no padding.
    (Llama: no dropout. With dropout, other shapes or compiled code draw other masks of the same law.)"""
    from cola_theory.lm.models import load_model
    from cola_theory.lm.train import LMRunConfig, run_lm
    from paper_repro.lm.runner import tiny_tokenizer

    base = LMRunConfig(model="tiny-llama", task="sst2", method="cola", n_links=2, epochs=2.0, num_train=8, num_dev=0,
                       num_test=8, batch_size=4, eval_batch_size=4, max_length=64, lr=1e-2)
    out = {}
    for name, cfg in (("eager", base), ("compiled", dataclasses.replace(base, compile="default",
                                                                         pad_to_multiple_of=16,
                                                                         compile_backend="aot_eager"))):
        model, _, _ = load_model("tiny-llama", device="cpu", tiny_vocab=128)
        out[name] = run_lm(cfg, tmp_path / f"{name}.json", data_dir=str(DATA_DIR), device="cpu",
                           model_bundle=(model.eval(), tiny_tokenizer(), "tiny"))
    assert out["compiled"]["config"]["compile"] == "default"
    # lengths <= 64 padded to multiples of 16: at most 4 lengths x (train, eval) x 2 batch sizes (full, last)
    assert 1 <= graphs() <= 16, f"{graphs()} graphs: padding did not bound the shapes"
    torch.testing.assert_close(losses_of(out["compiled"]), losses_of(out["eager"]), rtol=1e-4, atol=1e-5)
    assert out["compiled"]["metrics"]["test_acc"] == out["eager"]["metrics"]["test_acc"]


def losses_of(payload) -> list[float]:
    return [h["loss"] for h in payload["history"] if h["event"] == "step"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_chain_matches_eager():
    """mode="reduce-overhead" on CUDA: CUDA graphs replayed across knots give the eager chain's losses."""
    def build(compile):
        return PeftChainBackend(tiny_model("llama"), CFG, batch_fn(), lm_loss, target_modules=TARGETS,
                                device="cuda", compile=compile)

    eager, comp = build(None), build("reduce-overhead")
    res_e, res_c = run_chain(eager, CFG, log_every=1), run_chain(comp, CFG, log_every=1)
    assert comp.cudagraphs
    assert counters["inductor"]["cudagraph_skips"] == 0, "inductor fell back to running without CUDA graphs"
    torch.testing.assert_close(losses(res_c), losses(res_e), rtol=1e-4, atol=1e-5)
    for n, W in weights(comp).items():
        torch.testing.assert_close(W, weights(eager)[n], rtol=1e-4, atol=1e-5)


def test_speed_fields_of_the_run_config(tmp_path):
    """compile pads to 32 by default; results written before these fields existed keep their name and validity."""
    import hashlib
    import json

    from cola_theory.lm.train import LMRunConfig
    from cola_theory.results import save_result
    from paper_repro.lm.profiles import LATE_FIELDS, LMJob
    from paper_repro.lm.runner import existing_result

    defaults = LMRunConfig().to_dict()
    assert {k: defaults[k] for k in LATE_FIELDS} == LATE_FIELDS  # LATE_FIELDS repeats the defaults exactly
    assert LMRunConfig(compile="reduce-overhead").pad_to_multiple_of == 32
    assert LMRunConfig(compile="default", pad_to_multiple_of=8).pad_to_multiple_of == 8
    assert LMRunConfig().pad_to_multiple_of == 0
    job = LMJob(LMRunConfig(task="rte", num_train=4), ("cpu",))
    old = {k: v for k, v in job.cfg.to_dict().items() if k not in LATE_FIELDS}  # a config from before
    digest = hashlib.sha256(json.dumps(old, sort_keys=True, default=str).encode()).hexdigest()[:8]
    assert job.job_id.endswith(digest)
    save_result(job.result_path(tmp_path), config=json.loads(json.dumps(old)), history=[], metrics={})
    assert existing_result(job, tmp_path, log=lambda s: None) is not None
    compiled = LMJob(dataclasses.replace(job.cfg, compile="default"), ("cpu",))
    assert compiled.job_id != job.job_id
    save_result(compiled.result_path(tmp_path), config=json.loads(json.dumps(old)), history=[], metrics={})
    assert existing_result(compiled, tmp_path, log=lambda s: None) is None  # made without compile: recompute

    # in the tables, an old-format file and a new one of the same config are ONE variant (speed fields ignored)
    from paper_repro.lm.tables import load_lm_results

    other = LMJob(dataclasses.replace(job.cfg, seed=1), ("cpu",))
    new_cfg = json.loads(json.dumps(other.cfg.to_dict()))
    for j, c in ((job, old), (other, new_cfg)):
        save_result(j.result_path(tmp_path / "t"), config=c, history=[], metrics={"status": "finished",
                                                                                    "test_acc": 0.5})
    df = load_lm_results(tmp_path / "t")
    assert df["variant"].nunique() == 1 and len(df) == 2

"""The packed engine: K chains on one frozen base reproduce K sequential `run_lm` runs.

Independent references: per-run dense math for the batched layer, torch.optim.AdamW / Adam / SGD per run for the
stacked optimizer, `cola_theory.optim.reset_optimizer_state` for the knot policies, and `run_lm` (PEFT, folded
knots, the fused optimizer) for whole runs. A pack of one is NOT bitwise `run_lm`: its LoRA path is a batched
matmul instead of PEFT's two nn.Linear, a tied link stays a low-rank term instead of being folded into W, and the
optimizer is the (non-fused) AdamW formula on stacked tensors; each differs from the sequential path by float32
rounding only, which the tests bound (1e-5 relative on every step's loss, identical accuracies).
"""

import dataclasses
import math

import pytest
import torch
from lm_fixtures import DATA_DIR, needs_data, tiny_model

from cola_theory.config import ChainConfig, link_plan
from cola_theory.lm.export import concat_links
from cola_theory.lm.packed import PackedChainBackend, check_packable, merge_batches, per_run_loss
from cola_theory.lm.packed_layers import PackedLoRALinear, StackedAdam
from cola_theory.lm.packed_train import check_lm_packable, run_lm_packed
from cola_theory.lm.train import LMRunConfig, run_lm
from cola_theory.optim import reset_optimizer_state
from paper_repro.lm.runner import tiny_tokenizer

TINY = dict(model="tiny", task="sst2", epochs=3.0, batch_size=4, eval_batch_size=8, num_train=16, num_dev=8,
            num_test=16, max_length=64, rank=4)


# -- the batched layer ---------------------------------------------------------------------------------------------
def test_packed_layer_is_each_runs_own_lora_and_a_knot_preserves_it():
    torch.manual_seed(0)
    K, S, L, n, m, r = 3, 2, 5, 12, 7, 4
    base = torch.nn.Linear(n, m)
    layer = PackedLoRALinear(base, K, r, alpha=8.0)
    with torch.no_grad():
        layer.A.normal_()
        layer.B.normal_()
    x = torch.randn(K * S, L, n)
    out = layer(x)
    for k in range(K):  # independent reference: the dense W + (alpha/r) B_k A_k on run k's rows
        W = base.weight + 2.0 * layer.B[k] @ layer.A[k]
        ref = x[k * S:(k + 1) * S] @ W.T + base.bias
        torch.testing.assert_close(out[k * S:(k + 1) * S], ref, rtol=1e-5, atol=1e-5)
    layer.tie()
    assert torch.count_nonzero(layer.B) == 0 and layer.T_A.shape == (K, r, n)
    torch.testing.assert_close(layer(x), out, rtol=1e-6, atol=1e-6)  # tying a knot does not change the function


def _step_both(kind, wd, n_steps=4, all_alive=False):
    torch.manual_seed(1)
    K, lrs = 3, [1e-2, 3e-3, 1e-3]
    stacked = torch.nn.Parameter(torch.randn(K, 4, 5))
    refs = [torch.nn.Parameter(stacked[k].detach().clone()) for k in range(K)]
    opt = StackedAdam([stacked], K, kind, (0.9, 0.999), [wd, wd / 2, 0.0])
    cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[kind]
    extra = {} if kind == "sgd" else {"betas": (0.9, 0.999)}
    ref_opts = [cls([p], lr=lr, weight_decay=w, **extra) for p, lr, w in zip(refs, lrs, [wd, wd / 2, 0.0])]
    for t in range(n_steps):
        g = torch.randn(K, 4, 5, generator=torch.Generator().manual_seed(t))
        stacked.grad = g.clone()
        opt.step(torch.tensor(lrs), torch.ones(K, dtype=torch.bool), all_alive=all_alive)
        for k, (p, o) in enumerate(zip(refs, ref_opts)):
            p.grad = g[k].clone()
            o.step()
    return stacked, refs, opt, ref_opts


@pytest.mark.parametrize("all_alive", [False, True])  # the masked per-tensor path and the multi-tensor path
@pytest.mark.parametrize("kind", ["adamw", "adam", "sgd"])
def test_stacked_optimizer_equals_torch_per_run(kind, all_alive):
    stacked, refs, _, _ = _step_both(kind, wd=0.1, all_alive=all_alive)
    for k, p in enumerate(refs):
        torch.testing.assert_close(stacked[k].detach(), p.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("policy", ["full", "none", "magnitude:0.5", "random:0.3"])
def test_knot_policies_equal_the_sequential_reset(policy):
    stacked, refs, opt, ref_opts = _step_both("adamw", wd=0.0)
    for k, (p, o) in enumerate(zip(refs, ref_opts)):
        mine = opt.reset(k, policy, torch.Generator().manual_seed(k))
        theirs = reset_optimizer_state(o, [p], policy, torch.Generator().manual_seed(k))
        assert mine == theirs
        state = o.state.get(p, {})
        for mom, name in ((opt.exp_avg[0][k], "exp_avg"), (opt.exp_avg_sq[0][k], "exp_avg_sq")):
            expected = state[name] if name in state else torch.zeros_like(mom)
            assert torch.equal(mom, expected)
        assert float(opt.step_count[k]) == (float(state["step"]) if state else 0.0)


def test_a_dead_run_is_frozen_and_the_others_step():
    K = 2
    p = torch.nn.Parameter(torch.ones(K, 2, 2))
    opt = StackedAdam([p], K, "adamw", (0.9, 0.999), [0.0, 0.0])
    p.grad = torch.tensor([[[math.nan] * 2] * 2, [[1.0] * 2] * 2])
    opt.step(torch.tensor([1e-2, 1e-2]), torch.tensor([False, True]))
    assert torch.equal(p[0].detach(), torch.ones(2, 2)) and torch.isfinite(p).all() and (p[1] < 1).all()
    assert opt.step_count.tolist() == [0.0, 1.0]


# -- batches and per-run losses -------------------------------------------------------------------------------------
def test_merged_batch_scores_each_run_as_its_own_batch():
    from cola_theory.lm.scoring import candidate_logprobs, classification_loss, collate, encode_example
    from cola_theory.lm.tasks import Example

    tok = tiny_tokenizer()
    exs = [Example("sst2", i, f"review {i}{'!' * i} It was", (" bad", " good"), i % 2) for i in range(7)]
    enc = [encode_example(tok, ex, 64) for ex in exs]
    batches = [collate(enc[:3], pad_id=0), collate(enc[3:4], pad_id=0), collate(enc[4:], pad_id=0)]
    model = tiny_model("llama").eval()
    merged, sizes = merge_batches(batches, pad_id=0)
    S = max(b["input_ids"].shape[0] for b in batches)  # 2 sequences per example (multi-token candidates)
    assert sizes == [3, 1, 3] and S == 6 and merged["input_ids"].shape[0] == 3 * S
    scores = candidate_logprobs(model, merged)
    losses = per_run_loss(scores, merged["labels"], sizes)
    start = 0
    for b, n, loss in zip(batches, sizes, losses):
        alone = candidate_logprobs(model, b)
        torch.testing.assert_close(scores[start:start + n, :alone.shape[1]], alone, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss, classification_loss(alone, b["labels"]), rtol=1e-5, atol=1e-6)
        start += n


def test_configs_that_cannot_share_a_pack_name_the_field():
    a = ChainConfig(total_steps=10, n_links=2, rank=4)
    with pytest.raises(ValueError, match="ChainConfig.n_links"):
        check_packable([a, dataclasses.replace(a, n_links=3)])
    with pytest.raises(ValueError, match="ChainConfig.rank"):
        check_packable([a, dataclasses.replace(a, rank=2)])
    check_packable([a, dataclasses.replace(a, lr=1e-4, seed=3, optimizer_reset="none", warmup_steps=2)])
    c = LMRunConfig(**TINY)
    with pytest.raises(ValueError, match="LMRunConfig.task"):
        check_lm_packable([c, dataclasses.replace(c, task="rte")])
    with pytest.raises(ValueError, match="LMRunConfig.batch_size"):
        check_lm_packable([c, dataclasses.replace(c, batch_size=8)])
    with pytest.raises(ValueError, match="compile"):
        check_lm_packable([dataclasses.replace(c, compile="default")])
    check_lm_packable([c, dataclasses.replace(c, lr=1e-2, seed=4, lr_schedule="restart", zero_shot=True)])


# -- whole runs: packed == sequential --------------------------------------------------------------------------------
def _sequential(cfg, model, tok):
    torch.manual_seed(cfg.seed)
    return run_lm(cfg, data_dir=str(DATA_DIR), model_bundle=(model, tok, "tiny"), device="cpu")


def _assert_same_run(seq, packed):
    assert packed["metrics"]["status"] == seq["metrics"]["status"]
    strip = lambda h: [{k: v for k, v in e.items() if k != "loss"} for e in h]  # noqa: E731
    assert strip(packed["history"]) == strip(seq["history"])  # the same steps, lrs, knots and reset records
    ls = [e["loss"] for e in seq["history"] if e["event"] == "step"]
    lp = [e["loss"] for e in packed["history"] if e["event"] == "step"]
    assert len(ls) == len(lp) and max(abs(a - b) / abs(a) for a, b in zip(ls, lp)) < 1e-5
    for key in ("test_acc", "dev_acc", "zero_shot_test_acc", "steps_per_epoch", "total_steps", "trainable_params"):
        assert packed["metrics"].get(key) == seq["metrics"].get(key), key
    assert packed["config"] == seq["config"]


@needs_data
@pytest.mark.parametrize("kind", ["opt", "llama"])
@pytest.mark.parametrize("method", ["lora", "cola"])
def test_pack_of_3_lrs_x_2_seeds_reproduces_sequential_runs(tmp_path, kind, method):
    tok, model = tiny_tokenizer(), tiny_model(kind).eval()
    base = LMRunConfig(method=method, n_links=3, **TINY)
    cfgs = [dataclasses.replace(base, lr=lr, seed=s, zero_shot=lr == 1e-2) for lr in (1e-2, 3e-3, 1e-3)
            for s in (0, 1)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    outs = [tmp_path / f"{i}.json" for i in range(len(cfgs))]
    packed = run_lm_packed(cfgs, outs, data_dir=str(DATA_DIR), model_bundle=(model, tok, "tiny"), device="cpu")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the shared base is untouched
    assert [p["meta"]["packed"] for p in packed] == [{"size": 6, "index": i} for i in range(6)]
    assert all(o.exists() for o in outs)
    for cfg, p in zip(cfgs, packed):
        _assert_same_run(_sequential(cfg, model, tok), p)


@needs_data
def test_rank_stepdown_and_mixed_policies_pack():
    tok, model = tiny_model("llama").eval(), None
    tok, model = tiny_tokenizer(), tok
    base = LMRunConfig(method="cola", link_epochs=(2.0, 1.0), rank=(4, 2), **{k: v for k, v in TINY.items()
                                                                               if k != "rank"})
    cfgs = [dataclasses.replace(base, lr=3e-3, optimizer_reset="none"),
            dataclasses.replace(base, lr=1e-3, seed=1, lr_schedule="restart"),
            dataclasses.replace(base, lr=1e-2, seed=2, optimizer_reset="magnitude:0.5")]
    packed = run_lm_packed(cfgs, data_dir=str(DATA_DIR), model_bundle=(model, tok, "tiny"), device="cpu")
    for cfg, p in zip(cfgs, packed):
        _assert_same_run(_sequential(cfg, model, tok), p)
        assert [e["t"] for e in p["history"] if e["event"] == "knot"] == [8]  # after 2 of 3 epochs (4 steps each)


def _kill_pack_at(monkeypatch, t: int, run) -> list[int]:
    """run() with the pack killed (KeyboardInterrupt) as it starts step t; the steps started, step t last."""
    original, calls = PackedChainBackend.step, []

    def dying(self, lr):
        calls.append(self.t)
        if self.t == t:
            raise KeyboardInterrupt("killed")
        return original(self, lr)

    monkeypatch.setattr(PackedChainBackend, "step", dying)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(PackedChainBackend, "step", original)
    return calls


@needs_data
def test_killed_pack_resumes_to_the_same_results(tmp_path, monkeypatch):
    tok, model = tiny_tokenizer(), tiny_model("opt").eval()
    cfgs = [LMRunConfig(method="cola", n_links=3, lr=lr, seed=s, checkpoint_every=2, **TINY)
            for lr, s in ((1e-2, 0), (1e-3, 1))]
    kw = dict(data_dir=str(DATA_DIR), model_bundle=(model, tok, "tiny"), device="cpu")
    whole = run_lm_packed(cfgs, **kw)
    calls = _kill_pack_at(monkeypatch, 7, lambda: run_lm_packed(cfgs, checkpoint_dir=tmp_path / "ckpt", **kw))
    assert calls[-1] == 7 and any((tmp_path / "ckpt").iterdir())
    resumed = run_lm_packed(cfgs, checkpoint_dir=tmp_path / "ckpt", **kw)
    for a, b in zip(whole, resumed):
        assert a["history"] == b["history"] and a["metrics"]["test_acc"] == b["metrics"]["test_acc"]


@needs_data
def test_a_diverging_run_stops_alone_as_run_chain_would_stop_it():
    tok, model = tiny_tokenizer(), tiny_model("llama").eval()
    good = LMRunConfig(method="cola", n_links=3, lr=1e-3, **TINY)
    bad = dataclasses.replace(good, lr=1e12, seed=1)
    packed = run_lm_packed([good, bad], data_dir=str(DATA_DIR), model_bundle=(model, tok, "tiny"), device="cpu")
    assert packed[1]["metrics"]["status"] == "diverged" and "test_acc" not in packed[1]["metrics"]
    seq_bad = _sequential(bad, model, tok)
    assert seq_bad["metrics"]["status"] == "diverged"
    assert packed[1]["metrics"]["diverged"] == seq_bad["metrics"]["diverged"]
    _assert_same_run(_sequential(good, model, tok), packed[0])


def test_tied_links_export_as_one_adapter_equal_to_the_runs_delta():
    model = tiny_model("opt").eval()
    cfgs = [ChainConfig(total_steps=4, n_links=2, rank=(4, 2), lr=1e-2, seed=s) for s in (0, 1)]

    def batch_fn(t):
        from cola_theory.lm.scoring import collate, encode_example
        from cola_theory.lm.tasks import Example

        tok = tiny_tokenizer()
        ex = [Example("sst2", i, f"x{i} {t} It was", (" bad", " good"), (i + t) % 2) for i in range(3)]
        return [collate([encode_example(tok, e, 32) for e in ex], pad_id=0)] * 2

    backend = PackedChainBackend(model, cfgs, batch_fn)
    from cola_theory.chain import run_chain

    run_chain(backend, cfgs[0])
    assert [[r for _, r in run] for run in backend.tied] == [[4, 2], [4, 2]]
    for k in range(2):
        links = backend.run_links(k)
        assert [link["rank"] for link in links] == [4, 2]
        for name, (B, A) in concat_links(links).items():  # one adapter of rank 6 == W - W_0 of run k
            torch.testing.assert_close(B @ A, backend.delta(k)[name], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(backend.delta(0)[backend.layers[0][0]], backend.delta(1)[backend.layers[0][0]])
    base = [p for n, p in model.named_parameters() if not n.endswith((".A", ".B"))]
    assert base and all(p.grad is None for p in base)  # the frozen base gets no gradient, only the link factors
    backend.release()
    assert all(type(m).__name__ != "PackedLoRALinear" for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())  # given back as it came (a fresh model: trainable)


@needs_data
@pytest.mark.slow
def test_smollm2_pack_reproduces_sequential_runs():
    from cola_theory.lm.models import load_model

    model, tok, note = load_model("smollm2-135m", device="cpu")
    base = LMRunConfig(model="smollm2-135m", task="sst2", method="cola", n_links=2, epochs=2.0, batch_size=4,
                       num_train=8, num_dev=4, num_test=8, eval_batch_size=8, max_length=64, rank=8)
    cfgs = [dataclasses.replace(base, lr=1e-3, seed=0), dataclasses.replace(base, lr=5e-4, seed=1)]
    packed = run_lm_packed(cfgs, data_dir=str(DATA_DIR), model_bundle=(model.eval(), tok, note), device="cpu")
    for cfg, p in zip(cfgs, packed):
        torch.manual_seed(cfg.seed)
        seq = run_lm(cfg, data_dir=str(DATA_DIR), model_bundle=(model, tok, note), device="cpu")
        _assert_same_run(seq, p)
        assert link_plan(cfg.chain_config(p["metrics"]["steps_per_epoch"]))[1].start == 2


# -- best-dev selection in a pack ---------------------------------------------------------------------------------
@needs_data
def test_best_dev_pack_selects_and_restores_each_runs_best_epoch_as_run_lm_does(tmp_path, monkeypatch):
    tok, model = tiny_tokenizer(), tiny_model("llama").eval()
    base = LMRunConfig(method="cola", n_links=3, best_dev=True, checkpoint_every=2, **TINY)
    cfgs = [dataclasses.replace(base, lr=lr, seed=s) for lr, s in ((3e-2, 0), (1e-2, 1), (1e-3, 2))]
    kw = dict(data_dir=str(DATA_DIR), model_bundle=(model, tok, "tiny"), device="cpu")
    packed = run_lm_packed(cfgs, **kw)
    restored = 0
    for cfg, p in zip(cfgs, packed):
        seq = _sequential(cfg, model, tok)
        _assert_same_run(seq, p)
        m, s = p["metrics"], seq["metrics"]
        assert m["best_epoch"] == s["best_epoch"] and m["best_dev_restored"] == s["best_dev_restored"]
        torch.testing.assert_close(m["dev_loss_per_epoch"], s["dev_loss_per_epoch"], rtol=1e-5, atol=1e-7)
        assert m["best_epoch"] == 1 + min(range(3), key=lambda e: m["dev_loss_per_epoch"][e])
        restored += m["best_dev_restored"]
    assert restored >= 1  # an earlier epoch won for at least one run: the restore path itself is compared
    _kill_pack_at(monkeypatch, 9, lambda: run_lm_packed(cfgs, checkpoint_dir=tmp_path / "c", **kw))
    for a, b in zip(packed, run_lm_packed(cfgs, checkpoint_dir=tmp_path / "c", **kw)):
        assert a["history"] == b["history"]
        assert {k: a["metrics"][k] for k in ("best_epoch", "dev_loss_per_epoch", "test_acc")} == \
            {k: b["metrics"][k] for k in ("best_epoch", "dev_loss_per_epoch", "test_acc")}


@needs_data
@pytest.mark.gpu
def test_cuda_pack_reproduces_sequential_cuda_runs():
    """The packed engine on a CUDA device (float32, IEEE matmuls) against run_lm on the same device."""
    torch.backends.cuda.matmul.allow_tf32 = False
    tok, model = tiny_tokenizer(), tiny_model("llama").eval().to("cuda")
    base = LMRunConfig(method="cola", n_links=3, best_dev=True, dtype="float32", **TINY)
    cfgs = [dataclasses.replace(base, lr=lr, seed=s) for lr, s in ((1e-2, 0), (3e-3, 1), (1e-3, 0))]
    packed = run_lm_packed(cfgs, data_dir=str(DATA_DIR), model_bundle=(model, tok, "tiny"), device="cuda")
    for cfg, p in zip(cfgs, packed):
        torch.manual_seed(cfg.seed)
        seq = run_lm(cfg, data_dir=str(DATA_DIR), model_bundle=(model, tok, "tiny"), device="cuda")
        _assert_same_run(seq, p)
        assert p["metrics"]["best_epoch"] == seq["metrics"]["best_epoch"]

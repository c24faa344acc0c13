"""PeftChainBackend: one link == plain PEFT LoRA training, chains of 3 links, rank step-down, resets, RNG of links."""

import pytest
import torch
from lm_fixtures import batch_fn, lm_loss, logits, tiny_model
from peft import LoraConfig, get_peft_model
from transformers import get_linear_schedule_with_warmup

from cola_theory.chain import run_chain
from cola_theory.config import ChainConfig, Link, link_plan
from cola_theory.links import link_generator
from cola_theory.lm.backend import PeftChainBackend
from cola_theory.lm.lora_ops import ADAPTER, link_parameters, lora_layers, reinit_

KINDS = ["opt", "llama"]
TARGETS = ["q_proj", "v_proj"]


def make_backend(cfg, kind="opt", **kw):
    eval_fn = kw.pop("eval_fn", None)
    return PeftChainBackend(tiny_model(kind, dtype=kw.pop("dtype", torch.float32)), cfg, batch_fn(), lm_loss,
                            eval_fn, target_modules=TARGETS, **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_one_link_equals_plain_peft_lora_step_for_step(kind):
    cfg = ChainConfig(total_steps=6, n_links=1, rank=4, alpha=8.0, lr=1e-2, warmup_steps=2, weight_decay=0.01)
    backend = make_backend(cfg, kind)
    chain_params, chain_losses = [], []
    result = run_chain(backend, cfg, on_step=lambda t, link: chain_params.append(
        [p.detach().clone() for p in backend.link_parameters()]))
    chain_losses = [h["loss"] for h in result.history if h["event"] == "step"]

    # the reference: the textbook PEFT loop (get_peft_model + AdamW + HF linear warm-up/decay schedule)
    plain = get_peft_model(tiny_model(kind), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    reinit_(plain, link_generator(cfg.seed, 0))  # the chain draws A from its own generator; give PEFT the same A
    params = [p for p in plain.parameters() if p.requires_grad]
    assert len(params) == len(backend.link_parameters())
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=6)
    fn = batch_fn()
    for t in range(6):
        loss = lm_loss(plain, fn(t))
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        assert abs(loss.item() - chain_losses[t]) < 1e-6
        for p, q in zip(params, chain_params[t]):
            torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6)  # fused Adam vs its reference: float32 rounding
    # after the final knot the chain model is the merged LoRA model
    merged = plain.merge_and_unload()
    torch.testing.assert_close(logits(backend.model), logits(merged), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_three_links_rank_bound_and_records(kind):
    cfg = ChainConfig(total_steps=9, n_links=3, rank=4, alpha=8.0, lr=2e-2)
    evals = []
    backend = make_backend(cfg, kind, eval_fn=lambda m: evals.append(1) or {"probe": float(logits(m).mean())})
    res = run_chain(backend, cfg)
    assert res.status == "finished" and not backend.active
    knots = [h for h in res.history if h["event"] == "knot"]
    assert [h["t"] for h in knots] == [3, 6] and all(h["reset_fraction"] == 1.0 for h in knots)
    assert [h["t"] for h in res.history if h["event"] == "eval"] == [3, 6, 9] and len(evals) == 3
    assert [rec["index"] for rec in backend.links] == [0, 1, 2]
    delta = backend.delta()
    for name, layer in lora_layers(backend.model):
        assert layer.lora_B[ADAPTER].weight.abs().max() == 0  # every link tied, none active
        links_sum = sum(s * B @ A for B, A, s in (rec["factors"][name] for rec in backend.links))
        torch.testing.assert_close(delta[name], links_sum, rtol=1e-4, atol=1e-6)
        r = int(torch.linalg.matrix_rank(delta[name], rtol=1e-4))
        assert 4 < r <= 12, (name, r)  # more than one link's rank, at most the sum of ranks


def test_fresh_init_controls_the_link_draw():
    for fresh in (True, False):
        cfg = ChainConfig(total_steps=4, n_links=2, rank=2, alpha=4.0, lr=1e-2, fresh_init=fresh)
        b = make_backend(cfg)
        l0, l1 = link_plan(cfg)
        b.extend(l0)
        A0 = [p.detach().clone() for p in b.link_parameters()[0::2]]
        b.step(1e-2)
        b.step(1e-2)
        assert not torch.equal(b.link_parameters()[0], A0[0])  # A is trained
        b.tie_knot()
        b.extend(l1)
        A1 = b.link_parameters()[0::2]
        same = all(torch.equal(a, c) for a, c in zip(A0, A1))
        assert same == (not fresh)
        assert all(B.abs().max() == 0 for B in b.link_parameters()[1::2])


def test_rank_step_down_8_then_2():
    cfg = ChainConfig(total_steps=6, n_links=2, rank=(8, 2), alpha=16.0, lr=1e-2)
    b = make_backend(cfg, "llama")
    res = run_chain(b, cfg)
    assert res.status == "finished"
    assert [rec["rank"] for rec in b.links] == [8, 2]
    for _, layer in lora_layers(b.model):
        assert layer.r[ADAPTER] == 2 and layer.scaling[ADAPTER] == 8.0
    group = b.optimizer.param_groups[0]["params"]
    assert all(p.shape[0] == 2 or p.shape[1] == 2 for p in group)  # the optimizer holds the new factors
    assert all(any(p is q for q in group) for p in b.link_parameters())
    for d in b.delta().values():
        assert int(torch.linalg.matrix_rank(d, rtol=1e-4)) <= 10


@pytest.mark.parametrize("policy", ["full", "none"])
def test_backend_reset_policy(policy):
    cfg = ChainConfig(total_steps=6, n_links=2, rank=2, alpha=4.0, lr=1e-2, optimizer_reset=policy)
    b = make_backend(cfg)
    run_chain(b, cfg)
    steps = {int(b.optimizer.state[p]["step"]) for p in b.link_parameters()}
    assert steps == ({3} if policy == "full" else {6})  # Adam restarts at the knot only under "full"


def test_frozen_A_variant_trains_only_B():
    cfg = ChainConfig(total_steps=4, n_links=2, rank=2, alpha=4.0, lr=1e-2, frozen_factor="A")
    b = make_backend(cfg)
    run_chain(b, cfg)
    for k, rec in enumerate(b.links):
        m = make_backend(cfg)
        m.extend(Link(k, 0, 1, 2))  # the same draw on a fresh model
        assert not any(p.requires_grad for p in link_parameters(m.model)[0::2])
        for (name, layer) in lora_layers(m.model):
            assert torch.equal(rec["factors"][name][1], layer.lora_A[ADAPTER].weight)  # A never moved


def test_bf16_base_with_master_autocast_and_clipping():
    cfg = ChainConfig(total_steps=4, n_links=2, rank=2, alpha=4.0, lr=1e-2)
    b = make_backend(cfg, dtype=torch.bfloat16, fp32_master=True, autocast_dtype=torch.bfloat16, max_grad_norm=1.0)
    res = run_chain(b, cfg)
    assert res.status == "finished"
    assert all(p.dtype == torch.float32 for p in b.link_parameters())  # PEFT upcasts the adapter
    for name, layer in lora_layers(b.model):
        W = layer.get_base_layer().weight
        assert W.dtype == torch.bfloat16 and torch.equal(W, b.master[name].to(torch.bfloat16))


def test_bad_arguments():
    cfg = ChainConfig(total_steps=2)
    with pytest.raises(ValueError, match="max_grad_norm"):
        make_backend(cfg, max_grad_norm=0)
    with pytest.raises(ValueError, match="autocast_dtype"):
        make_backend(cfg, autocast_dtype=torch.int8)
    b = make_backend(cfg)
    with pytest.raises(RuntimeError, match="before extend"):
        b.step(1e-3)
    b.extend(link_plan(cfg)[0])
    with pytest.raises(ValueError, match="already a PeftModel"):
        PeftChainBackend(b.model, cfg, batch_fn(), lm_loss)
    with pytest.raises(ValueError, match="not tied"):
        b.unwrap()
    b.tie_knot()
    assert not hasattr(b.unwrap(), "peft_config")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_master_chain_resume_and_export(tmp_path, monkeypatch):
    """On a GPU: bf16 base + fp32 master + bf16 autocast, rank step-down, killed and resumed, then exported.

    The README claims bitwise resume, so this asserts it: the resumed run ends with the same tensors and the same
    losses bit for bit. Both runs use deterministic kernels (math SDPA, torch's deterministic mode, which raises on
    an op without a deterministic CUDA implementation), so a difference can only come from the resume itself."""
    from peft import PeftModel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from cola_theory.lm.checkpoint import KnotCheckpointer
    from cola_theory.lm.export import export_backend

    cfg = ChainConfig(total_steps=9, n_links=3, rank=(4, 2, 2), alpha=8.0, lr=2e-2, warmup_steps=1)

    def build():
        return PeftChainBackend(tiny_model("opt", dtype=torch.bfloat16, dropout=0.1), cfg, batch_fn(), lm_loss,
                                target_modules=TARGETS, fp32_master=True, autocast_dtype=torch.bfloat16,
                                device="cuda", lora_dropout=0.1)

    def stop(t, link):
        if t == 5:
            raise KeyboardInterrupt

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # torch's deterministic mode requires it for cuBLAS
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            torch.manual_seed(0)
            torch.cuda.manual_seed_all(0)
            ref = build()
            ref_res = run_chain(ref, cfg)
            torch.manual_seed(0)
            torch.cuda.manual_seed_all(0)
            with pytest.raises(KeyboardInterrupt):
                run_chain(build(), cfg, checkpointer=KnotCheckpointer(tmp_path / "ck", every_steps=2), on_step=stop)
            left = KnotCheckpointer(tmp_path / "ck").checkpoints()
            assert left and left[0].name.endswith("4"), left  # interrupted at t=5: resume from step 4
            torch.manual_seed(99)  # the checkpoint must restore the dropout streams, not this seed
            torch.cuda.manual_seed_all(99)
            resumed = build()
            res = run_chain(resumed, cfg, checkpointer=KnotCheckpointer(tmp_path / "ck", every_steps=2))
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    a, b = ref.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []  # bitwise, as the README claims
    assert all(torch.equal(ref.master[k], resumed.master[k]) for k in ref.master)
    assert [(h["event"], h["t"]) for h in ref_res.history] == [(h["event"], h["t"]) for h in res.history]
    assert [h.get("loss") for h in ref_res.history] == [h.get("loss") for h in res.history]
    for name, layer in lora_layers(resumed.model):
        assert layer.get_base_layer().weight.device.type == "cuda"
        assert torch.equal(layer.get_base_layer().weight, resumed.master[name].to(torch.bfloat16))

    # export exactness on a float32 CUDA base
    cfg32 = ChainConfig(total_steps=6, n_links=2, rank=4, alpha=8.0, lr=3e-2)
    b32 = PeftChainBackend(tiny_model("llama"), cfg32, batch_fn(), lm_loss, target_modules=TARGETS, device="cuda")
    run_chain(b32, cfg32)
    ids = torch.randint(3, 128, (3, 10), generator=torch.Generator().manual_seed(1)).cuda()
    export_backend(b32, tmp_path / "export")
    loaded = PeftModel.from_pretrained(tiny_model("llama").cuda(), tmp_path / "export")
    torch.testing.assert_close(logits(loaded, ids), logits(b32.model, ids), rtol=1e-4, atol=1e-4)

"""In-place knot primitives on PEFT LoRA: fold preserves the function, re-init draws a fresh link, resets hit
exactly the LoRA factors, rank step-down, and the bf16 fold drift with and without a float32 master."""

import copy
import warnings

import pytest
import torch
from lm_fixtures import batch_fn, lm_loss, logits, tiny_model

from cola_theory.links import draw_factor, link_generator
from cola_theory.lm.lora_ops import (
    ADAPTER,
    add_chain_lora,
    fold_,
    link_parameters,
    lora_layers,
    make_master,
    rebuild_rank_,
    reinit_,
)
from cola_theory.optim import reset_optimizer_state

KINDS = ["opt", "llama"]


def trained(kind, steps=3, rank=8, extra=False):
    """A tiny model with a chain adapter after a few AdamW steps (so B != 0 and Adam has state)."""
    model = add_chain_lora(tiny_model(kind), rank, 16.0)
    params = link_parameters(model)
    extra_p = None
    if extra:  # a non-LoRA trainable parameter sharing the optimizer (e.g. a head in modules_to_save)
        extra_p = dict(model.named_parameters())[[n for n, _ in model.named_parameters() if "norm" in n][-1]]
        extra_p.requires_grad_(True)
        params = params + [extra_p]
    opt = torch.optim.AdamW(params, lr=1e-2)
    fn = batch_fn()
    for t in range(steps):
        opt.zero_grad()
        lm_loss(model, fn(t)).backward()
        opt.step()
    return model, opt, extra_p


@pytest.mark.parametrize("kind", KINDS)
def test_fold_preserves_logits_and_adds_scaled_BA(kind):
    model, _, _ = trained(kind)
    before = logits(model)
    expected = {}
    for name, layer in lora_layers(model):
        A, B = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        assert B.abs().max() > 0
        expected[name] = layer.get_base_layer().weight.detach() + 2.0 * (B @ A).detach()  # alpha/r = 16/8
    ids = [id(p) for p in link_parameters(model)]
    biases = {name: layer.get_base_layer().bias for name, layer in lora_layers(model)}
    biases = {name: None if b is None else b.detach().clone() for name, b in biases.items()}
    tied = fold_(model)
    assert torch.allclose(logits(model), before, atol=1e-5)
    assert [id(p) for p in link_parameters(model)] == ids  # the Parameter objects are kept
    for name, layer in lora_layers(model):
        assert torch.equal(layer.lora_B[ADAPTER].weight, torch.zeros_like(layer.lora_B[ADAPTER].weight))
        assert torch.allclose(layer.get_base_layer().weight, expected[name], atol=1e-7)
        B, A, s = tied[name]
        assert s == 2.0 and B.shape == (layer.out_features, 8) and A.shape == (8, layer.in_features)
    # OPT keeps its q/v bias in the base layer, untouched by the fold (bit for bit); Llama has none
    assert all((b is not None) == (kind == "opt") for b in biases.values())
    for name, layer in lora_layers(model):
        bias = layer.get_base_layer().bias
        assert bias is None if biases[name] is None else torch.equal(bias, biases[name]), name


@pytest.mark.parametrize("kind", KINDS)
def test_reinit_draws_fresh_A_zero_B_and_keeps_function(kind):
    model, _, _ = trained(kind)
    fold_(model)
    before = logits(model)
    A_prev = [layer.lora_A[ADAPTER].weight.detach().clone() for _, layer in lora_layers(model)]
    reinit_(model, link_generator(0, 1))
    assert torch.allclose(logits(model), before, atol=1e-6)  # B = 0: the new link starts as the identity
    g = link_generator(0, 1)
    for (_, layer), a_prev in zip(lora_layers(model), A_prev):
        A, B = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        assert torch.equal(B, torch.zeros_like(B)) and A.requires_grad and B.requires_grad
        assert not torch.allclose(A, a_prev)
        assert torch.equal(A, draw_factor(tuple(A.shape), "kaiming", 8, g))  # same generator, same order
        assert A.abs().max() <= 1 / layer.in_features ** 0.5  # kaiming_uniform(a=sqrt(5)) bound
    # the same (seed, link) gives the same link; another link a different one
    m2 = add_chain_lora(tiny_model(kind), 8, 16.0)
    reinit_(m2, link_generator(0, 1))
    reinit_(model, link_generator(0, 2))
    assert not torch.equal(link_parameters(m2)[0], link_parameters(model)[0])
    reinit_(model, link_generator(0, 1))
    assert all(torch.equal(p, q) for p, q in zip(link_parameters(m2), link_parameters(model)))


def test_reinit_gaussian_and_frozen_factors():
    model = add_chain_lora(tiny_model("opt"), 4, 8.0)
    reinit_(model, link_generator(3, 0), init="gaussian")
    A = torch.cat([layer.lora_A[ADAPTER].weight.flatten() for _, layer in lora_layers(model)])
    assert abs(A.std().item() - 1 / 4) < 0.03  # PEFT "gaussian": std 1/r
    reinit_(model, link_generator(3, 0), frozen_factor="A")  # RAC-LoRA: A random frozen, train B
    for _, layer in lora_layers(model):
        assert not layer.lora_A[ADAPTER].weight.requires_grad and layer.lora_B[ADAPTER].weight.requires_grad
        assert layer.lora_B[ADAPTER].weight.abs().max() == 0
    reinit_(model, link_generator(3, 0), frozen_factor="B")  # B random frozen, A = 0 trained
    for _, layer in lora_layers(model):
        A, B = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        assert A.requires_grad and not B.requires_grad and A.abs().max() == 0 and B.abs().max() > 0
        assert B.abs().max() <= 1 / 4 ** 0.5  # kaiming bound with fan_in = r
    with pytest.raises(ValueError, match="frozen_factor"):
        reinit_(model, link_generator(0, 0), frozen_factor="C")
    with pytest.raises(ValueError, match="init='xavier'"):
        reinit_(model, link_generator(0, 0), init="xavier")


@pytest.mark.parametrize("kind", KINDS)
def test_rebuild_rank_step_down(kind):
    model, _, _ = trained(kind, rank=8)
    before = logits(model)
    W_expected = {n: lay.get_base_layer().weight.detach() + 2.0 * (lay.lora_B[ADAPTER].weight @ lay.lora_A[ADAPTER].weight).detach()
                  for n, lay in lora_layers(model)}
    tied = rebuild_rank_(model, 2)
    assert torch.allclose(logits(model), before, atol=1e-5)  # folded first, new link is zero
    assert model.peft_config[ADAPTER].r == 2 and len(tied) == len(W_expected)
    for name, layer in lora_layers(model):
        assert layer.r[ADAPTER] == 2 and layer.scaling[ADAPTER] == 16.0 / 2
        assert layer.lora_A[ADAPTER].weight.shape == (2, layer.in_features)
        assert layer.lora_B[ADAPTER].weight.shape == (layer.out_features, 2)
        assert torch.allclose(layer.get_base_layer().weight, W_expected[name], atol=1e-7)
    reinit_(model, link_generator(0, 1))
    fn = batch_fn()
    lm_loss(model, fn(0)).backward()  # the new factors are live in the graph
    assert all(p.grad is not None for p in link_parameters(model)[1::2])
    with pytest.raises(ValueError, match="rank=0"):
        rebuild_rank_(model, 0)


@pytest.mark.parametrize("policy", ["full", "none", "magnitude:0.5", "random:0.3"])
def test_reset_hits_exactly_the_lora_parameters(policy):
    model, opt, extra = trained("opt", extra=True)
    lora = link_parameters(model)
    saved = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in lora + [extra]}
    stats = reset_optimizer_state(opt, lora, policy, torch.Generator().manual_seed(0))
    assert all(torch.equal(v, saved[id(extra)][k]) for k, v in opt.state[extra].items())  # others keep theirs
    if policy == "full":
        assert all(p not in opt.state or not opt.state[p] for p in lora) and stats["reset_fraction"] == 1.0
    elif policy == "none":
        assert stats["reset_fraction"] == 0.0
        assert all(torch.equal(opt.state[p]["exp_avg"], saved[id(p)]["exp_avg"]) for p in lora)
    else:
        p_target = float(policy.split(":")[1])
        zeroed = sum(int((opt.state[p]["exp_avg_sq"] == 0).sum()) for p in lora)
        total = sum(opt.state[p]["exp_avg_sq"].numel() for p in lora)
        assert abs(zeroed / total - p_target) < 0.05 and abs(stats["reset_fraction"] - p_target) < 0.05
        assert all(torch.equal(opt.state[p]["step"], saved[id(p)]["step"]) for p in lora)  # step kept (ReLoRA)
    opt.step()  # the optimizer still works after the reset (state re-created lazily)


def test_bf16_fold_drift_master_vs_naive():
    """Repeated knots on a bf16 base: the float32 master keeps W within one rounding of the fp32 reference."""
    naive = add_chain_lora(tiny_model("opt", dtype=torch.bfloat16), 4, 8.0)
    mastered = add_chain_lora(tiny_model("opt", dtype=torch.bfloat16), 4, 8.0)
    ref = add_chain_lora(tiny_model("opt", dtype=torch.bfloat16).float(), 4, 8.0)  # same W_0, fp32 arithmetic
    W0 = {n: lay.get_base_layer().weight.detach().float().clone() for n, lay in lora_layers(ref)}
    master = make_master(mastered)
    g = torch.Generator().manual_seed(0)
    n_links = 50
    for _ in range(n_links):
        draws = [(torch.randn(lay.lora_B[ADAPTER].weight.shape, generator=g) * 1e-3,
                  torch.randn(lay.lora_A[ADAPTER].weight.shape, generator=g) * 0.1) for _, lay in lora_layers(ref)]
        for m in (naive, mastered, ref):
            with torch.no_grad():
                for (_, lay), (B, A) in zip(lora_layers(m), draws):
                    lay.lora_B[ADAPTER].weight.copy_(B)
                    lay.lora_A[ADAPTER].weight.copy_(A)
        fold_(naive)
        fold_(mastered, master)
        fold_(ref)

    def drift(m):  # ||(W - W_0) - Delta_ref|| / ||Delta_ref|| over all adapted matrices
        num = den = 0.0
        for (n, lay), (_, lref) in zip(lora_layers(m), lora_layers(ref)):
            d_ref = lref.get_base_layer().weight.float() - W0[n]
            num += float(((lay.get_base_layer().weight.float() - W0[n]) - d_ref).norm() ** 2)
            den += float(d_ref.norm() ** 2)
        return (num / den) ** 0.5

    d_naive, d_master = drift(naive), drift(mastered)
    print(f"\nbf16 fold drift after {n_links} knots: naive {d_naive:.4f}, fp32 master {d_master:.4f} "
          f"(relative to ||W_T - W_0|| of an fp32 reference)")
    assert d_master < d_naive / 4
    assert all(master[n].dtype == torch.float32 for n in master)


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="rank=0"):
        add_chain_lora(tiny_model("opt"), 0)
    with pytest.raises(ValueError, match="rank=64 exceeds"):
        add_chain_lora(tiny_model("opt"), 64)
    with pytest.raises(ValueError, match="target_modules"):
        add_chain_lora(tiny_model("opt"), 2, target_modules=["nonexistent_proj"])
    with pytest.raises(ValueError, match="no LoRA adapter"):
        lora_layers(tiny_model("opt"))
    model = add_chain_lora(tiny_model("opt"), 2)
    with pytest.raises(ValueError, match="already a PeftModel"):
        add_chain_lora(model, 2)
    with pytest.raises(ValueError, match="master"):
        fold_(model, master={})
    # any target_modules: an MLP projection too
    m2 = add_chain_lora(tiny_model("llama"), 2, target_modules=["q_proj", "v_proj", "up_proj"])
    names = [name for name, _ in lora_layers(m2)]
    assert len(names) == 6 and sum(name.endswith("mlp.up_proj") for name in names) == 2  # 2 layers x 3 targets
    # a deep copy (a frozen reference model) is the same function with its own tensors
    clone = copy.deepcopy(m2)
    assert [name for name, _ in lora_layers(clone)] == names and torch.equal(logits(clone), logits(m2))
    with torch.no_grad():
        for _, layer in lora_layers(clone):
            layer.lora_B[ADAPTER].weight.fill_(0.5)
    assert not torch.equal(logits(clone), logits(m2))
    assert all(not layer.lora_B[ADAPTER].weight.any() for _, layer in lora_layers(m2))  # original untouched


def test_attaching_the_adapter_emits_no_future_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        add_chain_lora(tiny_model("opt"), 2)

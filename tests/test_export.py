"""Export: one exact PEFT adapter of rank sum(r_k) on the ORIGINAL base reproduces the chain; per-link adapters
sum to the chain."""

import json

import pytest
import torch
from lm_fixtures import batch_fn, lm_loss, logits, tiny_model
from peft import PeftModel
from safetensors.torch import load_file

from cola_theory.chain import run_chain
from cola_theory.config import ChainConfig, link_plan
from cola_theory.lm.backend import PeftChainBackend
from cola_theory.lm.export import concat_links, export_backend, export_chain, original_base
from cola_theory.lm.lora_ops import lora_layers


def finished_chain(kind, rank=4, n_links=3):
    cfg = ChainConfig(total_steps=3 * n_links, n_links=n_links, rank=rank, alpha=8.0, lr=3e-2)
    b = PeftChainBackend(tiny_model(kind), cfg, batch_fn(), lm_loss, target_modules=["q_proj", "v_proj"])
    run_chain(b, cfg)
    return b


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_single_adapter_reproduces_chain_on_original_base(kind, tmp_path):
    b = finished_chain(kind)
    chained = logits(b.model)
    assert (chained - logits(tiny_model(kind))).abs().max() > 1e-3  # the chain did move the model
    export_backend(b, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 12 and cfg["lora_alpha"] == 12 and len(cfg["target_modules"]) == 4
    assert (tmp_path / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(tiny_model(kind), tmp_path)  # a fresh ORIGINAL base
    torch.testing.assert_close(logits(loaded), chained, rtol=1e-5, atol=1e-5)
    # the same from the backend's own W_0 copy (no second model load)
    base = original_base(b)
    torch.testing.assert_close(logits(base), logits(tiny_model(kind)), rtol=0, atol=0)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(base, tmp_path)), chained, rtol=1e-5, atol=1e-5)


def test_per_link_adapters_sum_to_the_chain(tmp_path):
    b = finished_chain("opt")
    chained, delta = logits(b.model), b.delta()
    export_chain(b.links, tmp_path)
    meta = json.loads((tmp_path / "chain.json").read_text())
    assert [e["rank"] for e in meta["links"]] == [4, 4, 4] and meta["rank"] == 12
    # sum_k s_k B_k A_k from the per-link files equals W_T - W_0
    total = {}
    for e in meta["links"]:
        sub = tmp_path / e["subfolder"]
        conf = json.loads((sub / "adapter_config.json").read_text())
        s = conf["lora_alpha"] / conf["r"]
        assert s == 2.0
        tensors = load_file(str(sub / "adapter_model.safetensors"))
        for name in delta:
            d = s * tensors[f"{name}.lora_B.weight"] @ tensors[f"{name}.lora_A.weight"]
            total[name] = total.get(name, 0) + d
    for name in delta:
        torch.testing.assert_close(total[name], delta[name], rtol=1e-4, atol=1e-6)
    # and loaded as three active adapters on the original base, they reproduce the chain's logits
    model = PeftModel.from_pretrained(tiny_model("opt"), tmp_path / "link_0", adapter_name="link_0")
    for k in (1, 2):
        model.load_adapter(str(tmp_path / f"link_{k}"), adapter_name=f"link_{k}")
    model.base_model.set_adapter(["link_0", "link_1", "link_2"])
    torch.testing.assert_close(logits(model), chained, rtol=1e-5, atol=1e-5)


def test_export_rank_step_down_and_cat_identity(tmp_path):
    cfg = ChainConfig(total_steps=6, n_links=2, rank=(8, 2), alpha=16.0, lr=3e-2)
    b = PeftChainBackend(tiny_model("llama"), cfg, batch_fn(), lm_loss, target_modules=["q_proj", "v_proj"])
    run_chain(b, cfg)
    cat = concat_links(b.links)
    for name, _ in lora_layers(b.model):
        B, A = cat[name]
        assert B.shape[1] == A.shape[0] == 10
        torch.testing.assert_close(B @ A, b.delta()[name], rtol=1e-4, atol=1e-6)
    chained = logits(b.model)
    export_backend(b, tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    torch.testing.assert_close(logits(loaded), chained, rtol=1e-5, atol=1e-5)


def test_export_refuses_untied_or_empty():
    cfg = ChainConfig(total_steps=2)
    b = PeftChainBackend(tiny_model("opt"), cfg, batch_fn(), lm_loss)
    with pytest.raises(ValueError, match="empty"):
        concat_links([])
    b.extend(link_plan(cfg)[0])
    with pytest.raises(ValueError, match="untied"):
        export_backend(b, "/nonexistent")

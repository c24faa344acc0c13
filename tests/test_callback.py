"""ColaCallback in a real transformers.Trainer run (tiny OPT, CPU): knots at the right steps, logits unchanged at
each knot, exactly the LoRA optimizer state reset, the Trainer's linear schedule running through."""

import pytest
import torch
from lm_fixtures import VOCAB, logits, tiny_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from cola_theory.config import ChainConfig
from cola_theory.lm.callback import ColaCallback, unwrap_optimizer
from cola_theory.lm.lora_ops import ADAPTER, add_chain_lora, link_parameters, lora_layers


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=32, seq=12):
        self.ids = torch.randint(3, VOCAB, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


class Probe(TrainerCallback):
    """Records the model around the COLA callback at every step."""

    def __init__(self, extra):
        self.extra, self.records = extra, {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw):
        inner = unwrap_optimizer(optimizer)
        lora = link_parameters(model)
        self.records[state.global_step] = {
            "logits": logits(model),
            "A": [p.detach().clone() for p in lora[0::2]],
            "B_zero": all(float(p.abs().max()) == 0 for p in lora[1::2]),
            "lora_state": sum(1 for p in lora if inner.state.get(p)),
            "extra_state": inner.state[self.extra]["exp_avg"].clone() if inner.state.get(self.extra) else None,
            "lr": lr_scheduler.get_last_lr()[0],
            "optimizer": type(optimizer).__name__, "inner": type(inner).__name__,
        }


def test_callback_ties_knots_in_trainer(tmp_path):
    model = add_chain_lora(tiny_model("opt"), 4, 8.0)
    extra = [p for n, p in model.named_parameters() if "final_layer_norm" in n][-1]
    extra.requires_grad_(True)  # a non-LoRA trainable parameter in the Trainer's optimizer
    before, cola, after = Probe(extra), ColaCallback([2, 4], seed=0, verbose=True), Probe(extra)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                             lr_scheduler_type="linear", use_cpu=True, report_to="none", save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, remove_unused_columns=False, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[before, cola, after])
    trainer.train()

    assert [e["step"] for e in cola.events] == [2, 4] and [e["link"] for e in cola.events] == [1, 2]
    assert all(e["reset_fraction"] == 1.0 for e in cola.events)
    for step in range(1, 7):
        b, a = before.records[step], after.records[step]
        torch.testing.assert_close(a["logits"], b["logits"], rtol=1e-5, atol=1e-5)  # function preserved
        if step in (2, 4):
            assert a["B_zero"] and not b["B_zero"]
            assert all(not torch.equal(x, y) for x, y in zip(a["A"], b["A"]))  # a fresh A
            assert b["lora_state"] > 0 and a["lora_state"] == 0  # LoRA state gone ...
            assert torch.equal(a["extra_state"], b["extra_state"])  # ... the extra param keeps its state
        else:
            assert a["lora_state"] == b["lora_state"] > 0
    assert before.records[1]["optimizer"] == "AcceleratedOptimizer" and before.records[1]["inner"] == "AdamW"
    lrs = [before.records[s]["lr"] for s in range(1, 7)]
    assert all(x > y for x, y in zip(lrs, lrs[1:]))  # one global linear decay, no restart at the knots
    assert len(cola.links) == 2
    cola.tie_final(model)
    assert len(cola.links) == 3
    assert all(float(layer.lora_B[ADAPTER].weight.abs().max()) == 0 for _, layer in lora_layers(model))


def test_callback_from_chain_config_and_bad_input():
    cfg = ChainConfig(total_steps=9, n_links=3, seed=5, optimizer_reset="magnitude:0.9")
    cb = ColaCallback(cfg)
    assert cb.knots == [3, 6] and cb.seed == 5 and cb.optimizer_reset == "magnitude:0.9"
    with pytest.raises(ValueError, match="rank"):
        ColaCallback(ChainConfig(total_steps=6, n_links=2, rank=(8, 2)))
    with pytest.raises(ValueError, match="knots"):
        ColaCallback([4, 2])
    with pytest.raises(ValueError, match="optimizer_reset"):
        ColaCallback([2], optimizer_reset="sometimes")

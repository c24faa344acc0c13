"""Timing pieces of the LM benchmarks (benchmarks/gpu_bench.py): a knot timer, one timed chain, LoRA and COLA
stepped in turn (paired), PEFT + transformers.Trainer paired with our step, evaluation speed, PEFT's re-wrap knot.
Every clock reading follows a device sync, so on a GPU the times are those of finished work."""

from __future__ import annotations

import gc
import statistics
import tempfile
import time

import torch

from cola_theory.chain import run_chain
from cola_theory.config import ChainConfig, link_plan, lr_at

LORA_TARGETS = ["q_proj", "v_proj"]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def graph_count() -> int:
    """Graphs torch.compile has built in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def chain_config(links: int, warm: int, steps: int) -> ChainConfig:
    """LoRA (1 link) or COLA (3 links): r=8; the warm-up belongs to link 0, COLA's two knots fall in the window."""
    knots = (warm + steps // 3, warm + 2 * steps // 3) if links == 3 else ()
    return ChainConfig(total_steps=steps + warm, n_links=links, knots=knots, rank=8, alpha=16, lr=1e-4)


def time_knots(backend, device: str) -> dict[int, float]:
    """Wrap `backend` so that every knot (tie a knot -> extend the chain -> reset the optimizer, as run_chain does)
    is timed: {s: seconds}, s = the step whose on_step interval holds the knot. The final knot has no reset and
    is not counted (it is not part of training)."""
    knots: dict[int, float] = {}
    start: dict[str, float] = {}
    tie, reset = backend.tie_knot, backend.reset_optimizer

    def timed_tie():
        sync(device)
        start["knot"] = time.perf_counter()
        tie()

    def timed_reset(policy):
        out = reset(policy)
        if "knot" in start:
            sync(device)
            knots[backend.t + 1] = time.perf_counter() - start.pop("knot")
        return out

    backend.tie_knot, backend.reset_optimizer = timed_tie, timed_reset
    return knots


def timed_chain(backend, cfg: ChainConfig, warm: int, device: str) -> dict:
    """run_chain with the timed window after `warm` steps.

    step_s = median of the per-step times of the steps without a knot + (time of all knots) / (timed steps): the
    median keeps a 2-core CPU's scheduler hiccups out of the COLA/LoRA ratio, and the knots are still charged in
    full. Also: mean_step_s (the plain mean over the window, knots included), knot_s (mean per knot: tie a knot
    + extend the chain + reset the optimizer), warm_s (the warm-up, compilation included), new_graphs (graphs
    compiled in the window).
    """
    knots = time_knots(backend, device)
    stamps: dict[int, float] = {}
    graphs: dict[str, int] = {}

    def on_step(t, link):
        if t < warm:
            return
        sync(device)
        stamps[t] = time.perf_counter()
        if t == warm:
            graphs["start"] = graph_count()
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()

    t0 = time.perf_counter()
    run_chain(backend, cfg, on_step=on_step, log_every=cfg.total_steps)
    sync(device)
    n = cfg.total_steps - warm
    pure = [stamps[t] - stamps[t - 1] for t in range(warm + 1, cfg.total_steps + 1) if t not in knots]
    return {"step_s": statistics.median(pure) + sum(knots.values()) / n,
            "mean_step_s": (time.perf_counter() - stamps[warm]) / n,
            "knot_s": sum(knots.values()) / len(knots) if knots else None,
            "warm_s": stamps[warm] - t0, "new_graphs": graph_count() - graphs["start"]}


def paired_chain(make, warm: int, steps: int, device: str) -> dict:
    """LoRA (1 link) and COLA (3 links, both knots inside the timed window) on two models in memory, stepped in
    turn: COLA runs through run_chain and after each of its steps one LoRA step runs (timed on its own). A slow
    phase of a shared machine then hits both alike. COLA's step: median of its intervals without their knot time
    + all knot time / timed steps; LoRA's: the median of its steps. make(cfg) -> a PeftChainBackend."""
    lora, cfg = make(chain_config(1, warm, steps)), chain_config(3, warm, steps)
    cola = make(cfg)
    (lora_link,) = link_plan(lora.cfg)
    lora.extend(lora_link)
    knots = time_knots(cola, device)
    t_lora: list[float] = []
    t_cola: list[float] = []
    end: dict[str, float] = {}

    def on_step(t, link):  # COLA finished step t: time it, then one LoRA step
        sync(device)
        now = time.perf_counter()
        if "last" in end and t > warm:
            t_cola.append(now - end["last"] - knots.get(t, 0.0))
        lora.step(lr_at(lora.cfg, t - 1, lora_link))
        sync(device)
        end["last"] = time.perf_counter()
        if t > warm:
            t_lora.append(end["last"] - now)

    run_chain(cola, cfg, on_step=on_step, log_every=cfg.total_steps)
    lora_s = statistics.median(t_lora)
    cola_s = statistics.median(t_cola) + sum(knots.values()) / steps
    return {"lora_step_s": lora_s, "cola_step_s": cola_s, "cola_over_lora_time": cola_s / lora_s}


@torch.no_grad()
def eval_speed(model, data, batch_size: int, device: str) -> float:
    from cola_theory.lm.scoring import candidate_logprobs, collate

    model.eval()
    batches = [collate(data[i : i + batch_size], pad_id=1) for i in range(0, len(data), batch_size)]
    candidate_logprobs(model, {k: v.to(device) for k, v in batches[0].items()})
    sync(device)
    t = time.perf_counter()
    for b in batches:
        candidate_logprobs(model, {k: v.to(device) for k, v in b.items()})
    sync(device)
    return len(data) / (time.perf_counter() - t)


def trainer_vs_ours(base, device, batches, loss_fn, steps: int, ours) -> dict:
    """Plain PEFT LoRA (get_peft_model on the model `base`, r=8, q/v) in a transformers.Trainer, same batches,
    PAIRED with our step:
    after every Trainer step (on_step_end) one step of `ours` (an extended LoRA PeftChainBackend on its own model)
    runs and is timed; the Trainer's step is the on_step_begin-to-on_step_begin interval minus ours. Medians
    after two warm-up steps: {"trainer_step_s", "ours_step_s"}."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS))

    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return steps + 2

        def __getitem__(self, i):
            return batches[i % len(batches)]

    class LossTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kw):
            return loss_fn(model, inputs)

    begins: list[float] = []
    mine: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            sync(device)
            begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            sync(device)
            t0 = time.perf_counter()
            ours.step(1e-4)
            sync(device)
            mine.append(time.perf_counter() - t0)

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=1,
            max_steps=steps + 2,
            learning_rate=1e-4,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            use_cpu=device != "cuda",
            remove_unused_columns=False,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = LossTrainer(
            model=model, args=args, train_dataset=Batches(), data_collator=lambda xs: xs[0], callbacks=[Clock()]
        )
        trainer.train()
    trainer_s = [b - a - m for a, b, m in zip(begins[2:], begins[3:], mine[2:])]
    del trainer, model
    gc.collect()
    return {"trainer_step_s": statistics.median(trainer_s), "ours_step_s": statistics.median(mine[2:])}


def rewrap_knot(base, device: str, repeats: int = 2) -> float:
    """Seconds per knot of the naive PEFT recipe on the model `base`: merge_and_unload + get_peft_model + a new
    AdamW."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS)
    model = get_peft_model(base, cfg)
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        model = get_peft_model(model.merge_and_unload(), cfg)
        torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        sync(device)
        times.append(time.perf_counter() - t)
    del model
    gc.collect()
    return sum(times) / len(times)

"""Best-dev-loss model selection for an LM chain run (`LMRunConfig.best_dev`), as MeZO's finetune.sh does it.

MeZO runs the HF Trainer with `--evaluation_strategy epoch --load_best_model_at_end` and the default metric, the
eval loss: the dev loss is computed after every epoch and the model of the epoch with the lowest one is the model
that is tested. Here:

- after the last step of every epoch (t a multiple of steps_per_epoch, and the final step) `on_step` computes the
  dev loss = the mean over the dev examples of the candidate cross-entropy (`scoring.candidate_logprobs` +
  `classification_loss`, eval mode, no gradient; the training loss of the train examples);
- a STRICTLY lower loss than the best so far (the earliest epoch wins ties, as HF) snapshots the adapted state:
  the target layers' base W (or its float32 master copy), the active link's A and B, the link index and rank,
  and how many links were tied (on the CPU);
- `restore_best` (after run_chain's final knot) puts the best epoch's state back and ties its link, so the final
  model is W_best + (alpha/r) B_best A_best, folded as at the end of any run. When the last epoch is the best
  it does nothing (the run's own end state is that model, bit for bit).

The losses and the snapshot ride in every knot checkpoint (`PeftChainBackend.extra_state`), so a killed run
resumes to the same result. The evaluation draws no random numbers, so the training is the same with and without
best_dev. Memory: one copy of the adapted weights on the CPU (q/v of SmolLM2-135M: 53 MB in float32).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cola_theory.config import Link
from cola_theory.lm import scoring
from cola_theory.lm.lora_ops import ADAPTER, lora_layers, rebuild_rank_

Tensor = torch.Tensor


def dev_loss(model: nn.Module, tokenizer: Any, examples: list, batch_size: int, max_length: int,
             pad_to_multiple_of: int | None = None) -> float:
    """Mean candidate cross-entropy over `examples` (eval mode, no gradient), MeZO's train_as_classification
    loss: the eval loss the HF Trainer ranks checkpoints by."""
    return scoring.mean_loss(scoring.score_examples(model, tokenizer, examples, batch_size, max_length,
                                                   pad_to_multiple_of), examples)


class BestDev:
    """Per-epoch dev loss and the best epoch's snapshot of a `PeftChainBackend` (see the module docstring).

    Hook it up with `backend.extra_state["best_dev"] = tracker` (checkpoints) and `run_chain(on_step=tracker)`.
    """

    def __init__(self, backend: Any, loss_fn: Callable[[nn.Module], float], steps_per_epoch: int,
                 total_steps: int) -> None:
        if steps_per_epoch < 1 or total_steps < 1:
            raise ValueError(f"steps_per_epoch={steps_per_epoch}, total_steps={total_steps}: need >= 1")
        self.backend, self.loss_fn = backend, loss_fn
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.losses: list[float] = []  # dev loss after epoch 1, 2, ... (the last may be a partial epoch)
        self.best_epoch: int | None = None  # 1-based
        self.snapshot: dict[str, Tensor] = {}
        self.snapshot_meta: dict[str, Any] = {}

    @property
    def best_loss(self) -> float | None:
        return None if self.best_epoch is None else self.losses[self.best_epoch - 1]

    def epoch_end(self, t: int) -> bool:
        return t % self.steps_per_epoch == 0 or t == self.total_steps

    def __call__(self, t: int, link: Link | None = None) -> None:
        """run_chain's on_step: after step t (t steps done)."""
        if not self.epoch_end(t):
            return
        epoch = math.ceil(t / self.steps_per_epoch)
        if epoch != len(self.losses) + 1:
            raise RuntimeError(f"best_dev: dev loss of epoch {epoch} but {len(self.losses)} epochs recorded")
        loss = float(self.loss_fn(self.backend.model))
        self.losses.append(loss)
        if math.isfinite(loss) and (self.best_loss is None or loss < self.best_loss):  # ties: the earlier epoch
            self.best_epoch = epoch
            self._take_snapshot()

    # -- the snapshot --------------------------------------------------------------------------------------
    @torch.no_grad()
    def _take_snapshot(self) -> None:
        b = self.backend
        snap = {}
        for name, layer in lora_layers(b.model):
            w = b.master[name] if b.master is not None else layer.get_base_layer().weight
            snap[f"W/{name}"] = w.detach().cpu().clone()
            snap[f"A/{name}"] = layer.lora_A[ADAPTER].weight.detach().cpu().clone()
            snap[f"B/{name}"] = layer.lora_B[ADAPTER].weight.detach().cpu().clone()
        self.snapshot = snap
        self.snapshot_meta = {"link": b.link, "rank": b.rank, "n_tied": len(b.links), "t": b.t,
                              "master": b.master is not None}

    @torch.no_grad()
    def restore_best(self) -> bool:
        """Put the best epoch's model back into the backend (after run_chain's final knot) and tie its link.
        Returns False (nothing to do) when the last recorded epoch is the best."""
        b = self.backend
        if self.best_epoch is None or self.best_epoch == len(self.losses):
            return False
        if b.active:
            raise RuntimeError("restore_best() needs the chain's final knot tied (run_chain does it)")
        meta = self.snapshot_meta
        if meta["master"] != (b.master is not None):
            raise ValueError("the best-dev snapshot was taken with another fp32_master setting")
        if meta["rank"] != b.rank:  # rank step-down: the best epoch's link has another rank
            rebuild_rank_(b.model, meta["rank"], b.master)
            b.rank, b.optimizer, b.wrapped = meta["rank"], None, None
        for name, layer in lora_layers(b.model):
            W = layer.get_base_layer().weight
            if b.master is not None:
                b.master[name].copy_(self.snapshot[f"W/{name}"])
                W.copy_(b.master[name])
            else:
                W.copy_(self.snapshot[f"W/{name}"])
            layer.lora_A[ADAPTER].weight.copy_(self.snapshot[f"A/{name}"])
            layer.lora_B[ADAPTER].weight.copy_(self.snapshot[f"B/{name}"])
        b.links = b.links[:meta["n_tied"]]
        b.link, b.active = meta["link"], True
        b.tie_knot()  # the best model, folded as at the end of any run
        return True

    def metrics(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch, "best_dev_loss": self.best_loss, "dev_loss_per_epoch": self.losses}

    # -- checkpoints (PeftChainBackend.extra_state) --------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        meta = {"losses": self.losses, "best_epoch": self.best_epoch, "snapshot": self.snapshot_meta,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps}
        return {"meta": meta, "tensors": dict(self.snapshot)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        meta = state["meta"]
        if (meta["steps_per_epoch"], meta["total_steps"]) != (self.steps_per_epoch, self.total_steps):
            raise ValueError(f"best_dev state of a run with {meta['steps_per_epoch']} steps per epoch and "
                             f"{meta['total_steps']} steps, not {self.steps_per_epoch} / {self.total_steps}")
        self.losses = [float(x) for x in meta["losses"]]
        self.best_epoch, self.snapshot_meta = meta["best_epoch"], dict(meta["snapshot"])
        self.snapshot = dict(state["tensors"])

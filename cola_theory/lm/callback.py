"""`ColaCallback`: Chain of LoRA inside an ordinary `transformers.Trainer` run on a PEFT LoRA model.

At each knot (after optimizer step `global_step` == k_i) the callback, in place:

    tie a knot        W <- W + (alpha/r) B A, B <- 0          (fold_; logits unchanged)
    extend the chain  A ~ link_generator(seed, i), B = 0       (reinit_; logits unchanged)
    reset             the optimizer state of exactly the LoRA factors (other trainable params keep theirs)

The Parameter objects are kept, so the Trainer's optimizer, scheduler and any DDP wrapping stay valid.
The Trainer's own LR scheduler keeps running across knots: with `lr_scheduler_type="linear"` that is the
paper's one global linear schedule over all T steps (ChainConfig.lr_schedule="linear"); per-link restarts
(ReLoRA's jagged schedule) are not produced by this callback. Rank changes between links need new
tensors and a new optimizer, which a running Trainer cannot take: use `run_chain` + `PeftChainBackend`.

Not handled: DeepSpeed ZeRO / FSDP sharded weights (the fold needs the gathered W, see `cola_theory.lm.fsdp`),
and the Trainer's own checkpoints save only the adapter, not the folded base weights (use `KnotCheckpointer`
with `run_chain` for resumable chains).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import TrainerCallback

from cola_theory.config import ChainConfig, link_plan, parse_reset
from cola_theory.links import check_link_init, draw_generator, reset_generator
from cola_theory.lm.lora_ops import fold_, link_parameters, make_master, reinit_
from cola_theory.optim import reset_optimizer_state


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's `AcceleratedOptimizer` (whose `.optimizer` is the real one)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def unwrap_model(model: Any) -> torch.nn.Module:
    """The model under DDP / accelerate wrappers (`.module`)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


class ColaCallback(TrainerCallback):
    """Tie knots at fixed optimizer steps during `Trainer.train()` (the model must carry the chain's LoRA adapter).

    knots: the steps after which a knot is tied (0 < k_1 < k_2 < ...), or a ChainConfig (its knots,
        seed, init, fresh_init, optimizer_reset and frozen_factor are used; its lr schedule is not).
    seed: seeds link k's draw with link_generator(seed, k), as PeftChainBackend does.
    reinit_first: re-draw link 0 from link_generator(seed, 0) at train start (same chain as the backend).
    fp32_master: fold into float32 copies of the adapted weights (bf16/fp16 bases).
    """

    def __init__(
        self,
        knots: Sequence[int] | ChainConfig,
        seed: int | None = None,
        *,
        init: str = "kaiming",
        init_std: float | None = None,
        fresh_init: bool = True,
        optimizer_reset: str = "full",
        frozen_factor: str = "none",
        reinit_first: bool = True,
        fp32_master: bool = False,
        verbose: bool = False,
    ) -> None:
        if isinstance(knots, ChainConfig):
            cfg = knots
            if len(set(cfg.ranks())) > 1:
                raise ValueError(f"ChainConfig.rank={cfg.rank!r}: a rank change needs a new optimizer, which a "
                                 "running Trainer cannot take; use run_chain with PeftChainBackend")
            knots = [link.start for link in link_plan(cfg)[1:]]
            seed = cfg.seed if seed is None else seed
            init, init_std, fresh_init = cfg.init, cfg.init_std, cfg.fresh_init
            optimizer_reset, frozen_factor = cfg.optimizer_reset, cfg.frozen_factor
        knots = [int(k) for k in knots]
        if knots != sorted(set(knots)) or (knots and knots[0] <= 0):
            raise ValueError(f"knots={knots!r} is invalid: need strictly increasing optimizer steps > 0")
        check_link_init(init, frozen_factor)
        parse_reset(optimizer_reset)  # raises a ValueError naming the policy
        self.knots, self.seed = knots, 0 if seed is None else int(seed)
        self.init, self.init_std, self.fresh_init = init, init_std, fresh_init
        self.optimizer_reset, self.frozen_factor = optimizer_reset, frozen_factor
        self.reinit_first, self.fp32_master, self.verbose = reinit_first, fp32_master, verbose
        self.master: dict[str, torch.Tensor] | None = None
        self.links: list[dict[str, Any]] = []  # tied links, as PeftChainBackend.links (for export)
        self.events: list[dict[str, Any]] = []  # one entry per knot: step, link, reset stats

    def _draw(self, model: torch.nn.Module, k: int) -> None:
        g = draw_generator(self.seed, k, self.fresh_init)
        reinit_(model, g, self.init, self.frozen_factor, self.init_std)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model = unwrap_model(model)
        if self.knots and state.max_steps and self.knots[-1] >= state.max_steps:
            raise ValueError(f"knots={self.knots}: the last knot must come before max_steps={state.max_steps}")
        if self.fp32_master and self.master is None:
            self.master = make_master(model)
        if self.reinit_first and state.global_step == 0:
            self._draw(model, 0)  # link 0 from the chain's generator (PEFT drew it from the global RNG)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step
        if step not in self.knots:
            return control
        k = self.knots.index(step) + 1  # the link that starts now
        model = unwrap_model(model)
        factors = fold_(model, self.master)  # tie a knot: W <- W + (alpha/r) B A
        self.links.append({"index": k - 1, "rank": next(iter(factors.values()))[0].shape[1], "factors": factors})
        self._draw(model, k)  # extend the chain: fresh A, B = 0
        stats = {"reset_fraction": 0.0, "reset_params": 0.0}
        if optimizer is not None:
            g = reset_generator(self.seed, k)
            stats = reset_optimizer_state(unwrap_optimizer(optimizer), link_parameters(model),
                                          self.optimizer_reset, g)
        event = {"step": step, "link": k, **stats}
        self.events.append(event)
        if self.verbose:
            print(f"[cola] knot at step {step}: link {k} starts; {stats}")
        return control

    def tie_final(self, model: torch.nn.Module) -> None:
        """Fold the last link (W_T = W_0 + sum of all links), e.g. before `export_chain(callback.links, ...)`."""
        model = unwrap_model(model)
        factors = fold_(model, self.master)
        self.links.append({"index": len(self.links), "rank": next(iter(factors.values()))[0].shape[1],
                           "factors": factors})

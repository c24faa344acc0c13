"""Optimizers for link factors and the knot-time optimizer policies (full reset, none, ReLoRA pruning)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from cola_theory.config import ChainConfig, parse_reset

MOMENTS = ("exp_avg", "exp_avg_sq", "momentum_buffer")


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: ChainConfig) -> torch.optim.Optimizer:
    """The link optimizer; lr is set per step by the chain driver."""
    params = list(params)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # the fused kernel (as transformers.Trainer's default adamw_torch_fused): one kernel for all factors, the same
    # update rule; the optimizer of a link holds a few dozen small tensors, where per-tensor dispatch dominates
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return cls(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused or None)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def reset_optimizer_state(
    optimizer: torch.optim.Optimizer,
    params: Iterable[torch.Tensor],
    policy: str,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Apply a knot's optimizer policy to exactly `params` (the LoRA factors); others keep their state.

    full: the state is deleted, so Adam starts again at step 0 with zero moments (COLA, Figure 1);
    none: the state is kept (RAC-LoRA's official code);
    magnitude:p / random:p: a fraction p of each moment tensor is zeroed, the smallest-|.| entries or a
    random subset (ReLoRA's `optimizer_reset`); the step count is kept, as in ReLoRA.
    Returns {"reset_fraction": share of moment entries zeroed (or states deleted)}.
    """
    kind, p = parse_reset(policy)
    params = [q for q in params if q in optimizer.state and optimizer.state[q]]
    zeroed, total = 0, 0
    for q in params:
        state = optimizer.state[q]
        moments = [state[k] for k in MOMENTS if isinstance(state.get(k), torch.Tensor)]
        size = sum(m.numel() for m in moments)
        total += size
        if kind == "full":
            del optimizer.state[q]
            zeroed += size
        elif kind in ("magnitude", "random") and p > 0:
            for m in moments:
                zeroed += prune_moment_(m, kind, p, generator)
    return {"reset_fraction": zeroed / total if total else 0.0, "reset_params": float(len(params))}


@torch.no_grad()
def prune_moment_(m: torch.Tensor, kind: str, p: float, generator: torch.Generator | None = None) -> int:
    """Zero a fraction p of one moment tensor in place (ReLoRA): the smallest-|.| entries ("magnitude") or a
    random subset ("random", drawn on the CPU from `generator`); returns how many entries were zeroed."""
    if kind == "magnitude":
        k = int(round(p * m.numel()))
        if k == 0:
            return 0
        thresh = m.abs().flatten().kthvalue(k).values
        mask = m.abs() <= thresh
        # ties at the threshold could zero more than k: keep exactly the k smallest
        if int(mask.sum()) > k:
            order = m.abs().flatten().argsort()[:k]
            mask = torch.zeros(m.numel(), dtype=torch.bool, device=m.device)
            mask[order] = True
            mask = mask.view_as(m)
    else:
        rand = torch.rand(m.shape, generator=generator, device="cpu").to(m.device)
        mask = rand < p
    m.masked_fill_(mask, 0.0)
    return int(mask.sum())

"""Chains of LoRA on sharded models: FSDP2 (`fully_shard`, DTensor parameters) and FSDP1 knots (tested on CPU/gloo).

FSDP2 (`Fsdp2ChainBackend`): W, A and B are row-sharded. A knot all-gathers only the small factors (B: m x r,
A: r x n), forms (alpha/r) B A and adds each rank's row block to its local shard of W: no full unshard of W
(`fold_sharded_`). The next link is drawn in full on every rank and each rank keeps its block (`reinit_sharded_`).
2 ranks vs 1 process: max |delta W| = 1.4e-6. Not supported there: rank step-down, fp32_master, magnitude/random
resets (a shard-local prune differs from the unsharded one), checkpoints (use torch.distributed.checkpoint).
FSDP1 (`FullyShardedDataParallel`, deprecated in torch): the knot runs inside `summon_full_params(writeback=True)`,
which must cover the units holding A, B and W (`fold_fsdp1_`, `reinit_fsdp1_`). Launching and the process group:
`cola_theory.lm.collectives`; DeepSpeed ZeRO: the docstring of `cola_theory.lm.distributed`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cola_theory.links import new_link, set_trainable_
from cola_theory.lm.backend import PeftChainBackend
from cola_theory.lm.collectives import full_tensor
from cola_theory.lm.lora_ops import ADAPTER, LinkFactors, fold_, link_delta, lora_layers, reinit_

Tensor = torch.Tensor
__all__ = ["Fsdp2ChainBackend", "fold_fsdp1_", "fold_sharded_", "fsdp2_shard", "reinit_fsdp1_", "reinit_sharded_"]


def fold_fsdp1_(model: nn.Module, master: dict[str, Tensor] | None = None) -> LinkFactors:
    """Tie a knot in an FSDP1 model: `fold_` inside `summon_full_params(writeback=True)` (all ranks call it)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model, writeback=True, with_grads=False):
        return fold_(model, master)


def reinit_fsdp1_(model: nn.Module, generator: torch.Generator, init: str = "kaiming", frozen_factor: str = "none",
                  init_std: float | None = None) -> None:
    """Draw the next link of an FSDP1 model (`reinit_` on the full parameters, written back to the shards)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model, writeback=True, with_grads=False):
        reinit_(model, generator, init, frozen_factor, init_std)


def fsdp2_shard(model: nn.Module, block_suffix: str = "DecoderLayer") -> nn.Module:
    """`fully_shard` every transformer block (class name ending in `block_suffix`) and then the root, in place."""
    from torch.distributed.fsdp import fully_shard

    blocks = [m for m in model.modules() if type(m).__name__.endswith(block_suffix)]
    for m in blocks:
        fully_shard(m)
    fully_shard(model)
    return model


def _local_block(full: Tensor, like: Tensor) -> Tensor:
    """This rank's block of a full tensor, placed as the DTensor `like` is (no communication)."""
    if not hasattr(like, "to_local"):
        return full.to(like.device, like.dtype)
    from torch.distributed.tensor import distribute_tensor

    block = distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)
    return block.to_local()


def _set_(param: Tensor, full: Tensor) -> None:
    (param.to_local() if hasattr(param, "to_local") else param).copy_(_local_block(full, param))


@torch.no_grad()
def fold_sharded_(model: nn.Module) -> LinkFactors:
    """Tie a knot of an FSDP2 model shard-locally: gather B and A (small), add this rank's rows of (alpha/r) B A
    to its shard of W in float32, set B = 0. All ranks must call it. Returns the link as `fold_` does."""
    tied: LinkFactors = {}
    for name, layer in lora_layers(model):
        A, B = full_tensor(layer.lora_A[ADAPTER].weight).float(), full_tensor(layer.lora_B[ADAPTER].weight).float()
        delta = link_delta(B, A, layer.scaling[ADAPTER], layer.fan_in_fan_out)
        W = layer.get_base_layer().weight
        local = W.to_local() if hasattr(W, "to_local") else W
        local.copy_(local.float() + _local_block(delta, W).float())
        tied[name] = (B.cpu().clone(), A.cpu().clone(), layer.scaling[ADAPTER])
        Bp = layer.lora_B[ADAPTER].weight
        (Bp.to_local() if hasattr(Bp, "to_local") else Bp).zero_()
    return tied


@torch.no_grad()
def reinit_sharded_(model: nn.Module, generator: torch.Generator, init: str = "kaiming",
                    frozen_factor: str = "none", init_std: float | None = None) -> None:
    """`reinit_` for FSDP2: the same full draw on every rank (same generator), each rank keeps its block."""
    for _, layer in lora_layers(model):
        A, B = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        a, b = new_link(tuple(A.shape), tuple(B.shape), layer.r[ADAPTER], generator, init, init_std, frozen_factor)
        _set_(A, a)
        _set_(B, b)
        set_trainable_(A, B, frozen_factor)


class Fsdp2ChainBackend(PeftChainBackend):
    """`PeftChainBackend` on an FSDP2-sharded model (see the module docstring for what is not supported).

    shard_fn(model) shards the PeftModel in place (default `fsdp2_shard`: every decoder block, then the root).
    """

    def __init__(self, *args: Any, shard_fn: Callable[[nn.Module], nn.Module] = fsdp2_shard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.cfg
        if self.fp32_master or cfg.optimizer_reset not in ("full", "none") or isinstance(cfg.rank, tuple):
            raise ValueError("Fsdp2ChainBackend supports fp32_master=False, optimizer_reset 'full' or 'none' and "
                             f"one rank for all links (got fp32_master={self.fp32_master}, optimizer_reset="
                             f"{cfg.optimizer_reset!r}, rank={cfg.rank!r}); use ddp=True for those")
        # FSDP keeps the replicas in step itself: no DDP wrapper, no replica check; the loss is the mean over ranks
        self.shard_fn, self.mean_loss, self.ddp = shard_fn, True, False

    def _attach(self, rank: int) -> None:
        super()._attach(rank)  # W_0 is copied before sharding
        self.model = self.shard_fn(self.model)

    # the five verbs are PeftChainBackend's; only the in-place writes differ (shard-local)
    def _draw(self, generator: torch.Generator) -> None:
        reinit_sharded_(self.model, generator, self.cfg.init, self.cfg.frozen_factor, self.cfg.init_std)

    def _fold(self) -> LinkFactors:
        return fold_sharded_(self.model)

    def full_weights(self) -> dict[str, Tensor]:
        """The adapted base weights W, gathered in full on every rank (collective)."""
        return {n: full_tensor(layer.get_base_layer().weight).detach().cpu() for n, layer in lora_layers(self.model)}

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError("checkpoints of FSDP2 chains are not supported: use torch.distributed.checkpoint, "
                                  "or ddp=True with RankZeroCheckpointer")

"""Chains of LoRA beyond one process: DDP (tested on CPU/gloo), FSDP2 and FSDP1 knots (tested on CPU/gloo),
DeepSpeed ZeRO (documented only).

Launch with `torchrun --nproc_per_node N script.py` or `accelerate launch --num_processes N script.py` (both set
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT); `init_from_env()` then joins the group (nccl on GPUs,
gloo on CPU). Every rank runs the same `run_chain`; only the data differ.

DDP (`PeftChainBackend(..., ddp=True)`): the PeftModel is wrapped in DistributedDataParallel for forward/backward
only; knots act on the unwrapped module and keep the Parameter objects (anchors.md 1.4 A), so the wrapper stays
valid. DDP broadcasts weights once, at construction, so every knot must be bitwise identical on all ranks, and is:
A and B are identical after the gradient all-reduce, the fold is the same float32 arithmetic everywhere, the next
link is drawn from `link_generator(seed, k)` on CPU, the optimizer reset and the lr schedule are functions of
(config, step, link). The backend checks this after every knot (`replicas_identical`, a sha256 per tensor
all-gathered to every rank) and raises naming the tensors if not. A rank step-down builds new A/B tensors, so
the wrapper and the optimizer are rebuilt. Each rank's `batch_fn(t)` returns its shard of the global batch of
step t (`shard_batch`); the loss a step reports is the mean over ranks. Checkpoints: `RankZeroCheckpointer`
(rank 0 writes, every rank restores; each rank's RNG state is saved). Equivalence: 2 ranks with global batch b
match 1 process with batch b up to float summation order: max |delta| over W, A, B = 1.6e-7, over the step losses
4.8e-7 (tiny OPT, 9 steps, 3 links with a rank step-down; tests/test_ddp.py asserts atol 1e-5 + rtol 1e-4, 1e-5).

FSDP2 (`fully_shard`, DTensor parameters; `Fsdp2ChainBackend`): W, A and B are row-sharded. A knot all-gathers
only the small factors (B: m x r, A: r x n), forms (alpha/r) B A and adds each rank's row block to its local
shard of W: no full unshard of W (`fold_sharded_`). The next link is drawn in full on every rank and each rank
keeps its block (`reinit_sharded_`). 2 ranks vs 1 process: max |delta W| = 1.4e-6. Not supported there: rank
step-down, fp32_master, magnitude/random resets (a shard-local prune differs from the unsharded one), checkpoints
(use torch.distributed.checkpoint). FSDP1 (`FullyShardedDataParallel`, deprecated in torch): the knot runs inside
`summon_full_params(writeback=True)`, which must cover the units holding A, B and W (`fold_fsdp1_`).

DeepSpeed ZeRO (not installable here, untested): ZeRO-1/2 do not partition parameters, so a knot is as under
DDP, but the optimizer keeps fp32 master copies of A and B that are the source of truth: after `reinit_` write
them with `deepspeed.utils.safe_set_full_fp32_param(p, value)` and zero the moments with
`safe_set_full_optimizer_state(p, zeros, "exp_avg")` / `"exp_avg_sq"` (there is no per-parameter reset API,
DeepSpeed#5615). ZeRO-3 partitions W as well: fold inside `deepspeed.zero.GatheredParameters([W, A, B],
modifier_rank=0)` (with the default modifier_rank=None the edit is not kept), then set A/B as above.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from peft import PeftModel
from torch import nn

from cola_theory.config import Link
from cola_theory.lm.backend import PeftChainBackend
from cola_theory.lm.checkpoint import PREFIX, KnotCheckpointer
from cola_theory.lm.lora_ops import ADAPTER, LinkFactors, draw_factor, fold_, lora_layers, reinit_
from cola_theory.matrix_backend import link_generator
from cola_theory.optim import make_optimizer
from cola_theory.results import CorruptResultError

Tensor = torch.Tensor
__all__ = ["DistInfo", "Fsdp2ChainBackend", "RankZeroCheckpointer", "all_reduce_mean", "fold_fsdp1_", "fold_sharded_",
           "fsdp2_shard", "gather_rng_states", "init_from_env", "reinit_fsdp1_", "reinit_sharded_",
           "replica_mismatches", "replicas_identical", "set_rng_states", "shard_batch", "shard_batch_fn", "unwrap"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def active() -> bool:
    """True when a process group is initialised (any world size)."""
    return dist.is_available() and dist.is_initialized()


def info() -> DistInfo:
    if not active():
        return DistInfo(device="cuda" if torch.cuda.is_available() else "cpu")
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    device = f"cuda:{local}" if dist.get_backend() == "nccl" else "cpu"
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, device)


def init_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by torchrun / accelerate env variables; a no-op for a single process.

    backend: None = nccl when CUDA is available, else gloo. Returns this process's rank, world size and device.
    """
    if active():
        return info()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and "RANK" not in os.environ:
        return info()
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"distributed launch is missing env variables {missing}; start with "
                           "`torchrun --nproc_per_node N ...` or `accelerate launch --num_processes N ...`")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return info()


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (FSDP modules are returned as they are)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# -- data --------------------------------------------------------------------------------------------------
def shard_batch(batch: Any, rank: int, world_size: int) -> Any:
    """This rank's contiguous block of every tensor's first dimension (mappings and sequences are recursed).

    The global batch must split evenly, so that the mean of the ranks' mean losses is the global mean loss.
    """
    if isinstance(batch, Tensor):
        n = batch.shape[0] if batch.dim() else 0
        if n % world_size:
            ok = max(world_size, n - n % world_size)
            raise ValueError(f"a global batch of {n} rows cannot be split evenly over {world_size} processes; use "
                             f"a global batch size divisible by the world size (e.g. {ok})")
        k = n // world_size
        return batch[rank * k:(rank + 1) * k]
    if isinstance(batch, Mapping):
        return type(batch)({key: shard_batch(v, rank, world_size) for key, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        return type(batch)(shard_batch(v, rank, world_size) for v in batch)
    return batch


def shard_batch_fn(batch_fn: Callable[[int], Any], rank: int | None = None,
                   world_size: int | None = None) -> Callable[[int], Any]:
    """batch_fn(t) of the global batch -> this rank's shard of it (rank / world size of the current group)."""
    me = info()
    rank = me.rank if rank is None else rank
    world_size = me.world_size if world_size is None else world_size
    return lambda t: shard_batch(batch_fn(t), rank, world_size)


def all_reduce_mean(value: float | Tensor) -> float | Tensor:
    """The mean of `value` over all ranks (the value itself in a single process). A tensor stays a tensor on
    its device (no host sync on a GPU); a float is reduced in float64."""
    if not active() or dist.get_world_size() == 1:
        return value
    if isinstance(value, Tensor):
        t = value.detach().to(_comm_device(), torch.float32).clone()
    else:
        t = torch.tensor(float(value), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)  # SUM (gloo has no AVG)
    t = t / dist.get_world_size()
    return t.to(value.device) if isinstance(value, Tensor) else float(t.item())


# -- replicas ----------------------------------------------------------------------------------------------
def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # a DTensor (FSDP2) is gathered: collective


def chain_tensors(model: nn.Module) -> dict[str, Tensor]:
    """What a knot changes: the adapted base weights W and the link factors A, B (all parameters without LoRA)."""
    model = unwrap(model)
    try:
        layers = lora_layers(model)
    except ValueError:
        return dict(model.named_parameters())
    out: dict[str, Tensor] = {}
    for name, layer in layers:
        out[f"{name}.W"] = layer.get_base_layer().weight
        out[f"{name}.A"], out[f"{name}.B"] = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    return out


def _digests(tensors: Mapping[str, Tensor]) -> Tensor:
    rows = []
    for name in sorted(tensors):
        t = _full(tensors[name]).detach().cpu().contiguous()
        h = hashlib.sha256(name.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        rows.append(torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8))
    return torch.stack(rows) if rows else torch.zeros(0, 32, dtype=torch.uint8)


def replica_mismatches(model: nn.Module, tensors: Mapping[str, Tensor] | None = None) -> list[str]:
    """Names of the tensors whose bytes differ from rank 0's (every rank gets the same list). Collective."""
    tensors = chain_tensors(model) if tensors is None else tensors
    if not active() or dist.get_world_size() == 1:
        return []
    dev, names = _comm_device(), sorted(tensors)
    mine = _digests(tensors).to(dev)
    counts = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([len(names)], device=dev))
    if len({int(c.item()) for c in counts}) > 1:
        return [f"<tensor count differs between ranks: {[int(c.item()) for c in counts]}>"]
    gathered = [torch.empty_like(mine) for _ in counts]
    dist.all_gather(gathered, mine)
    bad = set()
    for other in gathered[1:]:
        bad |= {names[i] for i in range(len(names)) if not torch.equal(other[i], gathered[0][i])}
    return sorted(bad)


def replicas_identical(model: nn.Module, tensors: Mapping[str, Tensor] | None = None) -> bool:
    """True if W, A, B of every adapted layer (default) are bitwise the same on all ranks. Collective."""
    return not replica_mismatches(model, tensors)


def gather_rng_states() -> dict[str, Tensor]:
    """{"rng/rank<r>/cpu": ..., "rng/rank<r>/cuda": ...} of every rank (for exact resume of dropout). Collective."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    if not active():
        return {f"rng/rank0/{k}": v for k, v in states.items()}
    out, dev, world = {}, _comm_device(), dist.get_world_size()
    for kind, state in states.items():
        bufs = [torch.empty_like(state, device=dev) for _ in range(world)]
        dist.all_gather(bufs, state.to(dev))
        out.update({f"rng/rank{r}/{kind}": b.cpu() for r, b in enumerate(bufs)})
    return out


def set_rng_states(tensors: Mapping[str, Tensor]) -> bool:
    """Restore this rank's entries of `gather_rng_states()`; False if the checkpoint has none for this rank."""
    r = dist.get_rank() if active() else 0
    if f"rng/rank{r}/cpu" not in tensors:
        return False
    torch.set_rng_state(tensors[f"rng/rank{r}/cpu"])
    if torch.cuda.is_available() and f"rng/rank{r}/cuda" in tensors:
        torch.cuda.set_rng_state(tensors[f"rng/rank{r}/cuda"])
    return True


# -- checkpoints -------------------------------------------------------------------------------------------
class RankZeroCheckpointer(KnotCheckpointer):
    """`KnotCheckpointer` for a data-parallel run: every rank takes part in `state_dict()` (it gathers the RNG
    states), rank 0 alone writes, all wait; on restore rank 0 picks the newest intact checkpoint (moving corrupt
    ones aside) and every rank loads that one. The directory must be visible to all ranks (one machine or a
    shared file system)."""

    def save(self, backend: Any, t: int, history: list[dict], at_knot: bool) -> Path | None:
        if not (at_knot or (self.every_steps and t % self.every_steps == 0)):
            return None
        if info().is_main:
            path = super().save(backend, t, history, at_knot)
        else:
            path = None
            backend.state_dict()  # its collectives (RNG states) need every rank
        if active():
            dist.barrier()
        return path

    def restore(self, backend: Any) -> tuple[int, list[dict]] | None:
        if not active() or dist.get_world_size() == 1:
            return super().restore(backend)
        chosen = torch.tensor([-1], dtype=torch.int64, device=_comm_device())
        if info().is_main:
            for path in self.checkpoints():
                try:
                    self.load(path)
                except CorruptResultError as exc:
                    aside = path.with_name(f"corrupt-{path.name}")  # kept for inspection, never loaded
                    shutil.rmtree(aside, ignore_errors=True)
                    os.replace(path, aside)
                    self.log(f"[cola] {exc}; moved to {aside}, trying an older checkpoint")
                    continue
                chosen[0] = int(path.name[len(PREFIX):])
                break
        dist.broadcast(chosen, src=0)
        if int(chosen[0]) < 0:
            return None
        ckpt = self.load(self.directory / f"{PREFIX}{int(chosen[0]):09d}")
        backend.load_state_dict({"meta": ckpt["meta"], "tensors": ckpt["tensors"], "optimizer": ckpt["optimizer"]})
        self.log(f"[cola] rank {info().rank} resumed after {ckpt['t']} steps")
        return ckpt["t"], ckpt["history"]


# -- FSDP --------------------------------------------------------------------------------------------------
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
        A, B = _full(layer.lora_A[ADAPTER].weight).float(), _full(layer.lora_B[ADAPTER].weight).float()
        delta = layer.scaling[ADAPTER] * (B @ A)
        delta = delta.T if layer.fan_in_fan_out else delta
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
        A, B, r = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight, layer.r[ADAPTER]
        if frozen_factor == "B":
            _set_(B, draw_factor(tuple(B.shape), init, r, generator, init_std))
            _set_(A, torch.zeros(tuple(A.shape)))
        else:
            _set_(A, draw_factor(tuple(A.shape), init, r, generator, init_std))
            _set_(B, torch.zeros(tuple(B.shape)))
        A.requires_grad_(frozen_factor != "A")
        B.requires_grad_(frozen_factor != "B")


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
        self.shard_fn, self.mean_loss = shard_fn, True

    def _attach(self, rank: int) -> None:
        super()._attach(rank)  # W_0 is copied before sharding
        self.model = self.shard_fn(self.model)

    def extend(self, link: Link) -> None:
        if not isinstance(self.model, PeftModel):
            self._attach(link.rank)
        g = link_generator(self.cfg.seed, link.index if self.cfg.fresh_init else 0)
        reinit_sharded_(self.model, g, self.cfg.init, self.cfg.frozen_factor, self.cfg.init_std)
        if self.optimizer is None:
            self.optimizer = make_optimizer([p for p in self.link_parameters() if p.requires_grad], self.cfg)
        self.link, self.active = link.index, True

    def tie_knot(self) -> None:
        if self.active:
            self.links.append({"index": self.link, "rank": self.rank, "factors": fold_sharded_(self.model)})
            self.active = False

    def full_weights(self) -> dict[str, Tensor]:
        """The adapted base weights W, gathered in full on every rank (collective)."""
        return {n: _full(layer.get_base_layer().weight).detach().cpu() for n, layer in lora_layers(self.model)}

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError("checkpoints of FSDP2 chains are not supported: use torch.distributed.checkpoint, "
                                  "or ddp=True with RankZeroCheckpointer")

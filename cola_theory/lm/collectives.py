"""The process group of a data-parallel chain: joining it, sharding batches, reductions, replica checks, RNG states.

Launch with `torchrun --nproc_per_node N script.py` or `accelerate launch --num_processes N script.py` (both set
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT); `init_from_env()` then joins the group (nccl on GPUs,
gloo on CPU). Every rank runs the same `run_chain`; only the data differ.

DDP (`PeftChainBackend(..., ddp=True)`): the PeftModel is wrapped in DistributedDataParallel for forward/backward
only; knots act on the unwrapped module and keep the Parameter objects (in-place folds, so the wrapper and the
optimizer stay valid). DDP broadcasts weights once, at construction, so every knot must be bitwise identical on all
ranks, and is: A and B are identical after the gradient all-reduce, the fold is the same float32 arithmetic
everywhere, the next link is drawn from `cola_theory.links.link_generator(seed, k)` on CPU, the optimizer reset and
the lr schedule are functions of (config, step, link). The backend checks this after every knot
(`replica_mismatches`, a sha256 per tensor all-gathered to every rank) and raises naming the tensors if not. A rank
step-down builds new A/B tensors, so the wrapper and the optimizer are rebuilt. Each rank's `batch_fn(t)` returns
its shard of the global batch of step t (`shard_batch`); the loss a step reports is the mean over ranks
(`all_reduce_mean`). Checkpoints: `cola_theory.lm.checkpoint.RankZeroCheckpointer` (rank 0 writes, every rank
restores; each rank's RNG state is saved, `gather_rng_states`). Equivalence: 2 ranks with global batch b match
1 process with batch b up to float summation order: max |delta| over W, A, B = 1.6e-7, over the step losses 4.8e-7
(tiny OPT, 9 steps, 3 links with a rank step-down; tests/test_ddp.py asserts atol 1e-5 + rtol 1e-4, 1e-5).
Sharded models: `cola_theory.lm.fsdp`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cola_theory.lm.lora_ops import ADAPTER, lora_layers

Tensor = torch.Tensor
__all__ = ["DistInfo", "active", "all_reduce_mean", "chain_tensors", "comm_device", "full_tensor",
           "gather_rng_states", "info", "init_from_env", "replica_mismatches", "replicas_identical", "set_rng_states",
           "shard_batch", "shard_batch_fn", "shard_bounds", "unwrap"]


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


def comm_device() -> torch.device:
    """Where this group's collectives run: the current CUDA device under nccl, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# -- data --------------------------------------------------------------------------------------------------
def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi) of this rank's contiguous share of n rows: rank * n // world_size to (rank + 1) * n // world_size
    (equal blocks when world_size divides n; else shares differ by at most one row)."""
    return rank * n // world_size, (rank + 1) * n // world_size


def shard_batch(batch: Any, rank: int, world_size: int) -> Any:
    """This rank's contiguous block (`shard_bounds`) of every tensor's first dimension (mappings and sequences are
    recursed). The global batch must split evenly, so that the mean of the ranks' mean losses is the global mean."""
    if isinstance(batch, Tensor):
        n = batch.shape[0] if batch.dim() else 0
        if n % world_size:
            ok = max(world_size, n - n % world_size)
            raise ValueError(f"a global batch of {n} rows cannot be split evenly over {world_size} processes; use "
                             f"a global batch size divisible by the world size (e.g. {ok})")
        lo, hi = shard_bounds(n, rank, world_size)
        return batch[lo:hi]
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
        t = value.detach().to(comm_device(), torch.float32).clone()
    else:
        t = torch.tensor(float(value), dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)  # SUM (gloo has no AVG)
    t = t / dist.get_world_size()
    return t.to(value.device) if isinstance(value, Tensor) else float(t.item())


# -- replicas ----------------------------------------------------------------------------------------------
def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor: a DTensor (FSDP2) is gathered (a collective), a plain tensor is returned as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


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
        t = full_tensor(tensors[name]).detach().cpu().contiguous()
        h = hashlib.sha256(name.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        rows.append(torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8))
    return torch.stack(rows) if rows else torch.zeros(0, 32, dtype=torch.uint8)


def replica_mismatches(model: nn.Module, tensors: Mapping[str, Tensor] | None = None) -> list[str]:
    """Names of the tensors whose bytes differ from rank 0's (every rank gets the same list). Collective."""
    tensors = chain_tensors(model) if tensors is None else tensors
    if not active() or dist.get_world_size() == 1:
        return []
    dev, names = comm_device(), sorted(tensors)
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


# -- RNG states ---------------------------------------------------------------------------------------------
def gather_rng_states() -> dict[str, Tensor]:
    """{"rng/rank<r>/cpu": ..., "rng/rank<r>/cuda": ...} of every rank (for exact resume of dropout). Collective."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    if not active():
        return {f"rng/rank0/{k}": v for k, v in states.items()}
    out, dev, world = {}, comm_device(), dist.get_world_size()
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

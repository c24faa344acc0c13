"""Chains of LoRA beyond one process, one import away: DDP (tested on CPU/gloo), FSDP2 and FSDP1 knots (tested on
CPU/gloo), DeepSpeed ZeRO (documented only). The code lives in its own rooms; this module only names it:

    cola_theory.lm.collectives  the process group (`init_from_env`), batch sharding (`shard_batch_fn`), the loss
                                mean over ranks, replica hashes, RNG states; how DDP knots stay bitwise identical
    cola_theory.lm.checkpoint   `RankZeroCheckpointer` (rank 0 writes, every rank restores)
    cola_theory.lm.fsdp         `Fsdp2ChainBackend` and the FSDP1 / FSDP2 knots

Launch with `torchrun --nproc_per_node N script.py` or `accelerate launch --num_processes N script.py`, call
`init_from_env()` first, then build `PeftChainBackend(..., ddp=True)` with `batch_fn=shard_batch_fn(global_batch_fn)`
and `RankZeroCheckpointer(dir)`, or call `run_lm` (its batch size is the global batch).

DeepSpeed ZeRO (not installable here, untested): ZeRO-1/2 do not partition parameters, so a knot is as under
DDP, but the optimizer keeps fp32 master copies of A and B that are the source of truth: after `reinit_` write
them with `deepspeed.utils.safe_set_full_fp32_param(p, value)` and zero the moments with
`safe_set_full_optimizer_state(p, zeros, "exp_avg")` / `"exp_avg_sq"` (there is no per-parameter reset API,
DeepSpeed#5615). ZeRO-3 partitions W as well: fold inside `deepspeed.zero.GatheredParameters([W, A, B],
modifier_rank=0)` (with the default modifier_rank=None the edit is not kept), then set A/B as above.
"""

from __future__ import annotations

from cola_theory.lm.checkpoint import RankZeroCheckpointer
from cola_theory.lm.collectives import (
    DistInfo,
    all_reduce_mean,
    gather_rng_states,
    init_from_env,
    replica_mismatches,
    replicas_identical,
    set_rng_states,
    shard_batch,
    shard_batch_fn,
    unwrap,
)
from cola_theory.lm.fsdp import (
    Fsdp2ChainBackend,
    fold_fsdp1_,
    fold_sharded_,
    fsdp2_shard,
    reinit_fsdp1_,
    reinit_sharded_,
)

__all__ = ["DistInfo", "Fsdp2ChainBackend", "RankZeroCheckpointer", "all_reduce_mean", "fold_fsdp1_", "fold_sharded_",
           "fsdp2_shard", "gather_rng_states", "init_from_env", "reinit_fsdp1_", "reinit_sharded_",
           "replica_mismatches", "replicas_identical", "set_rng_states", "shard_batch", "shard_batch_fn", "unwrap"]

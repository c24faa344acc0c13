"""The package's own COLA training loop for causal LMs on the MeZO tasks (used by paper_repro and benchmarks).

config -> model + MeZO sample -> `PeftChainBackend` -> `run_chain` (the SAME engine as the theory) -> one
self-describing result file {config, history, metrics, meta}. Resumable through knot checkpoints.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from cola_theory.chain import run_chain
from cola_theory.config import ChainConfig
from cola_theory.lm import collectives, fork, scoring
from cola_theory.lm.backend import PeftChainBackend
from cola_theory.lm.best_dev import BestDev, dev_loss
from cola_theory.lm.checkpoint import RankZeroCheckpointer
from cola_theory.lm.data import sample_protocol
from cola_theory.lm.models import load_model
from cola_theory.lm.run_config import LMRunConfig, fold_mode, resolve_dtype
from cola_theory.paths import safe_join
from cola_theory.results import environment_meta, save_result


def make_batches(n: int, batch_size: int, seed: int, lengths: list[int] | None = None, mega: int = 50):
    """batch_fn(t) -> example indices of step t: a fresh seeded permutation per epoch (resume-exact).

    With `lengths`, batches are grouped by length as transformers' LengthGroupedSampler does: the permutation is
    cut into mega-batches of `mega` batches, each sorted by length and split, and the batch order is shuffled
    (seeded) - so little padding is computed, and every epoch still visits every example once.
    """
    steps_per_epoch = math.ceil(n / batch_size)
    cache: dict[int, list[list[int]]] = {}

    def epoch_batches(epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        if lengths is None:
            return [perm[i:i + batch_size] for i in range(0, n, batch_size)]
        size = mega * batch_size
        chunks = [sorted(perm[i:i + size], key=lambda j: -lengths[j]) for i in range(0, n, size)]
        batches = [c[i:i + batch_size] for c in chunks for i in range(0, len(c), batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def indices(t: int) -> list[int]:
        epoch, i = divmod(t, steps_per_epoch)
        if epoch not in cache:
            cache.clear()
            cache[epoch] = epoch_batches(epoch)
        return cache[epoch][i]

    return indices, steps_per_epoch


def _inside(root: str | Path, path: str | Path, what: str) -> Path:
    """`path` (relative to `root`, or absolute) if it lies inside `root`; ValueError naming it otherwise."""
    if not Path(path).is_absolute():
        return safe_join(root, path, what=what)
    base, target = Path(root).resolve(), Path(path).resolve()
    if target != base and base not in target.parents:
        raise ValueError(f"{what}={str(path)!r} is outside results_root {str(base)!r}; write results and "
                         "checkpoints below it (or pass a relative name)")
    return target


def _target_dtype(model: torch.nn.Module, targets: tuple[str, ...]) -> torch.dtype:
    """dtype of the weights the chain folds into (the first target module's), else of the model."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and isinstance(getattr(module, "weight", None), torch.Tensor):
            return module.weight.dtype
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def inside_root(results_root: str | Path | None, path: str | Path | None, what: str) -> str | Path | None:
    """`path` checked to lie inside `results_root` (`_inside`); as it is without a root, None stays None."""
    return path if results_root is None or path is None else _inside(results_root, path, what)


# -- the steps of a run (shared with cola_theory.lm.packed_train where they are the same) ---------------------
def load_sample(cfg: LMRunConfig, data_dir: str | None, split_validation_as_train: bool = False) -> dict:
    """The run's MeZO sample {"train", "dev", "test"} (its seed); best_dev needs dev examples."""
    sample = sample_protocol(cfg.task, seed=cfg.seed, num_train=cfg.num_train, num_dev=cfg.num_dev,
                             num_test=cfg.num_test, data_dir=data_dir,
                             split_validation_as_train=split_validation_as_train or cfg.split_validation_as_train)
    if cfg.best_dev and not sample["dev"]:
        raise ValueError(f"LMRunConfig.best_dev=True selects the epoch on dev, but num_dev={cfg.num_dev!r} gave no "
                         "dev examples; use num_dev >= 1 (None = MeZO's size) or best_dev=False")
    return sample


def load_base(cfg: LMRunConfig, device: str, model_bundle: tuple | None) -> tuple:
    """(model, tokenizer, note): the given `model_bundle`, else `cfg.model` loaded in the run's dtype."""
    return model_bundle or load_model(cfg.model, device=device, dtype=resolve_dtype(cfg.dtype, device))


def batch_plan(cfg: LMRunConfig, train: list[scoring.EncodedExample]):
    """`make_batches` of the run's encoded train examples: (indices of step t, steps per epoch)."""
    lengths = [e.max_len for e in train] if cfg.group_by_length else None
    return make_batches(len(train), cfg.batch_size, cfg.seed, lengths)


def base_metrics(note: str, sample: dict, steps_per_epoch: int, total_steps: int) -> dict[str, Any]:
    return {"model_note": note, "sizes": {k: len(v) for k, v in sample.items()}, "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps}


def write_result(out_path: str | Path | None, cfg: LMRunConfig, chain_cfg: ChainConfig, history: list[dict],
                 metrics: dict[str, Any], device: str, **meta: Any) -> dict:
    """The self-describing payload {config (+ the chain), history, metrics, meta}, saved at `out_path` if given."""
    env = environment_meta(seed=cfg.seed, device=device)
    env.update(wall_time_s=metrics["wall_time_s"], **meta)
    payload = {"config": {**cfg.to_dict(), "chain": chain_cfg.to_dict()}, "history": history, "metrics": metrics,
               "meta": env}
    return payload if out_path is None else save_result(out_path, **payload)


def _data_parallel(distributed: bool | None) -> tuple[collectives.DistInfo, bool]:
    """This process's place in the group and whether the run is data-parallel (None: when the group has > 1)."""
    me = collectives.info()
    ddp = me.world_size > 1 if distributed is None else distributed
    if ddp and not collectives.active():
        raise ValueError("run_lm(distributed=True) needs an initialised process group: launch with torchrun and "
                         "call cola_theory.lm.collectives.init_from_env() first")
    return me, ddp


def _batching(cfg: LMRunConfig, train: list, batch_idx, pad_id: int, shard: collectives.DistInfo | None):
    """(batch_fn, loss_fn) of the run. Data-parallel (`shard`): each rank collates its contiguous share of the
    global batch (`collectives.shard_bounds`) and weights its mean loss by its share, so DDP's mean of the ranks'
    gradients is the global batch's; an empty share still runs (weight 0) so that every rank joins the all-reduce."""
    multiple = cfg.pad_to_multiple_of or None

    def collate(idx: list[int]):
        return scoring.collate([train[i] for i in idx], pad_id=pad_id, pad_to_multiple_of=multiple,
                               pad_limit=cfg.max_length)

    if shard is None:
        return lambda t: collate(batch_idx(t)), scoring.candidate_loss

    def batch_fn(t: int):
        idx = batch_idx(t)
        lo, hi = collectives.shard_bounds(len(idx), shard.rank, shard.world_size)
        return {"batch": collate(idx[lo:hi] or idx[:1]), "weight": (hi - lo) * shard.world_size / len(idx)}

    return batch_fn, lambda m, batch: batch["weight"] * scoring.candidate_loss(m, batch["batch"])


def _fold_setting(cfg: LMRunConfig, model: torch.nn.Module) -> tuple[bool, str]:
    """(fp32 master, how knots fold) for the weights the chain folds into; warns when a bf16/fp16 W is rounded."""
    master, fold = fold_mode(cfg.fp32_master, _target_dtype(model, cfg.target_modules))
    if fold.startswith("in place"):
        warnings.warn(f"LMRunConfig.fp32_master=False on a {fold[9:]} base: every knot rounds W to {fold[9:]} "
                      "(small links lose much of their update); fp32_master=None folds in float32", stacklevel=3)
    return master, fold


def fresh_device(cfg: LMRunConfig, device: str) -> None:
    """Peak memory counted from here; compiled graphs of an earlier run in this process dropped (they belong to a
    model that is gone and would only count against Dynamo's recompile limit, shared by every PeftModel)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if cfg.compile != "off":
        torch._dynamo.reset()


def _best_dev(cfg: LMRunConfig, backend: PeftChainBackend, tok: Any, sample: dict, chain_cfg: ChainConfig,
              steps_per_epoch: int) -> BestDev | None:
    """MeZO's load_best_model_at_end: the dev loss after every epoch, the best epoch is tested; its losses and
    snapshot ride in the checkpoints (`backend.extra_state`)."""
    if not cfg.best_dev:
        return None
    best = BestDev(backend, lambda m: dev_loss(m, tok, sample["dev"], cfg.eval_batch_size, cfg.max_length,
                                               cfg.pad_to_multiple_of or None), steps_per_epoch, chain_cfg.total_steps)
    backend.extra_state["best_dev"] = best
    return best


def _evaluate(cfg: LMRunConfig, backend: PeftChainBackend, result: Any, best: BestDev | None, accuracy,
              sample: dict, metrics: dict[str, Any]) -> None:
    """The run's outcome into `metrics`: status, trainable parameters, the best epoch (restored), test/dev accuracy
    of a finished run."""
    metrics["status"], metrics["diverged"] = result.status, result.diverged
    metrics["trainable_params"] = sum(p.numel() for p in backend.link_parameters())
    if best is not None:
        metrics.update(best.metrics())
        if result.status == "finished":
            metrics["best_dev_restored"] = best.restore_best()  # False: the last epoch is the best
    if result.status == "finished":
        t_eval = time.perf_counter()
        metrics["test_acc"] = accuracy(backend.model, "test")
        if cfg.eval_dev and sample["dev"]:
            metrics["dev_acc"] = accuracy(backend.model, "dev")
        metrics["eval_time_s"] = time.perf_counter() - t_eval


def run_lm(cfg: LMRunConfig, out_path: str | Path | None = None, *, data_dir: str | None = None,
           checkpoint_dir: str | Path | None = None, model_bundle: tuple | None = None, device: str | None = None,
           split_validation_as_train: bool = False, distributed: bool | None = None,
           results_root: str | Path | None = None, trunk_root: str | Path | None = None) -> dict:
    """Fine-tune one model on one task with LoRA or COLA and write the result file. Returns the payload.

    `model_bundle=(model, tokenizer, note)` reuses an already loaded base (its weights are restored after the
    run, so one process can run many configurations without reloading from disk).
    distributed: data-parallel over the torch.distributed group (None = when one of > 1 process is initialised;
    launch with torchrun): `cfg.batch_size` is the GLOBAL batch, each rank trains on a contiguous share of it
    (weighted so the averaged gradient is the global batch's), rank 0 alone writes checkpoints and the result.
    results_root: if given, `out_path` and `checkpoint_dir` must lie inside it (`cola_theory.paths.safe_join`).
    trunk_root: with a checkpoint_dir, share the first knot's checkpoint with the runs that agree up to it
    (`cola_theory.lm.fork`; not with `distributed`): the first one leaves it there, the others start from it.
    """
    out_path = inside_root(results_root, out_path, "out_path")
    checkpoint_dir = inside_root(results_root, checkpoint_dir, "checkpoint_dir")
    trunk_root = inside_root(results_root, trunk_root, "trunk_root")
    me, ddp = _data_parallel(distributed)
    print(f"[cola] {cfg}" + (f" (rank {me.rank} of {me.world_size})" if ddp else ""))
    device = device or (me.device if ddp else "cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    sample = load_sample(cfg, data_dir, split_validation_as_train)
    model, tok, note = load_base(cfg, device, model_bundle)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()} if model_bundle else None
    train = [scoring.encode_example(tok, ex, cfg.max_length) for ex in sample["train"]]  # dev/test: accuracy()
    batch_idx, steps_per_epoch = batch_plan(cfg, train)
    chain_cfg = cfg.chain_config(steps_per_epoch)
    batch_fn, loss_fn = _batching(cfg, train, batch_idx, tok.pad_token_id or 0, me if ddp else None)

    def accuracy(m, split: str) -> float:
        return scoring.evaluate_accuracy(m, tok, sample[split], cfg.eval_batch_size, max_length=cfg.max_length,
                                         pad_to_multiple_of=cfg.pad_to_multiple_of or None)

    metrics = base_metrics(note, sample, steps_per_epoch, chain_cfg.total_steps)
    if cfg.zero_shot:
        metrics["zero_shot_test_acc"] = accuracy(model, "test")
    fresh_device(cfg, device)
    master, metrics["fold"] = _fold_setting(cfg, model)
    backend = PeftChainBackend(model, chain_cfg, batch_fn, loss_fn, target_modules=list(cfg.target_modules),
                               fp32_master=master, device=device, ddp=ddp,
                               compile=None if cfg.compile == "off" else cfg.compile,
                               compile_backend=cfg.compile_backend)
    if ddp:
        ckpt = RankZeroCheckpointer(checkpoint_dir, every_steps=cfg.checkpoint_every) if checkpoint_dir else None
    else:
        ckpt = fork.checkpointer(checkpoint_dir, cfg.checkpoint_every, trunk_root, [cfg], [chain_cfg], "sequential",
                                 device)
    best = _best_dev(cfg, backend, tok, sample, chain_cfg, steps_per_epoch)
    t_train = time.perf_counter()
    result = run_chain(backend, chain_cfg, log_every=1, checkpointer=ckpt, on_step=best)
    metrics["train_time_s"] = time.perf_counter() - t_train
    if getattr(ckpt, "forked_at", None) is not None:
        metrics["forked_at_step"] = ckpt.forked_at  # the steps before it were trained by a run of its family
    _evaluate(cfg, backend, result, best, accuracy, sample, metrics)
    if device.startswith("cuda"):
        metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    metrics["wall_time_s"] = time.perf_counter() - t0
    payload = write_result(out_path if me.is_main else None, cfg, chain_cfg, result.history, metrics, device)
    if ddp:
        torch.distributed.barrier()  # the result exists before any rank returns
    if saved is not None:  # give the shared base back untouched
        backend.tie_knot()  # a diverged run ends with its link untied; its values are overwritten just below
        backend.unwrap().load_state_dict(saved)
    print(f"[cola] {cfg.task} {cfg.method} seed={cfg.seed}: test_acc={metrics.get('test_acc')} "
          f"({metrics['wall_time_s']:.0f}s)")
    return payload

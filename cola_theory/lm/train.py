"""The package's own COLA training loop for causal LMs on the MeZO tasks (used by paper_repro and benchmarks).

config -> model + MeZO sample -> `PeftChainBackend` -> `run_chain` (the SAME engine as the theory) -> one
self-describing result file {config, history, metrics, meta}. Resumable through knot checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from cola_theory.chain import run_chain
from cola_theory.config import ChainConfig, knots_from_epochs
from cola_theory.results import environment_meta, save_result

METHODS = ("lora", "cola")
# torch.compile modes; "reduce-overhead" and "max-autotune" also capture CUDA graphs (on a CUDA device)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# ChainConfig fields an LM run sets through its own LMRunConfig fields (the name to use instead)
CHAIN_OWNED = {"total_steps": "epochs", "knots": "link_epochs", "n_links": "n_links", "rank": "rank",
               "alpha": "alpha", "lr": "lr", "lr_schedule": "lr_schedule", "optimizer_reset": "optimizer_reset",
               "weight_decay": "weight_decay", "seed": "seed"}
# the other ChainConfig fields: settable per LM run through LMRunConfig.chain_overrides
CHAIN_OVERRIDES = tuple(f.name for f in dataclasses.fields(ChainConfig) if f.name not in CHAIN_OWNED
                        and f.name != "extra")
LOW_PRECISION = (torch.bfloat16, torch.float16)


def _override_type_error(name: str, value: Any) -> str | None:
    """Why `value` has the wrong type for ChainConfig field `name` (ChainConfig checks allowed values only)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if name in ("optimizer", "init", "frozen_factor") and not isinstance(value, str):
        return "need a string"
    if name in ("warmup_steps", "restart_warmup_steps") and not (isinstance(value, int) and not isinstance(value, bool)
                                                              and value >= 0):
        return "need an integer >= 0 (and < the run's total steps)"
    if name == "min_lr_ratio" and not number:
        return "need a number in [0, 1]"
    if name == "init_std" and not (value is None or number):
        return "need a number > 0 or None"
    if name == "fresh_init" and not isinstance(value, bool):
        return "need True or False"
    if name == "betas" and not (isinstance(value, tuple) and len(value) == 2 and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in value)):
        return "need two numbers in [0, 1), e.g. (0.9, 0.999)"
    return None


def normalise_chain_overrides(value: Any) -> tuple[tuple[str, Any], ...]:
    """A dict or (field, value) pairs of ChainConfig fields -> a sorted tuple of pairs, validated with
    ChainConfig's own checks; a field LMRunConfig owns (lr, rank, ...) raises naming the field to use."""
    where = "LMRunConfig.chain_overrides"
    try:
        pairs = [(k, v) for k, v in (value.items() if isinstance(value, Mapping) else value)]
    except (TypeError, ValueError):
        raise ValueError(f"{where}={value!r} is invalid: give a dict {{field: value}} or (field, value) pairs, "
                         f"fields from {CHAIN_OVERRIDES}") from None
    out: dict[str, Any] = {}
    for name, v in pairs:
        if name in CHAIN_OWNED:
            raise ValueError(f"{where}[{name!r}]: ChainConfig.{name} is set by LMRunConfig.{CHAIN_OWNED[name]}; "
                             f"set that field instead")
        if name not in CHAIN_OVERRIDES:
            raise ValueError(f"{where}[{name!r}]: not a ChainConfig field an LM run can set; use one of "
                             f"{CHAIN_OVERRIDES}")
        if name in out:
            raise ValueError(f"{where}: {name!r} is given twice")
        v = tuple(v) if isinstance(v, list) else v
        if (why := _override_type_error(name, v)) is not None:
            raise ValueError(f"{where}: ChainConfig.{name}={v!r} is invalid: {why}")
        out[name] = v
    # allowed values (optimizer, init, ...): ChainConfig's own checks; the step counts are checked by chain_config
    probe = {k: v for k, v in out.items() if k not in ("warmup_steps", "restart_warmup_steps")}
    try:
        ChainConfig(total_steps=1, **probe)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class LMRunConfig:
    """One fine-tuning run (one row-seed-lr cell of Table 1/2/4 or Figure 3)."""

    model: str = "smollm2-135m"  # hub id, local path, "smollm2-135m", "tiny-opt", "tiny-llama"
    task: str = "sst2"
    method: str = "cola"  # "lora" = a chain of one link
    n_links: int = 3
    epochs: float = 5.0  # the same budget for LoRA and COLA (paper: 5)
    link_epochs: tuple[float, ...] = ()  # explicit epochs per link, e.g. (3, 2) for rank step-down
    rank: int | tuple[int, ...] = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    lr: float = 5e-4
    lr_schedule: str = "linear"
    optimizer_reset: str = "full"
    weight_decay: float = 0.0
    batch_size: int = 8
    eval_batch_size: int = 16
    seed: int = 0
    num_train: int = 1000
    num_dev: int | None = None  # None = MeZO's per-task value (100 for CB/COPA, else 500)
    num_test: int = 1000
    max_length: int = 256
    eval_dev: bool = True
    zero_shot: bool = False  # also evaluate the untrained model on the test sample
    # fold each knot into a float32 master copy of the adapted weights; None = auto: when they are bf16/fp16
    # (a bf16 fold rounds W at every knot: the smaller the link, the more of it is lost; the result's
    # metrics["fold"] says how the run folded)
    fp32_master: bool | None = None
    dtype: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU) | "float32" | "bfloat16"
    checkpoint_every: int = 0  # also checkpoint every k steps (knots are always checkpointed)
    group_by_length: bool = True  # batches of similar length (less padding); False: plain shuffled batches
    # speed only (same math; with dropout, other shapes or compiled code draw other masks of the same law):
    # torch.compile mode of the adapted model ("off" = eager; see PeftChainBackend),
    # and padding of every batch to a multiple of this many tokens (0 = none) so that compiled code and
    # CUDA graphs see a few shapes (transformers' models recompile for every new length); 0 with compile means 32
    compile: str = "off"
    pad_to_multiple_of: int = 0
    compile_backend: str = "inductor"  # torch.compile backend ("aot_eager": graph capture without code generation)
    # ChainConfig fields that LMRunConfig does not own (CHAIN_OVERRIDES: optimizer, betas, warmup_steps,
    # restart_warmup_steps, min_lr_ratio, init, init_std, fresh_init, frozen_factor); a dict is accepted.
    # Stored as sorted (field, value) pairs, written to results as a dict.
    chain_overrides: tuple[tuple[str, Any], ...] = ()
    # MeZO's load_best_model_at_end: dev loss after every epoch, the best epoch's model is the one tested
    # (cola_theory.lm.best_dev; metrics best_epoch, dev_loss_per_epoch, best_dev_loss)
    best_dev: bool = False
    # a task whose train split is missing locally (BoolQ offline) draws train/dev from the validation rows that are
    # not in the test sample (`data.sample_protocol`): a labelled deviation from the protocol, recorded here
    split_validation_as_train: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"LMRunConfig.method={self.method!r}: use one of {METHODS}")
        if self.method == "lora" and (self.n_links != 1 or len(self.link_epochs) > 1):
            object.__setattr__(self, "n_links", 1)
            object.__setattr__(self, "link_epochs", ())
        if self.link_epochs and len(self.link_epochs) != self.n_links:
            object.__setattr__(self, "n_links", len(self.link_epochs))
        if self.link_epochs and not math.isclose(sum(self.link_epochs), self.epochs):
            raise ValueError(f"LMRunConfig.link_epochs={self.link_epochs} must sum to epochs={self.epochs}")
        for name in ("batch_size", "eval_batch_size", "num_train", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"LMRunConfig.{name}={getattr(self, name)!r} must be >= 1")
        if self.epochs <= 0:
            raise ValueError(f"LMRunConfig.epochs={self.epochs!r} must be > 0")
        if self.compile != "off" and self.compile not in COMPILE_MODES:
            raise ValueError(f"LMRunConfig.compile={self.compile!r}: use 'off' or a torch.compile mode "
                             f"{COMPILE_MODES}")
        if self.pad_to_multiple_of < 0:
            raise ValueError(f"LMRunConfig.pad_to_multiple_of={self.pad_to_multiple_of!r} must be >= 0 "
                             "(0 = no padding)")
        if self.pad_to_multiple_of == 0 and self.compile != "off":
            object.__setattr__(self, "pad_to_multiple_of", 32)  # one graph (and CUDA graph) per length bucket
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"LMRunConfig.dtype={self.dtype!r}: use auto, float32, bfloat16 or float16")
        for name in ("fp32_master", "best_dev", "split_validation_as_train"):
            value = getattr(self, name)
            if not (isinstance(value, bool) or (value is None and name == "fp32_master")):
                raise ValueError(f"LMRunConfig.{name}={value!r}: use True or False"
                                 + (" (or None = auto)" if name == "fp32_master" else ""))
        object.__setattr__(self, "chain_overrides", normalise_chain_overrides(self.chain_overrides))
        # the chain settings with ChainConfig's own checks now (the step counts once the run length is known)
        late = ("warmup_steps", "restart_warmup_steps")
        ChainConfig(total_steps=1 << 40, n_links=self.n_links, rank=self.rank, alpha=self.alpha, lr=self.lr,
                    lr_schedule=self.lr_schedule, optimizer_reset=self.optimizer_reset, weight_decay=self.weight_decay,
                    seed=self.seed, **{k: v for k, v in self.chain_overrides if k not in late})

    def chain_config(self, steps_per_epoch: int) -> ChainConfig:
        """The chain schedule: links of `link_epochs` (or equal shares of `epochs`) in optimizer steps."""
        per_link = self.link_epochs or (self.epochs / self.n_links,) * self.n_links
        T, knots = knots_from_epochs(per_link, steps_per_epoch)
        return ChainConfig(total_steps=T, knots=knots, n_links=self.n_links, rank=self.rank, alpha=self.alpha,
                           lr=self.lr, lr_schedule=self.lr_schedule, optimizer_reset=self.optimizer_reset,
                           weight_decay=self.weight_decay, seed=self.seed, **dict(self.chain_overrides))

    def override(self, settings: Mapping[str, Any]) -> LMRunConfig:
        """A copy with `settings` applied: LMRunConfig fields and chain overrides (CHAIN_OVERRIDES names) alike;
        an unknown name raises listing the choices; values are validated as at construction."""
        own = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(settings) - own - set(CHAIN_OVERRIDES))
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}: use an LMRunConfig field {sorted(own)} or a chain "
                             f"setting {list(CHAIN_OVERRIDES)}")
        changes = {k: v for k, v in settings.items() if k in own}
        chain = {k: v for k, v in settings.items() if k not in own}
        if chain:
            changes["chain_overrides"] = {**dict(normalise_chain_overrides(changes.get(
                "chain_overrides", self.chain_overrides))), **chain}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["chain_overrides"] = dict(self.chain_overrides)  # JSON-stable ({} at the default)
        return d


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """LMRunConfig.dtype on `device`: "auto" = bfloat16 on a CUDA device, float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


_dtype = resolve_dtype  # the former private name (paper_repro.lm.runner imports it)


def fold_mode(fp32_master: bool | None, weight_dtype: torch.dtype) -> tuple[bool, str]:
    """(use a float32 master copy, how knots fold) for adapted weights of `weight_dtype`; None = auto."""
    master = weight_dtype in LOW_PRECISION if fp32_master is None else fp32_master
    if master:
        return True, "float32 master copy"
    if weight_dtype in LOW_PRECISION:
        return False, f"in place {str(weight_dtype).removeprefix('torch.')}"
    return False, f"{str(weight_dtype).removeprefix('torch.')} weights"


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
    from cola_theory.paths import safe_join

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


def _shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    return rank * n // world, (rank + 1) * n // world


def run_lm(cfg: LMRunConfig, out_path: str | Path | None = None, *, data_dir: str | None = None,
           checkpoint_dir: str | Path | None = None, model_bundle: tuple | None = None, device: str | None = None,
           progress: bool = True, split_validation_as_train: bool = False, distributed: bool | None = None,
           results_root: str | Path | None = None) -> dict:
    """Fine-tune one model on one task with LoRA or COLA and write the result file. Returns the payload.

    `model_bundle=(model, tokenizer, note)` reuses an already loaded base (its weights are restored after the
    run, so one process can run many configurations without reloading from disk).
    distributed: data-parallel over the torch.distributed group (None = when one of > 1 process is initialised;
    launch with torchrun): `cfg.batch_size` is the GLOBAL batch, each rank trains on a contiguous share of it
    (weighted so the averaged gradient is the global batch's), rank 0 alone writes checkpoints and the result.
    results_root: if given, `out_path` and `checkpoint_dir` must lie inside it (`cola_theory.paths.safe_join`).
    """
    from cola_theory.lm import scoring
    from cola_theory.lm.backend import PeftChainBackend
    from cola_theory.lm.checkpoint import KnotCheckpointer
    from cola_theory.lm.data import sample_protocol
    from cola_theory.lm.models import load_model

    if results_root is not None:
        out_path = None if out_path is None else _inside(results_root, out_path, "out_path")
        checkpoint_dir = None if checkpoint_dir is None else _inside(results_root, checkpoint_dir, "checkpoint_dir")
    from cola_theory.lm import distributed as dist_mod

    me = dist_mod.info()
    ddp = me.world_size > 1 if distributed is None else distributed
    if ddp and not dist_mod.active():
        raise ValueError("run_lm(distributed=True) needs an initialised process group: launch with torchrun and "
                         "call cola_theory.lm.distributed.init_from_env() first")
    print(f"[cola] {cfg}" + (f" (rank {me.rank} of {me.world_size})" if ddp else ""))
    device = device or (me.device if ddp else "cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    sample = sample_protocol(cfg.task, seed=cfg.seed, num_train=cfg.num_train, num_dev=cfg.num_dev,
                             num_test=cfg.num_test, data_dir=data_dir,
                             split_validation_as_train=split_validation_as_train or cfg.split_validation_as_train)
    if cfg.best_dev and not sample["dev"]:
        raise ValueError(f"LMRunConfig.best_dev=True selects the epoch on dev, but num_dev={cfg.num_dev!r} gave no "
                         "dev examples; use num_dev >= 1 (None = MeZO's size) or best_dev=False")
    model, tok, note = model_bundle or load_model(cfg.model, device=device, dtype=resolve_dtype(cfg.dtype, device))
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()} if model_bundle else None
    train = [scoring.encode_example(tok, ex, cfg.max_length) for ex in sample["train"]]  # dev/test: accuracy()
    lengths = [e.max_len for e in train] if cfg.group_by_length else None
    batch_idx, steps_per_epoch = make_batches(len(train), cfg.batch_size, cfg.seed, lengths)
    chain_cfg = cfg.chain_config(steps_per_epoch)

    pad_id, multiple = tok.pad_token_id or 0, cfg.pad_to_multiple_of or None

    def batch_fn(t: int):
        idx = batch_idx(t)
        if not ddp:
            return scoring.collate([train[i] for i in idx], pad_id=pad_id, pad_to_multiple_of=multiple,
                                   pad_limit=cfg.max_length)
        lo, hi = _shard_bounds(len(idx), me.rank, me.world_size)  # weight: DDP's mean of means = global mean
        mine = idx[lo:hi] or idx[:1]  # an empty share still runs (weight 0) so that every rank joins the all-reduce
        return {"batch": scoring.collate([train[i] for i in mine], pad_id=pad_id, pad_to_multiple_of=multiple,
                                         pad_limit=cfg.max_length),
                "weight": (hi - lo) * me.world_size / len(idx)}

    def loss_fn(m, batch):
        weight, batch = (batch["weight"], batch["batch"]) if ddp else (1.0, batch)
        return weight * scoring.candidate_loss(m, batch)

    def accuracy(m, split: str) -> float:
        return scoring.evaluate_accuracy(m, tok, sample[split], cfg.eval_batch_size, max_length=cfg.max_length,
                                         pad_to_multiple_of=cfg.pad_to_multiple_of or None)

    metrics: dict[str, Any] = {"model_note": note, "sizes": {k: len(v) for k, v in sample.items()},
                               "steps_per_epoch": steps_per_epoch, "total_steps": chain_cfg.total_steps}
    if cfg.zero_shot:
        metrics["zero_shot_test_acc"] = accuracy(model, "test")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if cfg.compile != "off":
        # graphs of an earlier run in this process belong to a model that is gone; they would only count
        # against Dynamo's recompile limit (per code object, shared by every PeftModel)
        torch._dynamo.reset()
    master, metrics["fold"] = fold_mode(cfg.fp32_master, _target_dtype(model, cfg.target_modules))
    if metrics["fold"].startswith("in place"):
        warnings.warn(f"LMRunConfig.fp32_master=False on a {metrics['fold'][9:]} base: every knot rounds W to "
                      f"{metrics['fold'][9:]} (small links lose much of their update); fp32_master=None folds in "
                      "float32", stacklevel=2)
    backend = PeftChainBackend(model, chain_cfg, batch_fn, loss_fn, target_modules=list(cfg.target_modules),
                               fp32_master=master, device=device, ddp=ddp,
                               compile=None if cfg.compile == "off" else cfg.compile,
                               compile_backend=cfg.compile_backend)
    ckpt_cls = dist_mod.RankZeroCheckpointer if ddp else KnotCheckpointer
    ckpt = ckpt_cls(checkpoint_dir, every_steps=cfg.checkpoint_every) if checkpoint_dir else None
    best = None
    if cfg.best_dev:  # MeZO's load_best_model_at_end: the dev loss after every epoch, the best epoch is tested
        from cola_theory.lm.best_dev import BestDev, dev_loss

        best = BestDev(backend, lambda m: dev_loss(m, tok, sample["dev"], cfg.eval_batch_size, cfg.max_length,
                                                   cfg.pad_to_multiple_of or None), steps_per_epoch,
                       chain_cfg.total_steps)
        backend.extra_state["best_dev"] = best  # the losses and the best snapshot ride in the checkpoints
    t_train = time.perf_counter()
    result = run_chain(backend, chain_cfg, log_every=1, checkpointer=ckpt, on_step=best)
    metrics["train_time_s"] = time.perf_counter() - t_train
    metrics["status"], metrics["diverged"] = result.status, result.diverged
    peft_model = backend.model
    metrics["trainable_params"] = sum(p.numel() for p in backend.link_parameters())
    if best is not None:
        metrics.update(best.metrics())
        if result.status == "finished":
            metrics["best_dev_restored"] = best.restore_best()  # False: the last epoch is the best
    if result.status == "finished":
        t_eval = time.perf_counter()
        metrics["test_acc"] = accuracy(peft_model, "test")
        if cfg.eval_dev and sample["dev"]:
            metrics["dev_acc"] = accuracy(peft_model, "dev")
        metrics["eval_time_s"] = time.perf_counter() - t_eval
    if device.startswith("cuda"):
        metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    metrics["wall_time_s"] = time.perf_counter() - t0
    meta = environment_meta(seed=cfg.seed, device=device)
    meta["wall_time_s"] = metrics["wall_time_s"]
    payload = {"config": {**cfg.to_dict(), "chain": chain_cfg.to_dict()}, "history": result.history,
               "metrics": metrics, "meta": meta}
    if out_path is not None and me.is_main:
        payload = save_result(out_path, **payload)
    if ddp:
        torch.distributed.barrier()  # the result exists before any rank returns
    if saved is not None:  # give the shared base back untouched
        backend.tie_knot()  # a diverged run ends with its link untied; its values are overwritten just below
        base = backend.unwrap()
        base.load_state_dict(saved)
    print(f"[cola] {cfg.task} {cfg.method} seed={cfg.seed}: test_acc={metrics.get('test_acc')} "
          f"({metrics['wall_time_s']:.0f}s)")
    return payload

"""`LMRunConfig`: one fine-tuning run of a causal LM on a MeZO task (the unit of Tables 1/2/4 and Figure 3), and
the rules that turn it into a chain: `chain_config` (ChainConfig in optimizer steps; `chain_overrides` for the
ChainConfig fields an LM run does not own), `resolve_dtype` and `fold_mode` (how knots fold).

Light on purpose (torch and `cola_theory.config` only): command lines and job lists build configs without loading
transformers; the run itself is `cola_theory.lm.train.run_lm`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from cola_theory.config import ChainConfig, knots_from_epochs

METHODS = ("lora", "cola")
# torch.compile modes; "reduce-overhead" and "max-autotune" also capture CUDA graphs (on a CUDA device)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# ChainConfig fields an LM run sets through its own LMRunConfig fields (the name to use instead)
CHAIN_OWNED = {"total_steps": "epochs", "knots": "link_epochs", "n_links": "n_links", "rank": "rank",
               "alpha": "alpha", "lr": "lr", "lr_schedule": "lr_schedule", "optimizer_reset": "optimizer_reset",
               "weight_decay": "weight_decay", "seed": "seed"}
# the other ChainConfig fields: settable per LM run through LMRunConfig.chain_overrides
CHAIN_OVERRIDES = tuple(f.name for f in dataclasses.fields(ChainConfig) if f.name not in CHAIN_OWNED)
LOW_PRECISION = (torch.bfloat16, torch.float16)
# LMRunConfig fields that change the speed only (same math): they make no other variant of a run
SPEED_ONLY = ("compile", "pad_to_multiple_of", "compile_backend")


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


def epochs_per_link(epochs: float, n_links: int, link_epochs: tuple[float, ...] = ()) -> tuple[float, ...]:
    """The epochs of each link: `link_epochs` when given, else equal shares of `epochs`."""
    return tuple(link_epochs) or (float(epochs) / n_links,) * n_links


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
        T, knots = knots_from_epochs(epochs_per_link(self.epochs, self.n_links, self.link_epochs), steps_per_epoch)
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


def fold_mode(fp32_master: bool | None, weight_dtype: torch.dtype) -> tuple[bool, str]:
    """(use a float32 master copy, how knots fold) for adapted weights of `weight_dtype`; None = auto."""
    master = weight_dtype in LOW_PRECISION if fp32_master is None else fp32_master
    if master:
        return True, "float32 master copy"
    if weight_dtype in LOW_PRECISION:
        return False, f"in place {str(weight_dtype).removeprefix('torch.')}"
    return False, f"{str(weight_dtype).removeprefix('torch.')} weights"

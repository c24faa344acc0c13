"""`PeftChainBackend`: the `ChainBackend` protocol for a Hugging Face model with one PEFT LoRA adapter.

    W (frozen base weights of the target modules), link k = (B_k: (m, r_k), A_k: (r_k, n)), scale alpha/r_k

extend   first link: add the adapter (`add_chain_lora`); later links: re-draw A from
         `link_generator(seed, k)` and set B = 0 in place (a new rank: `rebuild_rank_` + a new optimizer)
step     one optimizer step on the link factors for the batch `batch_fn(t)` of step t
tie_knot W <- W + (alpha/r_k) B_k A_k in place (float32; optionally into a float32 master copy), B_k <- 0
reset_optimizer  the knot's policy on exactly the link factors

`batch_fn(t)` must depend only on t (and fixed data): that, the saved RNG state and the saved optimizer
state make a resumed run (see `state_dict` and `cola_theory.lm.checkpoint`) identical to an uninterrupted one.
`extra_state` carries the state of helpers (e.g. `cola_theory.lm.best_dev.BestDev`) in the same checkpoints.

ddp=True (torch.distributed initialised, e.g. by `cola_theory.lm.collectives.init_from_env`): forward/backward run
through a DistributedDataParallel wrapper, knots on the unwrapped model; every knot is checked to be bitwise
identical on all ranks; `batch_fn(t)` returns this rank's shard of the global batch (details: `collectives`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from cola_theory.config import ChainConfig, Link
from cola_theory.links import draw_generator, reset_generator, set_trainable_
from cola_theory.lm import collectives
from cola_theory.lm.checkpoint import (
    check_extra_state,
    extra_state_dict,
    load_extra_state,
    rng_tensors,
    set_rng_tensors,
)
from cola_theory.lm.lora_ops import (
    ADAPTER,
    DEFAULT_TARGETS,
    LinkFactors,
    add_chain_lora,
    base_weights,
    fold_,
    link_delta,
    link_parameters,
    lora_layers,
    make_master,
    rebuild_rank_,
    reinit_,
    trainable_link_parameters,
)
from cola_theory.lm.run_config import COMPILE_MODES
from cola_theory.optim import make_optimizer, reset_optimizer_state, set_lr

Tensor = torch.Tensor
STATE_FORMAT = 1
COMPILE_RECOMPILE_LIMIT = 64  # graphs per compiled forward: length buckets x train/eval x last-batch sizes


def move_to(batch: Any, device: torch.device | None) -> Any:
    """`batch` (tensor, mapping or sequence of them) on `device`."""
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({k: move_to(v, device) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def _json_config(cfg: ChainConfig) -> dict[str, Any]:
    return json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists, as stored in a checkpoint


class PeftChainBackend:
    """Chain of LoRA on a transformers model (OPT, Llama, ...) through PEFT, one persistent adapter.

    model: the plain (original) base model; the first `extend` wraps it, `self.model` is then the PeftModel.
    batch_fn(t) -> batch of step t; loss_fn(model, batch) -> scalar loss tensor; eval_fn(model) -> metrics.
    fp32_master: fold into float32 copies of the adapted weights (for bf16/fp16 bases, no rounding drift).
    autocast_dtype: e.g. torch.bfloat16 to run forward/backward under torch.autocast.
    keep_original: keep a CPU copy of the adapted weights W_0 (for `delta()` and export checks).
    compile: None (eager) or a torch.compile mode of `COMPILE_MODES`, applied in place to the adapted model
      (`nn.Module.compile`: same module, same state_dict keys, so checkpoints and export are unchanged).
      W, A and B enter the graph as inputs and knots fold / re-draw them in place, so a knot recompiles nothing
      and CUDA graphs (mode "reduce-overhead") replay over the same addresses; only a rank step-down recompiles.
      transformers' models specialise on the sequence length (measured: SmolLM2 / Llama recompile for every new
      length, ~20 s each), and CUDA graphs record one graph per shape: pad batches to a few lengths
      (`collate(pad_to_multiple_of=...)`, `LMRunConfig.pad_to_multiple_of`). Dynamo's recompile limit is raised
      to `COMPILE_RECOMPILE_LIMIT` (torch's default of 8 would silently fall back to eager after 8 lengths).
    compile_backend: torch.compile backend ("inductor"; "aot_eager" checks graph capture without code generation).
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: ChainConfig,
        batch_fn: Callable[[int], Any],
        loss_fn: Callable[[nn.Module, Any], Tensor],
        eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
        *,
        target_modules: Sequence[str] | str = DEFAULT_TARGETS,
        fp32_master: bool = False,
        max_grad_norm: float | None = None,
        autocast_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        lora_dropout: float = 0.0,
        keep_original: bool = True,
        ddp: bool = False,
        compile: str | None = None,
        compile_backend: str = "inductor",
    ) -> None:
        if isinstance(model, PeftModel):
            raise ValueError("model is already a PeftModel; pass the plain base model (the backend adds the adapter)")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={max_grad_norm!r} is invalid: need > 0 or None")
        if autocast_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast_dtype={autocast_dtype!r} is invalid: use None, torch.bfloat16, torch.float16")
        if compile is not None and compile not in COMPILE_MODES:
            raise ValueError(f"compile={compile!r} is invalid: use None (eager) or a torch.compile mode "
                             f"{COMPILE_MODES}")
        if ddp and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ValueError("ddp=True needs an initialised torch.distributed process group: launch with torchrun "
                             "(or accelerate launch) and call cola_theory.lm.collectives.init_from_env() first")
        self.device = torch.device(device) if device is not None else None
        self.model: nn.Module = model if self.device is None else model.to(self.device)
        self.cfg, self.batch_fn, self.loss_fn, self.eval_fn = cfg, batch_fn, loss_fn, eval_fn
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
        self.fp32_master, self.max_grad_norm, self.autocast_dtype = fp32_master, max_grad_norm, autocast_dtype
        self.lora_dropout, self.keep_original = lora_dropout, keep_original
        self.optimizer: torch.optim.Optimizer | None = None
        self.master: dict[str, Tensor] | None = None
        self.original: dict[str, Tensor] = {}  # W_0 of the adapted layers, CPU, original dtype
        self.links: list[dict[str, Any]] = []  # tied links: {"index", "rank", "factors": LinkFactors}
        self.t, self.link, self.rank, self.active = 0, -1, 0, False
        self.ddp, self.mean_loss = ddp, ddp  # mean_loss: the reported step loss is the mean over ranks
        self.wrapped: nn.Module | None = None  # the DDP wrapper (forward/backward only)
        self.compile, self.compile_backend = compile, compile_backend
        # name -> object with state_dict() -> {"meta": JSON-able, "tensors": {...}} and load_state_dict(state):
        # saved in (and restored from) this backend's checkpoints
        self.extra_state: dict[str, Any] = {}

    # -- setup -------------------------------------------------------------------------------------
    def _attach(self, rank: int) -> None:
        """Wrap the base model in the chain's adapter and remember W_0 (and the float32 master)."""
        self.model = add_chain_lora(self.model, rank, self.cfg.alpha, self.target_modules, self.lora_dropout)
        if self.keep_original:
            self.original = {n: w.detach().cpu().clone() for n, w in base_weights(self.model).items()}
        if self.fp32_master:
            self.master = make_master(self.model)
        if self.compile is not None:
            import torch._dynamo.config as dynamo_config

            limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"  # torch<2.6
            setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), COMPILE_RECOMPILE_LIMIT))
            mode = None if self.compile == "default" else self.compile
            self.model.compile(mode=mode, backend=self.compile_backend)
        self.rank = rank

    @property
    def cudagraphs(self) -> bool:
        """True when the compiled model replays CUDA graphs (a compile mode that captures them, on CUDA)."""
        captures = self.compile in ("reduce-overhead", "max-autotune") or self.compile_backend == "cudagraphs"
        dev = self.device or next(self.model.parameters()).device
        return self.compile is not None and captures and torch.device(dev).type == "cuda"

    @property
    def layer_names(self) -> list[str]:
        return [name for name, _ in lora_layers(self.model)]

    def _sync(self) -> None:
        """DDP: check that W, A, B are bitwise identical on all ranks, then (re)build the DDP wrapper if needed."""
        bad = collectives.replica_mismatches(self.model)
        if bad:
            raise RuntimeError(f"link {self.link}: tensors differ between ranks after a knot: {bad[:4]} "
                               f"({len(bad)} in all); every rank must load the same base model and config")
        if self.wrapped is None:
            dev = next(self.model.parameters()).device
            self.wrapped = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[dev.index] if dev.type == "cuda" else None)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        dev = self.device or next(self.model.parameters()).device
        return torch.autocast(device_type=dev.type, dtype=self.autocast_dtype)

    # -- the five verbs ----------------------------------------------------------------------------
    def extend(self, link: Link) -> None:
        """Start link k: A_k drawn from link_generator(seed, k) (k = 0 without fresh_init), B_k = 0."""
        if not isinstance(self.model, PeftModel):
            self._attach(link.rank)
        elif link.rank != self.rank:  # rank step-down: new tensors, hence a new optimizer (a full reset)
            rebuild_rank_(self.model, link.rank, self.master)
            self.rank, self.optimizer, self.wrapped = link.rank, None, None
        self._draw(draw_generator(self.cfg.seed, link.index, self.cfg.fresh_init))
        if self.ddp:
            self._sync()
        if self.optimizer is None:
            self.optimizer = make_optimizer(trainable_link_parameters(self.model), self.cfg)
        self.link, self.active = link.index, True

    def step(self, lr: float) -> float:
        """One optimizer step on the link factors for batch_fn(t); returns the minibatch loss."""
        if self.optimizer is None:
            raise RuntimeError("step() before extend(): the chain has no link yet")
        batch = move_to(self.batch_fn(self.t), self.device)
        model = self.model if self.wrapped is None else self.wrapped
        model.train()
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        if self.cudagraphs:  # a new training iteration: the previous replay's outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with self._autocast():
            loss = self.loss_fn(model, batch)
        loss.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable_link_parameters(self.model), self.max_grad_norm)
        self.optimizer.step()
        self.t += 1
        if self.mean_loss:  # the same value on every rank, so all ranks stop together on a non-finite loss
            loss = collectives.all_reduce_mean(loss.detach())
        # on a GPU the loss stays on the device: run_chain reads it every log_every steps (no sync per step)
        return loss.detach() if loss.is_cuda else float(loss.detach())

    def tie_knot(self) -> None:
        """W <- W + (alpha/r) B A for the active link, and record (B, A, scale) for export."""
        if not self.active:
            return  # already tied (e.g. the final knot after a run restored at its end)
        self.links.append({"index": self.link, "rank": self.rank, "factors": self._fold()})
        self.active = False
        if self.ddp:
            self._sync()

    def _draw(self, generator: torch.Generator) -> None:
        """Write the new link's values into the adapter (`cola_theory.links.new_link` rule, in place)."""
        reinit_(self.model, generator, self.cfg.init, self.cfg.frozen_factor, self.cfg.init_std)

    def _fold(self) -> LinkFactors:
        """W <- W + (alpha/r) B A, B <- 0, in place; returns the tied link's factors."""
        return fold_(self.model, self.master)

    def reset_optimizer(self, policy: str) -> dict[str, float]:
        if self.optimizer is None:
            return {"reset_fraction": 0.0, "reset_params": 0.0}
        g = reset_generator(self.cfg.seed, self.link)  # random:p pruning, same on every process
        return reset_optimizer_state(self.optimizer, link_parameters(self.model), policy, g)

    def evaluate(self) -> dict[str, float]:
        if self.eval_fn is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self._autocast():
                return dict(self.eval_fn(self.model))
        finally:
            self.model.train(was_training)

    # -- inspection --------------------------------------------------------------------------------
    def link_parameters(self) -> list[nn.Parameter]:
        """The current link's factors [A_1, B_1, ...] (frozen ones included)."""
        return link_parameters(self.model)

    def unwrap(self) -> nn.Module:
        """The plain transformers model with the adapter removed (no merge: W keeps the tied links)."""
        if isinstance(self.model, PeftModel):
            if self.active:
                raise ValueError("the active link is not tied; call tie_knot() (run_chain does) before unwrap()")
            self.model = self.model.unload()
            self.optimizer, self.master, self.wrapped = None, None, None
        return self.model

    def delta(self) -> dict[str, Tensor]:
        """W - W_0 per adapted layer (float32, CPU), tied links plus the active link."""
        if not self.original:
            raise ValueError("delta() needs the W_0 copy: construct the backend with keep_original=True")
        out = {}
        for name, layer in lora_layers(self.model):
            W = layer.get_base_layer().weight.detach().float().cpu()
            A, B = layer.lora_A[ADAPTER].weight.detach().cpu(), layer.lora_B[ADAPTER].weight.detach().cpu()
            active = link_delta(B, A, layer.scaling[ADAPTER], layer.fan_in_fan_out)
            out[name] = W - self.original[name].float() + active
        return out

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """{"meta": JSON-able, "tensors": flat name -> tensor, "optimizer": optimizer.state_dict()}.

        Only the target modules' base weights change in a chain, so only those are saved (as now folded);
        a restore needs the same original base model.
        """
        if not isinstance(self.model, PeftModel):
            raise RuntimeError("state_dict() before the first extend(): nothing to save yet")
        tensors = rng_tensors()
        if self.ddp:
            tensors.update(collectives.gather_rng_states())  # every rank's dropout stream (collective)
        for name, layer in lora_layers(self.model):
            tensors[f"base/{name}"] = layer.get_base_layer().weight.detach()
            tensors[f"lora/{name}/A"] = layer.lora_A[ADAPTER].weight.detach()
            tensors[f"lora/{name}/B"] = layer.lora_B[ADAPTER].weight.detach()
            if self.master is not None:
                tensors[f"master/{name}"] = self.master[name]
        links_meta = []
        for k, rec in enumerate(self.links):
            links_meta.append({"index": rec["index"], "rank": rec["rank"],
                               "scales": {n: f[2] for n, f in rec["factors"].items()}})
            for n, (B, A, _) in rec["factors"].items():
                tensors[f"links/{k}/{n}/B"], tensors[f"links/{k}/{n}/A"] = B, A
        meta = {"format": STATE_FORMAT, "t": self.t, "link": self.link, "rank": self.rank, "active": self.active,
                "links": links_meta, "layers": self.layer_names, "fp32_master": self.master is not None,
                "config": _json_config(self.cfg)}
        if self.extra_state:
            meta["extra_state"] = extra_state_dict(self.extra_state, tensors)
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
        return {"meta": meta, "tensors": tensors, "optimizer": self.optimizer.state_dict()}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict()` into this backend (built on the same ORIGINAL base model and config)."""
        meta, tensors = state["meta"], state["tensors"]
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"checkpoint format={meta.get('format')!r} is not {STATE_FORMAT}; it cannot be restored")
        mine = _json_config(self.cfg)
        diff = sorted(k for k in set(mine) | set(meta["config"]) if mine.get(k) != meta["config"].get(k))
        if diff:
            k = diff[0]
            raise ValueError(f"checkpoint was written with ChainConfig.{k}={meta['config'].get(k)!r} but this run "
                             f"has {mine.get(k)!r} (differing fields: {diff}); use the same config to resume")
        if meta["fp32_master"] != self.fp32_master:
            raise ValueError(f"checkpoint has fp32_master={meta['fp32_master']}; construct the backend with the same")
        extras = meta.get("extra_state", {})
        check_extra_state(extras, self.extra_state, "backend")
        if not isinstance(self.model, PeftModel):
            self._attach(meta["rank"])  # captures W_0 from the (original) base before it is overwritten
        elif meta["rank"] != self.rank:
            rebuild_rank_(self.model, meta["rank"], self.master)
            self.rank, self.wrapped = meta["rank"], None
        if self.layer_names != meta["layers"]:
            raise ValueError("checkpoint adapts other layers than this model/target_modules "
                             f"({meta['layers'][:2]}... vs {self.layer_names[:2]}...)")
        for name, layer in lora_layers(self.model):
            layer.get_base_layer().weight.copy_(tensors[f"base/{name}"])
            layer.lora_A[ADAPTER].weight.copy_(tensors[f"lora/{name}/A"])
            layer.lora_B[ADAPTER].weight.copy_(tensors[f"lora/{name}/B"])
            if self.master is not None:
                self.master[name].copy_(tensors[f"master/{name}"])
            set_trainable_(layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight, self.cfg.frozen_factor)
        self.links = []
        for k, lm in enumerate(meta["links"]):
            factors: LinkFactors = {n: (tensors[f"links/{k}/{n}/B"].float(), tensors[f"links/{k}/{n}/A"].float(), s)
                                    for n, s in lm["scales"].items()}
            self.links.append({"index": lm["index"], "rank": lm["rank"], "factors": factors})
        self.optimizer = make_optimizer(trainable_link_parameters(self.model), self.cfg)
        self.optimizer.load_state_dict(state["optimizer"])
        set_rng_tensors(tensors)
        self.t, self.link, self.active = meta["t"], meta["link"], meta["active"]
        load_extra_state(self.extra_state, extras, tensors)
        if self.ddp:
            collectives.set_rng_states(tensors)
            self._sync()

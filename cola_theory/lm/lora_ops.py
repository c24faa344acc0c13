"""In-place Chain-of-LoRA primitives on a PEFT LoRA adapter: tie a knot, re-draw a link, change its rank.

Each adapted layer computes  h = W x + (alpha/r) B A x,  W: (m, n) frozen, B: (m, r), A: (r, n).

    fold_    tie a knot:  W <- W + (alpha/r) B A  (float32 arithmetic), then B <- 0   (function-preserving)
    reinit_  extend the chain: A ~ kaiming/gaussian from a seeded generator, B = 0   (function-preserving)
    rebuild_rank_  a link of a different rank (rank step-down): new A/B tensors (the optimizer must be rebuilt)

fold_ and reinit_ write values into the existing Parameter objects instead of replacing them, so an optimizer,
DDP and the HF Trainer that hold those objects stay valid. PEFT's `merge_adapter` + `delete_adapter` is not
used: deleting a merged adapter raises on PEFT 0.21 (peft#3504). Only vanilla LoRA on dense weights is supported
(no DoRA, no quantized bases). Sharded weights (FSDP, ZeRO-3) need the fold where the shards are gathered or
kept: `cola_theory.lm.fsdp` and the notes in `cola_theory.lm.distributed`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from cola_theory.config import check_ranks
from cola_theory.links import new_link, set_trainable_

Tensor = torch.Tensor
ADAPTER = "default"  # the chain lives in one persistent PEFT adapter
DEFAULT_TARGETS = ("q_proj", "v_proj")  # the paper / MeZO LoRA setting (r=8, alpha=16)

# a tied link as recorded for export: layer name -> (B (m, r), A (r, n), scale alpha/r), CPU float32
LinkFactors = dict[str, tuple[Tensor, Tensor, float]]


def add_chain_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    target_modules: Sequence[str] | str = DEFAULT_TARGETS,
    dropout: float = 0.0,
) -> PeftModel:
    """Wrap `model` in a PEFT LoRA adapter (B = 0, A = PEFT's kaiming draw) that the chain re-uses.

    The base biases (OPT's q/v bias) stay in the base layer; the adapter has none (`bias="none"`).
    bf16/fp16 bases get float32 adapters (PEFT's `autocast_adapter_dtype=True`).
    """
    if isinstance(model, PeftModel):
        raise ValueError("model is already a PeftModel; pass the plain base model to add_chain_lora")
    check_ranks(rank)
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha={alpha!r} is invalid: need a finite number > 0 (e.g. 16)")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout!r} is invalid: need 0 <= dropout < 1")
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    if not targets:
        raise ValueError("target_modules=[] is empty: name the linear layers to adapt, e.g. ['q_proj', 'v_proj']")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout, bias="none")
    try:
        with warnings.catch_warnings():  # PEFT 0.21.2 reads transformers 5.x's deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise ValueError(f"target_modules={targets!r}: {exc}") from exc
    for name, layer in lora_layers(peft_model):
        check_ranks(rank, min(layer.in_features, layer.out_features), of=f"the adapted layer {name}")
    return peft_model


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """The adapted layers, in module order (the order every draw and record uses)."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            if ADAPTER in getattr(module, "lora_variant", {}):
                raise ValueError(f"layer {name} uses a LoRA variant (e.g. DoRA); the chain folds vanilla LoRA only")
            if not isinstance(module.get_base_layer(), nn.Linear) and not module.fan_in_fan_out:
                raise ValueError(f"layer {name} adapts {type(module.get_base_layer()).__name__}; "
                                 "the chain folds dense nn.Linear (or GPT-2 Conv1D) layers only")
            out.append((name, module))
    if not out:
        raise ValueError(f"model {type(model).__name__} has no LoRA adapter {ADAPTER!r}; call add_chain_lora first")
    return out


def link_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The link's factors [A_1, B_1, A_2, B_2, ...] in module order (PEFT's own parameter order)."""
    params = []
    for _, layer in lora_layers(model):
        params += [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight]
    return params


def trainable_link_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The link factors the optimizer updates (a frozen factor of RAC-LoRA is left out)."""
    return [p for p in link_parameters(model) if p.requires_grad]


def make_master(model: nn.Module) -> dict[str, Tensor]:
    """float32 copies of the adapted base weights W (the fold's accumulator for bf16/fp16 bases)."""
    return {name: layer.get_base_layer().weight.detach().float().clone() for name, layer in lora_layers(model)}


def base_weights(model: nn.Module) -> dict[str, Tensor]:
    """The adapted base weights W themselves (views, not copies), by layer name."""
    return {name: layer.get_base_layer().weight for name, layer in lora_layers(model)}


def link_delta(B: Tensor, A: Tensor, scale: float, fan_in_fan_out: bool = False) -> Tensor:
    """A knot's update (alpha/r) B A, B: (m, r), A: (r, n), in float32 whatever their dtype, laid out as W is:
    (m, n), or (n, m) for a fan-in-fan-out layer (GPT-2's Conv1D stores W transposed)."""
    delta = scale * (B.float() @ A.float())
    return delta.T if fan_in_fan_out else delta


def _delta(layer: LoraLayer) -> Tensor:
    A, B = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight  # (r, n), (m, r)
    return link_delta(B, A, layer.scaling[ADAPTER], layer.fan_in_fan_out)


@torch.no_grad()
def fold_(model: nn.Module, master: dict[str, Tensor] | None = None) -> LinkFactors:
    """Tie a knot in place: W <- W + (alpha/r) B A, then B <- 0, so the model's function is unchanged.

    The update is computed in float32. Without `master` it is added to W in float32 and rounded once to
    W's dtype; with `master` (float32 copies of W, see `make_master`) it is added to the master, which is
    then copied into W, so a bf16/fp16 base accumulates no rounding error across knots.
    Returns the tied link {layer name: (B, A, scale)} as CPU float32 copies (for export).
    """
    tied: LinkFactors = {}
    for name, layer in lora_layers(model):
        A, B = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        W = layer.get_base_layer().weight  # (m, n)
        delta = _delta(layer)
        if master is not None:
            if name not in master or master[name].shape != W.shape:
                raise ValueError(f"master has no float32 copy of {name} with shape {tuple(W.shape)}; "
                                 "build it with make_master(model) after add_chain_lora")
            master[name].add_(delta.to(master[name].device))
            W.copy_(master[name])
        else:
            W.copy_(W.float() + delta.to(W.device))
        tied[name] = (B.detach().float().cpu().clone(), A.detach().float().cpu().clone(), layer.scaling[ADAPTER])
        B.zero_()  # the tied link no longer contributes; reinit_ draws the next one
    return tied


@torch.no_grad()
def reinit_(
    model: nn.Module,
    generator: torch.Generator,
    init: str = "kaiming",
    frozen_factor: str = "none",
    init_std: float | None = None,
) -> None:
    """Extend the chain in place: a fresh link with A random (drawn from `generator`) and B = 0.

    frozen_factor "A" (RAC-LoRA): the same draw, A frozen, only B trained; "B": B random and frozen,
    A = 0 and trained (`cola_theory.links.new_link`). The Parameter objects are kept; only values and
    requires_grad change. Draws are made on CPU in float32 in module order, so every process with the same
    generator gets the same link.
    """
    for _, layer in lora_layers(model):
        A, B = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight  # (r, n), (m, r)
        a, b = new_link(tuple(A.shape), tuple(B.shape), layer.r[ADAPTER], generator, init, init_std, frozen_factor)
        A.copy_(a)
        B.copy_(b)
        set_trainable_(A, B, frozen_factor)


def _empty_linear(n_in: int, n_out: int, like: Tensor) -> nn.Linear:
    # meta then to_empty: no draw from the global RNG (keeps a resumed run's RNG stream identical)
    lin = nn.Linear(n_in, n_out, bias=False, device="meta", dtype=like.dtype).to_empty(device=like.device)
    nn.init.zeros_(lin.weight)
    return lin


@torch.no_grad()
def rebuild_rank_(model: PeftModel, rank: int, master: dict[str, Tensor] | None = None) -> LinkFactors:
    """Change the link rank (rank step-down, e.g. 8 -> 2): fold the current link, then new A, B of rank `rank`.

    The A/B Parameters are new objects, so an optimizer holding the old ones must be rebuilt (and DDP
    re-wrapped). The new link is zero (A = B = 0) until `reinit_`. Returns the fold's record (B = 0 if the
    knot was already tied, as in the chain backend).
    """
    check_ranks(rank)
    layers = lora_layers(model)
    for name, layer in layers:
        check_ranks(rank, min(layer.in_features, layer.out_features), of=f"the adapted layer {name}")
        if layer.use_rslora.get(ADAPTER, False):
            raise ValueError(f"layer {name} uses rsLoRA scaling; the chain supports alpha/r scaling only")
    tied = fold_(model, master)
    for _, layer in layers:
        A, B = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        layer.lora_A[ADAPTER] = _empty_linear(layer.in_features, rank, like=A)  # A: (r, n)
        layer.lora_B[ADAPTER] = _empty_linear(rank, layer.out_features, like=B)  # B: (m, r)
        layer.r[ADAPTER] = rank
        layer.scaling[ADAPTER] = layer.lora_alpha[ADAPTER] / rank
    if hasattr(model, "peft_config"):
        model.peft_config[ADAPTER].r = rank
    return tied

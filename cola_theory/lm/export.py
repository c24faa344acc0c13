"""Export a finished chain as ordinary PEFT LoRA adapters on the ORIGINAL base model.

A chain of m tied links changes each adapted weight by  W_T - W_0 = sum_k (alpha/r_k) B_k A_k.
That sum is itself one LoRA of rank R = sum_k r_k (PEFT's `add_weighted_adapter(combination_type="cat")`):

    B_cat = [B_1 | B_2 | ... | B_m]                        (m_out, R)
    A_cat = [s_1 A_1 ; s_2 A_2 ; ... ; s_m A_m]            (R, n),  s_k = alpha / r_k
    lora_alpha = R, so PEFT's scale is 1 and  B_cat A_cat = W_T - W_0  exactly (up to float32 rounding).

`export_chain` writes that adapter (adapter_config.json + adapter_model.safetensors, the files
`PeftModel.save_pretrained` writes, loadable with `PeftModel.from_pretrained(original_base, path)`), each
link as its own adapter in `link_<k>/`, and `chain.json` describing the links. The files are written
directly from the recorded factors, so no model has to be wrapped (and no RNG is consumed) to export.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from torch import nn

from cola_theory.lm.lora_ops import LinkFactors
from cola_theory.results import atomic_write_text

Tensor = torch.Tensor
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model


def _factors(link: Mapping[str, Any] | LinkFactors) -> LinkFactors:
    return link["factors"] if "factors" in link else link  # a backend record or a bare fold_ result


def concat_links(links: Sequence[Mapping[str, Any] | LinkFactors]) -> dict[str, tuple[Tensor, Tensor]]:
    """{layer: (B_cat (m, R), A_cat (R, n))} with B_cat A_cat = sum_k (alpha/r_k) B_k A_k."""
    if not links:
        raise ValueError("links=[] is empty: tie at least one knot (run_chain folds the last link at the end)")
    names = list(_factors(links[0]))
    out = {}
    for name in names:
        Bs, As = [], []
        for k, link in enumerate(links):
            f = _factors(link)
            if name not in f:
                raise ValueError(f"link {k} has no factors for layer {name}; all links must adapt the same layers")
            B, A, s = f[name]
            Bs.append(B.float())  # (m, r_k)
            As.append(s * A.float())  # (r_k, n), pre-scaled so the exported scale is 1
        out[name] = (torch.cat(Bs, dim=1).contiguous(), torch.cat(As, dim=0).contiguous())
    return out


def _module_key(name: str) -> str:
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def write_adapter(
    directory: str | os.PathLike,
    factors: Mapping[str, tuple[Tensor, Tensor]],
    rank: int,
    lora_alpha: float,
    *,
    base_model_name_or_path: str | None = None,
    fan_in_fan_out: bool = False,
) -> Path:
    """Write one PEFT LoRA adapter {layer: (B (m, r), A (r, n))} in `save_pretrained`'s format (safetensors).

    target_modules lists the adapted modules by their full names, so the adapter lands exactly on the
    layers the chain adapted and nowhere else.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(
        r=rank, lora_alpha=lora_alpha, target_modules=sorted(_module_key(n) for n in factors), bias="none",
        base_model_name_or_path=base_model_name_or_path, fan_in_fan_out=fan_in_fan_out,
    )
    config.save_pretrained(str(directory))
    tensors = {}
    for name, (B, A) in factors.items():
        if B.shape[1] != rank or A.shape[0] != rank:
            raise ValueError(f"layer {name}: B {tuple(B.shape)} and A {tuple(A.shape)} do not have rank={rank}")
        tensors[f"{PREFIX}{_module_key(name)}.lora_A.weight"] = A.detach().cpu().contiguous()
        tensors[f"{PREFIX}{_module_key(name)}.lora_B.weight"] = B.detach().cpu().contiguous()
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory


def export_chain(
    links: Sequence[Mapping[str, Any] | LinkFactors],
    directory: str | os.PathLike,
    *,
    per_link: bool = True,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write the chain as ONE exact adapter of rank sum(r_k) in `directory` (+ `link_<k>/` per link, + chain.json).

    links: the backend's `links` record (or `ColaCallback.links`), in chain order.
    Load with `PeftModel.from_pretrained(original_base, directory)` (the ORIGINAL base weights W_0, not the
    folded ones; `original_base(backend)` rebuilds them from the backend's copy).
    """
    directory = Path(directory)
    cat = concat_links(links)
    total_rank = next(iter(cat.values()))[1].shape[0]  # R = sum_k r_k
    write_adapter(directory, cat, total_rank, float(total_rank), base_model_name_or_path=base_model_name_or_path)
    described = []
    for k, link in enumerate(links):
        f = _factors(link)
        B0, _, s = next(iter(f.values()))
        r = B0.shape[1]
        index = link.get("index", k) if "factors" in link else k
        entry = {"index": index, "rank": r, "scale": s, "lora_alpha": s * r}
        if per_link:
            sub = f"link_{index}"
            # lora_alpha = s_k r_k so PEFT's scale lora_alpha / r equals the link's alpha / r_k
            write_adapter(directory / sub, {n: (B, A) for n, (B, A, _) in f.items()}, r, s * r,
                          base_model_name_or_path=base_model_name_or_path)
            entry["subfolder"] = sub
        described.append(entry)
    atomic_write_text(directory / "chain.json", json.dumps(
        {"rank": total_rank, "lora_alpha": float(total_rank), "links": described,
         "note": "adapter in this folder = all links concatenated (exact); link_<k>/ = one link each"}, indent=1))
    return directory


def export_backend(backend: Any, directory: str | os.PathLike, **kwargs: Any) -> Path:
    """`export_chain(backend.links, directory)`; the active link must be tied first (run_chain does it)."""
    if getattr(backend, "active", False):
        raise ValueError("the backend has an untied active link; call backend.tie_knot() (run_chain does) first")
    return export_chain(backend.links, directory, **kwargs)


@torch.no_grad()
def original_base(backend: Any) -> nn.Module:
    """The ORIGINAL base model rebuilt from a finished backend: adapter removed, W_0 copied back.

    Destroys the backend's model (its folded weights are overwritten); call it after exporting.
    """
    if not getattr(backend, "original", None):
        raise ValueError("the backend kept no W_0 copy: construct it with keep_original=True, or load the base again")
    base = backend.model.unload()  # removes the LoRA layers, no merge
    modules = dict(base.named_modules())
    for name, W0 in backend.original.items():
        modules[_module_key(name)].weight.copy_(W0)
    backend.model = base
    return base

"""Chain of LoRA on Hugging Face models (PEFT LoRA): in-place knots, the chain backend, a Trainer callback,
export and checkpoints. transformers/peft are imported only when a name below is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "lora_ops": ["add_chain_lora", "fold_", "link_parameters", "lora_layers", "make_master", "rebuild_rank_",
                 "reinit_", "trainable_link_parameters"],
    "backend": ["PeftChainBackend"],
    "callback": ["ColaCallback"],
    "export": ["concat_links", "export_backend", "export_chain", "original_base", "write_adapter"],
    "checkpoint": ["KnotCheckpointer", "verify"],
    "packed": ["PackedChainBackend"],
    "packed_train": ["run_lm_packed"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'cola_theory.lm' has no attribute {name!r}")
    return getattr(importlib.import_module(f"cola_theory.lm.{_WHERE[name]}"), name)

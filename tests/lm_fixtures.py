"""Tiny OPT / Llama models built from config objects (no hub downloads) and deterministic token batches.

Importable by any test: `from lm_fixtures import tiny_model, batch_fn, lm_loss` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# the real SST-2 / SuperGLUE files (CI has them): $COLA_DATA_DIR, else ../shared/data beside the repository
DATA_DIR = Path(os.environ.get("COLA_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_data = pytest.mark.skipif(not (DATA_DIR / "sst2" / "train.jsonl").exists(),
                                reason="benchmark data absent: set COLA_DATA_DIR=/path/to/shared/data")

VOCAB = 128
# tiny models gain nothing from intra-op threads, and on a busy 2-core runner OpenMP spin-waiting made
# a forward/backward ~40x slower (0.36 s vs 0.009 s measured); one thread keeps every test in seconds
torch.set_num_threads(1)


def tiny_model(kind: str = "opt", seed: int = 0, dtype: torch.dtype = torch.float32, dropout: float = 0.0):
    """A random 2-layer model (hidden 32, 4 heads) with the paper models' q_proj / v_proj names."""
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    if kind == "opt":
        cfg = OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                        max_position_embeddings=64, word_embed_proj_dim=32, dropout=dropout,
                        attention_dropout=dropout, pad_token_id=1, bos_token_id=2, eos_token_id=2)
        model = OPTForCausalLM(cfg)
    elif kind == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                          attention_dropout=dropout, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = LlamaForCausalLM(cfg)
    else:
        raise ValueError(kind)
    return model.to(dtype)


def batch_fn(seed: int = 0, batch: int = 4, seq: int = 12):
    """t -> the batch of step t (a function of (seed, t) only, as resumable runs need)."""

    def fn(t: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(10_000 * seed + t)
        ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    return fn


def lm_loss(model, batch) -> torch.Tensor:
    return model(**batch, labels=batch["input_ids"]).loss


def probe_ids(seed: int = 123, batch: int = 3, seq: int = 10) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids: torch.Tensor | None = None) -> torch.Tensor:
    was = model.training
    model.eval()
    out = model(input_ids=probe_ids() if ids is None else ids).logits.float()
    model.train(was)
    return out

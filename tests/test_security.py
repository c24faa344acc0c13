"""Security: no unpickling of untrusted files (source scan + a checkpoint carrying a code-running pickle is refused),
and paths taken from configs stay inside the output directory."""

import io
import json
import os
import re
from pathlib import Path

import pytest
import torch
from lm_fixtures import batch_fn, lm_loss, tiny_model

from cola_theory.chain import run_chain
from cola_theory.config import ChainConfig
from cola_theory.lm.backend import PeftChainBackend
from cola_theory.lm.checkpoint import KnotCheckpointer, _sha256
from cola_theory.lm.train import LMRunConfig, run_lm
from cola_theory.paths import safe_join
from cola_theory.results import CorruptResultError

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for pkg in ("cola_theory", "paper_repro") for p in (ROOT / pkg).rglob("*.py"))

FORBIDDEN = [  # pattern, why
    (r"\bimport\s+(c?pickle|dill|cloudpickle|shelve|marshal)\b|\bfrom\s+(c?pickle|dill|shelve)\b",
     "unpickling modules run code from the file"),
    (r"(?<![\w.])(eval|exec)\s*\(", "eval/exec of text"),
    (r"allow_pickle\s*=\s*True", "numpy pickles"),
    (r"\byaml\.load\s*\(", "yaml.load without SafeLoader (use yaml.safe_load)"),
    (r"\btrust_remote_code\s*=\s*True", "runs code downloaded with a model"),
]


def _calls(text: str, name: str) -> list[str]:
    """The argument text of every call `name(...)` (balanced parentheses)."""
    out = []
    for m in re.finditer(re.escape(name) + r"\s*\(", text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        out.append(text[m.end():i - 1])
    return out


def test_sources_hold_no_unsafe_deserialisation():
    assert len(SOURCES) > 20
    problems = []
    for path in SOURCES:
        text = path.read_text()
        for pattern, why in FORBIDDEN:
            for m in re.finditer(pattern, text):
                line = text[:m.start()].count("\n") + 1
                problems.append(f"{path.relative_to(ROOT)}:{line}: {m.group(0)!r} ({why})")
        for args in _calls(text, "torch.load"):
            if not re.search(r"weights_only\s*=\s*True", args):
                problems.append(f"{path.relative_to(ROOT)}: torch.load({args}) without weights_only=True")
    assert not problems, "\n".join(problems)


def test_the_scan_itself_finds_what_it_looks_for():  # so that an empty result above means something
    bad = "import pickle\nx = eval('1')\ntorch.load(f, map_location='cpu')\nm.eval()\ntorch.load(f, weights_only=True)\n"
    hits = [p for p, _ in FORBIDDEN if re.search(p, bad)]
    assert len(hits) == 2
    assert [a for a in _calls(bad, "torch.load") if "weights_only=True" not in a] == ["f, map_location='cpu'"]


class Evil:
    """Unpickling this object would create a file (a stand-in for running any command)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture()
def checkpointed(tmp_path):
    cfg = ChainConfig(total_steps=4, n_links=2, rank=2, alpha=4.0, lr=1e-2)
    b = PeftChainBackend(tiny_model("opt"), cfg, batch_fn(), lm_loss, target_modules=["q_proj"])
    ck = KnotCheckpointer(tmp_path / "ck", every_steps=2, keep=2, log=lambda s: None)
    run_chain(b, cfg, checkpointer=ck)
    return cfg, ck


def _forge(ckpt_dir: Path, name: str, data: bytes) -> None:
    """Replace one file and fix the manifest's sha256, as an attacker who controls the directory would."""
    (ckpt_dir / name).write_bytes(data)
    manifest = json.loads((ckpt_dir / "manifest.json").read_text())
    manifest["files"][name] = _sha256(ckpt_dir / name)
    (ckpt_dir / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("target", ["optimizer.pt", "tensors.safetensors"])
def test_a_checkpoint_with_a_code_running_pickle_is_refused(checkpointed, tmp_path, target):
    cfg, ck = checkpointed
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"state": {0: Evil(str(marker))}, "param_groups": []}, buf)
    newest = ck.checkpoints()[0]
    _forge(newest, target, buf.getvalue())
    with pytest.raises(CorruptResultError, match=f"checkpoint {newest} is unreadable"):
        ck.load(newest)
    logs = []
    b = PeftChainBackend(tiny_model("opt"), cfg, batch_fn(), lm_loss, target_modules=["q_proj"])
    restored = KnotCheckpointer(ck.directory, every_steps=2, log=logs.append).restore(b)
    assert not marker.exists()  # the payload never ran
    assert restored is not None and restored[0] == 2  # fell back to the older, intact checkpoint
    assert "is unreadable" in logs[0] and (ck.directory / f"corrupt-{newest.name}").is_dir()


def test_the_payload_is_live_so_the_refusal_matters(tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save(Evil(str(marker)), buf)
    buf.seek(0)
    torch.load(buf, weights_only=False).close()  # the unsafe loader runs it (here, on purpose)
    assert marker.exists()


@pytest.mark.parametrize("relative, ok", [
    ("lm/run-1.json", True), ("a/../b.json", True), ("facebook_opt-1.3b/rte/x.json", True),
    ("/etc/passwd", False), ("../escape.json", False), ("lm/../../escape.json", False), ("", False),
    ("a\x00b", False), ("C:\\results\\x.json", False), ("~/../../etc", False), ("~/x.json", True),
])
def test_safe_join_keeps_paths_inside(tmp_path, relative, ok):
    root = tmp_path / "out"
    root.mkdir()
    if ok:
        got = safe_join(root, relative)
        assert root.resolve() in got.parents
    else:
        with pytest.raises(ValueError, match=re.escape(repr(relative)[1:-1]) if relative else "empty"):
            safe_join(root, relative, what="LMRunConfig.task")


def test_safe_join_follows_symlinks_out(tmp_path):
    root, outside = tmp_path / "out", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / "link")
    with pytest.raises(ValueError, match="escapes the output directory"):
        safe_join(root, "link/result.json", what="checkpoint name")
    assert safe_join(root, "link2/result.json") == root.resolve() / "link2" / "result.json"


@pytest.mark.parametrize("kw", [{"out_path": "../escape.json"}, {"checkpoint_dir": "/tmp/elsewhere"},
                                {"out_path": "lm/../../../escape.json"}])
def test_run_lm_refuses_paths_outside_results_root(tmp_path, kw):
    root = tmp_path / "results"
    root.mkdir()
    name = next(iter(kw))
    with pytest.raises(ValueError, match=f"{name}=.*(escapes the output directory|is outside results_root)"):
        run_lm(LMRunConfig(model="tiny-opt", task="rte"), results_root=root,
               data_dir=str(ROOT / "tests" / "fixtures" / "superglue"), **kw)
    assert not (tmp_path / "escape.json").exists() and list(root.iterdir()) == []

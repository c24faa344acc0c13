"""Run a list of `LMJob`s: skip valid results, resume from checkpoints, share one loaded model per model name.

Per job: result file valid and made with the same config -> skipped; else `run_lm` with
`checkpoint_dir=results/lm/checkpoints/<job id>` (a killed run resumes from its last knot checkpoint), which is
deleted after the result is written. A task whose data is missing locally is skipped with the reason; a job that
raises is reported as failed and the others still run. The base model of all jobs of one model name is loaded
once and handed to `run_lm` as `model_bundle` (it restores the base weights after each run).
"""

from __future__ import annotations

import gc
import json
import shutil
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cola_theory.results import load_if_valid
from paper_repro.lm.profiles import LATE_FIELDS, LMJob

DATA_HELP = ("supply the benchmark files with --data-dir DIR or COLA_DATA_DIR=DIR, laid out as "
             "DIR/<task>/train.jsonl and DIR/<task>/val.jsonl (see shared/data/README.md)")


@dataclass
class LMOutcome:
    """What happened to each job: ran | skipped (valid result) | no-data (reason) | failed (error)."""

    status: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)

    def count(self, status: str) -> int:
        return sum(s == status for s in self.status.values())


def resolve_data(data_dir: str | None) -> tuple[Path | None, str | None]:
    """(data directory, None) or (None, message saying what is missing and how to supply it)."""
    from cola_theory.lm.data import resolve_data_dir

    try:
        root = resolve_data_dir(data_dir)
    except FileNotFoundError as exc:
        return None, f"{exc}; {DATA_HELP}"
    if root is None:
        return None, f"no benchmark data found (no --data-dir, no $COLA_DATA_DIR, no ../shared/data); {DATA_HELP}"
    return root, None


def tiny_tokenizer():
    """A character-level tokenizer (printable ASCII + tab/newline, < 128 ids) for the random tiny models."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<eos>"]
    chars = ["\t", "\n"] + [chr(c) for c in range(32, 127)]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def load_bundle(model_name: str, dtype_name: str, device: str) -> tuple[Any, Any, str]:
    """(model, tokenizer, note) for `run_lm(model_bundle=...)`; tiny models get the char-level tokenizer."""
    from cola_theory.lm.models import TINY, load_model
    from cola_theory.lm.train import _dtype

    model, tok, note = load_model(model_name, device=device, dtype=_dtype(dtype_name, device))
    if model_name in TINY and tok is None:
        tok, note = tiny_tokenizer(), f"{note}; character-level tokenizer (paper_repro.lm.runner.tiny_tokenizer)"
    model.eval()
    return model, tok, note


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def existing_result(job: LMJob, results_dir: Path, log: Callable[[str], None]) -> dict | None:
    """The job's result if it is intact (checksum) and was made with exactly this config, else None."""
    path = job.result_path(results_dir)
    payload = load_if_valid(path, warn=log)
    if payload is None:
        return None
    saved = {k: v for k, v in payload["config"].items() if k != "chain"}
    # a field added to LMRunConfig after the file was written (LATE_FIELDS): made with that field's default
    saved = {**{k: v for k, v in LATE_FIELDS.items() if k not in saved}, **saved}
    if saved != _jsonable(job.cfg.to_dict()):
        log(f"[lm] {path} was made with another config -> recomputing")
        return None
    return payload


def _data_problem(task: str, data_dir: Path, cache: dict[str, str | None]) -> str | None:
    """None if both splits of `task` load from `data_dir`, else the loader's reason plus how to fix it."""
    if task not in cache:
        from cola_theory.lm.data import load_split

        try:
            for split in ("train", "validation"):
                load_split(task, split, data_dir, source="local")
            cache[task] = None
        except (FileNotFoundError, ValueError) as exc:  # MissingSplitError (BoolQ train absent), bad rows
            cache[task] = f"{exc}; {DATA_HELP}"
    return cache[task]


def run_lm_jobs(jobs: Iterable[LMJob], results_dir: Path, *, data_dir: Path, force: bool = False,
                device: str | None = None, log: Callable[[str], None] = print,
                on_done: Callable[[LMJob, str], None] | None = None) -> LMOutcome:
    """Run (or skip) every job; `on_done(job, status)` is called after each (progress bars)."""
    import torch

    from cola_theory.lm.train import run_lm

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out, data_cache = LMOutcome(), {}
    bundle_key, bundle = None, None
    for job in sorted(jobs, key=lambda j: (j.cfg.model, j.cfg.dtype, j.job_id)):
        jid, path = job.job_id, job.result_path(results_dir)
        status = ""
        if not force and existing_result(job, results_dir, log) is not None:
            status = "skipped"
            shutil.rmtree(job.checkpoint_dir(results_dir), ignore_errors=True)  # left if killed right after saving
        elif (problem := _data_problem(job.cfg.task, data_dir, data_cache)) is not None:
            status, out.reasons[jid] = "no-data", problem
            log(f"[lm] skip {jid}: {problem}")
        else:
            ckpt = job.checkpoint_dir(results_dir)
            if force and ckpt.exists():
                shutil.rmtree(ckpt)
            try:
                if bundle_key != (job.cfg.model, job.cfg.dtype):
                    bundle = None
                    gc.collect()
                    bundle = load_bundle(job.cfg.model, job.cfg.dtype, device)
                    bundle_key = (job.cfg.model, job.cfg.dtype)
                torch.manual_seed(job.cfg.seed)  # dropout draws independent of what ran before in this process
                run_lm(job.cfg, path, data_dir=str(data_dir), checkpoint_dir=ckpt, model_bundle=bundle,
                       device=device, progress=False)
                shutil.rmtree(ckpt, ignore_errors=True)
                status = "ran"
            except Exception as exc:  # noqa: BLE001 - one failed job must not stop the others
                status, out.reasons[jid] = "failed", f"{type(exc).__name__}: {exc}"
                log(f"[lm] FAILED {jid}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
                bundle_key, bundle = None, None  # the shared model may be left half-modified: reload it
        out.status[jid] = status
        if on_done is not None:
            on_done(job, status)
    return out

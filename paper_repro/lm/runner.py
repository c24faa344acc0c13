"""Run a list of `LMJob`s: skip valid results, resume from checkpoints, share one loaded model per model name.

Per job: result file valid and made with the same config -> skipped; else `run_lm` with
`checkpoint_dir=results/lm/checkpoints/<job id>` (a killed run resumes from its last knot checkpoint), which is
deleted after the result is written. Chains that agree up to their first knot (rank step-down 8->2/4/6/8 of one
LR and seed; COLA-3 with and without the optimizer reset) share it: the units of one family run one after the
other, the first leaves its knot checkpoint in results/lm/checkpoints/trunks/<family>, the others start from it,
and it is deleted after the family's last unit (`cola_theory.lm.fork`; `fork=False` turns it off).
A task whose data is missing locally is skipped with the reason; a job that raises is reported as failed and the
others still run. The base model of all jobs of one model name is loaded once and handed to `run_lm` as
`model_bundle` (it restores the base weights after each run).
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
import traceback
from collections import Counter
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
    """What happened to each job: ran | skipped (valid result) | no-data (reason) | failed (error) | deferred
    (not started: the time budget would be exceeded)."""

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
    from cola_theory.lm.run_config import resolve_dtype

    model, tok, note = load_model(model_name, device=device, dtype=resolve_dtype(dtype_name, device))
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


def _data_problem(task: str, data_dir: Path, cache: dict[tuple, str | None],
                  validation_as_train: bool = False) -> str | None:
    """None if the splits `task` needs load from `data_dir` (only the validation split when it also supplies the
    training rows), else the loader's reason plus how to fix it."""
    key = (task, validation_as_train)
    if key not in cache:
        from cola_theory.lm.data import load_split

        try:
            for split in ("validation",) if validation_as_train else ("train", "validation"):
                load_split(task, split, data_dir, source="local")
            cache[key] = None
        except (FileNotFoundError, ValueError) as exc:  # MissingSplitError (BoolQ train absent), bad rows
            cache[key] = f"{exc}; {DATA_HELP}"
    return cache[key]


def _validation_as_train(job: LMJob) -> bool:
    return bool(getattr(job.cfg, "split_validation_as_train", False))


def plan_packs(jobs: Iterable[LMJob], pack: int, max_tokens: int | None = None) -> list[list[LMJob]]:
    """The jobs in run order, cut into packs: jobs that can share one (`packed_train.pack_key`: same model, task,
    sizes and chain shape; any learning rate, seed, schedule, reset) in seed-major order, each group split into
    the fewest packs of at most `pack` runs, of near-equal sizes. pack <= 1: one job per unit (sequential).
    max_tokens caps a pack at max_tokens // (batch_size * max_length) runs (the padded tokens of its largest
    training forward: activation memory). The cut depends only on the job list (a rerun forms the same packs and
    finds their checkpoints)."""
    ordered = sorted(jobs, key=lambda j: (j.cfg.model, j.cfg.dtype, j.job_id))
    if pack <= 1:
        return [[j] for j in ordered]
    from cola_theory.lm.packed_train import pack_key

    groups: dict[tuple, list[LMJob]] = {}
    for job in ordered:
        groups.setdefault((job.cfg.model, job.cfg.dtype, _validation_as_train(job), pack_key(job.cfg)), []).append(job)
    units = []
    for group in groups.values():
        c = group[0].cfg
        size = pack if not max_tokens else max(1, min(pack, max_tokens // (c.batch_size * c.max_length)))
        # seed-major: the runs of one seed share their batches (same sample and order), so a pack that holds a
        # seed's learning rates pads nothing across runs
        group = sorted(group, key=lambda j: (j.cfg.seed, j.job_id))
        n = -(-len(group) // size)
        units += [group[i * len(group) // n:(i + 1) * len(group) // n] for i in range(n)]
    return sorted(units, key=lambda u: (u[0].cfg.model, u[0].cfg.dtype, u[0].job_id))


def pack_checkpoint_dir(jobs: list[LMJob], results_dir: Path) -> Path:
    """Knot checkpoints of a pack, named by its members (another member set is another pack)."""
    digest = hashlib.sha256("\n".join(j.job_id for j in jobs).encode()).hexdigest()[:16]
    return Path(results_dir) / "lm" / "checkpoints" / f"pack-{digest}"


def run_lm_jobs(jobs: Iterable[LMJob], results_dir: Path, *, data_dir: Path, force: bool = False,
                device: str | None = None, log: Callable[[str], None] = print,
                on_done: Callable[[LMJob, str], None] | None = None, pack: int = 0,
                budget_s: float | None = None, pack_tokens: int | None = None, fork: bool = True) -> LMOutcome:
    """Run (or skip) every job; `on_done(job, status)` is called after each (progress bars).

    pack > 1: the jobs still to run are trained in packs of up to `pack` runs on one base (`run_lm_packed`;
    a unit left with one job runs sequentially); a failed pack fails its members and the others still run.
    budget_s: start no unit that would end after this many seconds (judged by the longest unit so far; the first
    unit always starts); the jobs left are "deferred" (a GPU window runs what fits, the next one the rest).
    fork: share first-knot checkpoints between units whose runs agree up to that knot (`unit_family`; the results
    are the same); a family's units are run one after the other.
    """
    import time

    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out, data_cache = LMOutcome(), {}
    bundle_key, bundle = None, None
    t_start, longest = time.monotonic(), 0.0
    units = plan_packs(jobs, pack, pack_tokens)
    families = [unit_family(u) for u in units]
    first = {f: i for i, f in reversed(list(enumerate(families)))}
    order = sorted(range(len(units)), key=lambda i: (first[families[i]], i))  # a family's units one after another
    left = Counter(families)
    shared = {f for f, n in left.items() if n > 1 and fork and not force}  # --force: every step computed again
    for unit, fam in ((units[i], families[i]) for i in order):
        todo = []
        for job in unit:
            jid = job.job_id
            if not force and existing_result(job, results_dir, log) is not None:
                out.status[jid] = "skipped"
                shutil.rmtree(job.checkpoint_dir(results_dir), ignore_errors=True)  # left if killed after saving
            elif (problem := _data_problem(job.cfg.task, data_dir, data_cache, _validation_as_train(job))) is not None:
                out.status[jid], out.reasons[jid] = "no-data", problem
                log(f"[lm] skip {jid}: {problem}")
            else:
                todo.append(job)
        if todo and budget_s is not None and longest and time.monotonic() - t_start + longest > budget_s:
            for job in todo:
                out.status[job.job_id] = "deferred"
            todo = []
        if todo:
            t_unit = time.monotonic()
            key = (todo[0].cfg.model, todo[0].cfg.dtype)
            try:
                if bundle_key != key:
                    bundle = None
                    gc.collect()
                    bundle, bundle_key = load_bundle(*key, device), key
                _run_unit(todo, results_dir, data_dir, bundle, device, force,
                          trunk_dir(results_dir, fam) if fam in shared else None)
                for job in todo:
                    out.status[job.job_id] = "ran"
            except Exception as exc:  # noqa: BLE001 - one failed job must not stop the others
                for job in todo:
                    out.status[job.job_id], out.reasons[job.job_id] = "failed", f"{type(exc).__name__}: {exc}"
                log(f"[lm] FAILED {', '.join(j.job_id for j in todo)}: {type(exc).__name__}: {exc}\n"
                    f"{traceback.format_exc()}")
                bundle_key, bundle = None, None  # the shared model may be left half-modified: reload it
            longest = max(longest, time.monotonic() - t_unit)
        left[fam] -= 1
        if fam in shared and not left[fam]:  # the family's last unit: its trunk is not needed any more
            shutil.rmtree(trunk_dir(results_dir, fam), ignore_errors=True)
        if on_done is not None:
            for job in unit:
                on_done(job, out.status[job.job_id])
    return out


def unit_family(unit: list[LMJob]) -> tuple:
    """Units with equal families may share a first-knot trunk (`cola_theory.lm.fork.family`, member by member)."""
    from cola_theory.lm.fork import family

    return tuple(family(j.cfg) for j in unit)


def trained_steps(jobs: Iterable[LMJob], pack: int = 0, pack_tokens: int | None = None, fork: bool = True,
                  done: frozenset[str] | set[str] = frozenset()) -> dict[str, int]:
    """Optimizer steps each job not in `done` (ids with a result) trains when `run_lm_jobs` runs `jobs` with these
    settings: all of its steps, or only those after its first link when an earlier unit of its family trained the
    same members (packs are cut over every job, as the runner cuts them, and a unit runs only its members without
    a result; a pack forks only from the same members). A step count, not a time: a forked run's cost follows the
    share of its steps it trains (BENCHMARKS.md, fork_bench)."""
    from cola_theory.lm.run_config import epochs_per_link
    from paper_repro.lm.profiles import run_steps, steps_per_epoch

    units = plan_packs(jobs, pack, pack_tokens)
    families = [unit_family(u) for u in units]
    count, trained, out = Counter(families), set(), {}
    for unit, fam in zip(units, families):
        todo = tuple(k for k, j in enumerate(unit) if j.job_id not in done)
        forks = fork and count[fam] > 1 and (fam, todo) in trained
        for job in (unit[k] for k in todo):
            c = job.cfg
            skip = epochs_per_link(c.epochs, c.n_links, c.link_epochs)[0] if forks and c.n_links > 1 else 0.0
            out[job.job_id] = run_steps(c) - round(steps_per_epoch(c.task, c.num_train, c.batch_size) * skip)
        trained.add((fam, todo))
    return out


def trunk_dir(results_dir: Path, fam: tuple) -> Path:
    """Where the units of family `fam` share their first-knot checkpoint (`cola_theory.lm.fork`)."""
    digest = hashlib.sha256(repr(fam).encode()).hexdigest()[:16]
    return Path(results_dir) / "lm" / "checkpoints" / "trunks" / digest


def _run_unit(todo: list[LMJob], results_dir: Path, data_dir: Path, bundle: tuple, device: str, force: bool,
              trunks: Path | None = None) -> None:
    """One job with `run_lm`, or several with `run_lm_packed`; knot checkpoints deleted once the results exist
    (`trunks`: where the unit's family shares its first-knot checkpoint)."""
    import torch

    from cola_theory.lm.packed_train import run_lm_packed
    from cola_theory.lm.train import run_lm

    vat = _validation_as_train(todo[0])
    ckpt = todo[0].checkpoint_dir(results_dir) if len(todo) == 1 else pack_checkpoint_dir(todo, results_dir)
    if force and ckpt.exists():
        shutil.rmtree(ckpt)
    if len(todo) == 1:
        job = todo[0]
        torch.manual_seed(job.cfg.seed)  # dropout draws independent of what ran before in this process
        run_lm(job.cfg, job.result_path(results_dir), data_dir=str(data_dir), checkpoint_dir=ckpt,
               model_bundle=bundle, device=device, split_validation_as_train=vat, trunk_root=trunks)
    else:
        torch.manual_seed(todo[0].cfg.seed)
        run_lm_packed([j.cfg for j in todo], [j.result_path(results_dir) for j in todo], data_dir=str(data_dir),
                      checkpoint_dir=ckpt, model_bundle=bundle, device=device, split_validation_as_train=vat,
                      trunk_root=trunks)
    shutil.rmtree(ckpt, ignore_errors=True)

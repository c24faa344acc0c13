"""Shared plumbing of the theory experiments T1-T5: sizes, cached results, CSV and Markdown tables.

Data flow: `run` computes rows -> one checksummed JSON (`cola_theory.results.save_result`) -> the CSV and
the Markdown summary are rendered from that JSON; `plot` reads only the JSON. A JSON that is valid and
was made with the same config is reused (no recompute); a corrupt one is recomputed with a message.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from cola_theory.results import atomic_write_text, environment_meta, load_if_valid, load_result, save_result

SIZES = ("smoke", "full")


def theory_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "theory"


def check_size(size: str) -> str:
    if size not in SIZES:
        raise ValueError(f"size={size!r}: use one of {SIZES} ('smoke' takes seconds, 'full' is the paper run)")
    return size


def log(tag: str, msg: str) -> None:
    print(f"[theory {tag}] {msg}", flush=True)


@contextmanager
def single_thread():
    """Small matrices: one torch thread is faster than two fighting over 2 cores."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def valid_result(path: Path, config: dict, warn: Callable[[str], None] = lambda m: None) -> dict | None:
    """The result at `path` if it is intact (checksum) and was made with `config`, else None (the reason to warn)."""
    payload = load_if_valid(path, warn=warn)
    if payload is not None and payload["config"] != _jsonable(config):
        warn(f"{path} was made with another config -> recomputing")
        return None
    return payload


def result_file(out_dir: str | Path, stem: str) -> Path:
    """Where an experiment's result JSON lives: out_dir/theory/<stem>.json (its CSV and summary beside it)."""
    return theory_dir(out_dir) / f"{stem}.json"


def up_to_date(experiment: Any, out_dir: Path, size: str) -> bool:
    """Whether `experiment.run(out_dir, size)` would reuse its saved result (what `run_all --dry-run` reports)."""
    return valid_result(result_file(out_dir, experiment.STEM), experiment.config(size)) is not None


def cached(tag: str, path: Path, config: dict, compute: Callable[[], tuple[list, dict]], force: bool) -> dict:
    """The result at `path` if it is intact and was made with `config`; else compute(), save and return it."""
    config = _jsonable(config)
    if not force:
        payload = valid_result(path, config, warn=lambda m: log(tag, m))
        if payload is not None:
            log(tag, f"{path} is up to date -> skipped")
            return payload
    start = time.perf_counter()
    with single_thread():
        history, metrics = compute()
    metrics = {**metrics, "wall_time_s": time.perf_counter() - start}
    payload = save_result(path, config=config, history=_jsonable(history), metrics=_jsonable(metrics),
                          meta=environment_meta(seed=config.get("seeds", [None])[0]))
    log(tag, f"wrote {path} ({metrics['wall_time_s']:.2f} s)")
    return payload


def load(path: Path) -> dict:
    """A saved result for plotting (checksum-verified); a clear error if it was never made."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run the experiment first (its `run(out_dir)`)")
    return load_result(path)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return str(v)


def write_csv(path: Path, rows: Sequence[dict], columns: Sequence[str] | None = None) -> Path:
    """rows -> CSV (full float precision), atomically; columns default to the union in first-seen order."""
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_fmt(row.get(c, "")) for c in columns])
    atomic_write_text(path, buf.getvalue())
    return path


def md_table(rows: Sequence[dict], columns: Sequence[str], digits: int = 4) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.{digits}g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_markdown(path: Path, title: str, text: str) -> Path:
    atomic_write_text(path, f"# {title}\n\n{text.strip()}\n")
    return path


# -- chains on matrix problems (T3, T4, T5) ------------------------------------------------------------
def rank_floor(Delta_star: torch.Tensor, rank: int) -> float:
    """Eckart-Young: min_{rank(X) <= rank} ||X - Delta*||_F / ||Delta*||_F = sqrt(sum_{i > rank} s_i^2) / ||s||."""
    s = torch.linalg.svdvals(Delta_star)
    return float(torch.linalg.norm(s[rank:]) / torch.linalg.norm(s))


def run_one_chain(problem, cfg_kwargs: dict, mode: str = "lora", curve: bool = False) -> dict:
    """One `run_chain` on `problem`: final loss, distance to Delta*, rank, status (diverged at which step).

    curve=True adds "curve": the loss of every step before a divergence.
    """
    from cola_theory import ChainConfig, MatrixBackend, run_chain

    cfg = ChainConfig(**cfg_kwargs)
    backend = MatrixBackend(problem, cfg, mode=mode)
    res = run_chain(backend, cfg, log_every=1 if curve else cfg.total_steps)
    out = {"status": res.status, "diverged_step": None if res.diverged is None else res.diverged["step"]}
    if curve:
        out["curve"] = [h["loss"] for h in res.history if h["event"] == "step"]
    if res.status == "finished":
        ev = backend.evaluate()
        out.update(final_loss=ev["f"], dist=ev.get("dist", math.nan), rank_delta=ev["rank_delta"])
    else:
        out.update(final_loss=math.inf, dist=math.inf, rank_delta=-1)
    return out


def lr_sweep(methods: dict[str, dict], lrs: Sequence[float], seeds: Sequence[int], problem_fn, base: dict) -> list:
    """Every (method, lr, seed) chain; methods map a label to ChainConfig kwargs plus an optional 'mode'.

    The lr of each method is then chosen by the lowest mean final loss over seeds (`chosen` column), so
    each method gets its own best lr from the same grid.
    """
    rows = []
    for label, spec in methods.items():
        spec = dict(spec)
        mode = spec.pop("mode", "lora")
        for lr in lrs:
            for seed in seeds:
                p = problem_fn(seed)
                out = run_one_chain(p, {**base, **spec, "lr": lr, "seed": seed}, mode)
                rows.append({"method": label, "mode": mode, "lr": lr, "seed": seed, **out})
    for label in methods:
        means = {lr: sum(r["final_loss"] for r in rows if r["method"] == label and r["lr"] == lr) / len(seeds)
                 for lr in lrs}
        best = min(lrs, key=lambda lr: means[lr])
        for r in rows:
            if r["method"] == label:
                r["chosen"] = r["lr"] == best
    return rows


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    mu = sum(xs) / n
    return mu, (math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0)


class BoundViolation(RuntimeError):
    """A measured point lies above its proven bound: a bug in the code or in a constant, never to be hidden."""
BELOW_RANK_FLOOR = "a chain beat the Eckart-Young floor of its rank at"


def below_rank_floor(rows: Sequence[dict]) -> list[tuple]:
    """(method, lr, seed) of the finished runs whose distance beat the Eckart-Young floor of their rank (`holds`
    False): impossible, hence a bug."""
    return [(r["method"], r["lr"], r["seed"]) for r in rows if math.isfinite(r["dist"]) and not r["holds"]]


def finish(tag: str, out_dir: Path, stem: str, rows: Sequence[dict], columns: Sequence[str], title: str, text: str,
           bad: Sequence, violated: str, summary: str) -> list[Path]:
    """The end of every experiment's `run`: <stem>.csv from `rows` beside <stem>.json, the Markdown summary
    t<N>_summary.md ("<tag>: <title>" over `text`); then, if `bad` (the points above their proven bound) is not
    empty, a BoundViolation "<tag>: <violated> <bad>: a bug in the code or a constant"; else `summary` is logged.
    Returns [csv, json, md]."""
    d = theory_dir(out_dir)
    paths = [write_csv(d / f"{stem}.csv", rows, columns), result_file(out_dir, stem),
             write_markdown(d / f"{tag.lower()}_summary.md", f"{tag}: {title}", text)]
    if bad:
        raise BoundViolation(f"{tag}: {violated} {bad}: a bug in the code or a constant")
    log(tag, summary)
    return paths



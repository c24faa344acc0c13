"""Verdicts on the paper's claims and figures/REPORT.md: a pure function of the saved results and tables.

Verdicts: Theorem 4.1 (every point of results/theory/theorem41.csv under its bound), COLA >= LoRA per task,
accuracy grows with chain length, rank step-down >= LoRA. Each is "holds", "fails"/"violated" or "not run".
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from paper_repro import reference as ref

RUN = "python paper_repro/run_all.py"
ROOT = Path(__file__).resolve().parent.parent  # the repository


def shown_path(path: Path) -> str:
    """`path` relative to the repository root when it lies inside it (a rebuild on another machine or in another
    checkout writes the same text), else absolute."""
    path = Path(path).resolve()
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


@dataclass(frozen=True)
class Verdict:
    claim: str  # key of reference.CLAIMS
    scope: str
    status: str  # holds | fails | violated | not run
    detail: str


def _truthy(text: str) -> bool:
    return str(text).strip().lower() in ("true", "1", "yes")


def theorem41_verdict(results_dir: Path) -> Verdict:
    """Every (problem, seed, T) point of theorem41.csv must have avg_fw_gap <= bound and holds == True."""
    path = Path(results_dir) / "theory" / "theorem41.csv"
    if not path.exists():
        return Verdict("theorem41", "T1", "not run", f"{path} missing: `{RUN} --only theory`")
    try:
        rows = list(csv.DictReader(path.open()))
        bad = [r for r in rows if not _truthy(r["holds"]) or float(r["avg_fw_gap"]) > float(r["bound"]) * (1 + 1e-9)]
    except (KeyError, ValueError) as exc:
        return Verdict("theorem41", "T1", "violated", f"{path} is unreadable ({exc}); rerun `{RUN} --only theory "
                                                      "--force`")
    if not rows:
        return Verdict("theorem41", "T1", "not run", f"{path} has no rows: `{RUN} --only theory --force`")
    if bad:
        pts = "; ".join(f"problem={r.get('problem')} seed={r.get('seed')} T={r.get('T')}: avg_fw_gap="
                        f"{r.get('avg_fw_gap')} > bound={r.get('bound')}" for r in bad[:5])
        return Verdict("theorem41", "T1", "violated", f"{len(bad)} of {len(rows)} points above the bound ({pts})")
    worst = max(float(r["avg_fw_gap"]) / float(r["bound"]) for r in rows if float(r["bound"]) > 0)
    return Verdict("theorem41", "T1", "holds", f"all {len(rows)} points under the bound (max gap/bound = {worst:.3g})")


def cola_vs_lora_verdicts(tables: dict[str, pd.DataFrame]) -> list[Verdict]:
    """Per main table (model label -> main_table frame): COLA mean >= LoRA mean on every task."""
    out = []
    for scope, df in tables.items():
        if df is None or df.empty:
            out.append(Verdict("cola_ge_lora", scope, "not run", "no LoRA/COLA pairs in the results"))
            continue
        has_std = {"lora_std", "cola_std"} <= set(df)
        stds = df[["lora_std", "cola_std"]].max(axis=1) if has_std else [math.nan] * len(df)
        wins = [(t, c - lo, sd) for t, lo, c, sd in zip(df["task"], df["lora_mean"], df["cola_mean"], stds)
                if not (math.isnan(lo) or math.isnan(c))]
        losses = [f"{t} ({d:+.2f})" for t, d, _ in wins if d < 0]
        noise = sum(abs(d) <= sd for _, d, sd in wins if not math.isnan(sd))
        detail = f"COLA >= LoRA on {len(wins) - len(losses)}/{len(wins)} tasks"
        detail += f"; below on {', '.join(losses)}" if losses else ""
        if any(not math.isnan(sd) for _, _, sd in wins):
            detail += f"; gap within one seed std on {noise}/{len(wins)} tasks"
        out.append(Verdict("cola_ge_lora", scope, "holds" if wins and not losses else "fails", detail))
    return out


def chain_length_verdicts(df: pd.DataFrame) -> list[Verdict]:
    """Per model: test accuracy non-decreasing in chain length on every (task, setting) row of Table 4."""
    if df is None or df.empty:
        return [Verdict("chain_length", "Table 4", "not run", f"no runs: `{RUN} --profile gpu --only lm`")]
    out = []
    for model, grp in df.groupby("model", sort=True):
        rows = [t for t, ok in zip(grp["task"], grp["increases"]) if not ok]
        detail = f"non-decreasing in chain length on {len(grp) - len(rows)}/{len(grp)} tasks"
        detail += f"; not on {', '.join(rows)}" if rows else ""
        out.append(Verdict("chain_length", f"Table 4: {model}", "fails" if rows else "holds", detail))
    return out


def stepdown_verdicts(df: pd.DataFrame) -> list[Verdict]:
    """Per model: step-down >= LoRA r=8 at all but at most one (task, residual rank) point, as the paper says."""
    if df is None or df.empty:
        return [Verdict("step_down", "Figure 3", "not run", f"no runs: `{RUN} --profile gpu --only lm`")]
    out = []
    for model, grp in df.groupby("model", sort=True):
        total, below = 0, []
        for _, row in grp.iterrows():
            for col in [c for c in grp.columns if c.startswith("mean_r")]:
                if not (pd.isna(row[col]) or pd.isna(row["lora_mean"])):
                    total += 1
                    if row[col] < row["lora_mean"]:
                        below.append(f"{row['task']} r={col[6:]}")
        detail = f"step-down >= LoRA at {total - len(below)}/{total} points"
        detail += f"; below at {', '.join(below)}" if below else ""
        status = "not run" if not total else ("holds" if len(below) <= 1 else "fails")
        out.append(Verdict("step_down", f"Figure 3: {model}", status, detail + " (paper: all but one point)"))
    return out


def verdict_table(verdicts: list[Verdict]) -> str:
    lines = ["| claim (paper) | scope | verdict | detail |", "|---|---|---|---|"]
    for v in verdicts:
        text, tag = ref.CLAIMS[v.claim]
        lines.append(f"| {text} [{tag}] | {v.scope} | **{v.status}** | {v.detail.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def reference_section() -> str:
    """Every recovered paper number with its provenance tag (`paper_repro.reference`)."""
    lines = [f"Source: {ref.SOURCE}. Tags: " + "; ".join(f"[{k}] {v}" for k, v in ref.TAGS.items()) + ".", "",
             "| model | task | LoRA | COLA | gain | relative gain |", "|---|---|---|---|---|---|"]
    for (model, task), vals in ref.MAIN.items():
        cells = [vals[k].cell() if k in vals else ref.MISSING for k in ("lora", "cola", "gain", "rel_gain")]
        lines.append(f"| {model} | {task} | " + " | ".join(cells) + " |")
    lines += ["", "Trainable parameters at r=8: " + "; ".join(f"{m}: {r.cell()}" for m, r in
                                                                ref.TRAINABLE_PARAMS.items()), ""]
    lines += [f"- {name}: {why}" for name, why in ref.NOT_RECOVERABLE.items()]
    return "\n".join(lines) + "\n"


def environment_section(metas: list[dict], git: tuple[str | None, bool | None]) -> str:
    """Versions and devices as recorded in the result files' meta, plus the commit the report was built at."""
    keys = ("device", "python", "torch", "transformers", "peft", "numpy", "platform", "cpus", "torch_threads")
    combos: dict[tuple, int] = {}
    for meta in metas:
        combo = tuple(str(meta.get(k, "-")) for k in keys)
        combos[combo] = combos.get(combo, 0) + 1
    commits = sorted({f"{m.get('git_commit')}{' (dirty)' if m.get('git_dirty') else ''}" for m in metas})
    lines = [f"Report built at git commit {git[0]}{' (dirty tree)' if git[1] else ''}.",
             f"Result files made at commit(s): {', '.join(commits) or '-'}.", "",
             "| " + " | ".join(keys) + " | result files |", "|" + "---|" * (len(keys) + 1)]
    lines += ["| " + " | ".join(c) + f" | {n} |" for c, n in sorted(combos.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines) + "\n"


def write_report(path: Path, *, sections: list[tuple[str, str]], verdicts: list[Verdict], metas: list[dict],
                 git: tuple[str | None, bool | None], results_dir: Path) -> Path:
    """figures/REPORT.md: verdicts, each section (title, markdown), the paper's numbers, the environment."""
    from cola_theory.results import atomic_write_text

    head = ["# COLA reproduction report", "",
            f"Generated by `paper_repro/make_figures.py` from the result files in `{shown_path(results_dir)}` on "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Every number below is computed from those "
            f"files; the paper's numbers appear only in columns / sections labelled \"{ref.LABEL}\".", "",
            "## Verdicts", "", verdict_table(verdicts)]
    body = [f"## {title}\n\n{text}" for title, text in sections]
    tail = [f"## Paper numbers ({ref.LABEL})", "", reference_section(), "## Environment", "",
            environment_section(metas, git)]
    atomic_write_text(path, "\n".join(head + body + tail))
    return path

"""The pairs behind each paired difference: per (task, seed), what dev chose for each arm and what it tested.

A pure function of saved results (`study.load_study`'s runs). The per-task verdicts of the `real` study are means
of paired differences over 5 seeds; a reader who asks *why* a task's mean moved needs the pairs themselves: for
each arm the LR that dev chose (by `stats.common_choice`, the rule the difference uses: the highest dev accuracy
on the LRs both arms tried, ties to the lower LR), its dev accuracy, the epoch that MeZO's best-dev-loss rule
kept, its test accuracy, and for the chain whether that epoch ends after its first knot (up to the knot a chain
*is* its LoRA pair, `epochs`). The mean of the difference column over a task's seeds is that task's paired
difference in `table_real_comparisons`.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from paper_repro.lm import stats
from paper_repro.lm.tables import fmt_lr

CAPTION = ("The pairs: per task and seed, each arm's dev-chosen LR (on the LRs both tried), dev accuracy, selected "
           "epoch and test accuracy (%), whether the chain's epoch ends after its first knot, and the difference")


def _run(runs: pd.DataFrame, task: str, variant: str, seed: int, lr: float) -> pd.Series:
    hit = runs[(runs["task"] == task) & (runs["variant"] == variant) & (runs["seed"] == seed)
               & np.isclose(runs["lr"].astype(float), lr, rtol=1e-9, atol=0)]
    return hit.iloc[0]


def _epoch(run: pd.Series) -> float:
    e = run.get("best_epoch")
    return float(e) if e is not None and not (isinstance(e, float) and math.isnan(e)) else math.nan


def pair_table(runs: pd.DataFrame, sel: pd.DataFrame, treatment: str, control: str,
               tasks: tuple[str, ...]) -> pd.DataFrame:
    """One row per (task, seed) paired by `stats.paired`, in `tasks` order (`sel`: `stats.select_lr_per_seed(runs)`;
    `runs` gives each chosen run's epoch and knot): '<arm> LR' (float), '<arm> dev',
    '<arm> epoch', '<arm> test' for the control then the treatment, 'LRs both tried', 'after first knot'
    (the treatment's selected epoch ends after its first knot: True / False, None when unknown) and 'diff (pp)'."""
    cols = ["task", "seed", "LRs both tried"]
    for arm in (control, treatment):
        cols += [f"{arm} LR", f"{arm} dev", f"{arm} epoch", f"{arm} test"]
    cols += ["after first knot", "diff (pp)"]
    if runs is None or runs.empty:
        return pd.DataFrame(columns=cols)
    sel = sel.set_index(["task", "variant", "seed"])
    rows = []
    for task in tasks:
        seeds = sorted({s for (t, v, s) in sel.index if t == task and v == treatment}
                       & {s for (t, v, s) in sel.index if t == task and v == control})
        for seed in seeds:
            t_grid, c_grid = sel.loc[(task, treatment, seed), "grid"], sel.loc[(task, control, seed), "grid"]
            got = stats.common_choice(t_grid, c_grid)
            if got is None:
                continue
            row = {"task": task, "seed": seed, "LRs both tried": len(set(t_grid) & set(c_grid))}
            for arm, (lr, _how), grid in ((control, got[1], c_grid), (treatment, got[0], t_grid)):
                run = _run(runs, task, arm, seed, lr)
                row.update({f"{arm} LR": lr, f"{arm} dev": grid[lr][0], f"{arm} epoch": _epoch(run),
                            f"{arm} test": grid[lr][1]})
                if arm == treatment:
                    knot, epoch = float(run.get("first_knot_epoch", math.nan)), row[f"{arm} epoch"]
                    row["after first knot"] = None if math.isnan(knot) or math.isnan(epoch) else bool(
                        epoch > knot + 1e-9)
            row["diff (pp)"] = row[f"{treatment} test"] - row[f"{control} test"]
            rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def shown(pairs: pd.DataFrame) -> pd.DataFrame:
    """The display form: LRs as 8e-4, accuracies to 2 decimals, epochs as integers, the knot flag as yes / no."""
    out = pairs.copy()
    for c in out.columns:
        if c.endswith(" LR"):
            out[c] = [fmt_lr(x) for x in out[c]]
        elif c.endswith((" dev", " test")) or c == "diff (pp)":
            out[c] = [f"{x:+.2f}" if c == "diff (pp)" else f"{x:.2f}" for x in out[c]]
        elif c.endswith(" epoch"):
            out[c] = ["-" if math.isnan(x) else str(int(x)) for x in out[c]]
    words = {True: "yes", False: "no: before its knot"}
    out["after first knot"] = [words.get(x, "unknown") for x in out["after first knot"]]
    return out

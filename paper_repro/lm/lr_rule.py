"""A second reading of a paired comparison: one LR per (task, method), chosen on the mean dev accuracy over seeds.

The study's rule (`stats.select_lr_per_seed`, as issue 13 asks) chooses the LR per (task, method, seed) on that
seed's dev set. With 100-500 dev examples two LRs are often a few examples apart (WiC seed 0: LoRA's dev picks the
under-fitting 1e-4 over 8e-4 by one example of 500, and tests 6 points lower), so part of a per-seed difference is
dev-selection noise. A common alternative protocol fixes one LR per (task, method): the highest dev accuracy
averaged over the seeds (5 x 500 examples), ties to the lower LR (`stats.choose`). For a fair pair both arms choose
among the LRs that both tried at every paired seed; each seed's pair is then the two arms at their chosen LRs.
This reading was added after the per-seed verdicts had been read; it is reported beside them, never instead.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from paper_repro.lm import stats

RULE = ("one LR per (task, method): the highest mean dev accuracy over the paired seeds, among the LRs both arms "
        "tried at every one of them (ties -> the lower LR)")


def select_lr_per_task(runs: pd.DataFrame, treatment: str, control: str, tasks: tuple[str, ...]) -> pd.DataFrame:
    """Rows task, variant, seed, lr, dev_acc, test_acc: per task, each arm at its one LR, at every paired seed."""
    cols = ["task", "variant", "seed", "lr", "dev_acc", "test_acc"]
    if runs is None or runs.empty:
        return pd.DataFrame(columns=cols)
    done = runs[runs["variant"].isin([treatment, control]) & np.isfinite(runs["test_acc"].astype(float))]
    out = []
    for task in tasks:
        g = done[done["task"] == task]
        cell = {(v, s, float(lr)): (float(d), float(t))
                for v, s, lr, d, t in zip(g["variant"], g["seed"], g["lr"], g["dev_acc"], g["test_acc"])}
        seeds = sorted({s for v, s, _ in cell if v == treatment} & {s for v, s, _ in cell if v == control})
        lrs = [lr for lr in sorted({lr for *_, lr in cell}) if seeds
               and all((v, s, lr) in cell for v in (treatment, control) for s in seeds)]
        if not lrs:
            continue
        for arm in (control, treatment):
            mean_dev = {lr: (float(np.mean([cell[(arm, s, lr)][0] for s in seeds])), math.nan) for lr in lrs}
            picked = stats.choose(mean_dev)
            if picked is None:
                continue
            out += [{"task": task, "variant": arm, "seed": s, "lr": picked[0], "dev_acc": cell[(arm, s, picked[0])][0],
                     "test_acc": cell[(arm, s, picked[0])][1]} for s in seeds]
    return pd.DataFrame(out, columns=cols)


def compare(runs: pd.DataFrame, treatment: str, control: str, tasks: tuple[str, ...]) -> tuple[pd.DataFrame, dict]:
    """(`stats.compare` rows on `select_lr_per_task`'s pairs, task -> (control LR, treatment LR))."""
    sel = select_lr_per_task(runs, treatment, control, tasks)
    if sel.empty:
        return pd.DataFrame(), {}
    lrs = {t: tuple(float(g[g["variant"] == v]["lr"].iloc[0]) for v in (control, treatment))
           for t, g in sel.groupby("task", sort=False)}
    return stats.compare(sel, treatment, control, tasks), lrs


def line(comp: pd.DataFrame, treatment: str, control: str, learned: pd.DataFrame | None = None) -> str:
    """The REPORT sentence: the pooled reading under this rule, worded from its interval; `learned`: the same
    comparison on the learned tasks only (`stats.learned_tasks`), when that leaves a task out."""
    r = stats.pooled_row(comp, treatment, control) if len(comp) else None
    if r is None:
        return "LR rule, second reading: no task has pairs on a common LR yet.\n"
    per_task = "; ".join(f"{x['task']} {x['mean_diff']:+.2f} ({x['verdict']}{', fragile' * stats.is_fragile(x)})"
                         for _, x in comp.iterrows() if x["task"] != "pooled")
    return (f"LR rule, a second reading (not the verdict; {RULE}; `table_real_lr_per_task`): {treatment} - "
            f"{control} pooled is {stats.describe(r)}: **{r['verdict']}**. Per task: {per_task}." + _learned(learned)
            + "\n")


def _learned(comp: pd.DataFrame | None) -> str:
    r = stats.pooled_row(comp, *comp[["treatment", "control"]].iloc[0]) if comp is not None and len(comp) else None
    return "" if r is None else (f" Learned tasks only ({', '.join(comp['task'][comp['task'] != 'pooled'])}): "
                                 f"{stats.describe(r)}: **{r['verdict']}**.")


def with_lrs(comp: pd.DataFrame, lrs: dict) -> pd.DataFrame:
    """`compare`'s rows with the one LR of each arm (`lr_control`, `lr_treatment`; NaN for the pooled rows), as
    saved in table_real_lr_per_task.csv (README's second-reading block reads them there)."""
    if not len(comp):
        return comp
    pick = lambda t, i: lrs[t][i] if t in lrs else math.nan  # noqa: E731
    return comp.assign(lr_control=[pick(t, 0) for t in comp["task"]], lr_treatment=[pick(t, 1) for t in comp["task"]])


def with_learned(comp: pd.DataFrame, learned: pd.DataFrame | None) -> pd.DataFrame:
    """`comp` plus the pooled row of `learned` (the same comparison on the learned tasks) as task `stats.LEARNED`."""
    if learned is None or not len(learned) or not len(comp):
        return comp
    return pd.concat([comp, learned[learned["task"] == "pooled"].assign(task=stats.LEARNED)], ignore_index=True)

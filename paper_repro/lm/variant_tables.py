"""Tables of several variants side by side (Table 4 and Figure 3 analogues), each row on runs every column shares.

A row of such a table is read across: length 1 < 2 < 3, or rank 2 against rank 8. While a grid fills in, the
variants of a task have not tried the same seeds and LRs (the Table 4 chains of the CPU ablation tier have seeds
0-2 and 3 LRs, LoRA and COLA-3 have 5 seeds and 5 LRs; a Figure 3 unit may land at one LR), and means over
different seeds and LR grids are not comparable: a seed's level moves every variant, and a larger grid gives dev
more chances. So each row is BALANCED (`balanced`): per task, the variants present are taken on the seeds all of
them have and, per seed, each is chosen by the dev rule on the LRs all of them tried (`stats.common_choice`); the
row says which seeds and LRs that is. (The paired differences of `stats.compare` use the same rule for two arms.)
`per_variant_table` without balancing serves tables whose columns are already paired (`stats.paired_arms`).
"""

from __future__ import annotations

import math

import pandas as pd

from paper_repro.lm import stats
from paper_repro.lm.stats import LORA
from paper_repro.lm.tables import fmt_lr

LENGTHS = (1, 2, 3, 5)
COMMON = "common runs"  # the column that says which seeds and LRs a balanced row is on


def balanced(sel: pd.DataFrame, variants: tuple[str, ...]) -> tuple[pd.DataFrame, dict[str, str]]:
    """(rows task, variant, seed, lr, test_acc re-chosen on the runs every variant of the task shares, task -> a
    label of those seeds and LRs). `sel` is `stats.select_lr_per_seed`'s (its grid column holds each cell's runs)."""
    rows, labels = [], {}
    mine = sel[sel["variant"].isin(variants)] if len(sel) else sel
    for task, g in mine.groupby("task", sort=False):
        present = [v for v in variants if (g["variant"] == v).any()]
        cells = {(v, s): grid for v, s, grid in zip(g["variant"], g["seed"], g["grid"])}
        seeds = sorted(set.intersection(*({s for (v, s) in cells if v == p} for p in present)))
        kept, lr_sets = [], []
        for seed in seeds:
            picks = stats.common_choice(*(cells[(v, seed)] for v in present))
            if picks is None:
                continue
            kept.append(seed)
            lr_sets.append(frozenset.intersection(*(frozenset(cells[(v, seed)]) for v in present)))
            rows += [{"task": task, "variant": v, "seed": seed, "lr": p[0], "test_acc": cells[(v, seed)][p[0]][1]}
                     for v, p in zip(present, picks)]
        if kept:
            lrs = (", ".join(fmt_lr(x) for x in sorted(lr_sets[0], reverse=True)) if len(set(lr_sets)) == 1
                   else f"{min(map(len, lr_sets))}-{max(map(len, lr_sets))} per seed")
            labels[task] = f"seeds {', '.join(map(str, kept))}; LRs {lrs}"
    return pd.DataFrame(rows, columns=["task", "variant", "seed", "lr", "test_acc"]), labels


def _cell(vals: pd.Series) -> str:
    vals = vals.dropna()
    if vals.empty:
        return "-"
    return f"{vals.mean():.2f}" + (f" ± {vals.std(ddof=1):.2f}" if len(vals) > 1 else "") + f" (n={len(vals)})"


def per_variant_table(sel: pd.DataFrame, variants: dict[str, str], tasks: tuple[str, ...]) -> pd.DataFrame:
    """Per task: mean ± std (n seeds) of the dev-selected test accuracy of each variant (column name -> variant),
    plus numeric mean_<col> / std_<col> helper columns (CSV, figures)."""
    rows = []
    for task in tasks:
        row, any_ = {"task": task}, False
        for col, variant in variants.items():
            v = sel[(sel["task"] == task) & (sel["variant"] == variant)]["test_acc"]
            row[col] = _cell(v)
            row[f"mean_{col}"] = v.mean() if len(v) else math.nan
            row[f"std_{col}"] = v.std(ddof=1) if len(v) > 1 else math.nan
            any_ |= bool(len(v))
        if any_:
            rows.append(row)
    return pd.DataFrame(rows)


def balanced_table(sel: pd.DataFrame, variants: dict[str, str], tasks: tuple[str, ...]) -> pd.DataFrame:
    """`per_variant_table` of the `balanced` runs, with a COMMON column naming each row's seeds and LRs."""
    bal, labels = balanced(sel, tuple(variants.values()))
    table = per_variant_table(bal, variants, tasks)
    if len(table):
        table[COMMON] = [labels.get(t, "-") for t in table["task"]]
    return table


def table4(sel: pd.DataFrame, tasks: tuple[str, ...]) -> pd.DataFrame:
    return balanced_table(sel, {f"length {n}": LORA if n == 1 else f"COLA-{n}" for n in LENGTHS}, tasks)


def fig3_table(sel: pd.DataFrame, tasks: tuple[str, ...], ranks: tuple[int, ...]) -> pd.DataFrame:
    return balanced_table(sel, {"LoRA r=8": LORA, **{f"r={r}": f"step-down 8→{r}" for r in ranks}}, tasks)

"""Figures of the `real` study (`paper_repro.lm.study`): the forest plot of paired differences and the per-task
line plots (Table 4, Figure 3 analogues). Pure functions of the study's frames."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from paper_repro.lm.stats import COLA3, LEARNED, LORA
from paper_repro.plot_style import BOUND_STYLE, method_color, new_figure, savefig


def forest_figure(comp: pd.DataFrame, treatments: tuple[str, ...], control: str = LORA):
    """One panel per treatment (vs `control`): mean paired difference per task and pooled (diamond) with its 95%
    CI, a dashed line at 0; every panel has the same rows (tasks in `comp` order, pooled last, then the learned-tasks
    sensitivity row where there is one) and x axis."""
    sub = comp[comp["control"] == control] if len(comp) else comp
    panels = [t for t in treatments if (sub["treatment"] == t).any()]
    if not panels:
        return None
    present = list(dict.fromkeys(sub[sub["treatment"].isin(panels)]["task"]))
    pools = ["pooled", *([LEARNED] if LEARNED in present else [])]  # the sensitivity row below the pooled one
    tasks = [t for t in present if t not in pools] + pools
    ypos = {t: len(tasks) - 1 - i for i, t in enumerate(tasks)}
    fig, axes = new_figure(1, len(panels), width=2.4, height=0.9 + 0.28 * len(tasks), sharey=True, sharex=True)
    for i, (ax, t) in enumerate(zip(axes[0], panels)):
        rows = sub[sub["treatment"] == t]
        y = np.array([ypos[k] for k in rows["task"]])
        lo = (rows["mean_diff"] - rows["ci_lo"]).fillna(0).clip(lower=0)
        hi = (rows["ci_hi"] - rows["mean_diff"]).fillna(0).clip(lower=0)
        color = method_color("COLA") if t == COLA3 else method_color(t, i + 2)
        ax.errorbar(rows["mean_diff"], y, xerr=[lo, hi], fmt="o", capsize=2, color=color)
        pooled = rows["task"].isin(pools).to_numpy()
        ax.scatter(rows["mean_diff"][pooled], y[pooled], marker="D", s=30, color="black", zorder=3)
        ax.axvline(0.0, **BOUND_STYLE)
        ax.set(title=f"{t}\nvs {control}", xlabel="test acc. diff. (pp)")
    axes[0][0].set(yticks=list(ypos.values()), yticklabels=list(ypos))
    return fig


def plot_forest(comp: pd.DataFrame, fig_dir: Path, treatments: tuple[str, ...], name: str = "fig_real_forest",
                control: str = LORA) -> list[Path]:
    fig = forest_figure(comp, treatments, control) if len(comp) else None
    return savefig(fig, name, fig_dir) if fig is not None else []


def plot_lines(df: pd.DataFrame, cols: list[str], x: list[float], fig_dir: Path, name: str, xlabel: str,
               baseline: str | None = None) -> list[Path]:
    """One panel per task: test accuracy (mean ± std over seeds) vs x; the `baseline` column as a dashed line."""
    if df is None or df.empty:
        return []
    ncols = min(4, len(df))
    fig, axes = new_figure(math.ceil(len(df) / ncols), ncols, width=2.6, height=2.3, layout="constrained")
    flat = axes.ravel()
    for ax, (_, row) in zip(flat, df.iterrows()):
        pts = [(xv, row[f"mean_{c}"], row[f"std_{c}"]) for xv, c in zip(x, cols) if math.isfinite(row[f"mean_{c}"])]
        if pts:
            xs, ms, ss = zip(*pts)
            ax.errorbar(xs, ms, yerr=[0.0 if math.isnan(s) else s for s in ss], marker="o", capsize=2,
                        color=method_color("COLA"), label="COLA")
        if baseline and math.isfinite(row[f"mean_{baseline}"]):
            ax.axhline(row[f"mean_{baseline}"], **BOUND_STYLE, label=baseline)
        ax.set(title=row["task"], xlabel=xlabel, xticks=x)
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy (%)")
    for ax in flat[len(df):]:
        ax.set_visible(False)
    if baseline:
        flat[0].legend()
    return savefig(fig, name, fig_dir)

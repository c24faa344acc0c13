"""LM figures from the tables of `paper_repro.lm.tables` (never from a model): PNG + PDF via plot_style.

- fig3_rank_stepdown: test accuracy vs residual rank of the step-down chain, LoRA r=8 as a dashed line.
- fig_chain_length: test accuracy vs chain length (1 = LoRA), one panel per model, one line per task.
- fig_<name>_lora_vs_cola: LoRA vs COLA bars per task (mean), every seed as a point.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from paper_repro.lm.tables import MODEL_LABELS
from paper_repro.plot_style import BOUND_STYLE, method_color, new_figure, savefig

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _label(model: str) -> str:
    return MODEL_LABELS.get(model, model)


def stepdown_figure(df: pd.DataFrame) -> Figure:
    """One panel per (model, task, setting) row of `stepdown_table`."""
    fig, axes = new_figure(1, len(df), width=2.8)
    for ax, (_, row) in zip(axes[0], df.iterrows()):
        ranks = sorted(int(c[6:]) for c in df.columns if c.startswith("mean_r") and not math.isnan(row[c]))
        means = [row[f"mean_r{r}"] for r in ranks]
        stds = [0.0 if math.isnan(row[f"std_r{r}"]) else row[f"std_r{r}"] for r in ranks]
        ax.errorbar(ranks, means, yerr=stds, marker="o", capsize=2, color=method_color("COLA"),
                    label="COLA step-down (r=8, then r)")
        if not math.isnan(row["lora_mean"]):
            ax.axhline(row["lora_mean"], **BOUND_STYLE, label="LoRA r=8")
        ax.set(title=f"{_label(row['model'])}: {row['task']}", xlabel="residual rank r (last 2 epochs)",
               ylabel="test accuracy (%)", xticks=ranks)
    axes[0][0].legend()
    return fig


def plot_stepdown(df: pd.DataFrame, fig_dir: Path) -> list[Path]:
    """fig_dir/fig3_rank_stepdown.png and .pdf (nothing for an empty table)."""
    return [] if df is None or df.empty else savefig(stepdown_figure(df), "fig3_rank_stepdown", fig_dir)


def chain_length_figure(df: pd.DataFrame) -> Figure:
    """Accuracy vs chain length per task; one panel per (model, setting)."""
    panels = list(df.groupby(["model", "setting"], sort=True))
    fig, axes = new_figure(1, len(panels), width=3.2)
    for ax, ((model, setting), grp) in zip(axes[0], panels):
        for i, (_, row) in enumerate(grp.iterrows()):
            lengths = sorted(int(c[5:]) for c in grp.columns if c.startswith("mean_") and not pd.isna(row[c]))
            stds = [0.0 if pd.isna(row[f"std_{n}"]) else row[f"std_{n}"] for n in lengths]
            ax.errorbar(lengths, [row[f"mean_{n}"] for n in lengths], yerr=stds, marker="o", capsize=2,
                        label=row["task"], color=method_color(row["task"], i))
        ax.set(title=f"{_label(model)}\n{setting}", xlabel="chain length (1 = LoRA)", ylabel="test accuracy (%)",
               xticks=[1, 2, 3])
        ax.legend()
    return fig


def plot_chain_length(df: pd.DataFrame, fig_dir: Path) -> list[Path]:
    """fig_dir/fig_chain_length.png and .pdf (nothing for an empty table)."""
    return [] if df is None or df.empty else savefig(chain_length_figure(df), "fig_chain_length", fig_dir)


def lora_vs_cola_figure(df: pd.DataFrame, title: str) -> Figure:
    """Bars = mean test accuracy of LoRA and COLA per task; dots = the individual seeds."""
    fig, axes = new_figure(1, 1, width=max(3.2, 1.4 * len(df)), height=2.8)
    ax = axes[0][0]
    x = np.arange(len(df))
    for k, (method, mean_col, vals_col) in enumerate((("LoRA", "lora_mean", "lora_values"),
                                                      ("COLA", "cola_mean", "cola_values"))):
        pos = x + (k - 0.5) * 0.38
        color = method_color(method)
        links = f"-{int(df['cola_links'].iloc[0])}" if method == "COLA" else ""
        ax.bar(pos, df[mean_col], width=0.36, color=color, alpha=0.45, label=f"{method}{links} (mean)")
        for p, vals in zip(pos, df[vals_col]):
            jitter = np.linspace(-0.08, 0.08, len(vals)) if len(vals) > 1 else [0.0]
            ax.scatter(p + np.asarray(jitter), vals, s=12, color=color, zorder=3)
    if "zero_shot" in df and df["zero_shot"].notna().any():
        ax.scatter(x, df["zero_shot"], marker="_", s=300, color="black", zorder=4, label="no fine-tuning")
    ax.set(xticks=x, xticklabels=list(df["task"]), ylabel="test accuracy (%)", title=title)
    lo = min([min(v) for v in (*df["lora_values"], *df["cola_values"]) if len(v)] + [50.0])
    ax.set_ylim(max(0.0, lo - 10), 100)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
    return fig


def plot_lora_vs_cola(df: pd.DataFrame, name: str, title: str, fig_dir: Path) -> list[Path]:
    """fig_dir/<name>.png and .pdf of `lora_vs_cola_figure` (nothing for an empty table)."""
    return [] if df is None or df.empty else savefig(lora_vs_cola_figure(df, title), name, fig_dir)

"""Where a chain can differ from LoRA: the epoch that MeZO's rule selects and the dev loss per epoch.

Up to its first knot a COLA run IS its LoRA pair: same seed (same sample, same first A, same batches), same LR
schedule (one linear decay over the whole run), and a knot preserves the network's outputs. So under MeZO's
best-dev-loss selection a chain's test accuracy can differ from LoRA's only when the selected epoch ends after
the first knot. Two diagnostics, pure functions of the saved per-epoch dev losses (`metrics.dev_loss_per_epoch`):

- `best_epoch_table`: per (task, variant), how often each epoch is selected, and how many of the chain's runs
  were selected at or before the first knot (where the chain is LoRA exactly).
- `dev_loss_gaps`: per (task, epoch), the paired dev-loss difference treatment - control at the SAME task, seed
  and LR (no LR selection: this isolates what the chain does to training, not what the grid picks). The LRs of
  one seed share its data sample, so each seed is one unit (its mean difference over the LRs); the mean over
  seeds gets a 95% percentile bootstrap interval over seeds (`stats.bootstrap_ci`). Epochs after the first knot
  are marked. A dev loss is an average over the dev examples of -log p(correct candidate), lower is better.
  `by_lr=True` keeps each LR apart (one pair per seed): pooling LRs can hide a gap whose sign depends on whether
  the run under- or over-fits in 5 epochs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from cola_theory.config import knots_from_epochs
from cola_theory.lm.run_config import epochs_per_link
from paper_repro.lm import stats
from paper_repro.plot_style import BOUND_STYLE, PALETTE, method_color, new_figure, savefig


def knot_epochs(cfg: dict, steps_per_epoch: int | None) -> tuple[float, ...]:
    """The epochs (fractional: the optimizer step where each is tied, over the steps per epoch) of a chain's
    knots inside the run; () for LoRA or a one-link chain, and nan for each when the steps per epoch are unknown."""
    per_link = epochs_per_link(cfg["epochs"], int(cfg.get("n_links", 1)), tuple(cfg.get("link_epochs") or ()))
    if cfg.get("method") == "lora" or len(per_link) < 2:
        return ()
    if not steps_per_epoch:
        return (math.nan,) * (len(per_link) - 1)
    _, knots = knots_from_epochs(per_link, int(steps_per_epoch))
    return tuple(k / int(steps_per_epoch) for k in knots)


def first_knot_epoch(cfg: dict, steps_per_epoch: int | None) -> float:
    """`knot_epochs`' first, inf when there is none (LoRA: never differs from itself)."""
    return (knot_epochs(cfg, steps_per_epoch) or (math.inf,))[0]


def knots_per_task(runs: pd.DataFrame, variant: str) -> dict[str, list[float]]:
    """task -> the knot epochs of `variant` (the same for every run of a task: its steps per epoch are fixed)."""
    g = runs[runs["variant"] == variant] if runs is not None and len(runs) else pd.DataFrame()
    return {} if g.empty else g.groupby("task")["knot_epochs"].first().map(list).to_dict()


def best_epoch_table(runs: pd.DataFrame, variants: tuple[str, ...], tasks: tuple[str, ...]) -> pd.DataFrame:
    """Per (task, variant) with best-dev runs: runs, how often each epoch won ('epoch e': count), and for chains
    'selected ≤ first knot' (runs whose selected epoch ends at or before the first knot: the chain = LoRA)."""
    rows = []
    if runs is None or runs.empty or "best_epoch" not in runs:
        return pd.DataFrame()
    have = runs[runs["best_epoch"].notna()]
    lengths = [len(x) for x in have.get("dev_loss_per_epoch", []) if isinstance(x, list | tuple)]
    n_epochs = max([int(have["best_epoch"].max()) if len(have) else 0, *lengths])
    for task in tasks:
        for variant in variants:
            g = have[(have["task"] == task) & (have["variant"] == variant)]
            if g.empty:
                continue
            best = g["best_epoch"].astype(int)
            row = {"task": task, "variant": variant, "runs": len(g)}
            row.update({f"epoch {e}": int((best == e).sum()) for e in range(1, n_epochs + 1)})
            knot = g["first_knot_epoch"].astype(float)
            known = knot.notna()
            if np.isinf(knot).all():  # LoRA, one-link chains: no knot inside the run
                row["first knot (epoch)"] = row["selected ≤ first knot"] = "-"
            else:
                row["first knot (epoch)"] = f"{knot[known].min():.2f}" if known.any() else "unknown"
                row["selected ≤ first knot"] = (f"{int((best[known] <= knot[known] + 1e-9).sum())} of "
                                                f"{int(known.sum())}")
            rows.append(row)
    return pd.DataFrame(rows)


def dev_loss_gaps(runs: pd.DataFrame, treatment: str, control: str, tasks: tuple[str, ...],
                  by_lr: bool = False) -> pd.DataFrame:
    """Per (task, epoch), or per (task, LR, epoch) with `by_lr` (lr is nan otherwise): n_pairs, the mean dev loss
    of each arm, the mean paired difference treatment - control with its 95% bootstrap and paired t intervals
    over seeds (the t interval is in the numeric table only), and whether the epoch ends after the treatment's
    first knot. Pairs: the same (task, seed, lr) in both arms, with a dev loss at every epoch."""
    cols = ["task", "lr", "epoch", "after_first_knot", "n_pairs", "n_seeds", "control_loss", "treatment_loss",
            "mean_diff", "ci_lo", "ci_hi", "t_lo", "t_hi"]
    if runs is None or runs.empty or "dev_loss_per_epoch" not in runs:
        return pd.DataFrame(columns=cols)
    have = runs[runs["dev_loss_per_epoch"].map(lambda x: isinstance(x, list | tuple) and len(x) > 0)]
    keys = ["task", "seed", "lr"]
    t = have[have["variant"] == treatment][[*keys, "dev_loss_per_epoch", "first_knot_epoch"]]
    c = have[have["variant"] == control][[*keys, "dev_loss_per_epoch"]]
    both = t.merge(c, on=keys, suffixes=("_t", "_c"))
    rows = []
    for task in tasks:
        at = both[both["task"] == task]
        for lr in sorted(set(at["lr"]), reverse=True) if by_lr else [math.nan]:
            g = at if math.isnan(lr) else at[at["lr"] == lr]
            g = g[[len(a) == len(b) for a, b in zip(g["dev_loss_per_epoch_t"], g["dev_loss_per_epoch_c"])]]
            if g.empty:
                continue
            lt = np.array(g["dev_loss_per_epoch_t"].tolist(), dtype=float)  # (pairs, epochs)
            lc = np.array(g["dev_loss_per_epoch_c"].tolist(), dtype=float)
            knot = float(g["first_knot_epoch"].min())
            seeds = g["seed"].to_numpy()
            for e in range(lt.shape[1]):
                d = lt[:, e] - lc[:, e]
                # the LRs of one seed share its sample: one unit per seed (its mean over LRs), seeds resampled
                units = np.array([d[seeds == s].mean() for s in np.unique(seeds)])
                lo, hi = stats.bootstrap_ci([units])  # nan below stats.MIN_PAIRS seeds
                t_lo, t_hi = stats.t_ci([units])
                rows.append({"task": task, "lr": lr, "epoch": e + 1, "after_first_knot": bool(e + 1 > knot + 1e-9),
                             "n_pairs": int(d.size), "n_seeds": int(units.size),
                             "control_loss": float(lc[:, e].mean()), "treatment_loss": float(lt[:, e].mean()),
                             "mean_diff": float(units.mean()), "ci_lo": lo, "ci_hi": hi, "t_lo": t_lo, "t_hi": t_hi})
    return pd.DataFrame(rows, columns=cols)


def gap_table(gaps: pd.DataFrame, treatment: str, control: str, star_cells: bool = False) -> pd.DataFrame:
    """Display form of `dev_loss_gaps`: one row per task (and LR, when kept apart), one column per epoch,
    'diff [lo, hi]'; a '*' marks the epochs after the first knot (where the chain can differ): on the column
    header, or with `star_cells` on each cell (rows of chains whose knots differ share the epoch columns)."""
    rows = []
    for (task, lr), g in gaps.groupby(["task", "lr"], sort=False, dropna=False):
        row = {"task": task, **({} if math.isnan(lr) else {"LR": f"{lr:g}"}),
               "pairs (seeds)": f"{int(g['n_pairs'].max())} ({int(g['n_seeds'].max())})"}
        for _, r in g.iterrows():
            ci = f" [{r['ci_lo']:+.3f}, {r['ci_hi']:+.3f}]" if math.isfinite(r["ci_lo"]) else ""
            star = "*" if r["after_first_knot"] else ""
            key, cell = (f"epoch {r['epoch']}", star) if star_cells else (f"epoch {r['epoch']}{star}", "")
            row[key] = f"{r['mean_diff']:+.3f}{ci}{cell}"
        rows.append(row)
    return pd.DataFrame(rows)


def variant_gaps(runs: pd.DataFrame, treatments: tuple[str, ...], control: str,
                 tasks: tuple[str, ...]) -> pd.DataFrame:
    """`dev_loss_gaps` by LR of each treatment (each with its own knots) against one control, stacked with a
    treatment column: which change to the chain moves its dev loss where, e.g. whether a chain without the optimizer
    reset still fits more slowly than LoRA (then the knot, not the reset, slows it)."""
    frames = [dev_loss_gaps(runs, t, control, tasks, by_lr=True).assign(treatment=t) for t in treatments]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def variant_gap_table(gaps: pd.DataFrame, control: str) -> pd.DataFrame:
    """Display form of `variant_gaps`: `gap_table` rows of each treatment (its knots starred per cell), a
    treatment column in front."""
    if gaps.empty:
        return pd.DataFrame()
    parts = [gap_table(g, t, control, star_cells=True).assign(treatment=t)
             for t, g in gaps.groupby("treatment", sort=False)]
    table = pd.concat(parts, ignore_index=True).fillna("")
    return table[["treatment", *[c for c in table.columns if c != "treatment"]]]


def plot_dev_loss(gaps: pd.DataFrame, knots: dict[str, list[float]], fig_dir: Path, treatment: str, control: str,
                  name: str = "fig_real_dev_loss_per_epoch") -> list[Path]:
    """One panel per task: mean dev loss per epoch of both arms (control solid, treatment dashed), one colour per
    LR when `gaps` keeps the LRs apart; the treatment's knots as dotted vertical lines."""
    if gaps is None or gaps.empty:
        return []
    tasks = list(dict.fromkeys(gaps["task"]))
    fig, axes = new_figure(1, len(tasks), width=3.0, height=2.6)
    for ax, task in zip(axes[0], tasks):
        at = gaps[gaps["task"] == task]
        for i, (lr, g) in enumerate(at.groupby("lr", sort=False, dropna=False)):
            lr_label = "" if math.isnan(lr) else f" {lr:g}"
            for arm, col, style in ((control, "control_loss", "-"), (treatment, "treatment_loss", "--")):
                color = method_color(arm.split("-")[0]) if math.isnan(lr) else PALETTE[i % len(PALETTE)]
                ax.plot(g["epoch"], g[col], style, marker="o", ms=3, color=color, label=f"{arm}{lr_label}")
        for k in knots.get(task, []):
            ax.axvline(k, **{**BOUND_STYLE, "linestyle": ":"})
        ax.set(title=f"{task} ({int(at['n_seeds'].max())} seeds)", xlabel="epoch", ylabel="dev loss",
               xticks=sorted(set(at["epoch"])))
    axes[0][-1].legend(title="dotted: knots", fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return savefig(fig, name, fig_dir)


def fixed_lr_gaps(runs: pd.DataFrame, treatment: str, control: str, tasks: tuple[str, ...]) -> pd.DataFrame:
    """Per (task, LR), no LR selection: test accuracy treatment - control at the same seed (`stats.compare` on the
    runs of that LR alone: mean, 95% bootstrap and paired t CIs over seeds, sign test), with the mean test
    accuracy of each arm and how many treatment runs selected an epoch after their first knot (only those can
    differ)."""
    cols = ["task", "lr", "n_pairs", "control_acc", "treatment_acc", "mean_diff", "ci_lo", "ci_hi", "t_lo", "t_hi",
            "n_pos", "n_neg", "n_ties", "after_knot"]
    if runs is None or runs.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for lr in sorted(set(runs["lr"]), reverse=True):
        at = runs[(runs["lr"] == lr) & np.isfinite(runs["test_acc"].astype(float))]
        comp, pairs = stats.compare(at, treatment, control, tasks=tasks), stats.paired(at, treatment, control)
        for _, r in comp[comp["task"] != "pooled"].iterrows():
            p = pairs[pairs["task"] == r["task"]]  # the seeds in both arms
            t = at[(at["task"] == r["task"]) & (at["variant"] == treatment) & at["seed"].isin(p["seed"])]
            late = int((t["best_epoch"].astype(float) > t["first_knot_epoch"].astype(float) + 1e-9).sum())
            rows.append({**{k: r[k] for k in ("task", "n_pairs", "mean_diff", "ci_lo", "ci_hi", "t_lo", "t_hi",
                                              "n_pos", "n_neg", "n_ties")},
                         "lr": lr, "control_acc": float(p["control"].mean()),
                         "treatment_acc": float(p["treatment"].mean()), "after_knot": f"{late} of {len(t)}"})
    return pd.DataFrame(rows, columns=cols)


def fixed_lr_table(gaps: pd.DataFrame, treatment: str, control: str) -> pd.DataFrame:
    """Display form of `fixed_lr_gaps`."""
    def ci(r) -> str:
        return f"{r['mean_diff']:+.2f}" + (f" [{r['ci_lo']:+.2f}, {r['ci_hi']:+.2f}]" if math.isfinite(r["ci_lo"])
                                          else "")

    return pd.DataFrame({"task": gaps["task"], "LR": [f"{x:g}" for x in gaps["lr"]], "pairs": gaps["n_pairs"],
                         control: gaps["control_acc"].map("{:.2f}".format),
                         treatment: gaps["treatment_acc"].map("{:.2f}".format),
                         f"{treatment} - {control} [95% CI]": [ci(r) for _, r in gaps.iterrows()],
                         "paired t 95% CI": [stats.fmt_t(r) for _, r in gaps.iterrows()],
                         "sign +/-/tie": [f"{a}/{b}/{c}" for a, b, c in zip(gaps["n_pos"], gaps["n_neg"],
                                                                           gaps["n_ties"])],
                         f"{treatment} selected after its first knot": gaps["after_knot"]})


def fixed_lr_variants(runs: pd.DataFrame, variants: tuple[str, ...], control: str,
                      tasks: tuple[str, ...]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`fixed_lr_gaps` of each of `variants` against `control` (e.g. the rank step-downs against LoRA), one block
    per variant: (display, numeric) with a `variant` column; rows only where both arms ran at that LR."""
    parts = [(v, fixed_lr_gaps(runs, v, control, tasks)) for v in variants]
    parts = [(v, g) for v, g in parts if len(g)]
    if not parts:
        return pd.DataFrame(), pd.DataFrame()
    shown = [fixed_lr_table(g, "step-down", control).assign(variant=v) for v, g in parts]
    shown = pd.concat(shown, ignore_index=True)
    shown = shown[["task", "LR", "variant", *[c for c in shown.columns if c not in ("task", "LR", "variant")]]]
    return shown, pd.concat([g.assign(variant=v) for v, g in parts], ignore_index=True)


def engine_noise(runs: pd.DataFrame, control: str, tasks: tuple[str, ...]) -> pd.DataFrame:
    """Pairs whose two selected models are the same mathematically: a chain (LoRA's schedule) and `control` at the
    same task, LR and seed, BOTH selected at an epoch at or before the chain's first knot. Up to that knot their dev
    losses are equal in exact arithmetic, so each rule picks the same epoch and the same model; their test
    accuracies differ only by float32 rounding, which differs between engines and pack layouts and which training
    can amplify until the two pick different epochs. Per task and per "same engine" (the engine label, packed (k) or
    sequential, forks aside): pairs, exact ties, pairs that picked different epochs, the largest |test difference|
    and the largest |dev-loss difference| at an epoch before the knot."""
    cols = ["task", "same engine", "pairs", "exact ties", "different epoch picked",
            "largest absolute difference (pp)", "largest dev-loss gap before the knot"]
    if runs is None or runs.empty or "best_epoch" not in runs:
        return pd.DataFrame(columns=cols)
    ok = runs[runs["best_epoch"].notna() & np.isfinite(runs["test_acc"].astype(float))]
    ctrl = {(r.task, r.lr, r.seed): r for r in ok[ok["variant"] == control].itertuples()}
    rows = []
    for r in ok[(ok["variant"] != control) & ok["task"].isin(tasks)].itertuples():
        c = ctrl.get((r.task, r.lr, r.seed))
        if c is None or r.lr_schedule != c.lr_schedule:  # other schedules differ from step 0
            continue
        knot = float(r.first_knot_epoch) + 1e-9
        if not (float(r.best_epoch) <= knot and float(c.best_epoch) <= knot):
            continue
        losses = [getattr(x, "dev_loss_per_epoch", None) for x in (r, c)]
        gap = max((abs(a - b) for a, b in list(zip(*losses))[:int(knot)]), default=math.nan) if all(
            isinstance(v, list | tuple) for v in losses) else math.nan  # epochs wholly before the knot
        rows.append({"task": r.task, "same engine": r.engine.replace(", forked", "") == c.engine,
                     "diff": float(r.test_acc) - float(c.test_acc), "moved": r.best_epoch != c.best_epoch,
                     "gap": gap})
    if not rows:
        return pd.DataFrame(columns=cols)
    d = pd.DataFrame(rows)
    out = d.groupby(["task", "same engine"], sort=False).agg(
        pairs=("diff", "count"), ties=("diff", lambda x: int((x == 0).sum())), moved=("moved", "sum"),
        worst=("diff", lambda x: float(x.abs().max())), gap=("gap", "max")).reset_index()
    order = {t: i for i, t in enumerate(tasks)}
    out = out.sort_values(["task", "same engine"], key=lambda s: s.map(order) if s.name == "task" else ~s)
    out = out.rename(columns=dict(zip(("ties", "moved", "worst", "gap"), cols[3:])))
    return out[cols].reset_index(drop=True)


def report_tables(runs: pd.DataFrame, treatment: str, control: str, tasks: tuple[str, ...],
                  variants: tuple[str, ...], fig_dir: Path, ablation: tuple[str, ...] = (),
                  stepdown: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())) -> list[tuple]:
    """The diagnostics of this module as the study report writes them: (name, display frame, numeric frame or
    None, caption, plot of the display frame or None) per table. `ablation`: the variants whose dev losses are
    also compared with `control`'s; `stepdown`: (variants, tasks) of the Figure 3 rows, compared with `control`
    at each LR."""
    gaps = dev_loss_gaps(runs, treatment, control, tasks)
    by_lr = dev_loss_gaps(runs, treatment, control, tasks, by_lr=True)
    fixed = fixed_lr_gaps(runs, treatment, control, tasks)
    abl = variant_gaps(runs, ablation, control, tasks)
    same = f"{treatment} - {control} at the same task, seed and LR"
    marks = f"* = after {treatment}'s first knot; lower is better for {treatment}"
    return [("table_real_best_epoch", best_epoch_table(runs, variants, tasks), None,
             "Which epoch MeZO's best-dev-loss rule selects (runs per epoch); a chain selected at or before its "
             "first knot is its LoRA pair exactly", None),
            ("table_real_dev_loss_gaps", gap_table(gaps, treatment, control), gaps,
             f"Dev loss per epoch, {same}, LRs pooled (a seed is one unit): mean [95% bootstrap CI] ({marks})", None),
            ("table_real_dev_loss_gaps_by_lr", gap_table(by_lr, treatment, control), by_lr,
             f"Dev loss per epoch, {same}, each LR apart: mean [95% bootstrap CI over seeds] ({marks})",
             lambda d: plot_dev_loss(by_lr, knots_per_task(runs, treatment), fig_dir, treatment, control)),
            ("table_real_fixed_lr", fixed_lr_table(fixed, treatment, control), fixed, "At each LR, no LR "
             f"selection: test accuracy (%) {treatment} - {control} at the same seed (a diagnostic beside the "
             "dev-selected verdicts)", None),
            ("table_real_fig3_fixed_lr", *fixed_lr_variants(runs, stepdown[0], control, stepdown[1]),
             f"Figure 3 at each LR, no LR selection: test accuracy (%) of each rank step-down - {control} at the "
             f"same seed (a step-down is its {control} pair up to its knot after epoch 3, so only a run selected "
             "after it can differ)", None),
            ("table_real_engine_noise", noise := engine_noise(runs, control, tasks), noise, "Engine noise: pairs "
             f"whose two selected models are the same mathematically (a chain and {control} at the same task, LR and "
             "seed, both selected at or before the chain's first knot, where in exact arithmetic both pick the same "
             "epoch); their test accuracies differ only by float32 rounding, which differs between engines and pack "
             "layouts and which training can amplify until the two pick different epochs", None),
            ("table_real_ablation_dev_loss", variant_gap_table(abl, control), abl,
             f"Dev loss per epoch, each ablation variant - {control} at the same task, seed and LR, each LR apart: "
             "mean [95% bootstrap CI over seeds] (a value marked * is after the variant's first knot; lower is "
             "better for the variant)", None)]

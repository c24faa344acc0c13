"""Statistics of LoRA-vs-COLA comparisons: LR chosen on dev per seed, paired differences, bootstrap, sign test.

Rules (pure functions of a frame of runs with columns task, variant, seed, lr, dev_acc, test_acc; accuracies in
percent):

- LR selection, per (task, variant, seed): the LR with the highest dev accuracy among the runs that finished
  (a finite dev and test accuracy), as MeZO picks its LR by dev accuracy. Ties (equal dev accuracy, common on a
  100-500 example dev set) go to the LOWER LR: deterministic, and the smaller step is the conservative choice.
  A cell where no run has a dev accuracy is kept only when it has exactly one LR ("single LR"); otherwise it is
  dropped (no LR can be chosen without looking at test).
- Paired difference, per task: treatment - control at the same seed (same seed = same MeZO sample, so the pair
  shares its train / dev / test data); seeds present in only one arm are left out. The LR grid is part of the
  budget: where the two arms of a pair tried different LRs (a grid still filling in), both are chosen again, by
  the same rule, on the LRs they have in common (no common LR: the pair is left out); `compare` counts them.
- Interval: 95% percentile bootstrap of the mean paired difference (10,000 resamples of the seeds, with
  replacement; numpy Generator seeded, so the interval is reproducible). Pooled over tasks: the mean of the
  per-task mean differences (every task weighs the same), resampling seeds WITHIN each task.
  With 5 seeds a percentile interval is narrow (it under-covers); it is a description, not a test.
- Beside it, the paired t interval (`t_ci`): mean +- t_{n-1} s / sqrt(n) over the seeds of a task; pooled, the
  mean of the task means with variance sum_k s_k^2 / n_k / K^2 and Welch-Satterthwaite degrees of freedom. With
  3-5 seeds it is much wider than the bootstrap (it charges for not knowing the spread). The verdict stays the
  bootstrap's, as the issue asks, but `describe` marks a "supported" / "not supported" whose t interval contains 0
  as fragile.
- One pair has no interval: resampling a single difference always returns it, a zero-width "interval" that says
  nothing about seed-to-seed spread. A task with fewer than MIN_PAIRS pairs gets no interval (nan) and the verdict
  "insufficient data", and the pooled row pools only the tasks that have MIN_PAIRS or more (its n_tasks says how
  many); the others still appear as their own rows.
- Resolution (`mde`): the smallest true mean difference the paired t test (two-sided, 5%) detects with 80%
  power, from the observed spread (noncentral t; the spread is taken as known, so with 3 seeds it is a rough
  guide). It says what "inconclusive at this scale" can and cannot rule out; `projected_mde` asks the same of a
  larger grid (n seeds x K tasks) with the within-task spread seen so far.
- Sign test: exact two-sided binomial test (scipy.stats.binomtest, p = 1/2) on the signs of the paired
  differences; ties (difference exactly 0) are DROPPED and counted.
- Sensitivity, learned tasks only (`learned_only`; a second reading beside the pooled verdict, never instead of
  it): a task whose fine-tuned accuracy is not above the untrained model's measures dev-selection noise, not
  fine-tuning. The rule is blind to the treatment - control difference: per task, the mean of the two arms'
  test accuracies of each pair minus the untrained model's, with its 95% percentile bootstrap interval over
  seeds; the task counts as learned when that interval lies above 0. The row "pooled, learned tasks" pools
  those tasks only; it exists only when the rule leaves some task out and keeps at least two. (Added when WSC,
  not learned by SmolLM2-135M, came to move the pooled reading: stated as such wherever it is shown.)
- Verdict from the interval: "supported" (lower bound > 0: the treatment is better), "not supported" (upper
  bound < 0: the treatment is worse), "inconclusive at this scale" (the interval contains 0), "insufficient
  data" (fewer than 2 pairs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

N_RESAMPLES = 10_000
LEVEL = 0.95
BOOT_SEED = 0
SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE, INSUFFICIENT = (
    "supported", "not supported", "inconclusive at this scale", "insufficient data")
VERDICTS = (SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE, INSUFFICIENT)
LR_RULE = ("LR chosen per (task, variant, seed) by the highest dev accuracy over the grid (ties -> the lower LR)")
_TOL = 1e-9  # dev accuracies closer than this are a tie
MIN_PAIRS = 2  # fewer paired seeds than this in a task: no interval, no place in the pooled row
LORA, COLA3 = "LoRA", "COLA-3"  # the variant labels of the main comparison (`study.variant_label`)
LEARNED = "pooled, learned tasks"  # the task label of the `learned_only` sensitivity row
POOLS = ("pooled", LEARNED)  # the task labels of rows that pool several tasks


def choose(grid: dict[float, tuple[float, float]]) -> tuple[float, str] | None:
    """The selection rule on one cell's finished runs, lr -> (dev_acc, test_acc): (lr, how), or None when no LR
    can be chosen without looking at test."""
    with_dev = {lr: dt for lr, dt in grid.items() if math.isfinite(dt[0])}
    if with_dev:
        best = max(dev for dev, _ in with_dev.values())
        tied = sorted(lr for lr, (dev, _) in with_dev.items() if dev >= best - _TOL)
        return tied[0], "best dev" + (f" (tie of {len(tied)} -> lower LR)" if len(tied) > 1 else "")
    return (next(iter(grid)), "single LR") if len(grid) == 1 else None


def select_lr_per_seed(runs: pd.DataFrame, keys: Sequence[str] = ("task", "variant", "seed")) -> pd.DataFrame:
    """One row per `keys` cell: the dev-selected run's lr, dev_acc, test_acc, plus lrs_tried, selected_by and
    grid (lr -> (dev_acc, test_acc) of the cell's finished runs, for re-selection on a common grid)."""
    keys = list(keys)
    cols = [*keys, "lr", "dev_acc", "test_acc", "lrs_tried", "selected_by", "grid"]
    if runs is None or runs.empty:
        return pd.DataFrame(columns=cols)
    out = []
    for cell, grp in runs.groupby(keys, sort=True):
        cell = cell if isinstance(cell, tuple) else (cell,)
        done = grp[np.isfinite(grp["test_acc"].astype(float))].sort_values("lr", kind="stable")
        grid: dict[float, tuple[float, float]] = {}
        for lr, dev, test in zip(done["lr"], done["dev_acc"], done["test_acc"]):
            grid.setdefault(float(lr), (float(dev), float(test)))  # a repeated LR: the first run counts
        picked = choose(grid)
        if picked is None:
            continue  # no dev accuracy and several LRs: nothing can be chosen without test
        lr, how = picked
        out.append({**dict(zip(keys, cell)), "lr": lr, "dev_acc": grid[lr][0], "test_acc": grid[lr][1],
                    "lrs_tried": int(grp["lr"].nunique()), "selected_by": how, "grid": grid})
    return pd.DataFrame(out, columns=cols)


def common_choice(*grids: dict) -> tuple[tuple[float, str], ...] | None:
    """(lr, how) of each arm, in the order given: every arm chosen by `choose` on the LRs all of them tried (their
    own choices when they tried the same LRs); None: no common LR, or no choice possible."""
    common = set.intersection(*(set(g) for g in grids)) if grids else set()
    picks = tuple(choose({lr: v for lr, v in g.items() if lr in common}) for g in grids) if common else (None,)
    return None if any(p is None for p in picks) else picks


def _on_common_grid(t_grid: dict, c_grid: dict) -> tuple[float, float, bool] | None:
    """(treatment test, control test, regridded) of one pair on `common_choice`'s LRs."""
    got = common_choice(t_grid, c_grid)
    return None if got is None else (t_grid[got[0][0]][1], c_grid[got[1][0]][1], set(t_grid) != set(c_grid))


def paired(sel: pd.DataFrame, treatment: str, control: str = LORA) -> pd.DataFrame:
    """Per (task, seed) present in both arms: test_acc of treatment and control, their difference, and whether
    the pair was chosen again on a common LR grid (rows of `select_lr_per_seed`; a frame without a grid column,
    e.g. runs at one fixed LR, is paired as it is)."""
    cols = ["task", "seed", "treatment", "control", "diff", "regridded"]
    if sel is None or sel.empty:
        return pd.DataFrame(columns=cols)
    extra = ["grid"] if "grid" in sel.columns else []
    t = sel[sel["variant"] == treatment][["task", "seed", "test_acc", *extra]]
    c = sel[sel["variant"] == control][["task", "seed", "test_acc", *extra]]
    both = t.merge(c, on=["task", "seed"], suffixes=("_t", "_c")).sort_values(["task", "seed"])
    rows = []
    for r in both.to_dict("records"):
        got = _on_common_grid(r["grid_t"], r["grid_c"]) if extra else (r["test_acc_t"], r["test_acc_c"], False)
        if got is not None:
            rows.append({"task": r["task"], "seed": r["seed"], "treatment": got[0], "control": got[1],
                         "diff": got[0] - got[1], "regridded": got[2]})
    return pd.DataFrame(rows, columns=cols)


def paired_arms(sel: pd.DataFrame, treatment: str, control: str = LORA) -> pd.DataFrame:
    """`paired`'s two arms as rows (task, seed, variant, test_acc): the paired seeds, each arm chosen on the LRs both
    tried, so that a table of the arms and the difference beside it describe the same runs while one arm's grid is
    ahead of the other's."""
    pairs = paired(sel, treatment, control)
    return pd.concat([pairs.assign(variant=v, test_acc=pairs[col]) for v, col in ((control, "control"),
                                                                                   (treatment, "treatment"))])


def bootstrap_ci(groups: Sequence[Sequence[float]], n_resamples: int = N_RESAMPLES, level: float = LEVEL,
                 seed: int = BOOT_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of mean_g(mean(groups[g])): seeds resampled with replacement within each
    group (one group = one task's paired differences). (nan, nan) if there are no groups or a group has fewer
    than MIN_PAIRS values (one value resamples to itself: a zero-width interval that measures nothing)."""
    arrays = [np.asarray(g, dtype=float) for g in groups]
    if not arrays or any(a.size < MIN_PAIRS for a in arrays):
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    stat = np.zeros(n_resamples)
    for a in arrays:
        stat += a[rng.integers(0, a.size, size=(n_resamples, a.size))].mean(axis=1)
    stat /= len(arrays)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(stat, [alpha, 1 - alpha])
    return float(lo), float(hi)


def t_ci(groups: Sequence[Sequence[float]], level: float = LEVEL) -> tuple[float, float]:
    """Paired t interval of mean_g(mean(groups[g])) (rules above); (nan, nan) under the same conditions as
    `bootstrap_ci`. Every group without spread gives the zero-width interval at the mean."""
    from scipy.stats import t as student_t

    centre, se, df = _se_df(groups)
    if not se > 0:  # nan (too few pairs) or 0 (no spread: the zero-width interval at the mean)
        return (centre, centre) if se == 0 else (math.nan, math.nan)
    half = float(student_t.ppf(0.5 + level / 2, df) * se)
    return centre - half, centre + half


def _se_df(groups: Sequence[Sequence[float]]) -> tuple[float, float, float]:
    """(mean of the task means, its standard error, Welch-Satterthwaite df); nan where `t_ci` has no interval."""
    arrays = [np.asarray(g, dtype=float) for g in groups]
    if not arrays or any(a.size < MIN_PAIRS for a in arrays):
        return math.nan, math.nan, math.nan
    centre = float(np.mean([a.mean() for a in arrays]))
    v = np.array([a.var(ddof=1) / a.size for a in arrays])  # squared standard error of each task mean
    if not v.any():
        return centre, 0.0, math.nan
    df = v.sum() ** 2 / np.sum(v**2 / np.array([a.size - 1 for a in arrays]))  # Welch-Satterthwaite (k = 1: n-1)
    return centre, float(math.sqrt(v.sum()) / len(arrays)), float(df)


def _detectable(se: float, df: float, power: float, level: float) -> float:
    """The true mean difference delta at which the two-sided level-`level` t test (statistic ~ noncentral t with
    df degrees of freedom and noncentrality delta / se) rejects with probability `power`."""
    from scipy.optimize import brentq
    from scipy.stats import nct
    from scipy.stats import t as student_t

    if not se > 0:  # no spread seen (all pairs tied): no estimate of the noise, no resolution (not zero)
        return math.nan
    crit = student_t.ppf(0.5 + level / 2, df)

    def shortfall(nc: float) -> float:
        # the far (lower) tail is below alpha / 2 and falls with nc; scipy returns NaN where it underflows
        return nct.sf(crit, df, nc) + np.nan_to_num(nct.cdf(-crit, df, nc)) - power

    hi = 2 * crit + 2  # expand the bracket (nct is NaN far out in its tail, so no fixed huge bound)
    while shortfall(hi) < 0:
        hi *= 2
    return float(brentq(shortfall, 0.0, hi) * se)


def mde(groups: Sequence[Sequence[float]], power: float = 0.8, level: float = LEVEL) -> float:
    """Minimum detectable effect (pp) of the paired t test on `groups` (one task's differences, or several tasks
    pooled as in `t_ci`), with the observed spread taken as the true one; nan where `t_ci` has no interval or
    the differences have no spread."""
    _, se, df = _se_df(groups)
    return _detectable(se, df, power, level)


def projected_mde(groups: Sequence[Sequence[float]], n_seeds: int, n_tasks: int, power: float = 0.8,
                  level: float = LEVEL) -> float:
    """`mde` of a grid of n_seeds paired seeds in each of n_tasks tasks (pooled as in `t_ci`), if every task had
    the within-task spread pooled over `groups`: s^2 = sum (n_k - 1) s_k^2 / sum (n_k - 1). An assumption (tasks
    not run yet may be noisier), stated wherever it is shown."""
    arrays = [np.asarray(g, dtype=float) for g in groups if len(g) >= MIN_PAIRS]
    if not arrays or n_seeds < MIN_PAIRS or n_tasks < 1:
        return math.nan
    s2 = sum((a.size - 1) * a.var(ddof=1) for a in arrays) / sum(a.size - 1 for a in arrays)
    return _detectable(math.sqrt(s2 / (n_seeds * n_tasks)), n_tasks * (n_seeds - 1), power, level)


def pair_rows(comp: pd.DataFrame, treatment: str, control: str) -> pd.DataFrame:
    """The `compare` rows (per task and pooled) of treatment vs control in a frame of several comparisons."""
    return comp[(comp["treatment"] == treatment) & (comp["control"] == control)] if len(comp) else comp


def pooled_row(comp: pd.DataFrame, treatment: str, control: str) -> pd.Series | None:
    """The pooled `compare` row of treatment vs control in a frame of several comparisons (None if absent)."""
    rows = pair_rows(comp, treatment, control)
    rows = rows[rows["task"] == "pooled"] if len(rows) else rows
    return rows.iloc[0] if len(rows) else None


def resolution(comp: pd.DataFrame, treatment: str, control: str, n_seeds: int, n_tasks: int) -> str:
    """What 'inconclusive at this scale' can rule out, for `compare` rows of treatment vs control: the pooled
    row's `mde`, and `projected_mde` for n_seeds x n_tasks from its tasks' spread ('' without a pooled row or
    without spread)."""
    pooled = pooled_row(comp, treatment, control)
    if pooled is None:
        return ""
    mine = pair_rows(comp, treatment, control)
    mine = mine[~mine["task"].isin(POOLS)]  # per-task rows only
    full = projected_mde(list(mine["diffs"]), n_seeds, n_tasks)  # (it skips tasks with too few pairs)
    if not (math.isfinite(pooled["mde"]) and math.isfinite(full)):
        return ""
    return (f"Resolution: with {pooled['n_pairs']} pairs over {pooled['n_tasks']} tasks, the pooled {treatment} - "
            f"{control} comparison detects a true difference of {pooled['mde']:.2f} pp with 80% power (paired t, "
            f"two-sided 5%, the observed spread taken as the true one); {n_seeds} seeds x {n_tasks} tasks would "
            f"detect {full:.2f} pp if every task had the within-task spread seen so far.\n")


@dataclass(frozen=True)
class SignTest:
    n_pos: int
    n_neg: int
    n_ties: int  # dropped
    p: float  # exact two-sided binomial p-value; nan when every pair is a tie (or there are none)


def sign_test(diffs: Sequence[float]) -> SignTest:
    """Exact two-sided sign test of the paired differences (ties dropped)."""
    from scipy.stats import binomtest

    d = np.asarray(diffs, dtype=float)
    d = d[np.isfinite(d)]
    pos, neg = int((d > 0).sum()), int((d < 0).sum())
    p = float(binomtest(pos, pos + neg, 0.5, alternative="two-sided").pvalue) if pos + neg else math.nan
    return SignTest(pos, neg, int(d.size - pos - neg), p)


def verdict(lo: float, hi: float, n_pairs: int) -> str:
    """The wording of an interval: supported / not supported / inconclusive at this scale / insufficient data."""
    if n_pairs < 2 or not (math.isfinite(lo) and math.isfinite(hi)):
        return INSUFFICIENT
    if lo > 0:
        return SUPPORTED
    if hi < 0:
        return NOT_SUPPORTED
    return INCONCLUSIVE


def compare(sel: pd.DataFrame, treatment: str, control: str = LORA, tasks: Sequence[str] | None = None,
            n_resamples: int = N_RESAMPLES, seed: int = BOOT_SEED) -> pd.DataFrame:
    """treatment - control per task and pooled (task = "pooled"): n_pairs, mean_diff, ci_lo, ci_hi, the sign
    test (n_pos, n_neg, n_ties, sign_p), the verdict, the resolution mde and n_regridded (pairs chosen on a
    common LR grid). Tasks in `tasks` order (default: sorted); tasks without a pair are left out; the pooled row
    averages the tasks with at least MIN_PAIRS pairs (none: no pooled row)."""
    pairs = paired(sel, treatment, control)
    order = list(tasks) if tasks is not None else sorted(set(pairs["task"]))
    rows, groups, pooled_regrid = [], [], 0
    for task in order:
        mine = pairs[pairs["task"] == task]
        d = mine["diff"].to_numpy(dtype=float)
        if d.size == 0:
            continue
        regrid = int(mine["regridded"].sum())
        if d.size >= MIN_PAIRS:
            groups.append(d)
            pooled_regrid += regrid
        rows.append({**_row(task, treatment, control, [d], d, n_resamples, seed), "n_regridded": regrid})
    if groups:
        rows.append({**_row("pooled", treatment, control, groups, np.concatenate(groups), n_resamples, seed),
                     "n_regridded": pooled_regrid})
    return pd.DataFrame(rows, columns=["task", "treatment", "control", "n_pairs", "n_tasks", "mean_diff", "ci_lo",
                                       "ci_hi", "t_lo", "t_hi", "n_pos", "n_neg", "n_ties", "sign_p", "verdict",
                                       "mde", "n_regridded", "diffs"])


def learned_tasks(sel: pd.DataFrame, treatment: str, control: str, untrained: Mapping[str, float],
                  tasks: Sequence[str] | None = None, n_resamples: int = N_RESAMPLES,
                  seed: int = BOOT_SEED) -> pd.DataFrame:
    """Per task with MIN_PAIRS or more pairs: is it learned? gain = mean over the pairs of (treatment + control) / 2
    minus the untrained test accuracy (pp), its 95% percentile bootstrap interval over seeds (ci_lo, ci_hi), and
    learned = ci_lo > 0 (False without an untrained accuracy). Blind to the treatment - control difference. Tasks
    in `tasks` order (default: sorted)."""
    pairs = paired(sel, treatment, control)
    rows = []
    for task in list(tasks) if tasks is not None else sorted(set(pairs["task"])):
        grp = pairs[pairs["task"] == task]
        if len(grp) < MIN_PAIRS:
            continue
        base = float(untrained.get(task, math.nan))
        gain = ((grp["treatment"] + grp["control"]) / 2 - base).to_numpy(dtype=float)
        lo, hi = bootstrap_ci([gain], n_resamples=n_resamples, seed=seed) if math.isfinite(base) else (
            math.nan, math.nan)
        rows.append({"task": task, "n_pairs": len(grp), "untrained": base, "gain": float(gain.mean()),
                     "ci_lo": lo, "ci_hi": hi, "learned": bool(lo > 0)})
    return pd.DataFrame(rows, columns=["task", "n_pairs", "untrained", "gain", "ci_lo", "ci_hi", "learned"])


def learned_only(sel: pd.DataFrame, treatment: str, control: str, untrained: Mapping[str, float],
                 n_resamples: int = N_RESAMPLES, seed: int = BOOT_SEED,
                 learned: pd.DataFrame | None = None) -> pd.DataFrame:
    """The sensitivity row (task = LEARNED): `compare`'s pooled row over the tasks `learned_tasks` keeps; empty
    when it keeps every task of the pooled row (nothing to add) or fewer than two (nothing to pool). `learned`:
    `learned_tasks`' frame for these arms when the caller already has it (same rule, any task order)."""
    ok = learned_tasks(sel, treatment, control, untrained, n_resamples=n_resamples, seed=seed) \
        if learned is None else learned
    keep = sorted(ok["task"][ok["learned"]])
    if len(keep) < 2 or len(keep) == len(ok):
        return pd.DataFrame()
    comp = compare(sel[sel["task"].isin(keep)], treatment, control, keep, n_resamples, seed)
    return comp[comp["task"] == "pooled"].assign(task=LEARNED).reset_index(drop=True)


def _row(task, treatment, control, groups, flat, n_resamples, seed) -> dict:
    lo, hi = bootstrap_ci(groups, n_resamples=n_resamples, seed=seed)
    t_lo, t_hi = t_ci(groups)
    s = sign_test(flat)
    return {"task": task, "treatment": treatment, "control": control, "n_pairs": int(flat.size),
            "n_tasks": len(groups), "mean_diff": float(np.mean([g.mean() for g in groups])), "ci_lo": lo,
            "ci_hi": hi, "t_lo": t_lo, "t_hi": t_hi, "n_pos": s.n_pos, "n_neg": s.n_neg, "n_ties": s.n_ties,
            "sign_p": s.p, "verdict": verdict(lo, hi, int(flat.size)), "mde": mde(groups),
            "diffs": [float(x) for x in flat]}


def fmt_t(row) -> str:
    """'[-0.20, +0.13]': the paired t interval of a `compare` row, '-' where it has none."""
    return "-" if not math.isfinite(row["t_lo"]) else f"[{row['t_lo']:+.2f}, {row['t_hi']:+.2f}]"


def is_fragile(row) -> bool:
    """A decided verdict ("supported" / "not supported") whose paired t interval contains 0."""
    return (row["verdict"] in (SUPPORTED, NOT_SUPPORTED) and math.isfinite(row["t_lo"])
            and row["t_lo"] <= 0 <= row["t_hi"])


def describe(row) -> str:
    """'+1.23 pp, 95% CI [+0.40, +2.10], paired t [-0.50, +2.96], fragile: the t interval contains 0 (5 pairs;
    sign test 5+/0-, p = 0.0625)' for one `compare` row."""
    ci = "no interval" if not math.isfinite(row["ci_lo"]) else f"[{row['ci_lo']:+.2f}, {row['ci_hi']:+.2f}]"
    if math.isfinite(row["t_lo"]):
        ci += f", paired t {fmt_t(row)}"
        if is_fragile(row):
            ci += ", fragile: the t interval contains 0"
    p = "p = -" if not math.isfinite(row["sign_p"]) else f"p = {row['sign_p']:.3g}"
    regrid = int(row.get("n_regridded", 0) or 0)
    ties = (f", {row['n_ties']} tie(s) dropped" if row["n_ties"] else "") + (
        f"; {regrid} pair(s) on their common LR grid" if regrid else "")
    n_tasks = row.get("n_tasks")
    where = f"{row['n_pairs']} pairs" + (f" over {n_tasks} task{'' if n_tasks == 1 else 's'}"
                                         if row["task"] in POOLS else "")
    return (f"{row['mean_diff']:+.2f} pp, 95% CI {ci} ({where}; sign test {row['n_pos']}+/{row['n_neg']}-"
            f"{ties}, {p})")

"""What the `real` grid costs: minutes per run measured from each result file, and what the missing runs would take.

A pure function of saved results (`study.load_study`): every result records its wall time (`meta.wall_time_s`; a
run trained in a pack of k records the pack's wall time / k) and the torch threads it ran with. Per task and
device: how many runs were measured, the median and range of minutes per run, the run-hours spent, how many runs
of the profile are still missing, and the projection `missing x median` for one process on that device. The CPU
runs here mostly ran as two single-threaded processes side by side, so their measured minutes already include
that sharing and two such processes finish the projection in about half the time. Tasks with no measured run on a
device get no projection (their inputs differ too much in length to borrow another task's cost). A forked run
(`cola_theory.lm.fork`: it started from a family member's first-knot checkpoint) trained only its last links: its
hours count as spent, but the minutes per run come from the runs trained from step 0. The projection is given
twice: every missing run from step 0, and with the forks still to come (`load_study`'s coverage: the optimizer
steps the missing runs train when run_all runs them one at a time, a family's first link once; the projection is
scaled by that share of their steps, as a forked run's cost follows the share of its steps it trains
(BENCHMARKS.md, fork_bench).
"""

from __future__ import annotations

import math

import pandas as pd

CAPTION = ("What the grid costs: minutes per run from the result files (a pack's wall time / its size; the CPU runs "
           "mostly ran as two one-thread processes side by side; forked runs count in the hours spent, not in the "
           "minutes per run) and missing runs x median for one process, from step 0 and with the forks to come "
           "(scaled by the steps they train)")
COLUMNS = ("task", "device", "runs measured", "threads", "pack sizes", "min per run: median [range]",
           "run-hours spent", "missing runs", "projected hours (one process)", "with forks")


def _values(s: pd.Series) -> str:
    vals = sorted({int(v) for v in s.dropna()})
    return ", ".join(map(str, vals)) if vals else "-"


def cost_table(runs: pd.DataFrame, coverage: pd.DataFrame, tasks: tuple[str, ...]) -> pd.DataFrame:
    """One row per (task, device) with measured runs, a row per task with none (missing count only), and per device
    a total that projects the tasks measured on it and names the missing ones it cannot project.
    `coverage` is `load_study`'s (group "all": every job once)."""
    cov = coverage[coverage["group"] == "all"].set_index("task")
    missing = {t: int(cov.loc[t, "total"] - cov.loc[t, "present"]) if t in cov.index else 0 for t in tasks}
    share = {t: float(cov.loc[t, "forked_steps_left"] / cov.loc[t, "steps_left"])
             if t in cov.index and cov.loc[t, "steps_left"] else 1.0 for t in tasks}  # steps trained with forks
    timed = runs[pd.to_numeric(runs.get("wall_time_s"), errors="coerce").notna()] if len(runs) else runs
    rows = []
    for task in tasks:
        mine = timed[timed["task"] == task] if len(timed) else timed
        if not len(mine):
            rows.append({"task": task, "device": "-", "runs measured": 0, "threads": "-", "pack sizes": "-",
                         "min per run: median [range]": "-", "median_min": math.nan, "run-hours spent": 0.0,
                         "missing runs": missing[task], "projected hours (one process)": math.nan,
                         "with forks": math.nan})
            continue
        for device, d in mine.groupby("device", sort=True):
            spent = d["wall_time_s"].astype(float) / 60.0
            whole = d[d["forked_at_step"].isna()] if "forked_at_step" in d else d  # trained from step 0
            minutes = (whole if len(whole) else d)["wall_time_s"].astype(float) / 60.0
            packs = d["engine"].str.extract(r"packed \((\d+)\)")[0].astype(float).fillna(1.0)
            med = float(minutes.median())
            rows.append({"task": task, "device": device, "runs measured": len(d), "threads": _values(
                d["torch_threads"]), "pack sizes": _values(packs),
                "min per run: median [range]": f"{med:.1f} [{minutes.min():.1f}, {minutes.max():.1f}]",
                "median_min": med, "run-hours spent": float(spent.sum() / 60.0), "missing runs": missing[task],
                "projected hours (one process)": med * missing[task] / 60.0,
                "with forks": med * missing[task] * share[task] / 60.0})
    out = pd.DataFrame(rows)
    totals = []
    for device in sorted(set(out["device"]) - {"-"}) or ["-"]:
        on = out[out["device"] == device]
        unprojected = [t for t in tasks if missing[t] and t not in set(on["task"])]
        totals.append({"task": "all", "device": device, "runs measured": int(on["runs measured"].sum()),
                       "threads": "-", "pack sizes": "-", "min per run: median [range]": "-", "median_min": math.nan,
                       "run-hours spent": float(on["run-hours spent"].sum()), "missing runs": sum(missing.values()),
                       **{c: float(on[c].sum()) if len(on) else math.nan
                          for c in ("projected hours (one process)", "with forks")},
                       "not projected (no run measured)": ", ".join(unprojected)})
    out = pd.concat([out, pd.DataFrame(totals)], ignore_index=True)
    return out[[*COLUMNS, "median_min", "not projected (no run measured)"]]


def shown(table: pd.DataFrame) -> pd.DataFrame:
    """The display form: hours to one decimal, NaN as '-'."""
    df = table.drop(columns=["median_min"]).copy()
    for c in ("run-hours spent", "projected hours (one process)", "with forks"):
        df[c] = [f"{v:.1f}" if isinstance(v, float) and math.isfinite(v) else "-" for v in df[c]]
    df["not projected (no run measured)"] = df["not projected (no run measured)"].fillna("")
    return df

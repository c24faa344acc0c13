"""What forking saves (`cola_theory.lm.fork`), measured on the committed `real` result files, not on a toy.

A forked run starts from a family member's first-knot checkpoint: it trains its last links only and scores dev at
the epochs after the knot. This script compares, per (task, device, engine, threads), the wall time per run of the
forked runs with that of the runs of the same variants trained from step 0, beside the fraction of optimizer
steps a forked run trains ((T - s) / T). A family of n runs then costs 1 + (n - 1) x ratio runs instead of n.

    python benchmarks/fork_bench.py [--results-dir paper_repro/results]   # -> results/fork_bench.json (~20 s)
    python benchmarks/make_benchmarks_md.py                               # -> ../BENCHMARKS.md

Goal: a forked rank step-down run (2 of 5 epochs trained) costs at most half a run trained from step 0.
Wall times of runs killed and resumed count only the last process's time, so medians (not means) are compared.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GOAL = 0.5


def _pack(engine: str) -> str:
    return engine.replace(", forked", "")


def measure(results_dir: Path) -> dict:
    from cola_theory.results import environment_meta
    from paper_repro.lm import study

    runs, _ = study.load_study(results_dir, warn=lambda m: None)
    if runs.empty or "forked_at_step" not in runs or runs["forked_at_step"].isna().all():
        raise SystemExit(f"no forked run in {results_dir}: run a family first (e.g. the rank step-down of one LR "
                         "and seed: `run_all.py --profile real --only lm --group real_fig3 --where lr=1e-4`)")
    # the four step-downs cost the same up to their last link's rank (2-8 of a 576-wide layer): one kind
    kind = runs["variant"].map(lambda v: "step-down 8→r" if v.startswith("step-down") else v)
    runs = runs.assign(pack=runs["engine"].map(_pack), forked=runs["forked_at_step"].notna(), variant=kind,
                       minutes=runs["wall_time_s"].astype(float) / 60.0)
    rows = []
    for (task, device, pack, threads, variant), d in runs.groupby(["task", "device", "pack", "torch_threads",
                                                                    "variant"], sort=True):
        f, w = d[d["forked"]], d[~d["forked"]]
        if f.empty or w.empty:
            continue
        knot = float(f["first_knot_epoch"].iloc[0])
        rows.append({"task": task, "device": device, "engine": pack, "threads": int(threads), "variant": variant,
                     "runs from step 0": len(w), "min per run from step 0": float(w["minutes"].median()),
                     "forked runs": len(f), "min per forked run": float(f["minutes"].median()),
                     "steps trained by a forked run": 1.0 - knot / 5.0})
    if not rows:
        raise SystemExit("no (task, device, engine, threads, variant) has both forked runs and runs from step 0")
    for r in rows:
        r["ratio"] = r["min per forked run"] / r["min per run from step 0"]
    return {"meta": environment_meta(), "goal": GOAL, "results_dir": str(results_dir), "rows": rows}


def markdown(rep: dict) -> str:
    df = pd.DataFrame(rep["rows"])
    lines = ["| task | device | engine | threads | variant | runs from step 0: n, median min | forked: n, median min "
             "| ratio | steps trained | family of 4: runs' worth |", "|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in df.iterrows():
        lines.append(f"| {r['task']} | {r['device']} | {r['engine']} | {r['threads']} | {r['variant']} | "
                     f"{r['runs from step 0']}, {r['min per run from step 0']:.1f} | {r['forked runs']}, "
                     f"{r['min per forked run']:.1f} | {r['ratio']:.2f} | {r['steps trained by a forked run']:.2f} | "
                     f"{1 + 3 * r['ratio']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", type=Path, default=ROOT / "paper_repro" / "results")
    p.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results" / "fork_bench.json")
    args = p.parse_args(argv)
    rep = measure(args.results_dir)
    from cola_theory.results import atomic_write_text

    atomic_write_text(args.json, json.dumps(rep, indent=1, default=str))
    print(markdown(rep))
    print(f"[fork_bench] wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

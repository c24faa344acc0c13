"""T4: rank step-down (COLA Figure 3 in miniature). Two links: rank 8 for the first 60% of the steps, then
rank 2/4/6/8, against one LoRA link of rank 8, at the same total step budget.

Planted least squares with a target change of rank k = 12 > 8 (m, n >= 24), so rank 8 alone is not enough:
LoRA stays above the Eckart-Young floor of rank 8, while the chain has rank <= 8 + r2. `param_steps` is
the adapter training cost sum_links r (m + n) steps (the residual phase at a lower rank is cheaper).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cola_theory.problems import make_problem
from paper_repro.theory.common import (
    BELOW_RANK_FLOOR,
    below_rank_floor,
    cached,
    check_size,
    finish,
    load,
    lr_sweep,
    md_table,
    mean_std,
    rank_floor,
    result_file,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TAG, STEM, FIG = "T4", "rank_stepdown", "t4_rank_stepdown"
PROBLEM = {"m": 24, "n": 32, "k": 12, "N": 400}
FIRST_RANK, SPLIT = 8, 0.6
SECOND_RANKS = (2, 4, 6, 8)
SETTINGS = {
    "smoke": {"total_steps": 40, "seeds": [0], "lrs": [0.1], "second_ranks": [2, 8]},
    "full": {"total_steps": 300, "seeds": [0, 1, 2], "lrs": [0.03, 0.1, 0.3, 1.0], "second_ranks": list(SECOND_RANKS)},
}
COLUMNS = ["method", "ranks", "lr", "seed", "final_loss", "dist", "rank_delta", "floor", "param_steps", "status",
           "diverged_step", "chosen", "holds"]


def _problem(seed: int):
    return make_problem("least_squares", seed=seed, **PROBLEM)


def methods(cfg: dict) -> dict[str, dict]:
    knot = round(SPLIT * cfg["total_steps"])
    out = {f"LoRA r={FIRST_RANK}": {"n_links": 1, "rank": FIRST_RANK}}
    for r2 in cfg["second_ranks"]:
        out[f"COLA {FIRST_RANK}->{r2}"] = {"knots": (knot,), "rank": (FIRST_RANK, r2)}
    return out


def _compute(cfg: dict) -> tuple[list, dict]:
    spec = methods(cfg)
    base = {"total_steps": cfg["total_steps"], "alpha": 16.0, "optimizer": "adamw", "lr_schedule": "linear"}
    rows = lr_sweep(spec, cfg["lrs"], cfg["seeds"], _problem, base)
    T, knot, mn = cfg["total_steps"], round(SPLIT * cfg["total_steps"]), PROBLEM["m"] + PROBLEM["n"]
    stars = {seed: _problem(seed).Delta_star for seed in cfg["seeds"]}
    for r in rows:
        s = spec[r["method"]]
        ranks = (s["rank"],) if s.get("n_links") == 1 else s["rank"]
        r["ranks"] = "/".join(map(str, ranks))
        r["param_steps"] = ranks[0] * mn * T if len(ranks) == 1 else (ranks[0] * knot + ranks[1] * (T - knot)) * mn
        r["floor"] = rank_floor(stars[r["seed"]], min(sum(ranks), min(PROBLEM["m"], PROBLEM["n"])))
        r["holds"] = bool(r["dist"] >= r["floor"] - 1e-9)
    return rows, {"problem": PROBLEM, "split": SPLIT, "knot": knot}


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method and r["chosen"]]
        grid = sorted({r["lr"] for r in rows if r["method"] == method})
        d, ds = mean_std([r["dist"] for r in rs])
        f, fs = mean_std([r["final_loss"] for r in rs])
        edge = len(grid) > 1 and rs[0]["lr"] in (grid[0], grid[-1])
        out.append({"method": method, "ranks": rs[0]["ranks"], "lr": rs[0]["lr"], "lr_at_grid_edge": edge,
                    "dist": d, "dist_std": ds,
                    "final_loss": f, "loss_std": fs, "floor": sum(r["floor"] for r in rs) / len(rs),
                    "param_steps": rs[0]["param_steps"], "seeds": len(rs)})
    return out


def config(size: str) -> dict:
    """The config its result is saved with (a saved result made with another one is recomputed)."""
    return {"experiment": TAG, "size": check_size(size), "problem": PROBLEM, "first_rank": FIRST_RANK,
            "split": SPLIT, **SETTINGS[size]}


def run(out_dir: Path, size: str = "full", force: bool = False) -> list[Path]:
    cfg = config(size)
    payload = cached(TAG, result_file(out_dir, STEM), cfg, lambda: _compute(cfg), force)
    rows = payload["history"]
    summ = summarize(rows)
    text = (f"least_squares {PROBLEM} (target rank {PROBLEM['k']}); {cfg['total_steps']} AdamW steps, alpha = 16; "
            f"COLA: rank {FIRST_RANK} for the first {SPLIT:.0%} of the steps, then the second rank; lr grid "
            f"{cfg['lrs']} (best mean final loss per method); floor = Eckart-Young bound at rank <= sum of "
            "link ranks.\n\n"
            + md_table(summ, ["method", "ranks", "lr", "lr_at_grid_edge", "dist", "dist_std", "final_loss",
                              "loss_std", "floor", "param_steps", "seeds"]))
    return finish(TAG, out_dir, STEM, rows, COLUMNS, "rank step-down", text, below_rank_floor(rows),
                  BELOW_RANK_FLOOR, "; ".join(f"{s['method']}: dist {s['dist']:.3g}" for s in summ))


def figure(out_dir: Path) -> Figure:
    """The matplotlib Figure, drawn from the saved result only (tests read its data back)."""
    from paper_repro.plot_style import BOUND_STYLE, method_color, new_figure

    rows = load(result_file(out_dir, STEM))["history"]
    summ = summarize(rows)
    lora = [s for s in summ if s["method"].startswith("LoRA")]
    cola = [s for s in summ if s["method"].startswith("COLA")]
    fig, axes = new_figure(1, 2, width=3.3)
    for ax, key, ylabel in [(axes[0][0], "dist", r"$\|\Delta-\Delta^*\|_F/\|\Delta^*\|_F$"),
                            (axes[0][1], "final_loss", "final loss f")]:
        r2 = [int(s["ranks"].split("/")[1]) for s in cola]
        ax.errorbar(r2, [max(s[key], 1e-16) for s in cola], yerr=[s[key + "_std" if key == "dist" else "loss_std"]
                    for s in cola], marker="o", color=method_color("COLA"), capsize=2,
                    label=f"COLA: rank {FIRST_RANK}, then r2")
        for s in lora:
            ax.axhline(max(s[key], 1e-16), color=method_color("LoRA"), label=f"LoRA rank {FIRST_RANK}")
        if key == "dist":
            pos = [(r, s["floor"]) for r, s in zip(r2, cola) if s["floor"] > 1e-12]  # 8 + r2 >= k: floor 0
            ax.plot([r for r, _ in pos], [f for _, f in pos], **BOUND_STYLE, marker="_", ms=14,
                    label=f"floor, rank ≤ {FIRST_RANK}+r2 (0 if ≥ {PROBLEM['k']})")
            ax.axhline(lora[0]["floor"], **{**BOUND_STYLE, "linestyle": ":"}, label=f"floor, rank ≤ {FIRST_RANK}")
        ax.set_yscale("log")
        ax.set_xticks(list(SECOND_RANKS))
        ax.set_xlabel("rank of the second (residual) link r2")
        ax.set_ylabel(ylabel)
    axes[0][0].legend(loc="center right")
    fig.suptitle(f"Rank step-down at a fixed budget (target rank {PROBLEM['k']})", fontsize=9)
    return fig


def plot(out_dir: Path, fig_dir: Path) -> list[Path]:
    """fig_dir/<FIG>.png and .pdf of `figure(out_dir)`."""
    from paper_repro.plot_style import savefig

    return savefig(figure(out_dir), FIG, fig_dir)

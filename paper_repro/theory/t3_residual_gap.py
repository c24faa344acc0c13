"""T3: residual learning closes the gap. LoRA vs COLA (2/3/4/8 links) vs full fine-tuning at a fixed step budget.

Planted least squares with a target change Delta* of rank k = 6 > r = 2. A single rank-r link cannot get
closer than the Eckart-Young floor sqrt(sum_{i>r} s_i^2)/||Delta*||_F; a chain of L links has rank <= L r,
so from L = 3 on it can reach Delta*. Every method runs through the same `run_chain` (AdamW, linear
schedule, alpha/r = 2; full fine-tuning is MatrixBackend(mode="full")), lr tuned per method on one grid.
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

TAG, STEM, FIG = "T3", "residual_gap", "t3_residual_gap"
RANK = 2
PROBLEM = {"m": 30, "n": 40, "k": 6, "N": 400}
METHODS = {"LoRA": {"n_links": 1}, "COLA-2": {"n_links": 2}, "COLA-3": {"n_links": 3},
           "COLA-4": {"n_links": 4}, "COLA-8": {"n_links": 8}, "full FT": {"n_links": 1, "mode": "full"}}
SETTINGS = {
    "smoke": {"total_steps": 40, "seeds": [0], "lrs": [0.03, 0.1], "methods": ["LoRA", "COLA-4", "full FT"]},
    "full": {"total_steps": 300, "seeds": [0, 1, 2], "lrs": [0.03, 0.1, 0.3, 1.0], "methods": list(METHODS)},
}
COLUMNS = ["method", "mode", "n_links", "rank", "lr", "seed", "final_loss", "dist", "rank_delta", "floor", "status",
           "diverged_step", "chosen"]


def _problem(seed: int):
    return make_problem("least_squares", seed=seed, **PROBLEM)


def _compute(cfg: dict) -> tuple[list, dict]:
    methods = {m: METHODS[m] for m in cfg["methods"]}
    base = {"total_steps": cfg["total_steps"], "rank": RANK, "alpha": 2.0 * RANK, "optimizer": "adamw",
            "lr_schedule": "linear"}
    rows = lr_sweep(methods, cfg["lrs"], cfg["seeds"], _problem, base)
    floors = {seed: _problem(seed).Delta_star for seed in cfg["seeds"]}
    for r in rows:
        links = METHODS[r["method"]]["n_links"]
        r["n_links"], r["rank"] = links, (RANK if r["mode"] == "lora" else None)
        budget = links * RANK if r["mode"] == "lora" else min(PROBLEM["m"], PROBLEM["n"])
        r["floor"] = rank_floor(floors[r["seed"]], budget)  # Eckart-Young floor of dist at rank <= L r
        r["holds"] = bool(r["dist"] >= r["floor"] - 1e-9)  # no rank-L r chain can beat it
    return rows, {"problem": PROBLEM, "target_rank": PROBLEM["k"], "rank": RANK}


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method and r["chosen"]]
        grid = sorted({r["lr"] for r in rows if r["method"] == method})
        d, ds = mean_std([r["dist"] for r in rs])
        f, fs = mean_std([r["final_loss"] for r in rs])
        edge = len(grid) > 1 and rs[0]["lr"] in (grid[0], grid[-1])
        out.append({"method": method, "lr": rs[0]["lr"], "lr_at_grid_edge": edge, "dist": d, "dist_std": ds,
                    "final_loss": f, "loss_std": fs, "floor": sum(r["floor"] for r in rs) / len(rs),
                    "rank": max(r["rank_delta"] for r in rs), "seeds": len(rs)})
    return out


def config(size: str) -> dict:
    """The config its result is saved with (a saved result made with another one is recomputed)."""
    return {"experiment": TAG, "size": check_size(size), "problem": PROBLEM, "rank": RANK, **SETTINGS[size]}


def run(out_dir: Path, size: str = "full", force: bool = False) -> list[Path]:
    cfg = config(size)
    payload = cached(TAG, result_file(out_dir, STEM), cfg, lambda: _compute(cfg), force)
    rows = payload["history"]
    summ = summarize(rows)
    text = (f"least_squares {PROBLEM}, target rank k={PROBLEM['k']}, link rank r={RANK}, "
            f"{cfg['total_steps']} AdamW steps in total for every method; lr grid {cfg['lrs']} (best mean final "
            "loss per method); dist = ||Delta - Delta*||_F / ||Delta*||_F, floor = Eckart-Young bound for "
            "rank <= links * r.\n\n"
            + md_table(summ, ["method", "lr", "lr_at_grid_edge", "dist", "dist_std", "final_loss", "loss_std", "floor",
                              "rank", "seeds"]))
    return finish(TAG, out_dir, STEM, rows, COLUMNS + ["holds"], "residual learning closes the gap", text,
                  below_rank_floor(rows), BELOW_RANK_FLOOR,
                  "; ".join(f"{s['method']}: dist {s['dist']:.3g}" for s in summ))


def figure(out_dir: Path) -> Figure:
    """The matplotlib Figure, drawn from the saved result only (tests read its data back)."""
    from paper_repro.plot_style import BOUND_STYLE, method_color, new_figure

    rows = load(result_file(out_dir, STEM))["history"]
    summ = summarize(rows)
    fig, axes = new_figure(1, 2, width=3.4)
    x = list(range(len(summ)))
    labels = [s["method"] for s in summ]
    colors = [method_color(s["method"], i) for i, s in enumerate(summ)]
    for ax, key, ylabel in [(axes[0][0], "dist", r"$\|\Delta-\Delta^*\|_F/\|\Delta^*\|_F$"),
                            (axes[0][1], "final_loss", "final loss f")]:
        vals = [max(s[key], 1e-16) for s in summ]
        ax.bar(x, vals, color=colors, alpha=0.85)
        for i, method in enumerate(labels):  # each seed at its chosen lr
            pts = [max(r[key], 1e-16) for r in rows if r["method"] == method and r["chosen"]]
            ax.plot([i] * len(pts), pts, "k.", ms=3)
        if key == "dist":
            pos = [(i, s["floor"]) for i, s in zip(x, summ) if s["floor"] > 1e-12]  # rank >= k: floor 0
            ax.hlines([f for _, f in pos], [i - 0.45 for i, _ in pos], [i + 0.45 for i, _ in pos], **BOUND_STYLE,
                      label="Eckart-Young floor of rank ≤ L·r (0 from L = 3 on, not drawn)")
            fig.legend(loc="lower center", bbox_to_anchor=(0.5, -0.12))
        ax.set_yscale("log")
        ax.set_xticks(x, labels, rotation=30, ha="right")
        ax.set_ylabel(ylabel)
    fig.suptitle(f"Fixed step budget, target rank {PROBLEM['k']}, link rank {RANK}", fontsize=9)
    return fig


def plot(out_dir: Path, fig_dir: Path) -> list[Path]:
    """fig_dir/<FIG>.png and .pdf of `figure(out_dir)`."""
    from paper_repro.plot_style import savefig

    return savefig(figure(out_dir), FIG, fig_dir)

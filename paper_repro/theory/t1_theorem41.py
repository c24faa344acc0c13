"""T1: COLA Theorem 4.1 measured. Idealized COLA (Algorithm 2) on nonconvex problems: average FW gap vs T.

K = {||Delta||_* <= tau} with tau = ||Delta*||_* (the planted change lies in K), D = 2 tau, Delta_1 = 0,
M = f(Delta_1) - lower_bound (lower_bound = 0: the losses are nonnegative), beta the problem's certified
smoothness constant. Each step trains a rank-r LoRA link by projected SGD on <G~_t, B A> (G~_t a minibatch
gradient), so the oracle is inexact; eps_t is measured with the exact gradient. For every T the step is
eta = theorem41_eta(M, beta, D, T) and the measured (1/T) sum_t g_t is checked against
    bound       = M/(eta T) + eta beta D^2/2 + mean_t eps_t      (the step-size form, always valid)
    paper_bound = 2 sqrt(M beta) D / sqrt(T) + mean_t eps_t       (Theorem 4.1 as stated).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cola_theory.baselines import idealized_cola
from cola_theory.bounds import theorem41_bound, theorem41_eta, theorem41_stepsize_bound
from cola_theory.frank_wolfe import nuclear_norm
from cola_theory.problems import make_problem
from paper_repro.theory.common import (
    cached,
    check_size,
    finish,
    load,
    md_table,
    result_file,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TAG, STEM, FIG = "T1", "theorem41", "t1_theorem41"
PROBLEMS = ["robust_cauchy", "two_layer", "sigmoid_sensing"]
SETTINGS = {
    "smoke": {"problems": PROBLEMS, "seeds": [0], "Ts": [10, 20], "rank": 1, "inner_steps": 5, "batch_frac": 0.1},
    "full": {"problems": PROBLEMS, "seeds": [0, 1, 2, 3, 4], "Ts": [25, 50, 100, 200, 400], "rank": 1,
             "inner_steps": 10, "batch_frac": 0.1},
}
COLUMNS = ["problem", "seed", "T", "avg_fw_gap", "eps", "bound", "paper_bound", "ratio", "holds", "paper_holds",
           "eta", "eta_capped", "M", "beta", "D", "tau", "f_final", "min_fw_gap", "rank", "inner_steps", "batch_size"]


def _compute(cfg: dict) -> tuple[list, dict]:
    rows = []
    for name in cfg["problems"]:
        for seed in cfg["seeds"]:
            p = make_problem(name, seed=seed)
            tau = nuclear_norm(p.Delta_star)  # Delta* on the boundary of K
            D = 2.0 * tau
            M = p.loss_grad(p.W0)[0] - p.lower_bound  # f(Delta_1) - lower bound on K
            batch = max(1, int(cfg["batch_frac"] * p.n_samples))
            for T in cfg["Ts"]:
                eta = theorem41_eta(M, p.beta, D, T)
                tr = idealized_cola(p, tau, T, eta, rank=cfg["rank"], inner_steps=cfg["inner_steps"],
                                    batch_size=batch, seed=1000 * seed + T)
                avg, eps = tr.avg_gap(), float(tr.eps.mean())
                bound = theorem41_stepsize_bound(M, p.beta, D, T, eta, eps)
                paper = theorem41_bound(M, p.beta, D, T, eps)
                rows.append({"problem": name, "seed": seed, "T": T, "avg_fw_gap": avg, "eps": eps, "bound": bound,
                             "paper_bound": paper, "ratio": avg / bound, "holds": bool(avg <= bound),
                             "paper_holds": bool(avg <= paper), "eta": eta, "eta_capped": eta >= 1.0, "M": M,
                             "beta": p.beta, "D": D, "tau": tau, "f_final": float(tr.f[-1]),
                             "min_fw_gap": float(tr.gap[:-1].min()), "rank": cfg["rank"],
                             "inner_steps": cfg["inner_steps"], "batch_size": batch})
    return rows, {}


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for name in dict.fromkeys(r["problem"] for r in rows):
        rs = [r for r in rows if r["problem"] == name]
        worst = max(rs, key=lambda r: r["ratio"])
        out.append({"problem": name, "runs": len(rs), "max_ratio": worst["ratio"], "at_T": worst["T"],
                    "at_seed": worst["seed"], "max_paper_ratio": max(r["avg_fw_gap"] / r["paper_bound"] for r in rs),
                    "mean_eps_share": float(np.mean([r["eps"] / r["bound"] for r in rs])),
                    "all_hold": all(r["holds"] for r in rs), "paper_all_hold": all(r["paper_holds"] for r in rs)})
    return out


def config(size: str) -> dict:
    """The config its result is saved with (a saved result made with another one is recomputed)."""
    return {"experiment": TAG, "size": check_size(size), **SETTINGS[size]}


def run(out_dir: Path, size: str = "full", force: bool = False) -> list[Path]:
    cfg = config(size)
    payload = cached(TAG, result_file(out_dir, STEM), cfg, lambda: _compute(cfg), force)
    rows = payload["history"]
    summ = summarize(rows)
    text = ("Idealized COLA (Algorithm 2, rank-{rank} links trained by {inner} projected-SGD steps on a minibatch "
            "of {frac:.0%} of the samples), eta = min(1, sqrt(2M/(beta D^2 T))), tau = ||Delta*||_*. "
            "ratio = avg FW gap / (M/(eta T) + eta beta D^2/2 + mean eps); paper ratio uses "
            "2 sqrt(M beta) D/sqrt(T) + mean eps; eps share = mean eps / bound.\n\n").format(
                rank=cfg["rank"], inner=cfg["inner_steps"], frac=cfg["batch_frac"])
    text += md_table(summ, ["problem", "runs", "max_ratio", "at_T", "at_seed", "max_paper_ratio", "mean_eps_share",
                            "all_hold", "paper_all_hold"])
    return finish(TAG, out_dir, STEM, rows, COLUMNS, "Theorem 4.1 (average FW gap of idealized COLA)", text,
                  [(r["problem"], r["seed"], r["T"]) for r in rows if not r["holds"]],
                  "the Theorem 4.1 bound is violated at",
                  "; ".join(f"{s['problem']}: max ratio {s['max_ratio']:.3g}" for s in summ))


def figure(out_dir: Path) -> Figure:
    """The matplotlib Figure, drawn from the saved result only (tests read its data back)."""
    from matplotlib.ticker import NullFormatter

    from paper_repro.plot_style import BOUND_STYLE, method_color, new_figure

    rows = load(result_file(out_dir, STEM))["history"]
    names = list(dict.fromkeys(r["problem"] for r in rows))
    fig, axes = new_figure(1, len(names), width=3.0)
    for ax, name in zip(axes[0], names):
        rs = [r for r in rows if r["problem"] == name]
        Ts = sorted({r["T"] for r in rs})

        def mean(key, rs=rs, Ts=Ts):
            return [float(np.mean([r[key] for r in rs if r["T"] == T])) for T in Ts]

        color = method_color("COLA")
        ax.loglog([r["T"] for r in rs], [r["avg_fw_gap"] for r in rs], ".", color=color, alpha=0.5)
        ax.loglog(Ts, mean("avg_fw_gap"), "o-", color=color, label=r"idealized COLA $\frac{1}{T}\sum g_t$")
        ax.loglog(Ts, mean("bound"), **BOUND_STYLE, label=r"$\frac{M}{\eta T}+\frac{\eta\beta D^2}{2}+\bar\epsilon$")
        ax.loglog(Ts, mean("paper_bound"), **{**BOUND_STYLE, "linestyle": ":"},
                  label=r"$2\sqrt{M\beta}D/\sqrt{T}+\bar\epsilon$ (paper)")
        ax.loglog(Ts, mean("eps"), "-.", color="#009E73", lw=1.0, label=r"measured $\bar\epsilon$")
        ax.set_title(f"{name} ({len({r['seed'] for r in rs})} seeds)")
        ax.set_xlabel("T (steps)")
        ax.set_xticks(Ts, [str(T) for T in Ts])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
    axes[0][0].set_ylabel("average Frank-Wolfe gap")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, bbox_to_anchor=(0.5, -0.2))
    return fig


def plot(out_dir: Path, fig_dir: Path) -> list[Path]:
    """fig_dir/<FIG>.png and .pdf of `figure(out_dir)`."""
    from paper_repro.plot_style import savefig

    return savefig(figure(out_dir), FIG, fig_dir)

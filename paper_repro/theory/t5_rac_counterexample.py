"""T5: RAC-LoRA's counterexample (Malinovsky et al. 2024, section 3) on `rac_quadratic` (3 x 3, beta = L = 10).

(a) LoRA (1 link) and COLA (several links), both factors trained by SGD at the step 1/L, through `run_chain`:
    expected to diverge; recorded as status "diverged" with the step, never a crash.
(b) RAC-LoRA through `run_chain` (frozen random A, B trained from 0, same step 1/L): converges.
(c) The closed-form RAC iteration W <- W - gamma grad f(W) H (H the projection onto a fresh Gaussian rank-r
    sketch's row space, gamma = 1/beta), averaged over sketch seeds, against the expectation bounds
    (1/T) sum_t E||grad f||^2 <= 2 (f0 - f*) / (lam gamma T) (every T) and
    E[f(W^t) - f*] <= (1 - gamma mu lam)^t (f0 - f*) (every t), lam = r / n.
    The pathwise descent sum_t (gamma/2)||G_t H_t||^2 <= f0 - f_T is also checked for every single run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cola_theory.baselines import rac_lora
from cola_theory.bounds import rac_lora_bound, rac_lora_pl_rate, sketch_lambda
from cola_theory.problems import make_problem
from paper_repro.theory.common import (
    cached,
    check_size,
    finish,
    load,
    md_table,
    result_file,
    run_one_chain,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TAG, STEM, FIG = "T5", "rac_counterexample", "t5_rac_counterexample"
RANK = 1
SETTINGS = {
    "smoke": {"seeds": [0], "chain_steps": 60, "cola_links": 6, "rac_links": 6, "sketches": 8, "T": 30},
    "full": {"seeds": [0, 1, 2], "chain_steps": 1000, "cola_links": 10, "rac_links": 20, "sketches": 40, "T": 120},
}
COLUMNS = ["part", "method", "seed", "status", "diverged_step", "final_f_ratio", "n_links", "lr", "T", "measured",
           "bound", "ratio", "holds", "stderr"]


def _chain_rows(cfg: dict, p, seed: int) -> tuple[list, dict]:
    f0, rows, curves = p.loss_grad(p.W0)[0], [], {}
    base = {"total_steps": cfg["chain_steps"], "rank": RANK, "alpha": float(RANK), "lr": 1.0 / p.beta,
            "optimizer": "sgd", "lr_schedule": "constant", "seed": seed}
    for method, kw in [("LoRA", {"n_links": 1}), ("COLA", {"n_links": cfg["cola_links"]}),
                       ("RAC-LoRA", {"n_links": cfg["rac_links"], "frozen_factor": "A"})]:
        out = run_one_chain(p, {**base, **kw}, curve=True)
        curves[method] = out.pop("curve")
        rows.append({"part": "chain", "method": method, "seed": seed, "status": out["status"],
                     "diverged_step": out["diverged_step"], "final_f_ratio": out["final_loss"] / f0,
                     "n_links": kw["n_links"], "lr": base["lr"]})
    return rows, {"f0": f0, **curves}


def _closed_form(cfg: dict, p, seed: int) -> tuple[list, dict]:
    T, gamma, lam = cfg["T"], 1.0 / p.beta, sketch_lambda(RANK, p.shape[1])
    runs = [rac_lora(p, T, gamma, RANK, side="right", seed=10_000 * seed + s) for s in range(cfg["sketches"])]
    f = np.array([r.f for r in runs])  # (S, T+1)
    gsq = np.array([r.grad_sq for r in runs])  # (S, T+1)
    pg = np.array([r.proj_grad_sq for r in runs])  # (S, T)
    f0, f_star, S = f[0, 0], float(p.f_star), len(runs)
    t = np.arange(1, T + 1)
    run_avg = np.cumsum(gsq[:, :T], axis=1) / t  # (S, T): (1/T') sum_{t < T'} ||grad f(W^t)||^2
    avg_mean, avg_se = run_avg.mean(0), run_avg.std(0, ddof=1) / math.sqrt(S)
    grad_bound = np.array([rac_lora_bound(f0, f_star, lam, gamma, int(Ti)) for Ti in t])
    sub_mean, sub_se = (f - f_star).mean(0), (f - f_star).std(0, ddof=1) / math.sqrt(S)  # (T+1,)
    pl_bound = rac_lora_pl_rate(p.mu, lam, gamma, np.arange(T + 1)) * (f0 - f_star)
    descent = (gamma / 2) * pg.sum(1) <= (f0 - f[:, -1]) * (1 + 1e-12) + 1e-15  # pathwise, per run
    rows = [
        {"part": "closed_form", "method": "mean grad_sq avg (all T)", "seed": seed, "T": T,
         "measured": float(avg_mean[-1]), "bound": float(grad_bound[-1]),
         "ratio": float(np.max(avg_mean / grad_bound)), "holds": bool(np.all(avg_mean <= grad_bound)),
         "stderr": float(avg_se[-1])},
        {"part": "closed_form", "method": "mean f - f* (all t, PL)", "seed": seed, "T": T,
         "measured": float(sub_mean[-1]), "bound": float(pl_bound[-1]),
         "ratio": float(np.max(sub_mean[1:] / pl_bound[1:])),  # t = 0 is an equality (up to rounding)
         "holds": bool(np.all(sub_mean[1:] <= pl_bound[1:])),
         "stderr": float(sub_se[-1])},
        {"part": "closed_form", "method": "pathwise descent (every run)", "seed": seed, "T": T,
         "measured": float(((gamma / 2) * pg.sum(1) / np.maximum(f0 - f[:, -1], 1e-300)).max()), "bound": 1.0,
         "ratio": float(((gamma / 2) * pg.sum(1) / np.maximum(f0 - f[:, -1], 1e-300)).max()),
         "holds": bool(descent.all()), "stderr": 0.0},
    ]
    curve = {"avg_grad_sq": avg_mean.tolist(), "avg_grad_sq_se": avg_se.tolist(), "grad_bound": grad_bound.tolist(),
             "subopt": sub_mean.tolist(), "subopt_se": sub_se.tolist(), "pl_bound": pl_bound.tolist(),
             "lam": lam, "gamma": gamma, "mu": p.mu}
    return rows, curve


def _compute(cfg: dict) -> tuple[list, dict]:
    rows, curves = [], {}
    for seed in cfg["seeds"]:
        p = make_problem("rac_quadratic", seed=seed)
        r1, c1 = _chain_rows(cfg, p, seed)
        r2, c2 = _closed_form(cfg, p, seed)
        rows += r1 + r2
        curves[str(seed)] = {"chain": c1, "closed_form": c2} if seed == cfg["seeds"][0] else {"closed_form": c2}
    return rows, {"curves": curves}


def config(size: str) -> dict:
    """The config its result is saved with (a saved result made with another one is recomputed)."""
    return {"experiment": TAG, "size": check_size(size), "rank": RANK, **SETTINGS[size]}


def run(out_dir: Path, size: str = "full", force: bool = False) -> list[Path]:
    cfg = config(size)
    payload = cached(TAG, result_file(out_dir, STEM), cfg, lambda: _compute(cfg), force)
    rows = payload["history"]
    chain = [r for r in rows if r["part"] == "chain"]
    closed = [r for r in rows if r["part"] == "closed_form"]
    text = (f"rac_quadratic (3 x 3, beta = L = 10, mu = 1, f* = 0), rank {RANK}, SGD at step 1/L, alpha = r "
            f"(scale 1), {cfg['chain_steps']} steps per chain.\n\n"
            + md_table(chain, ["method", "seed", "n_links", "status", "diverged_step", "final_f_ratio"])
            + f"\n\nClosed-form RAC-LoRA, gamma = 1/beta, lam = r/n = {RANK}/3, mean over {cfg['sketches']} "
            "sketch seeds (ratio = largest mean/bound over all T resp. t).\n\n"
            + md_table(closed, ["method", "seed", "T", "measured", "stderr", "bound", "ratio", "holds"]))
    status = {m: sorted({r["status"] for r in chain if r["method"] == m}) for m in ("LoRA", "COLA", "RAC-LoRA")}
    return finish(TAG, out_dir, STEM, rows, COLUMNS, "RAC-LoRA counterexample", text,
                  [(r["method"], r["seed"]) for r in closed if not r["holds"]],
                  "a RAC-LoRA bound is violated at",
                  f"chain status {status}; closed-form bounds hold")


def figure(out_dir: Path) -> Figure:
    """The matplotlib Figure, drawn from the saved result only (tests read its data back)."""
    from paper_repro.plot_style import BOUND_STYLE, method_color, new_figure

    payload = load(result_file(out_dir, STEM))
    rows, curves = payload["history"], payload["metrics"]["curves"]
    seed = next(s for s in curves if "chain" in curves[s])  # the first seed keeps its chain curves
    ch, cf = curves[seed]["chain"], curves[seed]["closed_form"]
    fig, axes = new_figure(1, 3, width=3.0)
    ax = axes[0][0]
    top = 1e6
    for i, method in enumerate(("LoRA", "COLA", "RAC-LoRA")):
        y = np.array(ch[method], dtype=float) / ch["f0"]
        y[~np.isfinite(y)] = np.inf
        style = {"lw": 3.0, "alpha": 0.6} if method == "LoRA" else {}  # LoRA = COLA's first link: drawn under it
        ax.semilogy(np.arange(1, len(y) + 1), np.minimum(y, top), color=method_color(method, i), label=method,
                    **style)
        row = next(r for r in rows if r["part"] == "chain" and r["method"] == method and str(r["seed"]) == seed)
        if row["status"] == "diverged":
            ax.plot(row["diverged_step"] + 1, top, "x", ms=8, color=method_color(method, i))
            ax.annotate(f"{method}: diverged at step {row['diverged_step']}", (row["diverged_step"] + 1, top),
                        fontsize=7, xytext=(8, -12 - 10 * i), textcoords="offset points")
    ax.set_ylim(1e-4, top * 10)
    ax.set_xscale("log")
    ax.set_xlabel("SGD step (lr = 1/L)")
    ax.set_ylabel(r"$f(W)/f(W_0)$")
    ax.set_title("chains at step 1/L")
    ax.legend(loc="lower left")
    ax = axes[0][1]
    t = np.arange(len(cf["subopt"]))
    ax.semilogy(t, cf["subopt"], color=method_color("RAC-LoRA"), label=r"RAC closed form, mean $f-f^*$")
    ax.semilogy(t, cf["pl_bound"], **BOUND_STYLE, label=r"$(1-\gamma\mu\lambda)^t (f_0-f^*)$")
    ax.set_xlabel("step t")
    ax.set_title(r"PL rate, $\lambda = r/n$")
    ax.legend()
    ax = axes[0][2]
    T = np.arange(1, len(cf["avg_grad_sq"]) + 1)
    ax.loglog(T, cf["avg_grad_sq"], color=method_color("RAC-LoRA"), label=r"mean $\frac{1}{T}\sum\|\nabla f\|^2$")
    ax.loglog(T, cf["grad_bound"], **BOUND_STYLE, label=r"$2(f_0-f^*)/(\lambda\gamma T)$")
    ax.set_xlabel("T")
    ax.set_title("nonconvex rate (expectation)")
    ax.legend()
    fig.suptitle(f"rac_quadratic (seed {seed}): LoRA/COLA diverge at 1/L, RAC-LoRA converges", fontsize=9, y=1.04)
    return fig


def plot(out_dir: Path, fig_dir: Path) -> list[Path]:
    """fig_dir/<FIG>.png and .pdf of `figure(out_dir)`."""
    from paper_repro.plot_style import savefig

    return savefig(figure(out_dir), FIG, fig_dir)

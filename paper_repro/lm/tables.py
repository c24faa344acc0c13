"""LM result files -> pandas tables (Table 1/2, Table 4, Figure 3 data, compute, CPU), written as md / tex / csv.

Everything here is a pure function of the result JSONs under `results/lm/` (never of a model or of the job
lists). Accuracies are percent on each run's test sample. The learning rate is selected per variant (all config
fields except lr and seed) by the best MEAN DEV accuracy over seeds; with one LR in the results there is nothing
to select. Mean +- sample std (ddof=1) over seeds at that LR. When several configs fill the same table cell (a
config change left older results beside new ones), the newest is shown. The paper's numbers appear only in
columns labelled "paper (reference)" (`paper_repro.reference`).
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cola_theory.lm.run_config import SPEED_ONLY
from cola_theory.results import load_if_valid
from paper_repro import reference as ref
from paper_repro.lm.profiles import LATE_FIELDS

# Frozen parameter count N and the (d_in, d_out) of the adapted q_proj / v_proj of one layer, x layers.
MODEL_DIMS = {
    "opt-1.3b": (1_315_758_080, 24, ((2048, 2048), (2048, 2048))),
    "llama-2-7b": (6_738_415_616, 32, ((4096, 4096), (4096, 4096))),
    "smollm2-135m": (134_515_008, 30, ((576, 576), (576, 192))),  # 9 query heads, 3 kv heads of 64
    "tiny-opt": (149_376, 2, ((64, 64), (64, 64))),  # counted from cola_theory.lm.models.tiny_config
    "tiny-llama": (106_816, 2, ((64, 64), (64, 32))),
}
MODEL_LABELS = {"opt-1.3b": "OPT-1.3B", "llama-2-7b": "Llama-2-7B", "smollm2-135m": "SmolLM2-135M (Q4_1 GGUF)",
                "tiny-opt": "tiny-opt (random)", "tiny-llama": "tiny-llama (random)"}
TASK_ORDER = ref.PAPER_TASKS + ("copa",)
# speed-only fields (compile, padding) do not make another variant: old files lack them, new runs may differ
_NOT_VARIANT = ("lr", "seed", "zero_shot", "eval_batch_size", "checkpoint_every", "chain", "eval_dev") + SPEED_ONLY
_NOT_SETTING = _NOT_VARIANT + ("model", "task", "method", "n_links", "rank", "link_epochs")


def _ranks(rank) -> tuple[int, ...]:
    return tuple(rank) if isinstance(rank, list | tuple) else (int(rank),)


def setting_label(cfg: dict) -> str:
    """The budget / data size of a run, e.g. 'train 96, 3 ep, bs 8'."""
    return f"train {cfg['num_train']}, {cfg['epochs']:g} ep, bs {cfg['batch_size']}"


def load_lm_results(results_dir: Path, warn: Callable[[str], None] = print) -> pd.DataFrame:
    """One row per intact LM result file (corrupt ones are reported and left out; the runner recomputes them)."""
    rows = []
    root = Path(results_dir) / "lm"
    for path in sorted(root.rglob("*.json")) if root.is_dir() else []:
        if "checkpoints" in path.relative_to(root).parts:
            continue
        payload = load_if_valid(path, warn=warn)
        if payload is None:
            continue
        cfg, m, meta = payload["config"], payload["metrics"], payload["meta"]
        ranks = _ranks(cfg["rank"])
        n_links = int(cfg["n_links"])
        ranks = ranks * n_links if len(ranks) == 1 else ranks
        pct = lambda key, m=m: 100.0 * m[key] if isinstance(m.get(key), int | float) else math.nan  # noqa: E731
        rows.append({
            "model": cfg["model"], "task": cfg["task"], "method": cfg["method"], "n_links": n_links,
            "ranks": "-".join(map(str, ranks)), "uniform_rank": len(set(ranks)) == 1, "first_rank": ranks[0],
            "last_rank": ranks[-1], "link_epochs": "-".join(f"{e:g}" for e in cfg.get("link_epochs") or ()),
            "epochs": float(cfg["epochs"]), "lr": float(cfg["lr"]), "seed": int(cfg["seed"]),
            "setting": setting_label(cfg),
            "variant": json.dumps({k: v for k, v in cfg.items() if k not in _NOT_VARIANT and not (  # a late field
                k in LATE_FIELDS and v == LATE_FIELDS[k])}, sort_keys=True),  # at its default = a file without it
            "status": m.get("status", "unknown"), "test_acc": pct("test_acc"), "dev_acc": pct("dev_acc"),
            "zero_shot_acc": pct("zero_shot_test_acc"), "train_time_s": m.get("train_time_s", math.nan),
            "eval_time_s": m.get("eval_time_s", math.nan), "wall_time_s": m.get("wall_time_s", math.nan),
            "trainable_params": m.get("trainable_params", math.nan),
            "peak_mem_gb": m.get("peak_mem_gb", math.nan), "model_note": m.get("model_note", ""),
            "device": meta.get("device", ""), "created": str(meta.get("created_at", "")), "path": str(path),
        })
    return pd.DataFrame(rows)


def select_lr(df: pd.DataFrame) -> pd.DataFrame:
    """Per variant: the LR with the best mean dev accuracy over seeds, and test mean / std / n at that LR."""
    out = []
    for _, runs in df.groupby("variant", sort=True):
        per_lr = runs.groupby("lr").agg(dev=("dev_acc", "mean"), n=("seed", "count"))
        if len(per_lr) == 1:
            lr, how = per_lr.index[0], "single LR"
        elif per_lr["dev"].notna().any():
            lr, how = per_lr["dev"].idxmax(), "best mean dev"
        else:
            lr, how = math.nan, "no dev accuracy: LR not selectable"
        chosen = runs[runs["lr"] == lr]
        first = runs.iloc[0]
        finished = chosen[chosen["test_acc"].notna()]
        out.append({
            **{k: first[k] for k in ("model", "task", "method", "n_links", "ranks", "uniform_rank", "first_rank",
                                     "last_rank", "link_epochs", "epochs", "setting", "model_note")},
            "lr": lr, "selected_by": how, "lrs_tried": len(per_lr), "n": len(finished),
            "n_failed": len(chosen) - len(finished), "test_mean": finished["test_acc"].mean(),
            "test_std": finished["test_acc"].std(ddof=1) if len(finished) > 1 else math.nan,
            "test_values": list(finished["test_acc"]), "dev_mean": finished["dev_acc"].mean(),
            "zero_shot_mean": runs["zero_shot_acc"].mean(), "train_time_s": chosen["train_time_s"].mean(),
            "wall_time_s": chosen["wall_time_s"].mean(), "trainable_params": chosen["trainable_params"].max(),
            "peak_mem_gb": chosen["peak_mem_gb"].mean(), "device": chosen["device"].iloc[0],
            "created": runs["created"].max(),
        })
    return pd.DataFrame(out)


def fmt(mean: float, std: float = math.nan, n: int | None = None) -> str:
    """'72.49 ± 1.20' (n seeds > 1), '72.49 (1 seed)', or '-' when nothing finished."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    if n == 1 or std is None or math.isnan(std):
        return f"{mean:.2f}" + (" (1 seed)" if n == 1 else "")
    return f"{mean:.2f} ± {std:.2f}"


def newest(df: pd.DataFrame) -> pd.Series:
    """The most recently made variant among rows that fill the same table cell (e.g. after a config change
    left older results beside the new ones)."""
    return df.sort_values("created", kind="stable").iloc[-1]


def _task_key(task: str) -> int:
    return TASK_ORDER.index(task) if task in TASK_ORDER else len(TASK_ORDER)


def _plain(sel: pd.DataFrame) -> pd.DataFrame:
    """Uniform-rank chains with evenly split links (no step-down)."""
    return sel[sel["uniform_rank"] & (sel["link_epochs"] == "")] if len(sel) else sel


def main_table(sel: pd.DataFrame, model: str) -> pd.DataFrame:
    """LoRA vs COLA per task (Table 1/2 layout): the longest plain COLA chain against LoRA, same setting."""
    plain = _plain(sel)
    plain = plain[plain["model"] == model] if len(plain) else plain
    rows = []
    for (task, setting), grp in sorted(plain.groupby(["task", "setting"]), key=lambda kv: _task_key(kv[0][0])):
        lora = grp[grp["n_links"] == 1]
        cola = grp[(grp["method"] == "cola") & (grp["n_links"] > 1)]
        if lora.empty or cola.empty:
            continue
        lo, co = newest(lora), newest(cola[cola["n_links"] == cola["n_links"].max()])
        gain = co["test_mean"] - lo["test_mean"]
        rows.append({
            "task": task, "setting": setting, "LoRA (ours)": fmt(lo["test_mean"], lo["test_std"], lo["n"]),
            f"COLA-{co['n_links']} (ours)": fmt(co["test_mean"], co["test_std"], co["n"]),
            "gain": f"{gain:+.2f}" if not math.isnan(gain) else "-",
            "seeds LoRA / COLA": f"{lo['n']} / {co['n']}",
            "LR LoRA / COLA": f"{lo['lr']:g} / {co['lr']:g} ({lo['selected_by']})",
            **({f"{k} {ref.LABEL}": ref.ref_cell(model, task, k.lower()) for k in ("LoRA", "COLA", "gain")}
               if model in ref.MAIN_TABLES else {}),
            "no fine-tuning (ours)": fmt(lo["zero_shot_mean"]),
            "lora_mean": lo["test_mean"], "cola_mean": co["test_mean"], "cola_links": co["n_links"],
            "lora_std": lo["test_std"], "cola_std": co["test_std"],
            "lora_values": lo["test_values"], "cola_values": co["test_values"],
            "zero_shot": lo["zero_shot_mean"],
        })
    return pd.DataFrame(rows)


def chain_length_table(sel: pd.DataFrame) -> pd.DataFrame:
    """Table 4: test accuracy vs chain length (plain chains), per model / task / setting with >= 2 lengths."""
    plain = _plain(sel)
    rows = []
    for (model, task, setting), grp in plain.groupby(["model", "task", "setting"]) if len(plain) else []:
        grp = grp[(grp["method"] == "lora") | (grp["method"] == "cola")]
        lengths = sorted(set(grp["n_links"]))
        if len(lengths) < 2:
            continue
        row = {"model": model, "task": task, "setting": setting}
        means = []
        for n in lengths:
            r = newest(grp[grp["n_links"] == n])
            row[f"length {n}"] = fmt(r["test_mean"], r["test_std"], r["n"])
            row[f"mean_{n}"], row[f"std_{n}"] = r["test_mean"], r["test_std"]
            means.append(r["test_mean"])
        means = [m for m in means if not math.isnan(m)]  # a length whose runs all failed is not compared
        row["increases"] = all(b >= a for a, b in zip(means, means[1:]))
        rows.append(row)
    out = pd.DataFrame(rows)
    return out.sort_values(["model", "task"], key=lambda s: s.map(_task_key) if s.name == "task" else s) \
        if len(out) else out


def stepdown_table(sel: pd.DataFrame) -> pd.DataFrame:
    """Figure 3 data: COLA of length 2 (rank 8, then residual rank r) against LoRA rank 8, same setting."""
    if not len(sel):
        return pd.DataFrame()
    step = sel[(sel["method"] == "cola") & (sel["n_links"] == 2) & (sel["link_epochs"] != "")]
    rows = []
    for (model, task, setting), grp in step.groupby(["model", "task", "setting"]):
        base = sel[(sel["model"] == model) & (sel["task"] == task) & (sel["setting"] == setting)
                   & (sel["n_links"] == 1) & (sel["first_rank"] == grp["first_rank"].iloc[0])]
        b = newest(base) if len(base) else None
        row = {"model": model, "task": task, "setting": setting,
               "LoRA r=8 (ours)": fmt(b["test_mean"], b["test_std"], b["n"]) if b is not None else "-",
               "lora_mean": b["test_mean"] if b is not None else math.nan}
        for _, r in pd.DataFrame([newest(g) for _, g in grp.groupby("last_rank")]).iterrows():
            row[f"step-down r={r['last_rank']}"] = fmt(r["test_mean"], r["test_std"], r["n"])
            row[f"mean_r{r['last_rank']}"], row[f"std_r{r['last_rank']}"] = r["test_mean"], r["test_std"]
        rows.append(row)
    return pd.DataFrame(rows)


def flops_per_token(n_frozen: float, layers: int, mats: Sequence[tuple[int, int]], link_ranks: Sequence[int],
                    link_fracs: Sequence[float] = (1,), attention: float = 0) -> float:
    """Training FLOPs per token with a frozen base (the one formula of the tables and benchmarks/gpu_bench.py):
    4 N_frozen (matmuls: fwd 2N + activation backprop 2N), 3 x `attention` (the attention-score FLOPs of the
    forward, x3 for fwd + bwd; 0 = left out), and 3 x 2 r (d_in + d_out) per adapted matrix (`mats`: the
    (d_in, d_out) of one layer's adapted matrices, x `layers`; adapter fwd, x3 for fwd + bwd), averaged over the
    links by their share of the steps."""
    adapter = sum(f * 3 * 2 * r * sum(a + b for a, b in mats) * layers for r, f in zip(link_ranks, link_fracs))
    return 4 * n_frozen + 3 * attention + adapter


def model_flops_per_token(model: str, link_ranks: tuple[int, ...], link_fracs: tuple[float, ...]) -> float:
    """`flops_per_token` of a model of MODEL_DIMS (attention left out: the analytic column of the compute table)."""
    if model not in MODEL_DIMS:
        return math.nan
    n, layers, mats = MODEL_DIMS[model]
    return flops_per_token(n, layers, mats, link_ranks, link_fracs)


def compute_table(sel: pd.DataFrame) -> pd.DataFrame:
    """Per configuration: trainable params (measured and analytic), analytic FLOPs/token, time, peak memory."""
    rows = []
    if not len(sel):
        return pd.DataFrame()
    for (model, setting, method, n_links, ranks, link_epochs), grp in sel.groupby(
            ["model", "setting", "method", "n_links", "ranks", "link_epochs"]):
        rk = tuple(int(r) for r in ranks.split("-"))
        ep = tuple(float(e) for e in link_epochs.split("-")) if link_epochs else (1.0,) * len(rk)
        fracs = tuple(e / sum(ep) for e in ep)
        dims = MODEL_DIMS.get(model)
        analytic = max(r * sum(a + b for a, b in dims[2]) * dims[1] for r in rk) if dims else math.nan
        rows.append({"model": model, "setting": setting, "method": method, "links": n_links, "ranks": ranks,
                     "link epochs": link_epochs or "even",
                     "trainable params (measured)": grp["trainable_params"].max(),
                     "trainable params per link (analytic, max)": analytic,
                     "GFLOPs/token (analytic)": model_flops_per_token(model, rk, fracs) / 1e9,
                     "train time s (mean)": grp["train_time_s"].mean(),
                     "peak mem GB (mean)": grp["peak_mem_gb"].mean(), "runs": int(grp["n"].sum())})
    out = pd.DataFrame(rows)
    lora = out[out["method"] == "lora"].groupby("model")["GFLOPs/token (analytic)"].first()
    out["FLOPs vs LoRA"] = [f / lora.get(m, math.nan) for m, f in zip(out["model"], out["GFLOPs/token (analytic)"])]
    return out


# --- writers ---------------------------------------------------------------------------------------------


def fmt_lr(x: float) -> str:
    """An LR as the paper writes it: 8e-4, 1e-3."""
    return np.format_float_scientific(x, trim="-", exp_digits=1)


def lr_coverage(runs: pd.DataFrame, variants: Sequence[str], grid: Sequence[float]) -> dict[str, str]:
    """task -> the LRs EVERY (variant, seed) cell of `variants` tried: 'all 5', or '3 of 5: 1e-3, 8e-4, 1e-4'
    (the grid that the dev choice of each pair really had; runs has columns task, variant, seed, lr)."""
    cells = runs[runs["variant"].isin(list(variants))].groupby(["task", "variant", "seed"])["lr"].agg(frozenset)
    out = {}
    for task, sets in cells.groupby(level="task"):
        common = sorted(frozenset.intersection(*sets), reverse=True)
        out[task] = (f"all {len(grid)}" if set(grid) <= set(common) else f"{len(common)} of {len(grid)}: "
                     + ", ".join(fmt_lr(x) for x in common))
    return out


def _cell(v) -> str:
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"
    return str(v)


def to_markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(v).replace("|", "/") for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _tex(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 ("±", r"$\pm$"), ("×", r"$\times$")):
        s = s.replace(a, b)
    return s


def to_latex(df: pd.DataFrame, caption: str, label: str) -> str:
    cols = list(df.columns)
    body = [" & ".join(_tex(_cell(v)) for v in row) + r" \\" for row in df.itertuples(index=False)]
    return "\n".join([r"\begin{table}[t]", r"\centering", rf"\caption{{{_tex(caption)}}}", rf"\label{{tab:{label}}}",
                      r"\begin{tabular}{" + "l" * len(cols) + "}", r"\toprule",
                      " & ".join(_tex(c) for c in cols) + r" \\", r"\midrule", *body, r"\bottomrule",
                      r"\end{tabular}", r"\end{table}", ""])


def display_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Drop the numeric helper columns (mean_*, *_values, ...) that only the CSV and the verdicts need."""
    helper = ("lora_mean", "cola_mean", "lora_std", "cola_std", "cola_links", "lora_values", "cola_values",
              "increases", "zero_shot")
    return df[[c for c in df.columns if c not in helper and not c.startswith(("mean_", "std_"))]]


def write_table(df: pd.DataFrame, name: str, tables_dir: Path, caption: str) -> list[Path]:
    """tables_dir/name.{md,tex,csv} (md/tex show the display columns, csv keeps every column)."""
    from cola_theory.results import atomic_write_text

    tables_dir = Path(tables_dir)
    shown = display_columns(df)
    paths = [tables_dir / f"{name}.{ext}" for ext in ("md", "tex", "csv")]
    atomic_write_text(paths[0], f"**{caption}**\n\n" + to_markdown(shown))
    atomic_write_text(paths[1], to_latex(shown, caption, name))
    atomic_write_text(paths[2], df.to_csv(index=False))
    return paths

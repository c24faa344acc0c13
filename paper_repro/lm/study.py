"""The `real` study (SmolLM2-135M at the paper's protocol): result files -> verdicts, tables, figures, REPORT.md.

A pure function of the result files of the `real` profile's jobs (`profiles.real_jobs`): a file counts when it is
intact and was made with exactly its job's config (`runner.existing_result`, read only), so results of other
profiles never mix in. Per (task, variant, seed) the LR is chosen on dev (`stats.select_lr_per_seed`); each
variant is compared with LoRA (and the ablations with COLA-3) seed by seed (`stats.compare`: paired differences,
percentile bootstrap, sign test). Every verdict is worded from its interval, with the settings that differ from
the paper beside it. With no results (or some) every part says how many of its runs are present.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from paper_repro.lm import cost, epochs, lr_rule, pairs, stats
from paper_repro.lm.stats import COLA3, LORA
from paper_repro.lm.study_figures import forest_figure, plot_forest, plot_lines  # noqa: F401 (API)
from paper_repro.lm.tables import fmt_lr
from paper_repro.lm.variant_tables import COMMON, LENGTHS, fig3_table, per_variant_table, table4  # noqa: F401 (API)

RUN = "python paper_repro/run_all.py"
RESTART, JAGGED, NO_RESET = "COLA-3, LR restart per link", "COLA-3, jagged cosine LR", "COLA-3, no opt. reset"
# treatment -> control of every comparison: the main one, the chain lengths and the ablation, each vs LoRA, and
# each ablation vs COLA-3 (what makes a chain win)
ABLATION = ("COLA-2", "COLA-5", RESTART, JAGGED, NO_RESET)
VS_LORA = (COLA3, *ABLATION)
VS_COLA3 = ("COLA-5", RESTART, JAGGED, NO_RESET)
CHAIN_STEPS = (("COLA-2", LORA), (COLA3, "COLA-2"), ("COLA-5", COLA3))  # Table 4: each length vs the previous
_ABLATION_WORDS = {stats.SUPPORTED: "supported: it beats COLA-3", stats.NOT_SUPPORTED: "not supported: it is worse "
                   "than COLA-3", stats.INCONCLUSIVE: stats.INCONCLUSIVE, stats.INSUFFICIENT: stats.INSUFFICIENT}
_SCHEDULES = {"restart": "LR restart per link", "jagged_cosine": "jagged cosine LR", "constant": "constant LR"}


def _ranks(rank, n_links: int) -> tuple[int, ...]:
    ranks = tuple(rank) if isinstance(rank, list | tuple) else (int(rank),)
    return ranks * n_links if len(ranks) == 1 else ranks


def variant_label(cfg: dict) -> str:
    """The row name of a run from its config: LoRA, COLA-n, step-down 8→r, plus schedule / reset changes. The
    same for every task (the jagged re-warm-up length differs per task and is listed in the deviations)."""
    if cfg["method"] == "lora":
        name = LORA
    else:
        n = int(cfg["n_links"])
        ranks, ep = _ranks(cfg["rank"], n), tuple(cfg.get("link_epochs") or ())
        if ep or len(set(ranks)) > 1:
            name = "step-down " + "→".join(map(str, ranks))
            name += "" if ep == (3.0, 2.0) else f" ({'+'.join(f'{e:g}' for e in ep) or 'even'} ep)"
        else:
            name = f"COLA-{n}"
    mods = []
    if cfg.get("lr_schedule", "linear") != "linear":
        mods.append(_SCHEDULES.get(cfg["lr_schedule"], f"LR {cfg['lr_schedule']}"))
    if cfg.get("optimizer_reset", "full") != "full":
        mods.append("no opt. reset" if cfg["optimizer_reset"] == "none" else f"opt. reset {cfg['optimizer_reset']}")
    return ", ".join([name, *mods])


def _pct(metrics: dict, key: str) -> float:
    v = metrics.get(key)
    return 100.0 * v if isinstance(v, int | float) and not isinstance(v, bool) else math.nan


def load_study(results_dir: Path, jobs: list | None = None,
               warn: Callable[[str], None] = print) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, coverage): one row per present result of `jobs` (default: the `real` profile), and per
    (group, task) how many of its runs are present (group "all": every job once) and the steps the missing ones
    would train (`steps_left`; `forked_steps_left`: with forks)."""
    from paper_repro.lm.profiles import real_jobs, run_steps
    from paper_repro.lm.runner import existing_result, trained_steps

    jobs = real_jobs() if jobs is None else jobs
    rows, cov = [], []
    for job in jobs:
        payload = existing_result(job, Path(results_dir), warn)
        cov += [{"group": g, "task": job.cfg.task, "present": payload is not None, "job": job}
                for g in ("all", *job.groups)]
        if payload is None:
            continue
        cfg, m = payload["config"], payload["metrics"]
        rows.append({"job_id": job.job_id, "groups": job.groups, "task": cfg["task"], "variant": variant_label(cfg),
                     "seed": int(cfg["seed"]), "lr": float(cfg["lr"]), "dev_acc": _pct(m, "dev_acc"),
                     "test_acc": _pct(m, "test_acc"), "zero_shot_acc": _pct(m, "zero_shot_test_acc"),
                     "status": m.get("status", "unknown"), "best_epoch": m.get("best_epoch"),
                     "lr_schedule": cfg.get("lr_schedule", "linear"),
                     "dev_loss_per_epoch": m.get("dev_loss_per_epoch"),
                     "knot_epochs": epochs.knot_epochs(cfg, m.get("steps_per_epoch")),
                     "first_knot_epoch": epochs.first_knot_epoch(cfg, m.get("steps_per_epoch")),
                     "validation_as_train": bool(cfg.get("split_validation_as_train", False)),
                     "restart_warmup_steps": (cfg.get("chain_overrides") or {}).get("restart_warmup_steps"),
                     "engine": _engine(payload["meta"], m), "device": str(payload["meta"].get("device", "unknown")),
                     "wall_time_s": payload["meta"].get("wall_time_s", m.get("wall_time_s", math.nan)),
                     "torch_threads": payload["meta"].get("torch_threads"),
                     "forked_at_step": m.get("forked_at_step"),
                     "created": str(payload["meta"].get("created_at", ""))})
    # forked: as run_all runs the missing runs on a CPU (one at a time; a family's first link once)
    forked = trained_steps([c["job"] for c in cov if c["group"] == "all"],
                           done={c["job"].job_id for c in cov if c["group"] == "all" and c["present"]})
    for c in cov:
        job = c.pop("job")
        c["steps_left"], c["forked_steps_left"] = ((0, 0) if c["present"] else (run_steps(job.cfg),
                                                                                   forked[job.job_id]))
    coverage = pd.DataFrame(cov, columns=["group", "task", "present", "steps_left", "forked_steps_left"])
    coverage = coverage.groupby(["group", "task"], sort=False).agg(
        present=("present", "sum"), total=("present", "count"), steps_left=("steps_left", "sum"),
        forked_steps_left=("forked_steps_left", "sum"))
    return pd.DataFrame(rows), coverage.reset_index()


def _engine(meta: dict, metrics: dict | None = None) -> str:
    """'packed (k)' for a run trained in a pack of k (`packed_train`), else 'sequential' (`run_lm`); ', forked'
    when it started from a family member's first-knot checkpoint (`cola_theory.lm.fork`)."""
    pack = meta.get("packed")
    name = f"packed ({int(pack['size'])})" if isinstance(pack, dict) and "size" in pack else "sequential"
    return name + (", forked" if (metrics or {}).get("forked_at_step") is not None else "")


def provenance(runs: pd.DataFrame) -> str:
    """Which engine and device produced the runs: 'N runs; engine: packed (2) k, sequential m; device: cpu N'. The
    packed engine matches `run_lm` to float32 rounding (tests/test_packed.py), so a verdict must not depend on the
    mix."""
    if runs is None or runs.empty:
        return "no runs"

    def count(col: str) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(runs[col].value_counts().items()))

    return f"{len(runs)} runs; engine: {count('engine')}; device: {count('device')}"


def coverage_line(coverage: pd.DataFrame, group: str = "all") -> str:
    """'all N runs present' or 'not run yet: k of N runs present' (of one group; "all": every job once)."""
    cov = coverage[coverage["group"] == group]
    present, total = int(cov["present"].sum()), int(cov["total"].sum())
    return f"all {total} runs present" if present == total and total else \
        f"not run yet: {present} of {total} runs present"


def untrained_acc(runs: pd.DataFrame) -> dict[str, float]:
    """task -> the untrained model's test accuracy (%), averaged over the seeds that measured it."""
    zs = runs[runs["variant"] == LORA].groupby("task")["zero_shot_acc"].mean() if len(runs) else pd.Series()
    return {t: float(v) for t, v in zs.items() if math.isfinite(v)}


def comparisons(sel: pd.DataFrame, tasks: tuple[str, ...], untrained: dict[str, float] | None = None,
                learned: dict[str, pd.DataFrame] | None = None) -> pd.DataFrame:
    """Every variant vs LoRA and every ablation vs COLA-3 (rows of `stats.compare`), where both arms exist; with
    `untrained` (task -> accuracy), each variant vs LoRA also gets the learned-tasks sensitivity row
    (`stats.learned_only`) where the rule leaves a task out. `learned`: variant -> its `stats.learned_tasks` frame
    vs LoRA, where the caller has one already (not computed twice)."""
    pairs = [(t, LORA) for t in VS_LORA] + [(t, COLA3) for t in VS_COLA3] + [CHAIN_STEPS[1]]
    frames = [stats.compare(sel, t, c, tasks=tasks) for t, c in pairs]
    if untrained is not None and len(sel):
        frames += [stats.learned_only(sel, t, LORA, untrained, learned=(learned or {}).get(t)) for t in VS_LORA]
    frames += [stats.compare(sel, v, LORA, tasks=tasks) for v in sorted(set(sel["variant"]))
               if v.startswith("step-down")] if len(sel) else []
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def learned_table(learned: pd.DataFrame) -> pd.DataFrame:
    """Display rows of `stats.learned_tasks`."""
    return pd.DataFrame({"task": learned["task"], "pairs": learned["n_pairs"],
                         "untrained (%)": [f"{u:.2f}" if math.isfinite(u) else "-" for u in learned["untrained"]],
                         "gain [95% CI] (pp)": [f"{g:+.2f} [{lo:+.2f}, {hi:+.2f}]" if math.isfinite(g) else "-"
                                                for g, lo, hi in zip(learned["gain"], learned["ci_lo"],
                                                                     learned["ci_hi"])],
                         "learned": ["yes" if x else "no" for x in learned["learned"]]})


def sensitivity_line(comp: pd.DataFrame, learned: pd.DataFrame) -> str:
    """The REPORT sentence of the learned-tasks sensitivity reading of COLA-3 - LoRA (rule: `stats`)."""
    unknown = learned["untrained"].isna()
    out = ", ".join(learned["task"][~learned["learned"] & ~unknown]) or "none"
    out += f"; no untrained accuracy, so left out too: {', '.join(learned['task'][unknown])}" if unknown.any() else ""
    row = stats.pair_rows(comp, COLA3, LORA)
    row = row[row["task"] == stats.LEARNED]
    if learned["learned"].all():
        return "Sensitivity: every task with pairs is learned (`table_real_learned`), so no second reading.\n"
    if row.empty:
        return f"Sensitivity: not learned: {out}; fewer than two learned tasks, so no second reading.\n"
    r = row.iloc[0]
    return (f"Sensitivity (a second reading, not the verdict; rule in the statistics notes above): without the "
            f"tasks not learned ({out}; `table_real_learned`), COLA-3 - LoRA pooled is {stats.describe(r)}: "
            f"**{r['verdict']}**.\n")


def _fmt_ci(r) -> str:
    return "-" if not math.isfinite(r["ci_lo"]) else f"{r['mean_diff']:+.2f} [{r['ci_lo']:+.2f}, {r['ci_hi']:+.2f}]"


def comparison_table(comp: pd.DataFrame) -> pd.DataFrame:
    """Display rows of `comparisons`: difference [95% bootstrap CI] and paired t CI in accuracy points, the sign
    test, the verdict (from the bootstrap interval)."""
    return pd.DataFrame({
        "treatment": comp["treatment"], "control": comp["control"], "task": comp["task"],
        "pairs": comp["n_pairs"], "difference [95% CI] (pp)": [_fmt_ci(r) for _, r in comp.iterrows()],
        "paired t 95% CI (pp)": [stats.fmt_t(r) for _, r in comp.iterrows()],
        "sign test +/-/ties": [f"{a}/{b}/{c}" for a, b, c in zip(comp["n_pos"], comp["n_neg"], comp["n_ties"])],
        "sign p": [f"{p:.3g}" if math.isfinite(p) else "-" for p in comp["sign_p"]], "verdict": comp["verdict"],
        "detectable at 80% power (pp)": [f"{m:.2f}" if math.isfinite(m) else "-" for m in comp["mde"]]})


def lr_rule_table(comp: pd.DataFrame, lrs: dict) -> pd.DataFrame:
    """`comparison_table` of `lr_rule.compare`'s rows, with the one LR each arm got per task."""
    table = comparison_table(comp) if len(comp) else comp
    if len(table):
        table.insert(3, "LR (LoRA / COLA-3)", [" / ".join(fmt_lr(x) for x in lrs[t]) if t in lrs else "-"
                                              for t in table["task"]])
    return table


# --- verdicts and the REPORT.md section ------------------------------------------------------------------


def deviations(runs: pd.DataFrame, short: bool = False) -> list[str]:
    """The settings of these runs that differ from the paper's (or that the paper leaves unknown, [U]); `short`:
    the terse form shown beside each verdict, without the fixed [U] notes."""
    from paper_repro.lm.profiles import LR_GRID, PAPER_SEEDS, REAL_TASKS

    out = [("SmolLM2-135M-Instruct, a Q4_1 GGUF expanded to float32, instead of OPT-1.3B / Llama-2-7B",
            "SmolLM2-135M (Q4_1 GGUF -> float32), not OPT-1.3B / Llama-2-7B"),
           ("float32 weights and training (MeZO: fp16)", "float32, not fp16")]
    lrs = sorted(set(runs["lr"]), reverse=True)
    grid = "{" + ", ".join(f"{x:g}" for x in LR_GRID) + "}"
    some = "{" + ", ".join(f"{x:g}" for x in lrs) + "}"
    out.append((f"LR chosen on dev per (task, variant, seed) from {grid} (the paper's rule [U])", None)
               if lrs == list(LR_GRID) else
               (f"LR chosen on dev per (task, variant, seed) among {some} only (paper grid {grid})",
                f"LR grid {some} only"))
    cells = runs.groupby(["task", "variant", "seed"])["lr"].agg(frozenset)
    if cells.nunique() > 1:  # some (task, variant, seed) cells lack an LR of the others
        full = int((cells == frozenset(lrs)).sum())
        out.append((f"only {full} of {len(cells)} (task, variant, seed) cells have every LR of {some}",
                    f"{full} of {len(cells)} cells have every LR"))
    seeds = sorted(set(runs["seed"]))
    listed, n_seeds = ", ".join(map(str, seeds)), runs.groupby(["task", "variant"])["seed"].nunique()
    full = int((n_seeds == len(PAPER_SEEDS)).sum())
    if seeds != list(PAPER_SEEDS):
        out.append((f"seeds {listed} (paper: 5 seeds, values [U])", f"seeds {listed} only"))
    elif full < len(n_seeds):  # every seed is present somewhere, but not in every (task, variant) cell
        out.append((f"seeds {listed}, but only {full} of {len(n_seeds)} (task, variant) cells have all 5 (paper: "
                    "5 seeds, values [U])", f"{full} of {len(n_seeds)} cells have 5 seeds"))
    else:
        out.append((f"seeds {listed} (paper: 5 seeds, values [U])", None))
    out.append(("COLA main chain: 3 links of 5/3 epochs each (the paper's main-table length [U])", None))
    best = int(runs["best_epoch"].notna().sum())
    out.append(("the last-step model is tested (MeZO tests the best dev-loss epoch)", "last-step model")
               if not best else (f"the best dev-loss epoch is tested (MeZO's load_best_model_at_end) in {best} of "
                                 f"{len(runs)} runs", None if best == len(runs) else
                                 f"best dev-loss epoch in {best} of {len(runs)} runs only"))
    if (runs["task"] == "boolq").any():
        n = int(runs[runs["task"] == "boolq"]["validation_as_train"].sum())
        out.append((f"BoolQ: train / dev drawn from the validation rows outside the test sample ({n} runs; its "
                    "train split is not in the offline data)", "BoolQ train / dev from its validation split"))
    tasks = [t for t in REAL_TASKS if t in set(runs["task"])]
    if len(tasks) < len(REAL_TASKS):
        out.append((f"tasks with results: {', '.join(tasks)} ({len(tasks)} of {len(REAL_TASKS)})",
                    f"{len(tasks)} of {len(REAL_TASKS)} tasks ({', '.join(tasks)})"))
    return [s for long, sh in out if (s := sh if short else long)]


def combine(statuses: list[str]) -> str:
    """One verdict from several intervals that must all hold: any 'not supported' wins, then all 'supported'."""
    if not statuses:
        return stats.INSUFFICIENT
    if stats.NOT_SUPPORTED in statuses:
        return stats.NOT_SUPPORTED
    if all(s == stats.SUPPORTED for s in statuses):
        return stats.SUPPORTED
    return stats.INSUFFICIENT if stats.INSUFFICIENT in statuses else stats.INCONCLUSIVE


def verdicts(comp: pd.DataFrame, devs: list[str], scope: str = "real: SmolLM2-135M", coverage: str = "") -> list:
    """The paper's three LM claims, each worded from pooled intervals (see `stats`), deviations beside each."""
    from paper_repro.lm.profiles import STEPDOWN_RANKS
    from paper_repro.report import Verdict

    beside = " | differs from the paper: " + "; ".join(devs) + (f" | {coverage}" if coverage else "")

    def one(claim: str, what: str, parts: list[tuple[str, str, str]]) -> Verdict:
        rows = [(label, stats.pooled_row(comp, t, c)) for label, t, c in parts]
        status = combine([r["verdict"] if r is not None else stats.INSUFFICIENT for _, r in rows])
        none = f"no task has {stats.MIN_PAIRS} or more pairs"
        detail = "; ".join(f"{label}: " + (stats.describe(r) if r is not None else none) for label, r in rows)
        return Verdict(claim, f"{scope}, {what}", status, detail + beside)

    return [one("cola_ge_lora", "COLA-3 vs LoRA pooled over tasks", [("COLA-3 - LoRA", COLA3, LORA)]),
            one("chain_length", "length 1 < 2 < 3 pooled", [("2 - 1", "COLA-2", LORA), ("3 - 2", COLA3, "COLA-2")]),
            one("step_down", "step-down 8→r vs LoRA pooled over its tasks",
                [(f"r={r}", f"step-down 8→{r}", LORA) for r in STEPDOWN_RANKS])]


def _write(display: pd.DataFrame, numeric: pd.DataFrame, name: str, tdir: Path, caption: str) -> list[Path]:
    from cola_theory.results import atomic_write_text
    from paper_repro.lm.tables import to_latex, to_markdown

    paths = [tdir / f"{name}.{ext}" for ext in ("md", "tex", "csv")]
    atomic_write_text(paths[0], f"**{caption}**\n\n" + to_markdown(display))
    atomic_write_text(paths[1], to_latex(display, caption, name))
    atomic_write_text(paths[2], numeric.drop(columns=[c for c in ("diffs",) if c in numeric]).to_csv(index=False))
    return paths


def _shown(df: pd.DataFrame) -> pd.DataFrame:
    return df[[c for c in df.columns if not c.startswith(("mean_", "std_"))]]


def report_section(results_dir: Path, fig_dir: Path, files: list[Path], log=print):
    """([(title, markdown)], verdicts) of the `real` study; 'not run yet: k of N runs present' when incomplete."""
    from paper_repro.lm import profiles as pr
    from paper_repro.lm.tables import lr_coverage, to_markdown
    from paper_repro.report import Verdict

    title = "Real model at the paper's protocol: SmolLM2-135M, LoRA vs COLA (profile `real`)"
    runs, cov = load_study(results_dir, warn=log)
    groups = ", ".join(f"{g}: {coverage_line(cov, g)}" for g in dict.fromkeys(cov["group"]) if g != "all")

    def names(tasks: tuple[str, ...]) -> str:
        return ", ".join({"sst2": "SST-2"}.get(t, t.upper()) for t in tasks)

    how = (f"run with `{RUN} --profile real --only lm` (GPU; `--missing` lists what is left) or the CPU fallback "
           f"`{RUN} --profile real-cpu --only lm` ({names(pr.REAL_CPU_TASKS)}; LoRA vs COLA-3, seeds "
           f"{', '.join(map(str, pr.REAL_CPU_SEEDS))}, LR {', '.join(f'{x:g}' for x in pr.REAL_CPU_LRS)}) and its "
           f"second tier `--profile real-cpu-ablation` (the ablation on {names(pr.REAL_CPU_ABLATION_TASKS)})")
    head = f"**{coverage_line(cov)}** ({groups}); {how}.\n\n{stats.__doc__.split(chr(10) + chr(10), 1)[1]}\n"
    if runs.empty:
        return [(title, head)], [Verdict(c, "real: SmolLM2-135M", "not run", coverage_line(cov))
                                 for c in ("cola_ge_lora", "chain_length", "step_down")]
    sel = stats.select_lr_per_seed(runs)
    untrained = untrained_acc(runs)
    learned = stats.learned_tasks(sel, COLA3, LORA, untrained, pr.REAL_TASKS)
    comp = comparisons(sel, pr.REAL_TASKS, untrained, learned={COLA3: learned})
    devs = deviations(runs)
    vs = verdicts(comp, deviations(runs, short=True), coverage=coverage_line(cov))
    tdir = fig_dir / "tables"
    parts = [head, "Settings that differ from the paper: " + "; ".join(devs) + ".\n",
             f"Provenance: {provenance(runs)} (the packed engine equals the sequential one to float32 rounding, "
             "tests/test_packed.py).\n",
             "| claim | verdict | intervals |", "|---|---|---|"]
    parts += [f"| {v.claim} ({v.scope}) | **{v.status}** | {v.detail.split(' | ')[0]} |" for v in vs]
    parts += ["", stats.resolution(comp, COLA3, LORA, len(pr.PAPER_SEEDS), len(pr.REAL_TASKS))]
    parts += [sensitivity_line(comp, learned)] if len(learned) else []
    comp_lr, lr_used = lr_rule.compare(runs, COLA3, LORA, pr.REAL_TASKS)
    kept = tuple(learned["task"][learned["learned"]]) if len(learned) and not learned["learned"].all() else ()
    learned_lr = lr_rule.compare(runs, COLA3, LORA, kept)[0] if kept else None
    parts.append(lr_rule.line(comp_lr, COLA3, LORA, learned_lr))
    comp_lr = lr_rule.with_learned(comp_lr, learned_lr)
    parts += ["What makes a chain win: each change against COLA-3 (linear decay over the whole chain, full "
              "optimizer reset, 3 links), pooled over tasks:", ""]
    for t in VS_COLA3:
        r = stats.pooled_row(comp, t, COLA3)
        parts.append(f"- {t.removeprefix('COLA-3, ')}: " + (f"**{_ABLATION_WORDS[r['verdict']]}**; {stats.describe(r)}"
                                                            if r is not None else "no pairs yet"))
    jag = runs[runs["variant"] == JAGGED].groupby("task")["restart_warmup_steps"].first().dropna()
    if len(jag):
        parts.append("- (jagged cosine re-warm-up after each knot, steps per task: "
                     + ", ".join(f"{t} {int(k)}" for t, k in jag.items()) + ")")
    main = per_variant_table(stats.paired_arms(sel, COLA3, LORA), {"LoRA": LORA, "COLA-3": COLA3}, pr.REAL_TASKS)
    if len(main) and len(comp):
        c3 = stats.pair_rows(comp, COLA3, LORA).set_index("task")
        main["COLA-3 - LoRA [95% CI]"] = [_fmt_ci(c3.loc[t]) if t in c3.index else "-" for t in main["task"]]
        main["verdict"] = [c3.loc[t, "verdict"] if t in c3.index else "-" for t in main["task"]]
        main["no fine-tuning"] = [f"{untrained[t]:.2f}" if t in untrained else "-" for t in main["task"]]
        lrs = lr_coverage(runs, (LORA, COLA3), pr.LR_GRID)
        main["LRs in every cell"] = [lrs.get(t, "-") for t in main["task"]]
    t4 = table4(sel, pr.REAL_TASKS)
    f3 = fig3_table(sel, pr.STEPDOWN_TASKS, pr.STEPDOWN_RANKS)
    variants = tuple(dict.fromkeys([LORA, COLA3, *sorted(set(runs["variant"]))]))
    tables = [("table_real_main", main, None, "SmolLM2-135M at the paper's protocol: test accuracy (%), mean ± std "
               "over the paired seeds of the dev-selected LR (both arms chosen on the LRs both tried), and the paired "
               "COLA-3 - LoRA difference", None),
              ("table_real_pairs", pairs.shown(pp := pairs.pair_table(runs, sel, COLA3, LORA, pr.REAL_TASKS)), pp,
               pairs.CAPTION, None),
              ("table_real_comparisons", comparison_table(comp) if len(comp) else comp, comp,
               "Paired differences (pp) per task and pooled, 95% bootstrap CI, paired t CI, exact sign test",
               lambda d: plot_forest(comp, fig_dir, VS_LORA) + plot_forest(comp, fig_dir, VS_COLA3,
                                                                           "fig_real_forest_vs_cola3", COLA3)),
              ("table_real_lr_per_task", lr_rule_table(comp_lr, lr_used), lr_rule.with_lrs(comp_lr, lr_used),
               "Second reading: COLA-3 - "
               f"LoRA with {lr_rule.RULE}; paired over seeds as in the verdict table", None),
              ("table_real_learned", learned_table(learned), learned, "Is the task learned? Mean of the two arms "
               "(COLA-3, LoRA) minus the untrained model, test accuracy (pp), 95% bootstrap CI over seeds", None),
              ("table_real_table4", t4, None, "Table 4 analogue: test accuracy vs chain length at 5 epochs "
               f"(each row on the seeds and LRs every length has: {COMMON})",
               lambda d: plot_lines(d, [f"length {n}" for n in LENGTHS], list(LENGTHS), fig_dir, "fig_real_table4",
                                    "chain length (1 = LoRA)")),
              ("fig3_real_rank_stepdown", f3, None, "Figure 3 analogue: rank 8 for 3 epochs, then r for 2, vs LoRA "
               f"r=8 (each row on the seeds and LRs every column has: {COMMON})",
               lambda d: plot_lines(d, [f"r={r}" for r in pr.STEPDOWN_RANKS], list(pr.STEPDOWN_RANKS), fig_dir,
                                    "fig3_real_rank_stepdown", "residual rank r (last 2 epochs)",
                                    baseline="LoRA r=8")),
              *epochs.report_tables(runs, COLA3, LORA, pr.REAL_TASKS, variants, fig_dir, ABLATION,
                                    (tuple(f"step-down 8→{r}" for r in pr.STEPDOWN_RANKS), pr.STEPDOWN_TASKS)),
              ("table_real_cost", cost.shown(spent := cost.cost_table(runs, cov, pr.REAL_TASKS)), spent, cost.CAPTION,
               None)]
    for name, frame, numeric, caption, plot in tables:
        if frame is None or frame.empty:
            parts.append(f"\n### {caption}\n\nno results yet.\n")
            continue
        files += _write(_shown(frame), frame if numeric is None else numeric, name, tdir, caption)
        made = plot(frame) if plot else []
        files += made
        figs = "".join(f"\n![{p.stem}]({p.relative_to(fig_dir)})\n" for p in made if p.suffix == ".png")
        parts.append(f"\n### {caption}\n\n" + to_markdown(_shown(frame)) + figs)
    return [(title, "\n".join(parts) + "\n")], vs

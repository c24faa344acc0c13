"""Saved results -> figures (PNG + PDF), tables (md / tex / csv in figures/tables/) and figures/REPORT.md.

    python paper_repro/make_figures.py [--results-dir paper_repro/results] [--figures-dir figures]
    (the same as `python paper_repro/run_all.py --only figures`)

Headless (Agg); reads only result files, never a model. Works with any subset of results: a part with no results
is listed in the report as "not run" with the command that makes it. Exit code 1 if a Theorem 4.1 point is above
its bound (the message names the points), else 0.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cola_theory.paths import check_writable  # noqa: E402
from paper_repro import plot_style  # noqa: E402,F401 - selects the Agg backend before pyplot is imported

RUN = "python paper_repro/run_all.py"
THEORY_HINT = f"`{RUN} --only theory` (add --profile smoke for the seconds-long version)"


@dataclass
class Summary:
    """What `build` made: the printed summary text, the files, and whether a theorem bound is violated."""

    text: str = ""
    files: list[Path] = field(default_factory=list)
    bound_violated: bool = False
    bound_message: str = ""


def theory_sections(results_dir: Path, fig_dir: Path, files: list[Path], log) -> list[tuple[str, str]]:
    """Plot each theory experiment that has results; include its t{N}_summary.md in the report."""
    try:
        from paper_repro.theory import EXPERIMENTS
    except ImportError as exc:
        return [("Theory (T1-T5)", f"not available: paper_repro.theory does not import ({exc}).\n")]
    out = []
    for key, module in EXPERIMENTS.items():
        summary = results_dir / "theory" / f"t{key[1:].lower()}_summary.md"
        first = (module.__doc__ or key).strip().splitlines()[0]
        title = f"Theory {first}" if first.startswith(key) else f"Theory {key}: {first}"
        if not summary.exists():
            out.append((title, f"not run ({summary.name} missing): {THEORY_HINT}.\n"))
            continue
        try:
            made = [Path(p) for p in module.plot(results_dir, fig_dir)]
        except Exception as exc:  # noqa: BLE001 - one broken plot must not hide the rest of the report
            log(f"[figures] {key}.plot failed: {type(exc).__name__}: {exc}")
            made, note = [], f"\n**plot failed**: {type(exc).__name__}: {exc}\n"
        else:
            note = ""
        files += made
        figs = "".join(f"![{p.stem}]({p.relative_to(fig_dir)})\n" for p in made if p.suffix == ".png")
        text = "\n".join("##" + line if line.startswith("#") else line for line in summary.read_text().splitlines())
        out.append((title, text + "\n" + note + ("\n" + figs if figs else "")))
    return out


def lm_sections(results_dir: Path, fig_dir: Path, files: list[Path], log):
    """(sections, main tables per scope, chain-length table, step-down table) from the LM result files."""
    from paper_repro import reference as ref
    from paper_repro.lm import plots, tables
    from paper_repro.lm.profiles import CPU_MODEL

    df = tables.load_lm_results(results_dir, warn=log)
    if len(df):  # the `real` profile's results have their own section (paper_repro.lm.study)
        from paper_repro.lm.profiles import real_jobs

        real = {str(j.result_path(results_dir)) for j in real_jobs()}
        df = df[~df["path"].isin(real)]
    sel = tables.select_lr(df) if len(df) else df
    tdir = fig_dir / "tables"
    sections, mains = [], {}
    smollm2 = f"{tables.MODEL_LABELS[CPU_MODEL]}: a 4-bit quantised checkpoint expanded to float32, not the " \
              "original weights"
    specs = [("table1_opt13b", "opt-1.3b", f"{ref.MAIN_TABLES['opt-1.3b']}: OPT-1.3B", "", "gpu"),
             ("table2_llama7b", "llama-2-7b", f"{ref.MAIN_TABLES['llama-2-7b']}: Llama-2-7B", "", "gpu"),
             ("table_cpu_smollm2", CPU_MODEL, "CPU: SmolLM2-135M (Q4_1 GGUF)", f" ({smollm2})", "cpu"),
             ("table_smoke_tiny", "tiny-opt", "smoke: tiny-opt (random weights)", "", "smoke")]
    note = ("Test accuracy (%) mean ± sample std over seeds at the LR selected by mean dev accuracy; "
            f"'{ref.LABEL}' columns are the paper's numbers, not ours.")
    for name, model, scope, extra, profile in specs:
        caption = f"{scope}{extra}, LoRA vs COLA"
        main = tables.main_table(sel, model) if len(sel) else None
        if profile != "smoke" or (main is not None and not main.empty):
            mains[scope] = main
        if main is None or main.empty:
            sections.append((caption, f"not run: `{RUN} --profile {profile} --only lm`.\n"))
            continue
        files += tables.write_table(main, name, tdir, f"{caption}. {note}")
        made = plots.plot_lora_vs_cola(main, f"fig_{name.removeprefix('table_')}_lora_vs_cola", scope,
                                       fig_dir) if profile != "gpu" else []
        files += made
        figs = "".join(f"\n![{p.stem}]({p.relative_to(fig_dir)})\n" for p in made if p.suffix == ".png")
        sections.append((caption, f"{note}\n\n" + tables.to_markdown(tables.display_columns(main)) + figs))
    chain = tables.chain_length_table(sel) if len(sel) else None
    step = tables.stepdown_table(sel) if len(sel) else None
    compute = tables.compute_table(sel) if len(sel) else None
    for name, frame, caption, plot in (
            ("table4_chain_length", chain, "Table 4: test accuracy vs chain length (5 epochs in the paper)",
             plots.plot_chain_length),
            ("fig3_rank_stepdown", step, "Figure 3 data: rank step-down (rank 8, then r) vs LoRA r=8",
             plots.plot_stepdown),
            ("table_compute", compute, "Compute: trainable parameters, analytic training FLOPs per token "
             "(4 N_frozen + 3 x 2 r (d_in + d_out) per adapted matrix, step-weighted over links), measured time "
             "and peak GPU memory", None)):
        paper = f"\n{ref.LABEL}: {ref.NOT_RECOVERABLE[name]}.\n" if name in ref.NOT_RECOVERABLE else ""
        if frame is None or frame.empty:
            sections.append((caption, f"not run: `{RUN} --profile gpu --only lm` (or cpu for SmolLM2).\n" + paper))
            continue
        files += tables.write_table(frame, name, tdir, caption)
        made = plot(frame, fig_dir) if plot else []
        files += made
        figs = "".join(f"\n![{p.stem}]({p.relative_to(fig_dir)})\n" for p in made if p.suffix == ".png")
        sections.append((caption, tables.to_markdown(tables.display_columns(frame)) + paper + figs))
    return sections, mains, chain, step


def _metas(results_dir: Path) -> list[dict]:
    from cola_theory.results import load_if_valid

    metas = []
    for part in ("theory", "lm"):
        for path in sorted((Path(results_dir) / part).rglob("*.json")):
            if "checkpoints" not in path.parts and (payload := load_if_valid(path, warn=lambda m: None)):
                metas.append(payload.get("meta", {}))
    return metas


def build(results_dir: Path, fig_dir: Path, profile: str | None = None, log=print) -> Summary:
    """Figures, tables and REPORT.md from whatever results exist under `results_dir`."""
    from cola_theory.results import git_state
    from paper_repro import report

    results_dir, fig_dir = Path(results_dir), Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    summary = Summary()
    sections = theory_sections(results_dir, fig_dir, summary.files, log)
    lm, mains, chain, step = lm_sections(results_dir, fig_dir, summary.files, log)
    from paper_repro.lm import study

    real, real_verdicts = study.report_section(results_dir, fig_dir, summary.files, log)
    verdicts = [report.theorem41_verdict(results_dir), *report.cola_vs_lora_verdicts(mains),
                *report.chain_length_verdicts(chain), *report.stepdown_verdicts(step), *real_verdicts]
    path = report.write_report(fig_dir / "REPORT.md", sections=sections + lm + real, verdicts=verdicts,
                               metas=_metas(results_dir), git=git_state(), results_dir=results_dir)
    summary.files.append(path)
    thm = verdicts[0]
    summary.bound_violated = thm.status == "violated"
    summary.bound_message = (f"Theorem 4.1 bound violated: {thm.detail} (see {results_dir / 'theory'}"
                             "/theorem41.csv)") if summary.bound_violated else ""
    lines = ["", "=== summary (full report: " + str(path) + ") ===", report.verdict_table(verdicts)]
    for scope, main in mains.items():
        if main is not None and not main.empty:
            from paper_repro.lm.tables import display_columns, to_markdown

            lines += [f"{scope}:", to_markdown(display_columns(main).drop(columns=["setting"]))]
    lines.append(f"{len(summary.files)} files written under {fig_dir}")
    summary.text = "\n".join(lines)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make_figures.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--results-dir", type=Path, default=ROOT / "paper_repro" / "results")
    p.add_argument("--figures-dir", type=Path, default=ROOT / "figures")
    args = p.parse_args(argv)
    if (msg := check_writable(args.figures_dir.resolve(), "--figures-dir")) is not None:
        p.error(msg)
    if not args.results_dir.is_dir():
        print(f"[figures] --results-dir {args.results_dir} does not exist: every part is reported as not run "
              f"(make results with `{RUN}`)", file=sys.stderr)
    summary = build(args.results_dir, args.figures_dir)
    print(summary.text)
    if summary.bound_violated:
        print(f"ERROR: {summary.bound_message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

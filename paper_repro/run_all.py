"""Run every experiment of the reproduction, resumably, then build the figures, tables and figures/REPORT.md.

    python paper_repro/run_all.py [--profile smoke|cpu|gpu|real|real-cpu|...] [--only theory,lm,figures] [--force]
                                  [--shard i/n] [--results-dir DIR] [--figures-dir DIR] [--data-dir DIR]
                                  [--device cpu|cuda] [--dry-run] [--set FIELD=VALUE ...]

Profiles: smoke (< 1 min: theory at size "smoke" + tiny-opt LM runs; used by the tests), cpu (default: the full
theory suite + SmolLM2-135M on real SST-2 / RTE subsets, ~15 min on 2 cores), gpu (paper scale: OPT-1.3B and
Llama-2-7B, 7 tasks, LoRA vs COLA, 5 seeds x 5 LRs, Table 4, Figure 3; 1175 LM runs, meant for --shard), real
(SmolLM2-135M at the paper's protocol on the 7 tasks: LoRA vs COLA-3, Table 4 / Figure 3 analogues and the
ablation, 5 seeds x 5 LRs; 1525 LM runs, ~3 GPU-hours), real-cpu (its CPU fallback: SST-2 / RTE / CB / WSC /
WiC, LoRA vs COLA-3, seeds 0-4, LR 1e-3 / 8e-4 / 1e-4; 150 of the real runs), real-cpu-ablation (its second CPU
tier: the ablation on SST-2 / CB at seeds 0-2 and the same LRs; 90 of the real runs). `--missing` prints what a
profile still lacks, by shard.

Resumable: a job whose result file is intact (sha256) and was made with the same config is skipped; a killed
LM run resumes from results/lm/checkpoints/<job id>. `--shard i/n` (0 <= i < n) runs the i-th of n near-equal
contiguous parts of the job list in (task, seed) order, never splitting a family of chains that share a first-knot
trunk (`shard`; SLURM: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT); figures are built only
when n == 1 or with --only figures. Exit codes: 0 ok, 1 a Theorem 4.1 bound is violated, 2 bad arguments,
3 some job failed (the others still ran).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python paper_repro/run_all.py` from anywhere
    sys.path.insert(0, str(ROOT))

from cola_theory.paths import check_writable  # noqa: E402
from paper_repro.lm.profiles import PROFILES  # noqa: E402

PARTS = ("theory", "lm", "figures")
THEORY_SIZE = {"smoke": "smoke", "cpu": "full", "gpu": "full", "real": "full", "real-cpu": "full",
               "real-cpu-ablation": "full"}
EXIT_BOUND, EXIT_ARGS, EXIT_FAILED = 1, 2, 3


def default_results_dir(profile: str) -> Path:
    return ROOT / "paper_repro" / "results" / ("smoke" if profile == "smoke" else "")


def default_figures_dir(profile: str) -> Path:
    return ROOT / "figures" / ("smoke" if profile == "smoke" else "")


def parse_parts(values: list[str] | None) -> tuple[str, ...]:
    """['theory,lm', 'figures'] -> ('theory', 'lm', 'figures'); raises ValueError naming the choices."""
    parts = [p.strip() for v in (values or []) for p in v.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ValueError(f"unknown part(s) {bad}: choose from {', '.join(PARTS)} (repeat --only or use commas)")
    return tuple(p for p in PARTS if p in parts) or PARTS


def parse_shard(text: str) -> tuple[int, int]:
    """'2/8' -> (2, 8) with 0 <= i < n."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: use i/n, e.g. 0/4 (0 <= i < n)") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"--shard {text!r}: need n >= 1 and 0 <= i < n")
    return i, n


def parse_pack(text: str) -> int | str:
    """'off' -> 0, 'auto' -> 'auto', 'N' -> N >= 1."""
    if text in ("off", "auto"):
        return 0 if text == "off" else "auto"
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"--pack {text!r}: use a pack size N >= 1, 'off' or 'auto'")
    return n


def pack_size(pack: int | str, device: str | None) -> int:
    """--pack auto: 25 runs per pack on a CUDA device (a small model's step is launch-bound there), off on a CPU."""
    if pack != "auto":
        return int(pack)
    import torch

    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    return 25 if cuda else 0


def parse_setting(text: str) -> tuple[str, object]:
    """'warmup_steps=10' -> ('warmup_steps', 10): an LMRunConfig field or chain setting (`LMRunConfig.override`);
    VALUE is a Python literal (ast.literal_eval: 1e-3, True, None, (0.9, 0.99)), else taken as a string."""
    import ast

    from cola_theory.lm.run_config import CHAIN_OVERRIDES, LMRunConfig

    field, eq, raw = text.partition("=")
    field = field.strip()
    choices = sorted({f for f in LMRunConfig.__dataclass_fields__} | set(CHAIN_OVERRIDES))
    if not eq or field not in choices:
        raise argparse.ArgumentTypeError(f"--set {text!r}: use FIELD=VALUE with FIELD one of {', '.join(choices)}")
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw.strip()
    return field, value


def parse_where(text: str) -> tuple[str, object]:
    """'task=sst2' -> ('task', 'sst2'), FIELD an LMRunConfig field (VALUE parsed as --set's)."""
    from cola_theory.lm.run_config import LMRunConfig

    field, value = parse_setting(text)
    if field not in LMRunConfig.__dataclass_fields__:
        raise argparse.ArgumentTypeError(f"--where {text!r}: FIELD must be an LMRunConfig field")
    return field, value


def where_holds(cfg, where: list[tuple[str, object]]) -> bool:
    """--where: every named FIELD holds one of the values given for it (AND across fields, OR within one), so
    `--where lr=1e-3 --where lr=1e-4 --where seed=0` is lr in {1e-3, 1e-4} and seed 0."""
    allowed: dict[str, list] = {}
    for field, value in where:
        allowed.setdefault(field, []).append(value)
    return all(getattr(cfg, field) in values for field, values in allowed.items())


def apply_settings(jobs: list, settings: dict) -> list:
    """The LM jobs with `settings` applied to every config (validated; merged where configs coincide)."""
    from paper_repro.lm.profiles import LMJob, _dedupe

    return _dedupe([LMJob(j.cfg.override(settings), j.groups) for j in jobs]) if settings else jobs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_all.py", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=PROFILES, default="cpu", help="experiment scale (default: cpu)")
    p.add_argument("--only", action="append", metavar="PART",
                   help=f"run only these parts: {', '.join(PARTS)} (repeatable or comma list; default: all)")
    p.add_argument("--force", action="store_true", help="rerun jobs even if a valid result exists")
    p.add_argument("--shard", type=parse_shard, default=(0, 1), metavar="i/n", help="run every n-th job from i")
    p.add_argument("--results-dir", type=Path, help="default: paper_repro/results (smoke: paper_repro/results/smoke)")
    p.add_argument("--figures-dir", type=Path, help="default: figures (smoke: figures/smoke)")
    p.add_argument("--data-dir", help="benchmark data (default: $COLA_DATA_DIR, else ../shared/data)")
    p.add_argument("--device", help="torch device for the LM runs (default: cuda if available, else cpu)")
    p.add_argument("--dry-run", action="store_true", help="print the job list and exit")
    p.add_argument("--set", action="append", type=parse_setting, default=[], metavar="FIELD=VALUE",
                   help="override an LMRunConfig field or chain setting (warmup_steps, optimizer, betas, ...) for "
                        "every LM job of the profile (repeatable; recorded in the result files; new job ids)")
    p.add_argument("--group", metavar="G[,G...]", help="LM jobs of these groups only (e.g. real_main; "
                   "--dry-run lists each job's groups)")
    p.add_argument("--where", action="append", type=parse_where, default=[], metavar="FIELD=VALUE",
                   help="LM jobs whose config has FIELD == VALUE only (repeatable: every field named must hold; a "
                        "field named twice takes either value), e.g. --where task=sst2 --where seed=0 --where seed=1")
    p.add_argument("--budget-s", type=float, metavar="S", help="start no LM unit (run or pack) that would end after "
                   "S seconds (judged by the longest so far); the rest is reported deferred (a GPU window)")
    p.add_argument("--missing", action="store_true", help="print the LM jobs without a valid result (per group / "
                   "task, and by shard of --shard i/n) and exit")
    p.add_argument("--no-tf32", action="store_true",
                   help="keep IEEE float32 matmuls on a CUDA device (default there: TF32, "
                        "torch.set_float32_matmul_precision('high'); recorded in each result's meta)")
    p.add_argument("--pack-tokens", type=int, default=65536, metavar="T",
                   help="at most T // (batch_size * max_length) runs per pack (its largest padded training batch; "
                        "activation memory). Default 65536: an estimate for SmolLM2 on one H200 (~1 MB per token "
                        "in float32), not yet measured")
    p.add_argument("--no-fork", action="store_true",
                   help="train every chain from step 0 (default: chains that agree up to their first knot, e.g. "
                        "the rank step-down 8->2/4/6/8 of one LR and seed, start from one shared knot checkpoint, "
                        "results/lm/checkpoints/trunks; same results, cola_theory.lm.fork)")
    p.add_argument("--pack", type=parse_pack, default="auto", metavar="N|off|auto",
                   help="train up to N LM runs that differ only in lr / seed / schedule / reset as one pack on one "
                        "base (cola_theory.lm.packed_train); off: one run at a time; auto (default): 25 on a "
                        "CUDA device, off on a CPU")
    return p


@dataclass(frozen=True)
class Job:
    """One unit of work: a theory experiment (key T1..T5) or an LM run (`lm` is its LMJob)."""

    kind: str  # "theory" | "lm"
    key: str
    lm: object = None

    @property
    def job_id(self) -> str:
        return f"{self.kind}/{self.key}"


def theory_experiments() -> dict:
    from paper_repro.theory import EXPERIMENTS

    return EXPERIMENTS


def job_list(profile: str, parts: tuple[str, ...], settings: dict | None = None) -> tuple[list[Job], list[str]]:
    """(jobs sorted by id, problems): the theory experiments and the LM runs of a profile (`settings`: --set)."""
    jobs, problems = [], []
    if "theory" in parts:
        try:
            jobs += [Job("theory", key) for key in theory_experiments()]
        except ImportError as exc:
            problems.append(f"theory part unavailable (paper_repro.theory does not import: {exc})")
    if "lm" in parts:
        from paper_repro.lm.profiles import jobs_for

        jobs += [Job("lm", j.job_id, j) for j in apply_settings(jobs_for(profile), settings or {})]
    return sorted(jobs, key=lambda j: j.job_id), problems


def shard(jobs: list[Job], i: int, n: int) -> list[Job]:
    """Shard i of n: contiguous runs of jobs in (task, seed) order, cut into n parts of near-equal job counts,
    never inside a family of runs that may share a first-knot trunk (`cola_theory.lm.fork.family`; a theory job or
    a LoRA run is a family of one). Keeping a task's seed together lets a shard pack the runs of one seed (they
    share its sample and batch order, so a pack pads nothing across runs) and fork its families. Returned in job
    order."""
    if n == 1:
        return jobs
    from cola_theory.lm.fork import family

    families: dict[tuple, list[int]] = {}
    for k, j in enumerate(jobs):
        families.setdefault(("lm", family(j.lm.cfg)) if j.kind == "lm" else ("theory", j.key), []).append(k)

    def where(members: list[int]) -> tuple:
        j = jobs[members[0]]
        return ("", -1, members[0]) if j.kind != "lm" else (j.lm.cfg.task, j.lm.cfg.seed, members[0])

    mine, done = set(), 0
    for members in sorted(families.values(), key=where):
        if min(n - 1, (2 * done + len(members)) * n // (2 * len(jobs))) == i:  # the part holding its midpoint
            mine.update(members)
        done += len(members)
    return [j for k, j in enumerate(jobs) if k in mine]


def _mtimes(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else {}


def run_theory_job(key: str, results_dir: Path, size: str, force: bool) -> str:
    """Run one theory experiment (it skips its own valid results): 'skipped' if its result JSONs were untouched
    (the CSV / Markdown views are re-rendered from them every time), else 'ran'."""
    before = _mtimes(results_dir / "theory")
    paths = [Path(p) for p in theory_experiments()[key].run(results_dir, size=size, force=force)]
    results = [p for p in paths if p.suffix == ".json"] or paths
    unchanged = all(p in before and before[p] == p.stat().st_mtime_ns for p in results if p.exists())
    return "skipped" if results and unchanged else "ran"


def would_skip(job: Job, results_dir: Path, profile: str, force: bool) -> bool:
    """Whether a real run would skip `job`: a valid result made with the same config exists (read only; the same
    checks the theory experiments and the LM runner make)."""
    if force:
        return False
    if job.kind == "theory":
        from paper_repro.theory.common import up_to_date

        return up_to_date(theory_experiments()[job.key], results_dir, THEORY_SIZE[profile])
    from paper_repro.lm.runner import existing_result

    return existing_result(job.lm, results_dir, log=lambda m: None) is not None


def dry_run(jobs: list[Job], profile: str, shard_spec: tuple[int, int], results_dir: Path, force: bool,
            pack: int = 0, pack_tokens: int | None = None, fork: bool = True) -> None:
    """Print the job list, each job marked run / skip (up to date), and the projected time of those that run."""
    from paper_repro.lm.profiles import projected_seconds

    skip = {job.job_id for job in jobs if would_skip(job, results_dir, profile, force)}
    print(f"profile={profile} shard={shard_spec[0]}/{shard_spec[1]} results={results_dir}: {len(jobs)} jobs, "
          f"{len(jobs) - len(skip)} would run, {len(skip)} would be skipped (valid result exists)")
    for job in jobs:
        groups = f"  [{', '.join(job.lm.groups)}]" if job.lm is not None else ""
        print(f"  {'skip' if job.job_id in skip else 'run '} {job.job_id}{groups}")
    to_run = [j.lm for j in jobs if j.lm is not None and j.job_id not in skip]
    seconds = projected_seconds(to_run)
    if seconds:
        print(f"projected LM time of the {len(to_run)} LM jobs that would run (measured per-job costs, 2 CPU cores): "
              f"{seconds / 60:.1f} min")
    elif not to_run:
        print("projected LM time: 0 min (no LM job would run; --force reruns everything)")
    if profile.startswith("real"):
        from paper_repro.lm.profiles import projected_gpu_seconds, run_steps
        from paper_repro.lm.runner import trained_steps

        if gpu := projected_gpu_seconds(to_run):
            steps = trained_steps([j.lm for j in jobs if j.lm is not None], pack, pack_tokens, fork and not force,
                                  done={j.lm.job_id for j in jobs if j.lm is not None and j.job_id in skip})
            forked = sum(steps[j.job_id] < run_steps(j.cfg) for j in to_run)
            print(f"projected GPU time of those {len(to_run)} LM jobs: {gpu / 3600:.1f} h sequential at 10 GPU-s per "
                  "625-step run (measured on an H200 with 12 processes sharing it; steps only, eval not modelled); "
                  f"{projected_gpu_seconds(to_run, steps) / 3600:.1f} h with forks ({forked} runs start from a "
                  "shared first-knot checkpoint at this --pack)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        parts = parse_parts(args.only)
    except ValueError as exc:
        parser.error(str(exc))
    i, n = args.shard
    results_dir = (args.results_dir or default_results_dir(args.profile)).resolve()
    figures_dir = (args.figures_dir or default_figures_dir(args.profile)).resolve()
    build_figures = "figures" in parts and (n == 1 or parts == ("figures",))
    checks = ([(results_dir, "--results-dir")] if {"theory", "lm"} & set(parts) else []) + (
        [(figures_dir, "--figures-dir")] if build_figures else [])
    for path, flag in checks if not args.dry_run else []:  # before any work
        if (msg := check_writable(path, flag)) is not None:
            parser.error(msg)
    settings = dict(args.set)
    if len(settings) < len(args.set):
        parser.error(f"--set: a field is given twice ({[f for f, _ in args.set]})")
    try:
        jobs, problems = job_list(args.profile, parts, settings)
    except (ValueError, TypeError) as exc:  # a value the configs reject
        parser.error(f"--set {' '.join(f'{k}={v!r}' for k, v in settings.items())}: {exc}")
    if args.group:
        wanted = {g.strip() for g in args.group.split(",") if g.strip()}
        known = {g for j in jobs if j.lm is not None for g in j.lm.groups}
        if wanted - known:
            parser.error(f"--group {args.group}: unknown group(s) {sorted(wanted - known)} in profile "
                         f"{args.profile}; its groups are {sorted(known)}")
        jobs = [j for j in jobs if j.lm is None or wanted & set(j.lm.groups)]
    if args.where:
        jobs = [j for j in jobs if j.lm is None or where_holds(j.lm.cfg, args.where)]
    if args.missing:
        from paper_repro.lm.missing import missing_report, selection_flags

        lm_shards = [[j.lm for j in shard(jobs, k, n) if j.kind == "lm"] for k in range(n)]
        print(missing_report(lm_shards, results_dir, args.profile, ",".join(args.only) if args.only else None,
                             selection_flags(args.group, args.where, args.set, args.results_dir)))
        return 0
    jobs = shard(jobs, i, n)
    if args.dry_run:
        dry_run(jobs, args.profile, args.shard, results_dir, args.force, pack_size(args.pack, args.device),
                args.pack_tokens, not args.no_fork)
        return 0
    for msg in problems:
        print(f"[run_all] WARNING: {msg}", file=sys.stderr)
    t0 = time.perf_counter()
    counts = run_jobs(jobs, args, results_dir)
    code = EXIT_FAILED if counts.get("failed") or problems else 0
    print(f"[run_all] {len(jobs)} jobs: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
          + f" ({time.perf_counter() - t0:.0f} s)")
    if build_figures:
        from paper_repro.make_figures import build

        summary = build(results_dir, figures_dir, profile=args.profile)
        print(summary.text)
        if figures_dir == default_figures_dir("real"):  # the repository's own figures: keep README's table current
            from paper_repro import readme_sync

            readme_sync.main(["--tables-dir", str(figures_dir / "tables")])  # reports (never fails) on missing tables
        if summary.bound_violated:
            print(f"[run_all] ERROR: {summary.bound_message}", file=sys.stderr)
            return EXIT_BOUND
    elif "figures" in parts:
        print(f"[run_all] shard {i}/{n}: figures not built; run `python paper_repro/run_all.py --only figures "
              f"--results-dir {results_dir}` after all shards finish")
    return code


def run_jobs(jobs: list[Job], args: argparse.Namespace, results_dir: Path) -> dict[str, int]:
    """Theory jobs first, then the LM jobs (grouped by model inside `run_lm_jobs`); a tqdm bar over all."""
    from tqdm import tqdm

    counts: dict[str, int] = {}
    bar = tqdm(total=len(jobs), desc="run_all", unit="job", file=sys.stderr, dynamic_ncols=True)

    failed: list[str] = []

    def done(job_id: str, status: str) -> None:
        counts[status] = counts.get(status, 0) + 1
        if status == "failed":
            failed.append(job_id)
        bar.set_postfix_str(f"{job_id} {status}"[-60:])
        bar.update(1)

    for job in (j for j in jobs if j.kind == "theory"):
        try:
            status = run_theory_job(job.key, results_dir, THEORY_SIZE[args.profile], args.force)
        except Exception as exc:  # noqa: BLE001 - report, run the rest
            import traceback

            print(f"[run_all] FAILED {job.job_id}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            status = "failed"
        done(job.job_id, status)
    lm_jobs = [j.lm for j in jobs if j.kind == "lm"]
    if lm_jobs and not args.no_tf32:
        import torch

        if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
            torch.set_float32_matmul_precision("high")  # TF32 tensor cores for the float32 profiles (cpu, real)
    if lm_jobs:
        from paper_repro.lm.runner import resolve_data, run_lm_jobs

        data_dir, problem = resolve_data(args.data_dir)
        if data_dir is None:
            print(f"[run_all] LM part skipped ({len(lm_jobs)} jobs): {problem}")
            for job in lm_jobs:
                done(f"lm/{job.job_id}", "no-data")
        else:
            run_lm_jobs(lm_jobs, results_dir, data_dir=data_dir, force=args.force, device=args.device,
                        pack=pack_size(args.pack, args.device), budget_s=args.budget_s, pack_tokens=args.pack_tokens,
                        fork=not args.no_fork,
                        log=lambda m: tqdm.write(m, file=sys.stdout),
                        on_done=lambda job, status: done(f"lm/{job.job_id}", status))
    bar.close()
    if failed:
        print(f"[run_all] {len(failed)} job(s) FAILED (tracebacks above; rerun to retry them): " + ", ".join(failed))
    return counts


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

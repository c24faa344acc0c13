"""What a profile still lacks: `python paper_repro/run_all.py --profile real --missing [--shard i/n] [--only lm]`.

Read only: a job is present when `runner.existing_result` accepts its result file (intact, same config), as the
runner's own skip check. Prints present / total per group and task, then the missing job ids grouped by the
shard of `--shard i/n` that runs them (n from --shard; the same job order and --only parts as a real run), each
with the command that runs that shard: it repeats the flags that chose the jobs (--group, --where, --set,
--results-dir), so pasting it runs that shard of the same selection, not of the whole profile.
"""

from __future__ import annotations

import ast
import shlex
from collections.abc import Sequence
from pathlib import Path

RUN = "python paper_repro/run_all.py"


def _flag_value(value: object) -> str:
    """The text --where / --set parse back to `value` (they read VALUE with ast.literal_eval, else as a string)."""
    text = str(value)
    if isinstance(value, str):
        try:
            ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
        return repr(value)  # a string that would read back as a number or tuple
    return text


def selection_flags(group: str | None, where: Sequence[tuple[str, object]], settings: Sequence[tuple[str, object]],
                    results_dir: Path | None) -> str:
    """The flags that chose the jobs (--group, --where, --set, a non-default --results-dir), shell-quoted, so a
    printed command runs the same selection."""
    flags = [f"--group={group}"] if group else []
    flags += [f"--where={f}={_flag_value(v)}" for f, v in where]
    flags += [f"--set={f}={_flag_value(v)}" for f, v in settings]
    flags += [f"--results-dir={results_dir}"] if results_dir is not None else []
    return " ".join(shlex.quote(f) for f in flags)


def missing_report(shards: Sequence[Sequence], results_dir: Path, profile: str, only: str | None = None,
                   selection: str = "") -> str:
    """`shards[i]` = the LMJobs shard i runs (in run order); `selection` = the shell-quoted flags that chose
    them, repeated in each shard's command. Returns the report text."""
    from paper_repro.lm.profiles import PAPER_TASKS
    from paper_repro.lm.runner import existing_result

    stale: list[str] = []
    present = {j.job_id: existing_result(j, Path(results_dir), stale.append) is not None
               for jobs in shards for j in jobs}
    jobs = {j.job_id: j for s in shards for j in s}
    order = {t: i for i, t in enumerate(PAPER_TASKS)}
    tasks = sorted({j.cfg.task for j in jobs.values()}, key=lambda t: (order.get(t, len(order)), t))
    groups = list(dict.fromkeys(g for j in jobs.values() for g in j.groups))
    n_missing = sum(not p for p in present.values())
    lines = [f"profile={profile} results={results_dir}: {len(jobs)} LM jobs, {len(jobs) - n_missing} present, "
             f"{n_missing} missing" + (f" ({len(stale)} of them with a result made by another config)"
                                      if stale else ""), "",
             "present/total per group and task:", "",
             "| group | " + " | ".join(tasks) + " | all |", "|---|" + "---|" * (len(tasks) + 1)]
    for g in groups:
        cells = []
        for t in [*tasks, None]:
            ids = [i for i, j in jobs.items() if g in j.groups and (t is None or j.cfg.task == t)]
            cells.append(f"{sum(present[i] for i in ids)}/{len(ids)}" if ids else "-")
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    n = len(shards)
    only_flag = f" --only {only}" if only else ""
    for i, shard_jobs in enumerate(shards):
        miss = [j.job_id for j in shard_jobs if not present[j.job_id]]
        if not miss:
            continue
        cmd = f"{RUN} --profile {profile}{only_flag}" + (f" {selection}" if selection else "") + (
            f" --shard {i}/{n}" if n > 1 else "")
        lines += ["", f"shard {i}/{n}: {len(miss)} missing: `{cmd}`"] + [f"  {m}" for m in miss]
    if not n_missing:
        lines += ["", "nothing is missing"]
    return "\n".join(lines) + "\n"

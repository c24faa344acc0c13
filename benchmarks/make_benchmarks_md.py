"""BENCHMARKS.md from the saved benchmark results (never typed by hand).

python benchmarks/theory_bench.py          # -> results/theory_bench.json   (CPU, ~1-2 min)
python benchmarks/gpu_bench.py --size cpu  # -> results/gpu_bench_cpu.json  (CPU, ~2 min)
python benchmarks/gpu_bench.py             # -> results/gpu_bench.json      (H200, <= 8 min)
bash benchmarks/device_check.sh            # on a lent device: GPU tests + gpu_bench.py in one prepared run
python benchmarks/compile_lm.py            # -> results/compile_lm_cpu.json  (CPU, ~10 min, needs COLA_DATA_DIR)
python benchmarks/fold_precision.py        # -> results/fold_precision.json  (CPU, ~10 s)
python benchmarks/pack_bench.py --size tiny     # -> results/pack_bench_tiny_cpu.json (CPU, ~1 min)
python benchmarks/pack_bench.py --size smollm2  # -> results/pack_bench_smollm2_<device>.json (CPU ~5 min)
python benchmarks/fork_bench.py           # -> results/fork_bench.json (from the committed `real` results, ~20 s)
python benchmarks/make_benchmarks_md.py    # -> ../BENCHMARKS.md
"""

from __future__ import annotations

import json
from pathlib import Path

from cola_theory.results import atomic_write_text

HERE = Path(__file__).resolve().parent
RES = HERE / "results"


def _load(name: str) -> dict | None:
    path = RES / name
    return json.loads(path.read_text()) if path.exists() else None


def _machine(meta: dict) -> str:
    keys = ("device", "platform", "cpus", "torch_threads", "python", "torch", "transformers", "peft")
    desc = ", ".join(f"{k} {meta[k]}" for k in keys if meta.get(k) is not None)
    return f"{desc}; measured {meta.get('created_at')} at commit {str(meta.get('git_commit'))[:10]}"


def ok(flag: bool) -> str:
    return "met" if flag else "**missed**"


def lm_section(title: str, rep: dict, gpu: bool) -> list[str]:
    from gpu_bench import markdown  # noqa: PLC0415 - sibling script

    lines = [f"## {title}", "", _machine(rep["meta"]), ""]
    lines += markdown(rep).splitlines()[2:]
    lines += ["", "| goal | model | measured | verdict |", "|---|---|---|---|"]
    for r in rep["models"]:
        lines.append(
            f"| COLA/LoRA wall time <= 1.02 | {r['model']} | {r['cola_over_lora_time']:.3f} | "
            f"{ok(r['cola_over_lora_time'] <= 1.02)} |"
        )
        if r.get("cola_over_lora_mem"):
            lines.append(
                f"| COLA/LoRA peak memory <= 1.01 | {r['model']} | {r['cola_over_lora_mem']:.3f} | "
                f"{ok(r['cola_over_lora_mem'] <= 1.01)} |"
            )
        lines.append(
            f"| our LoRA step >= 1.0x PEFT + Trainer step | {r['model']} | "
            f"{r['ours_over_trainer_speed']:.2f}x | {ok(r['ours_over_trainer_speed'] >= 1.0)} |"
        )
        if gpu and r["model"] == "llama-2-7b":
            lines.append(
                f"| MFU >= 35% (Llama-2-7B) | {r['model']} | {r['lora']['mfu']:.1%} | {ok(r['lora']['mfu'] >= 0.35)} |"
            )
        if gpu and r["model"] == "opt-1.3b":
            h = r["projection"]["grid_gpu_hours"]
            lines.append(f"| Table 1 grid (OPT-1.3B) < 1 GPU-hour | {r['model']} | {h:.2f} h | {ok(h < 1)} |")
        for key, x in r.items():
            if key.startswith("cola_") and isinstance(x, dict) and "skipped" not in x:
                lines.append(f"| knots compile nothing new ({key[5:]}, {x['mode']}) | {r['model']} | "
                             f"{x['new_graphs']} graphs in the timed window | {ok(x['new_graphs'] == 0)} |")
    if not any(k.startswith("cola_") and isinstance(v, dict) for r in rep["models"] for k, v in r.items()):
        lines += ["", "torch.compile / CUDA graphs: not measured in this report (it predates them); rerun "
                  "`python benchmarks/gpu_bench.py` on the device."]
    if not any("paired" in r for r in rep["models"]):
        lines += ["", "COLA/LoRA time and ours/Trainer here come from separate runs (mean step times, the link "
                  "optimizer then foreach AdamW): the method before the paired one below; rerun the script on the "
                  "device to refresh."]
    else:
        lines += ["", "COLA/LoRA time and ours/Trainer are PAIRED measurements (both sides stepped in turn in one "
                  "window, medians; COLA's knots charged in full); the per-method table above comes from separate "
                  "runs, one model each (tokens/s, MFU, memory, knot time)."]
    return lines + [""]


def compile_lm_section(rep: dict) -> list[str]:
    """torch.compile on one real fine-tuning run (benchmarks/compile_lm.py)."""
    rows, cfg = rep["rows"], rep["config"]
    lines = [f"## torch.compile on a real run ({cfg['model']}, {cfg['task']} {cfg['method']}-{cfg['n_links']}, "
             f"{rows[0]['steps']} steps, {rows[0]['test_examples']} test examples; {rep['meta']['device']})", "",
             _machine(rep["meta"]), "",
             "| variant | wall s | train s | eval s | graphs compiled | test acc |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['wall_s']:.1f} | {r['train_s']:.1f} | {r['eval_s']:.1f} | {r['graphs']} "
                     f"| {r['test_acc']:.4f} |")
    eager, comp = rows[0], rows[-1]
    ratio = eager["wall_s"] / comp["wall_s"]
    verdict = "pays" if ratio > 1 else "does not pay"
    lines += ["", f"Compiled vs eager wall time: {ratio:.2f}x - compiling {verdict} at this run length "
              f"({comp['graphs']} graphs: one per padded length, train and eval)."]
    return lines + [""]


def fold_section(rep: dict) -> list[str]:
    """bf16 knots with and without the float32 master copy (benchmarks/fold_precision.py)."""
    from fold_precision import markdown  # noqa: PLC0415 - sibling script

    rows = rep["rows"]
    three = [r for r in rows if r["knots"] == max(x["knots"] for x in rows)]
    worst = max(three, key=lambda r: r["lost_in_place"] / r["lost_master"])
    return ["## bf16 knots: the float32 master copy (CPU)", "", _machine(rep["meta"]), "",
            f"Links of rank {rep['rank']} folded by `lora_ops.fold_` into SmolLM2-135M-shaped bf16 weights "
            f"(gaussian, std {rep['w_std']}); lost = ‖W_fold - W_exact‖ / ‖W_exact - W0‖.", "",
            *markdown(rows).splitlines(), "",
            f"With the master copy (the default for bf16/fp16 bases) a chain is rounded to bf16 once, however many "
            f"knots; in place every knot rounds again: at {worst['knots']} knots of ‖dW_k‖/‖W‖ = {worst['ratio']:g} "
            f"the master copy loses {worst['lost_master']:.1%} of the update, in place {worst['lost_in_place']:.1%}. "
            "One knot (LoRA) rounds once either way; float32 weights lose < 1e-4 (tests/test_fold_precision.py).",
            ""]


def pack_section(rep: dict) -> list[str]:
    """Runs per hour of the packed engine (benchmarks/pack_bench.py) and the issue's goals."""
    gpu = rep["device"].startswith("cuda")
    seq, packs = rep["sequential_runs_per_hour"], rep["packed"]
    lines = [f"## Packed grids: {rep['model']} on {rep['device']} (runs per hour at the MeZO protocol's "
             f"{rep['protocol']['steps_per_run']} steps + {rep['protocol']['eval_batches_per_run']} scoring batches)",
             "", _machine(rep["meta"]), "",
             "| engine | runs / hour | speedup | train step | scoring batch | peak memory | per run |",
             "|---|---|---|---|---|---|---|",
             f"| sequential (PeftChainBackend) | {seq:.3g} | 1.00x | {rep['step_s']['sequential'] * 1e3:.1f} ms | "
             f"{rep['eval_s']['sequential'] * 1e3:.1f} ms | {rep['peak_mem_mb']['sequential']:.0f} MB | "
             f"{rep['peak_mem_mb_per_run']['sequential']:.0f} MB |"]
    for K, rph in packs.items():
        lines.append(f"| pack of {K} | {rph:.3g} | {rep['speedup_at'][K]:.2f}x | {rep['step_s'][K] * 1e3:.1f} ms | "
                     f"{rep['eval_s'][K] * 1e3:.1f} ms | {rep['peak_mem_mb'][K]:.0f} MB | "
                     f"{rep['peak_mem_mb_per_run'][K]:.0f} MB |")
    best = max(rep["speedup_at"].values())
    mem_ok = all(rep["peak_mem_mb_per_run"][K] <= rep["peak_mem_mb_per_run"]["sequential"] * 1.01
                 for K in packs if int(K) > 1)
    lines += ["", "| goal | measured | verdict |", "|---|---|---|"]
    if gpu:
        lines.append(f"| >= 10x runs per GPU-hour (SmolLM2) | {best:.1f}x | {ok(best >= 10)} |")
    else:
        worst = min(x for K, x in rep["speedup_at"].items() if int(K) > 1)
        lines.append(f"| packing never slower than sequential (K > 1) | worst {worst:.2f}x | {ok(worst >= 1)} |")
        if rep["model"].startswith("tiny") and "8" in rep["speedup_at"]:
            lines.append(f"| >= 3x runs per hour, tiny model, K = 8 | {rep['speedup_at']['8']:.2f}x | "
                         f"{ok(rep['speedup_at']['8'] >= 3)} |")
    lines.append(f"| memory per packed run <= one sequential run | {'yes' if mem_ok else 'no'} | {ok(mem_ok)} |")
    if not gpu:
        lines += ["", "On a CPU a pack pays only while a step is dominated by per-step overhead: a SmolLM2 step is "
                  "arithmetic, and a large pack's activations outgrow the caches, so `run_all.py --pack auto` packs "
                  "on CUDA devices only. Peak memory here is the process's resident set (the runtime included). "
                  "Measured on 2 cores shared with other work (load average 2-3): ratios vary by about 20% "
                  "between runs."]
    return lines + [""]


def fork_section(rep: dict) -> list[str]:
    """What a forked run costs against one trained from step 0 (benchmarks/fork_bench.py)."""
    from fork_bench import markdown  # noqa: PLC0415 - sibling script

    lines = ["## Forked runs: the rank step-down family on real results (`cola_theory.lm.fork`)", "",
             _machine(rep["meta"]) + " (the report's date; the runs' own dates are in their result files)", "",
             markdown(rep), "", "| goal | measured | verdict |", "|---|---|---|"]
    for r in rep["rows"]:
        if r["variant"].startswith("step-down"):
            lines.append(f"| forked step-down run <= {rep['goal']} x a run from step 0 ({r['task']}, {r['engine']}, "
                         f"{r['variant']}) | {r['ratio']:.2f}x | {ok(r['ratio'] <= rep['goal'])} |")
    lines += ["", "Measured from the wall times the result files record (a pack's wall time / its size), runs of the "
              "same task, device, engine, threads and variant; medians, as a run killed and resumed records only "
              "its last process's time. A family of n runs costs 1 + (n - 1) x ratio runs' worth instead of n; the "
              "results are the same (tests/test_fork.py).", ""]
    return lines


def main() -> str:
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python benchmarks/make_benchmarks_md.py` from `benchmarks/results/*.json`;",
        "each section names the machine, versions, date and commit of its measurement. Goals come from the",
        "issues; a missed goal is reported as missed.",
        "",
    ]
    theory = _load("theory_bench.json")
    if theory:
        s, lmo = theory["suite"], theory["lmo"]
        lines += [
            "## Theory suite and the nuclear-norm LMO (CPU)",
            "",
            _machine(theory["meta"]),
            "",
            "| figure | measured | goal | verdict |",
            "|---|---|---|---|",
            f"| T1-T5 at full size, wall time (load avg before {s['load_before']:.1f}) | {s['run_wall_s']:.1f} s "
            f"(CPU {s['run_cpu_s']:.1f} s; plots +{s['plot_wall_s']:.1f} s) | < 60 s | {ok(s['meets_goal'])} |",
        ]
        for name, m in lmo["matrices"].items():
            lines.append(
                f"| LMO vs full SVD, {lmo['n']}x{lmo['n']} {name} (tol {lmo['tol']:g}) | "
                f"{m['speedup_vs_full']:.1f}x ({m['lmo_s']:.2f} s vs {m['svd_full_s']:.2f} s; "
                f"sigma rel. err {abs(m['sigma_rel_err']):.0e}) | >= 10x | {ok(m['speedup_vs_full'] >= 10)} |"
            )
        lines.append("")
    for fname, title, gpu in (
        ("gpu_bench.json", "Transformers on an H200 (paper architectures, random weights)", True),
        ("gpu_bench_cpu.json", "Transformers on the CPU (small random OPT / Llama)", False),
    ):
        rep = _load(fname)
        if rep:
            lines += lm_section(title, rep, gpu)
        else:
            lines += [f"## {title}", "", f"not measured yet: see the commands at the top ({fname}).", ""]
    for fname in ("compile_lm_cpu.json", "compile_lm_cuda.json"):
        rep = _load(fname)
        if rep:
            lines += compile_lm_section(rep)
    fold = _load("fold_precision.json")
    if fold:
        lines += fold_section(fold)
    for path in sorted(RES.glob("pack_bench_*.json")):
        lines += pack_section(json.loads(path.read_text()))
    fork = _load("fork_bench.json")
    if fork:
        lines += fork_section(fork)
    text = "\n".join(lines)
    atomic_write_text(HERE.parent / "BENCHMARKS.md", text)
    return text


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(HERE))
    print(main())

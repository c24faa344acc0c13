"""Runs per hour: the sequential engine (one `PeftChainBackend` run at a time) vs packs of K runs on one base.

    python benchmarks/pack_bench.py --size tiny     [--device cpu] [--json PATH]   # < 1 min on a CPU
    python benchmarks/pack_bench.py --size smollm2  [--device cuda]                 # SmolLM2-135M, MeZO sizes

What is timed, per variant, in a fresh process (so its peak memory is its own): training steps of a COLA chain
(batch 8 of real SST-2 prompts when COLA_DATA_DIR / ../shared/data has them, else synthetic ones of SST-2's length)
and no-grad scoring batches (16 examples), after warm-up. A MeZO-protocol run is 625 steps (1000 examples x 5
epochs at batch 8) plus 1000 test + 500 dev examples scored + 5 x 500 dev examples for best_dev: 625 steps and
255 scoring batches, so seconds per run = 625 step_s / K + 255 eval_s / K. Peak memory: CUDA's max allocated,
or the process's peak resident set on a CPU; per run = peak / K.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
STEPS_PER_RUN, EVAL_BATCHES_PER_RUN = 625, 63 + 32 + 5 * 32
SIZES = {  # model, timed steps, warm-up steps, timed eval batches, pack sizes
    "tiny": dict(model="tiny-llama", steps=40, warmup=5, evals=12, packs=(1, 5, 8, 25)),
    "smollm2": dict(model="smollm2-135m", steps=6, warmup=2, evals=3, packs=(1, 5, 25)),
}


def _examples(n: int, tiny: bool) -> list:
    from cola_theory.lm.data import resolve_data_dir, sample_protocol
    from cola_theory.lm.tasks import Example

    try:
        data = resolve_data_dir(None)
    except FileNotFoundError:
        data = None
    if data is not None and (Path(data) / "sst2" / "train.jsonl").exists():
        exs = sample_protocol("sst2", seed=0, num_train=n, num_dev=1, num_test=1, data_dir=str(data))["train"]
    else:
        exs = [Example("sst2", i, f"{'a fine, moving film ' * (1 + i % 4)}It was", (" terrible", " great"), i % 2)
               for i in range(n)]
    if tiny:  # short prompts, as in the tests: a tiny model's step is then launch- and Python-bound
        exs = [Example(e.task, e.idx, e.prompt[-12:], e.candidates, e.label) for e in exs]
    return exs


def measure(size: str, device: str, K: int, threads: int) -> dict:
    """One variant: K = 0 the sequential engine (PeftChainBackend), K >= 1 a pack of K runs."""
    import torch

    from cola_theory.config import ChainConfig
    from cola_theory.lm import scoring
    from cola_theory.lm.backend import PeftChainBackend
    from cola_theory.lm.models import load_model
    from cola_theory.lm.packed import PackedChainBackend, merge_batches
    from paper_repro.lm.runner import tiny_tokenizer

    torch.set_num_threads(threads)
    spec = SIZES[size]
    tiny = spec["model"].startswith("tiny")
    if tiny:  # the tests' tiny Llama (hidden 32, 2 layers) with the character tokenizer
        from transformers import AutoModelForCausalLM

        from cola_theory.lm.models import tiny_config

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config("tiny-llama", vocab_size=128, hidden=32)).to(device)
        tok = tiny_tokenizer()
    else:
        model, tok, _ = load_model(spec["model"], device=device)
    runs = max(K, 1)
    enc = [scoring.encode_example(tok, ex, 128) for ex in _examples(8 * runs * 4 + 16 * runs, tiny)]
    n_steps = spec["steps"] + spec["warmup"]
    cfgs = [ChainConfig(total_steps=n_steps + 1, n_links=2, rank=8, lr=1e-4 * (k + 1), seed=k) for k in range(runs)]

    def batch(t: int, k: int):  # as a real grid's pack: 5 learning rates per seed share the seed's batches
        i = (8 * (t * runs + k // 5)) % (len(enc) - 8)
        return scoring.collate(enc[i:i + 8], pad_id=tok.pad_token_id or 0)

    # scoring: a seed's runs score the same examples (its test / dev sample), in the same chunks
    eval_batches = [[scoring.collate(enc[-16 * (k // 5 + 1):len(enc) - 16 * (k // 5)], pad_id=tok.pad_token_id or 0)
                     for k in range(runs)]] * spec["evals"]
    if K == 0:
        backend = PeftChainBackend(model, cfgs[0], lambda t: batch(t, 0), scoring.candidate_loss, device=device)
    else:
        backend = PackedChainBackend(model, cfgs, lambda t: [batch(t, k) for k in range(K)], device=device)
    from cola_theory.config import link_plan

    backend.extend(link_plan(cfgs[0])[0])
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    for _ in range(n_steps):
        sync()
        t0 = time.perf_counter()
        backend.step(1e-4)
        sync()
        times.append(time.perf_counter() - t0)
    step_s = sorted(times[spec["warmup"]:])[len(times[spec["warmup"]:]) // 2]
    fwd = backend.model
    fwd.eval()
    evals = []
    with torch.no_grad():
        for group in eval_batches:
            sync()
            t0 = time.perf_counter()
            b = group[0] if K == 0 else merge_batches(group[:K], tok.pad_token_id or 0)[0]
            scoring.candidate_logprobs(fwd, b)
            sync()
            evals.append(time.perf_counter() - t0)
    eval_s = sorted(evals)[len(evals) // 2]
    if device.startswith("cuda"):
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    per_run_s = (STEPS_PER_RUN * step_s + EVAL_BATCHES_PER_RUN * eval_s) / runs
    return {"K": K, "step_s": step_s, "eval_s": eval_s, "per_run_s": per_run_s, "runs_per_hour": 3600 / per_run_s,
            "peak_mem_mb": peak_mb, "peak_mem_mb_per_run": peak_mb / runs}


def _isolated(args: tuple) -> dict:
    return measure(*args)


def bench(size: str, device: str, threads: int) -> dict:
    from cola_theory.results import environment_meta

    ctx = mp.get_context("spawn")
    rows = {}
    for K in (0, *SIZES[size]["packs"]):
        with ctx.Pool(1) as pool:  # a fresh process per variant: its own peak memory, no warm caches
            rows[K] = pool.apply(_isolated, ((size, device, K, threads),))
        print(f"[pack_bench] {'sequential' if K == 0 else f'pack of {K}'}: step {rows[K]['step_s'] * 1e3:.1f} ms, "
              f"eval batch {rows[K]['eval_s'] * 1e3:.1f} ms, {rows[K]['runs_per_hour']:.0f} runs/h, "
              f"peak {rows[K]['peak_mem_mb']:.0f} MB", flush=True)
    seq = rows[0]["runs_per_hour"]
    return {"size": size, "device": device, "model": SIZES[size]["model"], "sequential_runs_per_hour": seq,
            "packed": {str(K): rows[K]["runs_per_hour"] for K in SIZES[size]["packs"]},
            "speedup_at": {str(K): rows[K]["runs_per_hour"] / seq for K in SIZES[size]["packs"]},
            "peak_mem_mb": {("sequential" if K == 0 else str(K)): r["peak_mem_mb"] for K, r in rows.items()},
            "peak_mem_mb_per_run": {("sequential" if K == 0 else str(K)): r["peak_mem_mb_per_run"]
                                    for K, r in rows.items()},
            "step_s": {("sequential" if K == 0 else str(K)): r["step_s"] for K, r in rows.items()},
            "eval_s": {("sequential" if K == 0 else str(K)): r["eval_s"] for K, r in rows.items()},
            "protocol": {"steps_per_run": STEPS_PER_RUN, "eval_batches_per_run": EVAL_BATCHES_PER_RUN},
            "meta": {**environment_meta(device=device), "torch_threads": threads}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=tuple(SIZES), default="tiny")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    p.add_argument("--json", type=Path, help="write the report here (default: benchmarks/results/pack_bench_<size>_"
                                             "<device>.json)")
    args = p.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rep = bench(args.size, device, args.threads)
    out = args.json or HERE / "results" / f"pack_bench_{args.size}_{device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rep, indent=1))
    print(json.dumps({k: rep[k] for k in ("sequential_runs_per_hour", "packed", "speedup_at")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

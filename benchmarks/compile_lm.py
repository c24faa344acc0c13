"""torch.compile on a real fine-tuning run: does it pay at the run lengths of this package's profiles?

The cpu profile's SST-2 COLA job (SmolLM2-135M, 3 links, 96 steps, 200 test examples) run three times through
`run_lm`: eager, eager with batches padded to multiples of 32, and compiled (inductor, padded to 32; a fresh
inductor cache, so compilation is paid as on a first run). Records wall / train / eval seconds, the graphs
compiled, and the test accuracy (the three must agree up to float rounding: same math).

    COLA_DATA_DIR=/path/to/data python benchmarks/compile_lm.py      # ~10 min on 2 CPU cores
    python benchmarks/compile_lm.py --model tiny-llama --small --backend aot_eager --out DIR   # the test's size
Writes results/compile_lm_<device>.json; BENCHMARKS.md shows it (make_benchmarks_md.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from cola_theory.results import atomic_write_text, environment_meta

HERE = Path(__file__).resolve().parent
VARIANTS = (("eager", "off", 0), ("eager, padded to 32", "off", 32),
            ("compiled (inductor), padded to 32", "default", 32))


def main(argv=None) -> dict:
    from torch._dynamo.utils import counters

    from cola_theory.lm.train import run_lm
    from paper_repro.lm.profiles import cpu_jobs
    from paper_repro.lm.runner import load_bundle

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("COLA_DATA_DIR"))
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--model", default=None, help="another model than the job's (e.g. tiny-llama)")
    ap.add_argument("--small", action="store_true", help="16 train / 16 test examples (for the test)")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled variant")
    args = ap.parse_args(argv)
    if not args.data_dir:
        raise SystemExit("compile_lm.py needs the benchmark data: --data-dir DIR or COLA_DATA_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="cola-inductor-")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    job = next(j for j in cpu_jobs() if j.cfg.task == "sst2" and j.cfg.method == "cola" and j.cfg.n_links == 3)
    base = job.cfg
    if args.model:
        base = dataclasses.replace(base, model=args.model)
    if args.small:
        base = dataclasses.replace(base, num_train=16, num_test=16, epochs=3.0, max_length=64)
    bundle = load_bundle(base.model, base.dtype, device)
    rows = []
    for label, mode, pad in VARIANTS:
        cfg = dataclasses.replace(base, compile=mode, pad_to_multiple_of=pad, compile_backend=args.backend)
        torch._dynamo.reset()
        counters.clear()
        t = time.perf_counter()
        payload = run_lm(cfg, None, data_dir=args.data_dir, device=device, model_bundle=bundle)
        m = payload["metrics"]
        rows.append({"variant": label, "compile": mode, "pad_to_multiple_of": pad, "wall_s": time.perf_counter() - t,
                     "train_s": m["train_time_s"], "eval_s": m["eval_time_s"], "steps": m["total_steps"],
                     "test_examples": m["sizes"]["test"], "test_acc": m["test_acc"],
                     "graphs": int(counters["stats"]["unique_graphs"])})
        print(json.dumps(rows[-1]), flush=True)
    report = {"job": job.job_id, "config": base.to_dict(), "backend": args.backend, "rows": rows,
              "meta": environment_meta(device=device)}
    atomic_write_text(Path(args.out) / f"compile_lm_{device}.json", json.dumps(report, indent=1, default=str))
    return report


if __name__ == "__main__":
    main()

"""GPU benchmark: LoRA vs COLA on the real OPT-1.3B and Llama-2-7B architectures (random weights).

ONE prepared script (< 8 minutes on an H200) that measures, through the package's own path
(PeftChainBackend + run_chain + batched candidate scoring), for LoRA (1 link) and COLA (3 links):
training tokens/s, model FLOP utilisation against the MEASURED bf16 matmul peak, peak memory, time per knot,
evaluation examples/s, our step vs a PEFT + transformers.Trainer step on the same batch, COLA with the optional
torch.compile (and, on CUDA, CUDA graphs: mode "reduce-overhead") against eager - step time, one-off compile cost,
the run length from which it pays, and graphs compiled after the warm-up (knots must add none) - and the projected
wall time of the paper's Table 1 grid (7 tasks x 2 methods x 5 seeds x 5 learning rates, MeZO sizes, 5 epochs) from
the per-task token lengths in benchmarks/results/task_lengths.json. Speed does not depend on weight values.

    python benchmarks/gpu_bench.py                 # paper size (needs CUDA)
    python benchmarks/gpu_bench.py --size tiny     # CPU, seconds: used by tests/test_benchmarks.py
    python benchmarks/gpu_bench.py --no-compile    # skip the torch.compile / CUDA-graph variants
Writes <out>/gpu_bench.json and <out>/gpu_bench.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import torch
from bench_timing import (  # sibling module: this file runs as a script
    chain_config,
    eval_speed,
    paired_chain,
    rewrap_knot,
    timed_chain,
    trainer_vs_ours,
)

from cola_theory.config import link_plan
from cola_theory.results import atomic_write_text, environment_meta
from paper_repro.lm.tables import flops_per_token

HERE = Path(__file__).resolve().parent
# Hub configs of the paper's models (config.json values), so no download is needed.
ARCHS = {
    "opt-1.3b": dict(
        kind="opt",
        hidden_size=2048,
        num_hidden_layers=24,
        num_attention_heads=32,
        ffn_dim=8192,
        vocab_size=50272,
        max_position_embeddings=2048,
        word_embed_proj_dim=2048,
    ),
    "llama-2-7b": dict(
        kind="llama",
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
    "tiny-opt": dict(
        kind="opt",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=128,
        vocab_size=512,
        max_position_embeddings=512,
        word_embed_proj_dim=64,
    ),
    "tiny-llama": dict(
        kind="llama",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=512,
        max_position_embeddings=512,
    ),
    # small random models (6 layers, hidden 256) for the CPU-side numbers
    "small-opt": dict(kind="opt", hidden_size=256, num_hidden_layers=6, num_attention_heads=8, ffn_dim=1024,
                      vocab_size=8000, max_position_embeddings=512, word_embed_proj_dim=256),
    "small-llama": dict(kind="llama", hidden_size=256, num_hidden_layers=6, num_attention_heads=8,
                        num_key_value_heads=4, intermediate_size=688, vocab_size=8000, max_position_embeddings=512),
}
SHAPES = {
    "paper": {"opt-1.3b": (32, 256), "llama-2-7b": (32, 256)},
    "tiny": {"tiny-opt": (4, 32), "tiny-llama": (4, 32)},
    "cpu": {"small-opt": (8, 64), "small-llama": (8, 64)},
}
STEPS = {"paper": (4, 24, 10), "tiny": (1, 6, 3), "cpu": (3, 90, 30)}  # (warm-up, timed chain steps, Trainer steps)
# torch.compile variants of COLA: (label, mode); CUDA graphs only exist on CUDA
COMPILE_VARIANTS = {"cuda": (("compile", "default"), ("cuda-graphs", "reduce-overhead")),
                    "cpu": (("compile", "default"),)}
# tiny (the test's size) checks graph capture without a C++ build; the measured sizes use inductor
COMPILE_BACKEND = {"paper": "inductor", "cpu": "inductor", "tiny": "aot_eager"}
LR_GRID, SEEDS, EPOCHS = 5, 5, 5


def build(name: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

    spec = dict(ARCHS[name])
    cfg = (OPTConfig if spec.pop("kind") == "opt" else LlamaConfig)(**spec)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def synthetic(n: int, length: int, vocab: int, seed: int):
    """n two-candidate examples of `length` tokens each with a one-token answer (the SST-2/RTE shape)."""
    from cola_theory.lm.scoring import EncodedExample

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(3, vocab, (length - 1,), generator=g).tolist()
        out.append(EncodedExample(tuple(tuple(prompt + [a]) for a in (5, 6)), (1, 1), int(torch.randint(2, (1,)))))
    return out


def matmul_peak(device: str) -> float:
    """Measured dense bf16 matmul rate (TFLOP/s): the MFU denominator."""
    if device != "cuda":
        return float("nan")
    n = 8192
    a, b = (
        torch.randn(n, n, device=device, dtype=torch.bfloat16),
        torch.randn(n, n, device=device, dtype=torch.bfloat16),
    )
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * 10 / (time.perf_counter() - t) / 1e12


def model_flops_per_token(model, seq_len: int, rank: int) -> float:
    """`paper_repro.lm.tables.flops_per_token` of this model with q_proj / v_proj (d x d) adapted at `rank`, with
    the attention scores (causal: half of 4 L d per layer). Embeddings and lm_head excluded (only the candidate
    positions reach the head)."""
    cfg = model.config
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    emb = sum(p.numel() for n, p in model.named_parameters() if "embed" in n or "lm_head" in n)
    N = sum(p.numel() for p in model.parameters()) - emb
    return flops_per_token(N, layers, ((d, d), (d, d)), (rank,), attention=layers * 2 * seq_len * d)


def bench_model(name: str, size: str, device: str, peak: float, compile_variants: bool = True,
                deadline: float = float("inf")) -> dict:
    from cola_theory.lm.backend import PeftChainBackend
    from cola_theory.lm.scoring import candidate_logprobs, classification_loss, collate

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    B, L = SHAPES[size][name]
    warm, steps, trainer_steps = STEPS[size]
    vocab = ARCHS[name]["vocab_size"]
    data = synthetic(B * 4, L, vocab, 0)
    batches = [collate(data[i * B : (i + 1) * B], pad_id=1) for i in range(4)]
    tokens_per_step = int(sum(b["attention_mask"].sum() for b in batches) / len(batches))

    def loss_fn(m, batch):
        return classification_loss(candidate_logprobs(m, batch), batch["labels"])

    out: dict = {"model": name, "batch_examples": B, "seq_len": L, "tokens_per_step": tokens_per_step}

    def measure(method: str, mode: str | None) -> dict:
        """One fresh model, one timed chain (LoRA: 1 link, COLA: 3), eager or compiled with `mode`."""
        links = 3 if method == "cola" else 1
        torch._dynamo.reset()
        model = build(name, device, dtype)
        fpt = model_flops_per_token(model, L, 8)
        cfg = chain_config(links, warm, steps)
        backend = PeftChainBackend(model, cfg, lambda t: batches[t % 4], loss_fn, device=device, keep_original=False,
                                   compile=mode, compile_backend=COMPILE_BACKEND[size])
        timing = timed_chain(backend, cfg, warm, device)
        res = {**timing, "tokens_per_s": tokens_per_step / timing["step_s"], "flops_per_token": fpt,
               "mfu": fpt * tokens_per_step / timing["step_s"] / (peak * 1e12) if peak == peak else None,
               "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}
        if method == "lora" and "eval_examples_per_s" not in out:
            out["eval_examples_per_s"] = eval_speed(backend.model, data, B * 2, device)
        del backend, model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        return res

    # separate runs (one model each): tokens/s, MFU, peak memory, knot time, warm-up
    out["lora"], out["cola"] = measure("lora", None), measure("cola", None)
    if out["lora"]["peak_mem_gb"]:
        out["cola_over_lora_mem"] = out["cola"]["peak_mem_gb"] / out["lora"]["peak_mem_gb"]

    # the two speed ratios, each measured PAIRED (both sides in turn, step by step, in one window)
    def make(cfg):
        return PeftChainBackend(build(name, device, dtype), cfg, lambda t: batches[t % 4], loss_fn, device=device,
                                keep_original=False)

    out["paired"] = paired_chain(make, warm, steps, device)
    out["cola_over_lora_time"] = out["paired"]["cola_over_lora_time"]
    ours = make(chain_config(1, 2, trainer_steps))  # the Trainer's two warm-up steps + its timed ones
    ours.extend(link_plan(ours.cfg)[0])
    out["trainer"] = trainer_vs_ours(build(name, device, dtype), device, batches, loss_fn, trainer_steps, ours)
    del ours
    gc.collect()
    out["trainer_step_s"] = out["trainer"]["trainer_step_s"]
    out["ours_over_trainer_speed"] = out["trainer"]["trainer_step_s"] / out["trainer"]["ours_step_s"]
    out["rewrap_knot_s"] = rewrap_knot(build(name, device, dtype), device)
    out["flops_per_token"] = out["lora"]["flops_per_token"]
    for label, mode in COMPILE_VARIANTS[device] if compile_variants else ():
        if time.perf_counter() > deadline:  # keep the whole script inside its time budget
            out[f"cola_{label}"] = {"mode": mode, "skipped": "the script's time budget (--budget-s) was spent"}
            continue
        res, eager = measure("cola", mode), out["cola"]
        saved = eager["step_s"] - res["step_s"]  # per step
        extra = res["warm_s"] - eager["warm_s"]  # one-off: compilation (and CUDA-graph recording)
        out[f"cola_{label}"] = {**res, "mode": mode, "backend": COMPILE_BACKEND[size],
                                "speedup": eager["step_s"] / res["step_s"], "compile_s": extra,
                                "pays_after_steps": extra / saved if saved > 0 else None}
    return out


def project_grid(res: dict, lengths: dict) -> dict:
    """Projected wall time of Table 1 for one model: every (task, method, seed, lr) run trains 5 epochs on the MeZO
    train sample and scores dev + test, at the measured token rates (bench shape; shorter real sequences run at a
    lower rate, so this is an estimate)."""
    train_tps = res["lora"]["tokens_per_s"]
    eval_tps = res["eval_examples_per_s"] * res["seq_len"]  # one shared-prefix sequence per example
    per_run = {}
    for task, row in lengths["tasks"].items():
        if task == "copa":
            continue
        train_tokens = EPOCHS * row["n_train"] * row["train_model_tokens_per_example"]
        eval_tokens = (row["n_dev"] + row["n_test"]) * row["test_model_tokens_per_example"]
        per_run[task] = train_tokens / train_tps + eval_tokens / eval_tps
    runs = 2 * SEEDS * LR_GRID
    return {
        "per_run_s": per_run,
        "grid_gpu_hours": runs * sum(per_run.values()) / 3600,
        "runs": runs * len(per_run),
        "note": "lengths from the SmolLM2 tokenizer (benchmarks/task_lengths.py)",
    }


def markdown(report: dict) -> str:
    peak = report["peak_tflops"]
    lines = [
        f"# LM benchmark ({report['meta']['device']}, {report['meta']['created_at']})",
        "",
        f"Measured bf16 matmul peak: {peak:.0f} TFLOP/s" if peak == peak else "No matmul peak on a CPU (no MFU).",
        "",
        "| model | method | tokens/s | step s | MFU | peak mem GB | knot s |",
        "|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v, f: "-" if v is None or v != v else format(v, f)
    for r in report["models"]:
        for m in ("lora", "cola"):
            x = r[m]
            lines.append(
                f"| {r['model']} | {m} | {x['tokens_per_s']:.0f} | {x['step_s']:.3f} | {fmt(x['mfu'], '.1%')} "
                f"| {fmt(x['peak_mem_gb'], '.1f')} | {fmt(x['knot_s'], '.4f')} |"
            )
    lines += [
        "",
        "| model | COLA/LoRA time (goal <= 1.02) | COLA/LoRA mem (goal <= 1.01) | ours vs Trainer speed (goal >= 1.0) "
        "| knot / step | PEFT re-wrap knot s | eval ex/s | Table-1 grid, hours on this device |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["models"]:
        lines.append(
            f"| {r['model']} | {r['cola_over_lora_time']:.3f} | {fmt(r.get('cola_over_lora_mem'), '.3f')} | "
            f"{r['ours_over_trainer_speed']:.2f}x | {fmt(r['cola']['knot_s'] / r['cola']['step_s'], '.3f')} | "
            f"{fmt(r.get('rewrap_knot_s'), '.4f')} | {r['eval_examples_per_s']:.0f} | "
            f"{fmt(r.get('projection', {}).get('grid_gpu_hours'), '.2f')} |"
        )
    return "\n".join(lines + compile_markdown(report)) + "\n"


def pays(x: dict) -> str:
    """After how many steps compiling pays back its one-off cost."""
    if x["pays_after_steps"] is None:
        return "never (no faster per step)"
    return "at once" if x["pays_after_steps"] <= 0 else f"{x['pays_after_steps']:.0f}"


def compile_markdown(report: dict) -> list[str]:
    """The torch.compile / CUDA-graph table (empty when the report has no compiled variants)."""
    variants = [(r, k, r[k]) for r in report["models"] for k in r if k.startswith("cola_") and isinstance(r[k], dict)]
    rows = [v for v in variants if "skipped" not in v[2]]
    skipped = [f"{r['model']} {k[5:]}" for r, k, x in variants if "skipped" in x]
    if not variants:
        return []
    fmt = lambda v, f: "-" if v is None or v != v else format(v, f)
    cache = report.get("inductor_cache", "warm")
    lines = ["", f"COLA (3 links) compiled vs eager: step time, one-off compile cost (warm-up minus eager warm-up; "
             f"{cache} inductor cache), "
             "the run length from which compiling pays, and graphs compiled after the warm-up (knots must add none).",
             "", "| model | variant (mode, backend) | step s | eager step s | speedup | compile s | pays after steps "
             "| new graphs in timed window | peak mem GB |", "|---|---|---|---|---|---|---|---|---|"]
    for r, key, x in rows:
        lines.append(f"| {r['model']} | {key[5:]} ({x['mode']}, {x['backend']}) | {x['step_s']:.4f} | "
                     f"{r['cola']['step_s']:.4f} | {x['speedup']:.2f}x | {x['compile_s']:.1f} | "
                     f"{pays(x)} | "
                     f"{x['new_graphs']} | {fmt(x['peak_mem_gb'], '.1f')} |")
    if skipped:
        lines += ["", f"Not measured (time budget of the script spent): {', '.join(skipped)}."]
    return lines


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("paper", "cpu", "tiny"), default="paper")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--models", default=None, help="comma list (default: both paper models, or both tiny ones)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile / CUDA-graph variants")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="start no compiled variant after this many seconds (the script must end within 8 min)")
    ap.add_argument("--warm-cache", action="store_true",
                    help="keep inductor's on-disk cache (default: a fresh one, so compile_s is a first-run cost)")
    args = ap.parse_args(argv)
    if not args.warm_cache:
        import tempfile

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="cola-inductor-")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.size == "paper" and device != "cuda":
        raise SystemExit("gpu_bench.py --size paper needs a CUDA device; use --size tiny on a CPU")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    start = time.perf_counter()
    peak = matmul_peak(device)
    lengths = json.loads((HERE / "results" / "task_lengths.json").read_text())
    names = args.models.split(",") if args.models else list(SHAPES[args.size])
    out = Path(args.out)
    stem = {"paper": "gpu_bench", "cpu": "gpu_bench_cpu", "tiny": "gpu_bench_tiny"}[args.size]
    report = {"size": args.size, "peak_tflops": peak, "models": [], "meta": environment_meta(device=device),
              "inductor_cache": "warm" if args.warm_cache else "cold"}
    for name in names:
        t = time.perf_counter()
        res = bench_model(name, args.size, device, peak, compile_variants=not args.no_compile,
                          deadline=start + args.budget_s)
        res["projection"] = project_grid(res, lengths)
        res["bench_s"] = time.perf_counter() - t
        report["models"].append(res)
        print(json.dumps({k: v for k, v in res.items() if k != "projection"}, default=str), flush=True)
        # after every model: a run stopped by a time limit keeps what it measured
        atomic_write_text(out / f"{stem}.json", json.dumps(report, indent=1, default=str))
        atomic_write_text(out / f"{stem}.md", markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()

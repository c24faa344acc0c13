"""The GPU benchmark script runs at tiny size on a CPU (so it cannot rot) and reports every figure it promises."""

import json
import subprocess
import sys
from pathlib import Path

from lm_fixtures import DATA_DIR, needs_data

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_bench_tiny_on_cpu(tmp_path):
    """Through the prepared device script (benchmarks/device_check.sh --tiny): its test step and gpu_bench."""
    import os

    env = {**os.environ, "OUT": str(tmp_path), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--tiny"], capture_output=True,
                         text=True, timeout=700, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "1 passed, 1 skipped" in (tmp_path / "gpu_tests.txt").read_text()  # the CUDA-graph test skips here
    report = json.loads((tmp_path / "gpu_bench_tiny.json").read_text())
    (row,) = report["models"]
    for method in ("lora", "cola"):
        assert row[method]["tokens_per_s"] > 0 and row[method]["step_s"] > 0
    assert row["cola"]["knot_s"] > 0 and row["rewrap_knot_s"] > 0 and row["trainer_step_s"] > 0
    # the two ratios come from paired (step-by-step alternating) measurements
    assert row["paired"]["lora_step_s"] > 0 and row["paired"]["cola_step_s"] > 0
    assert row["cola_over_lora_time"] == row["paired"]["cola_step_s"] / row["paired"]["lora_step_s"]
    assert row["trainer"]["ours_step_s"] > 0 and row["trainer"]["trainer_step_s"] > 0
    assert row["eval_examples_per_s"] > 0 and row["projection"]["grid_gpu_hours"] > 0
    compiled = row["cola_compile"]  # torch.compile variant (aot_eager at this size): measured, and no recompiles
    assert compiled["step_s"] > 0 and compiled["compile_s"] > 0 and compiled["speedup"] > 0
    assert compiled["new_graphs"] == 0  # the two knots inside the timed window compiled nothing new
    md = (tmp_path / "gpu_bench_tiny.md").read_text()
    assert "COLA/LoRA time" in md and "compile (default, aot_eager)" in md


@needs_data
def test_compile_lm_tiny_on_cpu(tmp_path):
    """benchmarks/compile_lm.py at the test's size: three variants, same accuracy, graphs only when compiled."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_lm.py"), "--model", "tiny-llama",
                          "--small", "--backend", "aot_eager", "--data-dir", str(DATA_DIR), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "compile_lm_cpu.json").read_text())["rows"]
    assert [r["compile"] for r in rows] == ["off", "off", "default"]
    assert len({r["test_acc"] for r in rows}) == 1  # tiny Llama has no dropout: the same predictions
    assert rows[0]["graphs"] == rows[1]["graphs"] == 0 and rows[2]["graphs"] >= 1
    assert all(r["train_s"] > 0 and r["eval_s"] > 0 for r in rows)


def test_compiled_variants_skipped_past_the_budget_are_reported():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    report = {"models": [{"model": "opt-1.3b", "cola": {"step_s": 0.1},
                          "cola_cuda-graphs": {"mode": "reduce-overhead", "skipped": "budget"}}]}
    md = "\n".join(gpu_bench.compile_markdown(report))
    assert "Not measured (time budget of the script spent): opt-1.3b cuda-graphs." in md

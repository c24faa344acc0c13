#!/usr/bin/env bash
# The ONE prepared device run (an H200 lent through the `device` tool), from the repository root:
#   bash benchmarks/device_check.sh            # GPU tests (~2 min) + benchmarks/gpu_bench.py (<= 8 min)
#   bash benchmarks/device_check.sh --tiny     # the same steps on a CPU at tiny size (tests/test_benchmarks.py)
# Results go to $OUT (the device tool's output folder) or benchmarks/results: gpu_tests.txt, gpu_bench.json/.md,
# gpu_bench_log.txt. Wheels the device image lacks (transformers / peft pinned as in pyproject, pytest) may be put in
# .whl/ (git-ignored) and carried; they are installed without dependencies. Nothing needs the network.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "${1:-}" != "--tiny" ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python -m pip install -q --no-deps .whl/*.whl
fi
python - <<'PY'
import importlib.metadata as m, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      *(f"{p} {m.version(p)}" for p in ("transformers", "peft", "accelerate", "safetensors")))
PY
if [ "${1:-}" = "--tiny" ]; then
  tests=(tests/test_compile.py -k "cuda_graphs or speed_fields")  # the GPU test skips on a CPU
  bench=(--size tiny --models tiny-llama)
  budget=300
else
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use --tiny on a CPU')" || exit 2
  # every GPU-marked test, plus the compile and multi-process suites (forkserver on a CUDA machine)
  tests=(tests/test_compile.py tests/test_ddp.py tests/test_lm_backend.py -p no:cacheprovider)
  bench=()
  budget=600
fi
timeout 240 python -m pytest -q -rs "${tests[@]}" 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
tests_rc=${PIPESTATUS[0]}
timeout "$budget" python benchmarks/gpu_bench.py --out "$OUT" "${bench[@]}" 2>&1 | grep -v -i "warn" \
  | tee "$OUT/gpu_bench_log.txt" | tail -30
bench_rc=${PIPESTATUS[0]}
echo "device_check: tests exit $tests_rc, gpu_bench exit $bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]

#!/usr/bin/env bash
# The ONE prepared device run (an H200 lent through the `device` tool), from the repository root:
#   bash benchmarks/device_check.sh            # GPU tests (<= 150 s) + benchmarks/gpu_bench.py; ends within 570 s
#   bash benchmarks/device_check.sh --tiny     # the same steps on a CPU at tiny size (tests/test_benchmarks.py)
# Results go to $OUT (the device tool's output folder) or benchmarks/results: gpu_tests.txt, gpu_bench.json/.md
# (rewritten after every model, so an overrun keeps what was measured), gpu_bench_log.txt. Wheels the device image
# lacks (transformers / peft as pinned in pyproject; see the device README for `pip download`) go in .whl/
# (git-ignored; name it in `carry`); they are installed into /tmp/site without the network.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python || command -v python3)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ "${1:-}" != "--tiny" ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "device_check: installing the carried wheels failed" | tee "$OUT/gpu_tests.txt"; exit 2; }
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
"$PY" - <<'PY'
import importlib.metadata as m, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      *(f"{p} {m.version(p)}" for p in ("transformers", "peft", "accelerate", "safetensors")))
PY
if [ "${1:-}" = "--tiny" ]; then
  tests=(tests/test_compile.py -k "cuda_graphs or speed_fields")  # the GPU test skips on a CPU
  bench=(--size tiny --models tiny-llama)
  limit=600  # a loaded 2-core CI machine: the tests alone can take 150 s
  reserve=30  # a tiny model compiles in seconds
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use --tiny on a CPU')" \
    || exit 2
  # every GPU-marked test, plus the compile and multi-process suites (forkserver on a CUDA machine)
  tests=(tests/test_compile.py tests/test_ddp.py tests/test_lm_backend.py -p no:cacheprovider)
  bench=()
  limit=570  # the device tool kills a command at 600 s
  reserve=150  # no compiled variant starts later than this before the end (a cold Llama-7B compile takes ~150 s)
fi
timeout 150 "$PY" -m pytest -q -rs "${tests[@]}" 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
tests_rc=${PIPESTATUS[0]}
left=$((limit - SECONDS))
timeout "$left" "$PY" benchmarks/gpu_bench.py --out "$OUT" --budget-s "$((left > reserve + 20 ? left - reserve : 20))" \
  ${bench[@]+"${bench[@]}"} 2>&1 | grep --line-buffered -v -i "warn" | tee "$OUT/gpu_bench_log.txt" | tail -30
bench_rc=${PIPESTATUS[0]}
echo "device_check: tests exit $tests_rc, gpu_bench exit $bench_rc, ${SECONDS}s"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]

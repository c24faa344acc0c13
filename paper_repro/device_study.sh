#!/usr/bin/env bash
# One GPU window of the protocol-scale study (the `real` profile: SmolLM2-135M, MeZO protocol, LR grid x 5 seeds),
# run through the packed engine on a lent H200. Prepare on the development machine, from the repository root:
#   . .venv/bin/activate && bash ../shared/device/stage.sh          # writes .device/ (wheels, data, GGUF halves)
# then two device calls, the second right after the first (the machine keeps /tmp only while it stays warm):
#   call 1: carry [".device/wheels", ".device/data.tar.xz", ".device/m1", ".device/call1.sh", ".device/call2.sh"]
#           command: bash .device/call1.sh bash paper_repro/device_study.sh --check              (timeout_s 300)
#   call 2: carry [".device/m2"] (each transfer <= 64 MiB)
#           command: bash .device/call2.sh bash paper_repro/device_study.sh --bench --budget-s 480  (timeout_s 590)
# --check: the packed engine's GPU tests and pack_bench at tiny size on the GPU (call 1: SmolLM2 is not staged yet).
# --bench: first pack_bench at SmolLM2 size on the GPU (about 1-2 min; the issue's >= 10x goal), then the study.
# The study step runs the `real` jobs still missing
# (`run_all.py --profile real --missing` lists them), groups in the order of --groups (default: the main LoRA vs
# COLA grid first), packs of --pack runs, and starts no pack that would end after --budget-s; every finished run's
# result file lands in paper_repro/results/lm and all of them come back in $OUT/real_results.tar.gz (commit them;
# the next window runs what is still missing).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/cola_out}"
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python || command -v python3)}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
budget=480 groups="real_main,real_table4,real_fig3,real_ablation" pack=25 check=0
profile=real device=cuda results=paper_repro/results bench=0
while [ $# -gt 0 ]; do
  case "$1" in
    --check) check=1 ;;
    --bench) bench=1 ;;
    --budget-s) budget="$2"; shift ;;
    --groups) groups="$2"; shift ;;
    --pack) pack="$2"; shift ;;
    --profile) profile="$2"; shift ;;    # (tests: --profile smoke --device cpu --groups smoke)
    --device) device="$2"; shift ;;
    --results-dir) results="$2"; shift ;;
    *) echo "device_study.sh: unknown argument $1"; exit 2 ;;
  esac
  shift
done
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
if [ "$check" = 1 ]; then
  timeout 200 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_packed.py -k "cuda or stacked or merged" 2>&1 \
    | tail -15 | tee "$OUT/packed_tests.txt"
  rc=${PIPESTATUS[0]}
  timeout 200 "$PY" benchmarks/pack_bench.py --size tiny --device cuda --json "$OUT/pack_bench_tiny_cuda.json" 2>&1 \
    | grep "pack_bench\]"
  exit "$rc"
fi
if [ "$bench" = 1 ]; then
  timeout 240 "$PY" benchmarks/pack_bench.py --size smollm2 --device cuda --json "$OUT/pack_bench_smollm2_cuda.json" \
    2>&1 | grep "pack_bench\]"
fi
rc=0
for g in ${groups//,/ }; do  # the groups in priority order, each with the time still left
  left=$((budget - SECONDS))
  [ "$left" -gt 30 ] || break
  "$PY" paper_repro/run_all.py --profile "$profile" --only lm --device "$device" --pack "$pack" --group "$g" \
    --results-dir "$results" \
    --budget-s "$left" 2>&1 | grep --line-buffered -v -i "warn" | tee -a "$OUT/study_log.txt" | tail -8
  r=${PIPESTATUS[0]}; [ "$r" -ne 0 ] && rc=$r
done
"$PY" paper_repro/run_all.py --profile "$profile" --results-dir "$results" --missing > "$OUT/missing.txt" 2>&1
tar -czf "$OUT/real_results.tar.gz" --exclude=checkpoints --exclude=trunks -C "$results" lm
echo "device_study: run_all exit $rc, ${SECONDS} s; results in $OUT/real_results.tar.gz"
exit "$rc"

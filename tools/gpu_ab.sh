#!/usr/bin/env bash
# On the GPU machine, in one call: every GPU test, then `detox bench ppo` (or `bench sft`) of two
# binaries in turns (A B A B, so the machine's drift falls on both) beside the PyTorch anchor. The
# anchor's own time swings by half between calls, so only figures from one call are compared.
#   Here:  BASELINE=/path/to/old/detox tools/gpu_pack.sh models/minilm-toxicity/{config.json,model.safetensors,tokenizer.json} \
#            tokenizers/{t5,bert-base-uncased,roberta-base}/tokenizer.json bench data/samsum/test.jsonl
#   There: bash tools/gpu_ab.sh             (results and logs under $OUT, or runs/gpu-ab)
# Environment: BENCH (ppo or sft), BATCH (64), MINI (16), SIZE (base), OPTIMIZER (adafactor; sft),
# ROUNDS (2), TESTS (1: run the GPU tests first), ANCHOR (1: ../shared/bench/torch_baseline.py for
# ppo, tools/bench_hf_sft.py on `detox init`'s random weights of SIZE for sft).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-ab}
BATCH=${BATCH:-64}
MINI=${MINI:-16}
SIZE=${SIZE:-base}
BENCH=${BENCH:-ppo}
OPTIMIZER=${OPTIMIZER:-adafactor}
ROUNDS=${ROUNDS:-2}
mkdir -p "$OUT"
tar -xJf .carry/bin.tar.xz -C .carry
mkdir -p .carry/shared && { [ ! -f .carry/shared.tar.xz ] || tar -xJf .carry/shared.tar.xz -C .carry/shared; }
S=$PWD/.carry/shared
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"

if [ "${TESTS:-1}" = 1 ]; then
  DETOX_ROOT=$PWD DETOX_SHARED=$S .carry/bin/gpu 2>&1 | tee "$OUT/gpu-tests.txt" | tail -n 5
fi

bench() {  # label, binary
  if [ "$BENCH" = sft ]; then
    "$2" bench sft --size "$SIZE" --batch "$BATCH" --optimizer "$OPTIMIZER" \
      --json "$OUT/bench-$1.json" >"$OUT/bench-$1.log" 2>&1 || { echo "bench $1 failed"; tail "$OUT/bench-$1.log"; }
  else
    "$2" bench ppo --size "$SIZE" --batch "$BATCH" --mini "$MINI" --epochs 4 --iters 2 \
      --classifier "$S/models/minilm-toxicity" --tokenizer "$S/tokenizers/t5/tokenizer.json" \
      --json "$OUT/bench-$1.json" >"$OUT/bench-$1.log" 2>&1 || { echo "bench $1 failed"; tail "$OUT/bench-$1.log"; }
  fi
  grep -h . "$OUT/bench-$1.log" | tail -n 8
}
for r in $(seq "$ROUNDS"); do
  for side in A B; do
    bin=.carry/bin/detox
    [ "$side" = A ] && bin=.carry/bin/detox-base
    [ -x "$bin" ] || continue
    echo "== round $r, $side ($bin)"
    bench "$side$r" "$bin"
  done
done

if [ "${ANCHOR:-1}" = 1 ]; then
  echo "== anchor"
  if [ "$BENCH" = sft ]; then
    .carry/bin/detox init --size "$SIZE" --seed 0 --out "/tmp/anchor-$SIZE" >/dev/null
    PYTHONUNBUFFERED=1 python3 tools/bench_hf_sft.py --model "/tmp/anchor-$SIZE" --batch "$BATCH" \
      --optimizer "$OPTIMIZER" >"$OUT/anchor.log" 2>&1
  else
    PYTHONUNBUFFERED=1 python3 "$S/bench/torch_baseline.py" --model "$SIZE" --batch "$BATCH" --mini "$MINI" --iters 2 \
      >"$OUT/anchor.log" 2>&1
  fi
  tail -n 12 "$OUT/anchor.log"
fi

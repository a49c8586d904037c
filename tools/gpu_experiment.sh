#!/usr/bin/env bash
# On the GPU machine, in one call of under ten minutes: every GPU test, beam-4 generation of W64 on
# flan-t5-base by detox and by Hugging Face (the anchor, same call), then tools/experiment.sh with its
# deadline; the small outputs come back as one tarball (the device returns at most 8 files).
#   Here:  tools/gpu_pack.sh models/minilm-toxicity/{config.json,model.safetensors,tokenizer.json} \
#            tokenizers/{t5,bert-base-uncased,roberta-base}/tokenizer.json data/samsum
#   There: bash tools/gpu_experiment.sh        (RESULTS in /tmp/exp, so a next call on the warm
#          machine resumes it; TESTS=0 BENCH=0 skip those parts; experiment.sh's variables pass through)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-experiment}
mkdir -p "$OUT"
[ -x .carry/bin/detox ] || tar -xJf .carry/bin.tar.xz -C .carry
if [ ! -d .carry/shared/data ]; then mkdir -p .carry/shared && tar -xJf .carry/shared.tar.xz -C .carry/shared; fi
S=$PWD/.carry/shared
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
if [ "${TESTS:-1}" = 1 ]; then
  DETOX_ROOT=$PWD DETOX_SHARED=$S .carry/bin/gpu 2>&1 >"$OUT/gpu-tests.txt"
  grep -E "FAILED|panicked|^test result" "$OUT/gpu-tests.txt" | tail -n 12
fi
if [ "${BENCH:-1}" = 1 ]; then
  .carry/bin/detox init --size base --seed 0 --dtype f16 --tokenizer "$S/tokenizers/t5/tokenizer.json" \
    --out /tmp/flan-t5-base >/dev/null
  .carry/bin/detox bench beam --size base 2>&1 | tee "$OUT/bench-beam.txt" | tail -n 4
  PYTHONUNBUFFERED=1 python3 tools/bench_hf_beam.py --model /tmp/flan-t5-base 2>&1 | tee "$OUT/bench-hf-beam.txt" | tail -n 3
fi
export RESULTS=${RESULTS:-/tmp/exp}
DETOX=.carry/bin/detox SHARED=$S bash tools/experiment.sh 2>&1 | grep -v '\r' | tail -n 40 >"$OUT/experiment.txt"
tail -n 25 "$OUT/experiment.txt"
python3 tools/results_table.py "$RESULTS" >"$RESULTS/table.md" 2>&1
tar -C "$RESULTS" --exclude='*.safetensors' --exclude=init -czf "$OUT/results.tgz" .

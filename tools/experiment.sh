#!/usr/bin/env bash
# The seed's experiment on one GPU, end to end, in one call of about ten minutes or less: no pretrained
# FLAN-T5 exists here, so detox trains its own summarizer and then detoxifies it.
#   1. `detox init --size small`: random weights of flan-t5-small's shapes;
#   2. `detox sft`: full-parameter fine-tuning on SAMSum train, time-boxed (SFT_SECONDS);
#   3. `detox eval` on SAMSum test: the SFT model's toxicity (minilm-toxicity) and ROUGE;
#   4. `detox train` with the seed's setting (50 PPO steps, batch 16, LoRA r 32 on q and v), then eval;
#   5. `detox train` with a larger batch (64 per step; LARGE_LR, by default 4× the seed's learning rate,
#      scaled with the batch), then eval;
#   6. transformers loads the SFT model and generates what detox generates (tools/check_hf_export.py).
# Every output lands in $RESULTS; tools/results_table.py turns it into the results table.
#   tools/experiment.sh                      (from the repository root)
# Environment: DETOX (the binary), SHARED (../shared), RESULTS (runs/experiment), DEVICE (cuda),
# SIZE (small), SFT_SECONDS (150), SFT_MAX_STEPS (3000), EVAL_LIMIT (819), PPO_STEPS (50),
# TRAIN_LIMIT (0: all of SAMSum train), SOURCE_LEN (256), LARGE_LR (5.64e-5), PYTHON (python3; the
# check is skipped without transformers).
set -euo pipefail
DETOX=${DETOX:-target/release/detox}
SHARED=${SHARED:-../shared}
RESULTS=${RESULTS:-runs/experiment}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-small}
SFT_SECONDS=${SFT_SECONDS:-150}
SFT_MAX_STEPS=${SFT_MAX_STEPS:-3000}
EVAL_LIMIT=${EVAL_LIMIT:-819}
PPO_STEPS=${PPO_STEPS:-50}
TRAIN_LIMIT=${TRAIN_LIMIT:-0}
SOURCE_LEN=${SOURCE_LEN:-256}
LARGE_LR=${LARGE_LR:-5.64e-5}
PYTHON=${PYTHON:-python3}
mkdir -p "$RESULTS"
stage() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$RESULTS/stages.txt"; }
evaluate() {  # name, model, [adapter]
  local adapter=()
  [ -n "${3:-}" ] && adapter=(--adapter "$3")
  "$DETOX" eval --model "$2" "${adapter[@]}" --classifier "$SHARED/models/minilm-toxicity" \
    --data "$SHARED/data/samsum/test.jsonl" --limit "$EVAL_LIMIT" --device "$DEVICE" \
    --output "$RESULTS/eval-$1.json" | tee "$RESULTS/eval-$1.txt"
}

stage "init $SIZE"
"$DETOX" init --size "$SIZE" --seed 0 --dtype f32 --tokenizer "$SHARED/tokenizers/t5/tokenizer.json" \
  --out "$RESULTS/init"

stage "sft for at most $SFT_SECONDS s"
cat > "$RESULTS/sft.toml" <<TOML
[model]
path = "$RESULTS/init"
[data]
train = "$SHARED/data/samsum/train.jsonl"
eval = "$SHARED/data/samsum/validation.jsonl"
train_limit = $TRAIN_LIMIT
max_source_len = $SOURCE_LEN
max_target_len = 64
[optim]
method = "full"
learning_rate = 1e-3
warmup_steps = 100
schedule = "linear"
batch_size = 32
label_smoothing = 0.1
[eval]
limit = 200
max_new_tokens = 64
[run]
epochs = 100
max_steps = $SFT_MAX_STEPS
time_limit_s = $SFT_SECONDS
device = "$DEVICE"
out = "$RESULTS/sft"
TOML
"$DETOX" sft --config "$RESULTS/sft.toml"
"$DETOX" plot "$RESULTS/sft/log.jsonl" --keys loss,eval_loss,rougeL --title "SFT from random init" \
  --out "$RESULTS/sft.svg"

stage "eval sft"
evaluate sft "$RESULTS/sft/model"

ppo() {  # name, batch, mini-batch, learning rate, dialogues
  cat > "$RESULTS/$1.toml" <<TOML
[model]
path = "$RESULTS/sft/model"
[data]
path = "$SHARED/data/samsum/train.jsonl"
limit = $5
[reward]
classifier = "$SHARED/models/minilm-toxicity"
[ppo]
batch_size = $2
mini_batch_size = $3
learning_rate = $4
[run]
steps = $PPO_STEPS
device = "$DEVICE"
out = "$RESULTS/$1"
checkpoint_every = $PPO_STEPS
TOML
  "$DETOX" train --config "$RESULTS/$1.toml"
  "$DETOX" plot "$RESULTS/$1/log.jsonl" --title "PPO: $1" --out "$RESULTS/$1.svg"
  evaluate "$1" "$RESULTS/sft/model" "$RESULTS/$1/$(cat "$RESULTS/$1/latest")"
}
stage "ppo, the seed's setting"
ppo ppo-seed 16 4 1.41e-5 500
stage "ppo, larger batch"
ppo ppo-large 64 16 "$LARGE_LR" 3200

stage "transformers loads the SFT model"
if "$PYTHON" -c "import transformers" 2>/dev/null; then
  head -n 64 "$SHARED/data/samsum/test.jsonl" > "$RESULTS/check.jsonl"
  "$DETOX" summarize --model "$RESULTS/sft/model" --input "$RESULTS/check.jsonl" --output "$RESULTS/check-detox.jsonl" \
    --max-new-tokens 64 --device "$DEVICE"
  "$PYTHON" tools/check_hf_export.py --model "$RESULTS/sft/model" --detox "$RESULTS/check-detox.jsonl" \
    --data "$RESULTS/check.jsonl" --limit 64 --max-new-tokens 64 | tee "$RESULTS/check-hf.json"
else
  echo "skipped: $PYTHON has no transformers" | tee "$RESULTS/check-hf.json"
fi
stage done

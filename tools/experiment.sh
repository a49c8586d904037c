#!/usr/bin/env bash
# The experiment on one GPU, resumable across GPU calls of at most ten minutes: no pretrained FLAN-T5
# exists here, so detox trains its own summarizer and then detoxifies it.
#   init   `detox init --size small --init mesh-tf`: random weights of flan-t5-small's shapes;
#   sft    `detox sft` on SAMSum train, time-boxed (SFT_SECONDS); the optimiser's keys are below;
#   tune   the beam's length penalty (LENGTH_PENALTIES) picked by the SFT model's ROUGE-L on SAMSum
#          validation (TUNE_LIMIT dialogues), never on test; every later beam eval uses it;
#   ppo    `detox train` with the seed's setting (50 steps of 16 rollouts, minibatches of 4, lr 1.41e-5,
#          500 dialogues) once per seed in PPO_SEEDS;
#   eval   `detox eval` on all of SAMSum test: LEAD-3 (the reference summaries' toxicity is in every
#          eval's JSON), then the SFT model and each PPO run under beam search (BEAM_ARGS) and under
#          sampling (SAMPLE_ARGS);
#   sweep  (optional) PPO runs over SWEEP's settings, each evaluated under beam search and under
#          sampling, for the trade-off plots;
#   plot   the training curves and one trade-off plot per decoding (toxicity against ROUGE-L and KL);
#   check  transformers loads the SFT model and generates what detox generates (skipped without it).
# Each stage's units (one init, one SFT, one PPO run, one eval) are skipped when the unit's ".done"
# marker and its output both exist in RESULTS, so the script can be started again with the same
# RESULTS and goes on where it stopped; a unit whose output vanished (the machine went back between
# calls) runs again. A unit starts only if its expected time (*_EXPECT_S below) ends before DEADLINE_S
# seconds of this call; otherwise the script says "stopped before …" and exits 0, so that a call
# ends inside the device's ten-minute limit: start it again to go on (stages.txt has each unit's
# start time, to tune the estimates). After every unit the small outputs (logs, eval JSON, tables,
# plots, TOMLs, markers; no weights) are copied to EXPORT when set (e.g. $OUT).
#   tools/experiment.sh                       (from the repository root; all stages but sweep)
#   STAGES="init sft ppo" tools/experiment.sh; STAGES="eval plot" tools/experiment.sh
# tools/results_table.py RESULTS turns the output into the results table.
set -euo pipefail
DETOX=${DETOX:-target/release/detox}
SHARED=${SHARED:-../shared}
RESULTS=${RESULTS:-runs/experiment}
DEVICE=${DEVICE:-cuda}
STAGES=${STAGES:-init sft tune ppo eval plot check}
DEADLINE_S=${DEADLINE_S:-540}
EXPORT=${EXPORT:-}
PYTHON=${PYTHON:-python3}

# init
SIZE=${SIZE:-small}
INIT=${INIT:-mesh-tf}
INIT_SEED=${INIT_SEED:-0}
# config.json's dropout_rate, which detox sft applies: at FLAN-T5's 0.1 the held-out loss turns up after
# 5 epochs of SAMSum; 0.2 trains a better model in less time (docs/RESULTS.md, runs 5 and 6)
DROPOUT_RATE=${DROPOUT_RATE:-0.2}

# sft: T5's own recipe, Adafactor with its relative step (min(1e-2, 1/sqrt(t)) times each tensor's RMS),
# trained from scratch far faster than AdamW did here (docs/RESULTS.md, runs 3 and 4: ROUGE-L 0.238 after
# 110 s against AdamW's 0.115 after 215 s at lr 7e-4). With it, SFT_LR, SFT_WARMUP and SFT_SCHEDULE are unused.
# 270 s is run 6's budget: its best held-out ROUGE-L came at epoch 10 of 11.5.
SFT_SECONDS=${SFT_SECONDS:-270}
SFT_MAX_STEPS=${SFT_MAX_STEPS:-100000}
SFT_OPTIMIZER=${SFT_OPTIMIZER:-adafactor}
SFT_LR=${SFT_LR:-1e-3}
SFT_BATCH=${SFT_BATCH:-64}
SFT_WARMUP=${SFT_WARMUP:-100}
SFT_SCHEDULE=${SFT_SCHEDULE:-linear}
SFT_WEIGHT_DECAY=${SFT_WEIGHT_DECAY:-0.0}
SFT_LABEL_SMOOTHING=${SFT_LABEL_SMOOTHING:-0.1}
SFT_OPTIM_EXTRA=${SFT_OPTIM_EXTRA:-}   # more [optim] lines, e.g. "relative_step = false" for adafactor
SFT_EVAL_LIMIT=${SFT_EVAL_LIMIT:-200}
TRAIN_LIMIT=${TRAIN_LIMIT:-0}
SOURCE_LEN=${SOURCE_LEN:-512}

# ppo: the seed's setting
PPO_SEEDS=${PPO_SEEDS:-0 1 2}
PPO_STEPS=${PPO_STEPS:-50}
PPO_BATCH=${PPO_BATCH:-16}
PPO_MINI=${PPO_MINI:-4}
PPO_LR=${PPO_LR:-1.41e-5}
PPO_DIALOGUES=${PPO_DIALOGUES:-500}

# tune
LENGTH_PENALTIES=${LENGTH_PENALTIES:-1.0 1.5 2.0}
TUNE_LIMIT=${TUNE_LIMIT:-818}

# eval
EVAL_DATA=${EVAL_DATA:-test}
EVAL_LIMIT=${EVAL_LIMIT:-819}
EVAL_MAX_NEW_TOKENS=${EVAL_MAX_NEW_TOKENS:-64}
EVAL_SEED=${EVAL_SEED:-0}
LEAD=${LEAD:-3}
BEAM_ARGS=${BEAM_ARGS:---num-beams 4 --no-repeat-ngram-size 3}
SAMPLE_ARGS=${SAMPLE_ARGS:---do-sample --temperature 1 --top-k 0 --top-p 1}
ROUGE_ARGS=${ROUGE_ARGS:---use-stemmer}

# sweep: NAME:STEPS:LEARNING_RATE:INIT_KL_COEF:TARGET:ADAP_KL_CTRL[:TRANSFORM[:BATCH]] per run ([run]
# steps, [ppo] learning_rate, init_kl_coef, target, adap_kl_ctrl, [reward] transform, [ppo] batch_size
# with minibatches of a quarter of it), each with PPO_SEEDS' first seed; TRANSFORM defaults to the
# seed's neg_logit and BATCH to PPO_BATCH
SWEEP=${SWEEP:-lr-0.5x:50:7.05e-6:0.2:6:true lr-2x:50:2.82e-5:0.2:6:true lr-4x:50:5.64e-5:0.2:6:true \
steps-100:100:1.41e-5:0.2:6:true target-2:50:1.41e-5:0.2:2:true kl-0.05-fixed:50:1.41e-5:0.05:6:false \
kl-0.5-fixed:50:1.41e-5:0.5:6:false}

# expected seconds per unit, for DEADLINE_S
INIT_EXPECT_S=${INIT_EXPECT_S:-30}
SFT_EXPECT_S=${SFT_EXPECT_S:-$((SFT_SECONDS + 60))}
PPO_EXPECT_S=${PPO_EXPECT_S:-120}
EVAL_EXPECT_S=${EVAL_EXPECT_S:-90}

mkdir -p "$RESULTS"
START=$SECONDS
log() { echo "== $(date -u +%H:%M:%S) +$((SECONDS - START))s $*" | tee -a "$RESULTS/stages.txt"; }
wants() { [[ " $STAGES " == *" $1 "* ]]; }
export_results() {
  [ -n "$EXPORT" ] || return 0
  mkdir -p "$EXPORT"
  (cd "$RESULTS" && find . -maxdepth 2 -type f \( -name '*.done' -o -name '*.json' -o -name '*.jsonl' -o -name '*.txt' \
    -o -name '*.svg' -o -name '*.toml' \) ! -path './init/*' -print0 |
    xargs -0 -r cp --parents -t "$EXPORT")
}
# unit NAME OUTPUT EXPECT_S COMMAND…: runs COMMAND unless NAME's marker and OUTPUT (relative to
# RESULTS) exist; stops the script when EXPECT_S more seconds would pass DEADLINE_S.
unit() {
  local name=$1 output=$2 expect=$3
  shift 3
  if [ -e "$RESULTS/$name.done" ] && [ -e "$RESULTS/$output" ]; then
    return 0
  fi
  if [ $((SECONDS - START + expect)) -gt "$DEADLINE_S" ]; then
    log "stopped before $name (about $expect s; $((SECONDS - START)) of $DEADLINE_S s spent): run again with RESULTS=$RESULTS"
    export_results
    exit 0
  fi
  rm -f "$RESULTS/$name.done"
  log "$name"
  "$@"
  touch "$RESULTS/$name.done"
  export_results
}
# needs UNIT OUTPUT STAGE: a clear error when an earlier stage's unit is not done.
needs() {
  if ! [ -e "$RESULTS/$1.done" ] || ! [ -e "$RESULTS/$2" ]; then
    echo "error: $RESULTS/$2 is missing: run STAGES=\"$3 …\" first (with RESULTS=$RESULTS)" >&2
    exit 1
  fi
}

do_init() {
  rm -rf "$RESULTS/init"
  "$DETOX" init --size "$SIZE" --init "$INIT" --seed "$INIT_SEED" --dropout-rate "$DROPOUT_RATE" --dtype f32 \
    --tokenizer "$SHARED/tokenizers/t5/tokenizer.json" --out "$RESULTS/init"
}

do_sft() {
  needs init init/config.json init
  rm -rf "$RESULTS/sft"
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
optimizer = "$SFT_OPTIMIZER"
learning_rate = $SFT_LR
weight_decay = $SFT_WEIGHT_DECAY
warmup_steps = $SFT_WARMUP
schedule = "$SFT_SCHEDULE"
batch_size = $SFT_BATCH
label_smoothing = $SFT_LABEL_SMOOTHING
$SFT_OPTIM_EXTRA
[eval]
limit = $SFT_EVAL_LIMIT
max_new_tokens = 64
[run]
epochs = 100
max_steps = $SFT_MAX_STEPS
time_limit_s = $SFT_SECONDS
device = "$DEVICE"
out = "$RESULTS/sft"
TOML
  "$DETOX" sft --config "$RESULTS/sft.toml"
}

# ppo_run NAME SEED STEPS LR INIT_KL_COEF TARGET ADAP_KL_CTRL [TRANSFORM [BATCH]]
ppo_run() {
  local transform=${8:-neg_logit} batch=${9:-$PPO_BATCH} mini=$PPO_MINI
  [ "$batch" = "$PPO_BATCH" ] || mini=$((batch / 4))
  needs sft sft/model/config.json sft
  rm -rf "${RESULTS:?}/$1"
  cat > "$RESULTS/$1.toml" <<TOML
[model]
path = "$RESULTS/sft/model"
[data]
path = "$SHARED/data/samsum/train.jsonl"
limit = $PPO_DIALOGUES
[reward]
classifier = "$SHARED/models/minilm-toxicity"
transform = "$transform"
[ppo]
batch_size = $batch
mini_batch_size = $mini
learning_rate = $4
init_kl_coef = $5
target = $6
adap_kl_ctrl = $7
[run]
steps = $3
seed = $2
device = "$DEVICE"
out = "$RESULTS/$1"
checkpoint_every = $3
TOML
  "$DETOX" train --config "$RESULTS/$1.toml"
}

# The beam's options: BEAM_ARGS, with the tuned length penalty once the tune stage has picked one.
beam_args() {
  if [ -e "$RESULTS/length-penalty.txt" ]; then
    echo "$BEAM_ARGS --length-penalty $(cat "$RESULTS/length-penalty.txt")"
  else
    echo "$BEAM_ARGS"
  fi
}

# evaluate NAME DECODING MODEL-ARGS…: eval-NAME.json and eval-NAME.txt, on SAMSum's EVAL_DATA split;
# DECODING is beam, sample, none, or args (DECODE_ARGS as given)
evaluate() {
  local name=$1 decoding=$2
  shift 2
  local decode=()
  case $decoding in
    beam) read -r -a decode <<<"$(beam_args)" ;;
    args) read -r -a decode <<<"$DECODE_ARGS" ;;
    sample) read -r -a decode <<<"$SAMPLE_ARGS --seed $EVAL_SEED" ;;
    none) ;;
  esac
  local rouge=()
  read -r -a rouge <<<"$ROUGE_ARGS"
  "$DETOX" eval "$@" "${decode[@]}" "${rouge[@]}" --classifier "$SHARED/models/minilm-toxicity" \
    --data "$SHARED/data/samsum/$EVAL_DATA.jsonl" --limit "$EVAL_LIMIT" --max-new-tokens "$EVAL_MAX_NEW_TOKENS" \
    --device "$DEVICE" --output "$RESULTS/eval-$name.json" | tee "$RESULTS/eval-$name.txt"
}
eval_ppo() {  # RUN DECODING STAGE
  needs "$1" "$1/latest" "$3"
  evaluate "$1-$2" "$2" --model "$RESULTS/sft/model" --adapter "$RESULTS/$1/$(cat "$RESULTS/$1/latest")"
}
eval_sft() {
  needs sft sft/model/config.json sft
  evaluate "sft-$1" "$1" --model "$RESULTS/sft/model"
}

# tune_lp LP: the SFT model on validation under beam search with length penalty LP.
tune_lp() {
  needs sft sft/model/config.json sft
  EVAL_DATA=validation EVAL_LIMIT=$TUNE_LIMIT DECODE_ARGS="$BEAM_ARGS --length-penalty $1" \
    evaluate "val-lp$1" args --model "$RESULTS/sft/model"
}
# The length penalty of the best validation ROUGE-L, written to length-penalty.txt.
pick_length_penalty() {
  local files=()
  for lp in $LENGTH_PENALTIES; do files+=("$RESULTS/eval-val-lp$lp.json"); done
  local scores
  scores=$("$PYTHON" - "$RESULTS/length-penalty.txt" "${files[@]}" <<'PY'
import json, sys
out, paths = sys.argv[1], sys.argv[2:]
scores = {p.rsplit("-lp", 1)[1][: -len(".json")]: json.load(open(p))["rouge"]["rougeL"] for p in paths}
with open(out, "w") as f:
    print(max(scores, key=scores.get), file=f)
print(" ".join(f"{lp}: {r:.4f}" for lp, r in scores.items()))
PY
)
  log "length penalty $(cat "$RESULTS/length-penalty.txt") (validation ROUGE-L $scores)"
}

sweep_names() { for s in $SWEEP; do echo "sweep-${s%%:*}"; done; }

if wants init; then
  unit init init/config.json "$INIT_EXPECT_S" do_init
fi
if wants sft; then
  unit sft sft/model/config.json "$SFT_EXPECT_S" do_sft
fi
if wants tune; then
  for lp in $LENGTH_PENALTIES; do
    unit "eval-val-lp$lp" "eval-val-lp$lp.json" "$EVAL_EXPECT_S" tune_lp "$lp"
  done
  unit tune length-penalty.txt 5 pick_length_penalty
fi
if wants ppo; then
  for seed in $PPO_SEEDS; do
    unit "ppo-s$seed" "ppo-s$seed/latest" "$PPO_EXPECT_S" ppo_run "ppo-s$seed" "$seed" "$PPO_STEPS" "$PPO_LR" 0.2 6 true
  done
fi
if wants eval; then
  unit "eval-lead$LEAD" "eval-lead$LEAD.json" "$EVAL_EXPECT_S" evaluate "lead$LEAD" none --lead "$LEAD"
  for decoding in beam sample; do
    unit "eval-sft-$decoding" "eval-sft-$decoding.json" "$EVAL_EXPECT_S" eval_sft "$decoding"
    for seed in $PPO_SEEDS; do
      unit "eval-ppo-s$seed-$decoding" "eval-ppo-s$seed-$decoding.json" "$EVAL_EXPECT_S" \
        eval_ppo "ppo-s$seed" "$decoding" ppo
    done
  done
fi
if wants sweep; then
  first_seed=${PPO_SEEDS%% *}
  for s in $SWEEP; do
    IFS=: read -r name steps lr kl target adaptive transform batch <<<"$s"
    unit "sweep-$name" "sweep-$name/latest" "$PPO_EXPECT_S" \
      ppo_run "sweep-$name" "$first_seed" "$steps" "$lr" "$kl" "$target" "$adaptive" "${transform:-neg_logit}" \
      "${batch:-$PPO_BATCH}"
    for decoding in beam sample; do
      unit "eval-sweep-$name-$decoding" "eval-sweep-$name-$decoding.json" "$EVAL_EXPECT_S" \
        eval_ppo "sweep-$name" "$decoding" sweep
    done
  done
fi

plots() {
  if [ -e "$RESULTS/sft/log.jsonl" ]; then
    "$DETOX" plot "$RESULTS/sft/log.jsonl" --keys loss,eval_loss,rougeL --title "SFT from random init" \
      --out "$RESULTS/sft.svg"
  fi
  local run runs
  runs="$(for seed in $PPO_SEEDS; do echo "ppo-s$seed"; done) $(sweep_names)"
  for run in $runs; do
    [ -e "$RESULTS/$run/log.jsonl" ] || continue
    "$DETOX" plot "$RESULTS/$run/log.jsonl" --title "PPO: $run" --out "$RESULTS/$run.svg"
  done
  local decoding points title
  for decoding in beam sample; do
    points=()
    if [ -e "$RESULTS/eval-sft-$decoding.json" ]; then
      points+=(--tradeoff "SFT=$RESULTS/eval-sft-$decoding.json")
    fi
    for run in $runs; do
      if [ -e "$RESULTS/eval-$run-$decoding.json" ] && [ -e "$RESULTS/$run/log.jsonl" ]; then
        points+=(--tradeoff "$run=$RESULTS/eval-$run-$decoding.json,$RESULTS/$run/log.jsonl")
      fi
    done
    [ "$decoding" = beam ] && title="beam search" || title="sampling"
    if [ ${#points[@]} -gt 1 ]; then
      "$DETOX" plot "${points[@]}" --title "Toxicity against ROUGE-L and KL ($title, SAMSum test)" \
        --out "$RESULTS/tradeoff-$decoding.svg"
    fi
  done
}
if wants plot; then
  log plot
  plots
  export_results
fi

check() {
  needs sft sft/model/config.json sft
  if "$PYTHON" -c "import transformers" 2>/dev/null; then
    head -n 64 "$SHARED/data/samsum/test.jsonl" > "$RESULTS/check.jsonl"
    "$DETOX" summarize --model "$RESULTS/sft/model" --input "$RESULTS/check.jsonl" \
      --output "$RESULTS/check-detox.jsonl" --max-new-tokens 64 --device "$DEVICE"
    "$PYTHON" tools/check_hf_export.py --model "$RESULTS/sft/model" --detox "$RESULTS/check-detox.jsonl" \
      --data "$RESULTS/check.jsonl" --limit 64 --max-new-tokens 64 | tee "$RESULTS/check-hf.json"
  else
    echo "skipped: $PYTHON has no transformers" | tee "$RESULTS/check-hf.json"
  fi
}
if wants check; then
  unit check check-hf.json "$EVAL_EXPECT_S" check
fi
log "done: $STAGES"

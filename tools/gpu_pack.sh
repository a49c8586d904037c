#!/usr/bin/env bash
# Packs what one GPU-machine run needs into .carry/ (git-ignored; name it in the device tool's
# `carry`): the release `detox` binary, the GPU test binary, and the parts of ../shared the run
# reads. The GPU machine has no Rust and no network, and ../shared does not travel.
#   tools/gpu_pack.sh [shared paths…]   e.g. tools/gpu_pack.sh tokenizers/t5 data/samsum/test.jsonl
# BASELINE=path/to/an/older/detox packs that binary too, as bin/detox-base, for an A/B in one call
# (tools/gpu_ab.sh).
# There: tar -xJf .carry/bin.tar.xz -C .carry; mkdir -p .carry/shared; tar -xJf .carry/shared.tar.xz -C .carry/shared
#        DETOX_ROOT=$PWD DETOX_SHARED=$PWD/.carry/shared .carry/bin/gpu
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .carry && mkdir -p .carry/bin .carry/shared
cargo build --release --quiet
cargo test --release --no-run --quiet --test gpu 2>/dev/null
gpu_test=$(cargo test --release --no-run --test gpu 2>&1 | sed -n 's/.*Executable tests\/gpu.rs (\(.*\))/\1/p')
bench=$(cargo bench --no-run 2>&1 | sed -n 's/.*Executable benches\/kernels.rs (\(.*\))/\1/p')
cp target/release/detox .carry/bin/detox
cp "$gpu_test" .carry/bin/gpu
cp "$bench" .carry/bin/kernels
if [ -n "${BASELINE:-}" ]; then cp "$BASELINE" .carry/bin/detox-base; fi
strip .carry/bin/*
# Compressed, the binaries leave room under the 64 MiB a run may carry for models and data.
tar -C .carry -cJf .carry/bin.tar.xz bin && rm -r .carry/bin
# The shared parts travel compressed too: the classifier and three tokenizers alone come near the
# limit. A path may be a file (tokenizers/t5/tokenizer.json) to leave a folder's other files behind.
if [ "$#" -gt 0 ]; then tar -C ../shared -cf - "$@" | xz -T0 -6 >.carry/shared.tar.xz; fi
rmdir .carry/shared
du -sh .carry

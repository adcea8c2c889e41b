#!/usr/bin/env bash
# burn-8bit next to its peers in one run, on the CPU, at one size and thread count:
# bench_step (every 8-bit optimizer and Burn's AdamW, Flex), gpu_report (Adam8bit, Burn AdamW,
# quantize and dequantize as fractions of a copy measured in the same process), then
# peers.py (torch's Adam/AdamW, bitsandbytes' Adam8bit and block-wise quantization).
#
#   python3 -m venv .venv && .venv/bin/pip install -r benches/peers/requirements.txt
#   PYTHON=.venv/bin/python benches/peers/run.sh          # PROFILE=dev for a debug build
#
# Only Flex runs here, so the examples are built with the default features: a release build of
# wgpu takes most of half an hour on two cores and adds nothing to these figures.
set -euo pipefail
cd "$(dirname "$0")/../.."

log2=${LOG2:-24}
threads=${THREADS:-2}
profile=${PROFILE:-release}
python=${PYTHON:-python3}
params=$((1 << log2))

export RAYON_NUM_THREADS="$threads"
cargo run --profile "$profile" --example bench_step -- --device flex --params "$params"
cargo run --profile "$profile" --example gpu_report -- --device flex --log2 "$log2"
"$python" benches/peers/peers.py --params "$params" --threads "$threads"

#!/usr/bin/env bash
# The command whose result is in this folder (docs/results/quantized_merge), as merge_modes.json's settings record
# it (every other setting is the bench's default). About 10 minutes on one CPU thread; it writes merge_modes.json
# here. Then rerun: python -m rso.train.report docs/results/quantized_merge
set -euo pipefail
cd "$(dirname "$0")/../../.."

# -> merge_modes.json
OMP_NUM_THREADS=1 python -m rso.train.bench.requantize --steps 300 --tau 10 --out docs/results/quantized_merge/merge_modes.json

#!/usr/bin/env bash
# The zoo run whose results are zoo.json and README.md in this folder (about 15-30 minutes on 2 busy cores).
set -euo pipefail
cd "$(dirname "$0")/../../.."
. .venv/bin/activate
OMP_NUM_THREADS=1 python -m rso.train.zoo --out docs/results/zoo --timeout 180 --jobs 1

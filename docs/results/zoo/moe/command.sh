#!/usr/bin/env bash
# The mixture-of-experts part of the zoo (the causal-LM families whose modeling file uses transformers' experts
# interface), whose results are zoo.json and README.md in this folder (about 2 minutes on 2 busy cores).
set -euo pipefail
cd "$(dirname "$0")/../../../.."
. .venv/bin/activate
OMP_NUM_THREADS=1 python -m rso.train.zoo --tasks causal-lm --moe --out docs/results/zoo/moe --timeout 180 --jobs 1

#!/usr/bin/env bash
# The estimates in this folder: rso.memory's planner, no model built (a few seconds each).
set -euo pipefail
cd "$(dirname "$0")/../../.."

out=docs/results/fit-plan
for budget in 24GB 80GB; do
  python -m rso.memory --model llama-1b --fit $budget --seq 256 --json > $out/llama-1b_$budget.json
  python -m rso.memory --model llama-7b --fit $budget --rank 1024,256 --seq 256 --json > $out/llama-7b_$budget.json
done

#!/usr/bin/env bash
# The commands whose results are in this folder (docs/results/activation-sweep), each exactly as the JSON it wrote
# records it. Long: read the notes for how long each took. After a run, copy its table.json / results.json
# here under the name shown and rerun: python -m rso.train.report docs/results/activation-sweep
set -euo pipefail
cd "$(dirname "$0")/../../.."

# -> bench_sweep_tiny.json
# recorded as: python -m rso.train.benchmark --configs tiny --methods adamw,frozen,galore-torch,rso-stiefel,rso-stiefel+ce --steps 0 --no-flops --sweep --sweep-methods adamw,frozen,galore-torch,rso-stiefel,rso-stiefel+ce --batch 1 --seq 256 --sweep-seqs 256,512,1024,2048,4096 --sweep-batches 1,2,4,8,16 --out /tmp/runs/sweep_tiny
# (rso.train.benchmark has since been renamed rso.train.bench.step, same flags):
python -m rso.train.bench.step --configs tiny --methods adamw,frozen,galore-torch,rso-stiefel,rso-stiefel+ce --steps 0 --no-flops --sweep --sweep-methods adamw,frozen,galore-torch,rso-stiefel,rso-stiefel+ce --batch 1 --seq 256 --sweep-seqs 256,512,1024,2048,4096 --sweep-batches 1,2,4,8,16 --out /tmp/runs/sweep_tiny

# -> sweep_measured_tiny.png: written by the command above into its --out folder
# -> the estimator's curves (no model built):
python -m rso.train.bench.plots --model llama-60m --dtype fp32 --rank 128 --out docs/results/activation-sweep/sweep_estimated_60m.png
python -m rso.train.bench.plots --model llama-7b --dtype bf16 --rank 1024 --out docs/results/activation-sweep/sweep_estimated_7b.png

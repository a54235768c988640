#!/usr/bin/env bash
# The commands whose results are in this folder (docs/results/bench-cpu-60m), each exactly as the JSON it wrote
# records it. Long: read the notes for how long each took. After a run, copy its table.json / results.json
# here under the name shown and rerun: python -m rso.train.report docs/results/bench-cpu-60m
set -euo pipefail
cd "$(dirname "$0")/../../.."

# -> bench_cpu_60m.json
# recorded as: python -m rso.train.benchmark --configs 60m --batch 8 --seq 256 --steps 3 --warmup 1 --out /tmp/runs/60m
# (rso.train.benchmark has since been renamed rso.train.bench.step, same flags):
python -m rso.train.bench.step --configs 60m --batch 8 --seq 256 --steps 3 --warmup 1 --out /tmp/runs/60m

# -> bench_cpu_60m_1thread.json
# recorded as: python -m rso.train.benchmark --configs 60m --methods adamw,frozen,galore-torch,rso-stiefel,rso-coordinate,rso-stiefel+ce --batch 2 --seq 256 --threads 1 --steps 4 --warmup 1 --rounds 2 --no-flops --no-peak --out /tmp/runs/60m_t1
# (rso.train.benchmark has since been renamed rso.train.bench.step, same flags):
python -m rso.train.bench.step --configs 60m --methods adamw,frozen,galore-torch,rso-stiefel,rso-coordinate,rso-stiefel+ce --batch 2 --seq 256 --threads 1 --steps 4 --warmup 1 --rounds 2 --no-flops --no-peak --out /tmp/runs/60m_t1

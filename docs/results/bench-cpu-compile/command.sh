#!/usr/bin/env bash
# The commands whose results are in this folder (docs/results/bench-cpu-compile), each exactly as the JSON it wrote
# records it. Long: read the notes for how long each took. After a run, copy its table.json / results.json
# here under the name shown and rerun: python -m rso.train.report docs/results/bench-cpu-compile
set -euo pipefail
cd "$(dirname "$0")/../../.."

# -> bench_cpu_60m_1thread_eager.json
# recorded as: python -m rso.train.benchmark --configs 60m --methods adamw,frozen,galore-torch,rso-stiefel,rso-coordinate --batch 4 --seq 256 --threads 1 --cores 1 --steps 4 --warmup 1 --rounds 3 --no-flops --no-peak --out runs/bench_compile2_eager
# (rso.train.benchmark has since been renamed rso.train.bench.step, same flags):
python -m rso.train.bench.step --configs 60m --methods adamw,frozen,galore-torch,rso-stiefel,rso-coordinate --batch 4 --seq 256 --threads 1 --cores 1 --steps 4 --warmup 1 --rounds 3 --no-flops --no-peak --out runs/bench_compile2_eager

# -> bench_cpu_60m_1thread_compile.json
# recorded as: python -m rso.train.benchmark --configs 60m --methods adamw,frozen,galore-torch,rso-stiefel,rso-coordinate --batch 4 --seq 256 --threads 1 --cores 1 --steps 4 --warmup 1 --rounds 3 --no-flops --no-peak --compile --out runs/bench_compile2_compile
# (rso.train.benchmark has since been renamed rso.train.bench.step, same flags):
python -m rso.train.bench.step --configs 60m --methods adamw,frozen,galore-torch,rso-stiefel,rso-coordinate --batch 4 --seq 256 --threads 1 --cores 1 --steps 4 --warmup 1 --rounds 3 --no-flops --no-peak --compile --out runs/bench_compile2_compile

# -> bench_cpu_130m_1thread_eager.json
# recorded as: python -m rso.train.benchmark --configs 130m --methods adamw,frozen,galore-torch,rso-stiefel,rso-coordinate --batch 4 --seq 256 --threads 1 --cores 1 --steps 3 --warmup 1 --rounds 2 --no-flops --no-peak --out runs/bench130_eager2
# (rso.train.benchmark has since been renamed rso.train.bench.step, same flags):
python -m rso.train.bench.step --configs 130m --methods adamw,frozen,galore-torch,rso-stiefel,rso-coordinate --batch 4 --seq 256 --threads 1 --cores 1 --steps 3 --warmup 1 --rounds 2 --no-flops --no-peak --out runs/bench130_eager2

# -> bench_cpu_130m_1thread_compile.json
# recorded as: python -m rso.train.benchmark --configs 130m --methods adamw,frozen,galore-torch,rso-stiefel,rso-coordinate --batch 4 --seq 256 --threads 1 --cores 1 --steps 3 --warmup 1 --rounds 1 --no-flops --no-peak --compile --out runs/bench130_compile
# (rso.train.benchmark has since been renamed rso.train.bench.step, same flags):
python -m rso.train.bench.step --configs 130m --methods adamw,frozen,galore-torch,rso-stiefel,rso-coordinate --batch 4 --seq 256 --threads 1 --cores 1 --steps 3 --warmup 1 --rounds 1 --no-flops --no-peak --compile --out runs/bench130_compile

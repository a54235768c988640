#!/usr/bin/env bash
# The commands whose results are in this folder (docs/results/gpu-h100), each exactly as the JSON it wrote
# records it. Long: read the notes for how long each took. After a run, copy its table.json / results.json
# here under the name shown and rerun: python -m rso.train.report docs/results/gpu-h100
set -euo pipefail
cd "$(dirname "$0")/../../.."

# -> h100_350m_1b.json
# recorded as: python -m rso.train.benchmark --configs 350m,1b --device cuda --dtype bf16 --methods adamw,frozen,galore-torch,rso-stiefel --batch 4 --seq 1024 --rank quarter --steps 5 --warmup 2 --no-flops --timeout 80 --out /root/out/bench
# (rso.train.benchmark has since been renamed rso.train.bench.step, same flags):
python -m rso.train.bench.step --configs 350m,1b --device cuda --dtype bf16 --methods adamw,frozen,galore-torch,rso-stiefel --batch 4 --seq 1024 --rank quarter --steps 5 --warmup 2 --no-flops --timeout 80 --out /root/out/bench

# -> h100_7b_fit.json
# recorded as: python -m rso.train.benchmark --device cuda --dtype bf16 --configs 7b --methods rso-stiefel,adamw --batch 1 --seq 2048 --steps 0 --no-flops --timeout 80 --out /root/out/fit
# (rso.train.benchmark has since been renamed rso.train.bench.step, same flags):
python -m rso.train.bench.step --device cuda --dtype bf16 --configs 7b --methods rso-stiefel,adamw --batch 1 --seq 2048 --steps 0 --no-flops --timeout 80 --out /root/out/fit

# -> h100_layer.json
# this JSON records no command; see the notes

# -> h100_layer.json records no command line; rebuilt from its "args":
# python -m rso.train.bench.layer --shapes 2048x2048,5461x2048,1024x1024,2736x1024 --tokens 8192 --rank 512 --device cuda --dtype bf16 --steps 20 --warmup 5 --json $OUT/layer.json

#!/usr/bin/env bash
# The commands whose results are in this folder (docs/results/memory-frontier), each exactly as the JSON it wrote
# records it. Long: read the notes for how long each took. After a run, copy its table.json / results.json
# here under the name shown and rerun: python -m rso.train.report docs/results/memory-frontier
set -euo pipefail
cd "$(dirname "$0")/../../.."

# -> memory_frontier_1b.json
python -m rso.train.bench.memory_frontier --config llama-1b --cases rso,rso+ckpt,adamw --batch 1 --seq 64 --out docs/memory_frontier_1b.json

# -> memory_frontier_7b.json
python -m rso.train.bench.memory_frontier --config llama-7b --cases rso+ckpt+ce --rank 256 --batch 1 --seq 128 --nice 0 --timeout 9000 --out docs/memory_frontier_7b.json

# -> memory_frontier_1b_quantized.json (W₀ stored int8 / NF4 by rso.wrap(quantize=); check against the estimate)
python -m rso.train.bench.memory_frontier --config llama-1b --cases rso+ckpt+ce+nf4,rso+ckpt+ce+int8 --batch 1 --seq 64 --out docs/results/memory-frontier/memory_frontier_1b_quantized.json

# -> memory_frontier_7b_nf4.json
python -m rso.train.bench.memory_frontier --config llama-7b --cases rso+ckpt+ce+nf4 --rank 256 --batch 1 --seq 128 --nice 0 --timeout 2700 --out docs/results/memory-frontier/memory_frontier_7b_nf4.json

# -> memory_frontier_7b_int8.json
python -m rso.train.bench.memory_frontier --config llama-7b --cases rso+ckpt+ce+int8 --rank 256 --batch 1 --seq 128 --nice 0 --timeout 1800 --out docs/results/memory-frontier/memory_frontier_7b_int8.json

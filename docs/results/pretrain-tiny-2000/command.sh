#!/usr/bin/env bash
# The commands whose results are in this folder (docs/results/pretrain-tiny-2000), each exactly as the JSON it wrote
# records it. Long: read the notes for how long each took. After a run, copy its table.json / results.json
# here under the name shown and rerun: python -m rso.train.report docs/results/pretrain-tiny-2000
set -euo pipefail
cd "$(dirname "$0")/../../.."

# -> pretrain_tiny_2000_seeds.json
python -m rso.train.compare --config tiny --max-steps 2000 --rank 64 --tau 200 --jobs 2 --threads-per-job 1 --seeds 0,1,2 --methods adamw=1e-3,galore=3e-3,golore@20=3e-3,rso:stiefel=3e-3,rso:svd=3e-3,rso:hybrid=3e-3 --output-dir runs/seeds2000 --resume

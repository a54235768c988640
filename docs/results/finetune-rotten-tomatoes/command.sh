#!/usr/bin/env bash
# The commands whose results are in this folder (docs/results/finetune-rotten-tomatoes), each exactly as the JSON it wrote
# records it. Long: read the notes for how long each took. After a run, copy its table.json / results.json
# here under the name shown and rerun: python -m rso.train.report docs/results/finetune-rotten-tomatoes
set -euo pipefail
cd "$(dirname "$0")/../../.."

# -> finetune_rotten_tomatoes.json
python -m rso.train.compare_finetune --task rotten_tomatoes --seeds 0,1,2 --val-from-train 500 --jobs 2 --threads-per-job 1 --output-dir runs/ft-rt --resume --methods 'adamw=2.5e-5/5e-5/1e-4/2e-4/4e-4,rso:stiefel[rank=64]=1e-4/2e-4/4e-4/8e-4/1.6e-3,lora[rank=16]=2.5e-4/5e-4/1e-3/2e-3/4e-3,lora[rank=8]=2.5e-4/5e-4/1e-3/2e-3/4e-3,galore[rank=64]=2e-4/4e-4/8e-4/1.6e-3,rso:hybrid[rank=64]=2e-4/4e-4/8e-4/1.6e-3,golore@20[rank=64]=2e-4/4e-4/8e-4/1.6e-3,golore@20[rank=4,scale=4,tau=500]=3e-5/1e-4/3e-4/1e-3' -- --max-train 4000 --epochs 1 --batch-size 32 --max-length 64 --max-eval 2000 --eval-every 125

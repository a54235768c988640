#!/usr/bin/env bash
# The commands whose results are in this folder (docs/results/pretrain-60m), each exactly as the JSON it wrote
# records it. Long: read the notes for how long each took. After a run, copy its table.json / results.json
# here under the name shown and rerun: python -m rso.train.report docs/results/pretrain-60m
set -euo pipefail
cd "$(dirname "$0")/../../.."

# -> pretrain_60m_400_seeds.json
python -m rso.train.compare --config 60m --max-steps 400 --methods rso:stiefel,galore,adamw,rso:svd --seeds 0,1 --jobs 2 --threads-per-job 1 --resume --output-dir runs/pretrain60m-400 --batch-size 16 --grad-accum 1 --eval-every 50

# -> pretrain_60m_400.json
python -m rso.train.compare --config 60m --max-steps 400 --methods rso:stiefel,galore,adamw,rso:svd --seeds 0 --jobs 2 --threads-per-job 1 --resume --output-dir runs/pretrain60m-400 --batch-size 16 --grad-accum 1 --eval-every 50

# -> pretrain_60m_200.json
python -m rso.train.compare --config 60m --max-steps 200 --methods adamw,galore,rso:stiefel,rso:svd --seeds 0 --jobs 2 --threads-per-job 1 --resume --output-dir runs/pretrain60m --batch-size 16 --grad-accum 1 --eval-every 50

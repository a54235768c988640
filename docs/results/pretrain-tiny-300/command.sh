#!/usr/bin/env bash
# The commands whose results are in this folder (docs/results/pretrain-tiny-300), each exactly as the JSON it wrote
# records it. Long: read the notes for how long each took. After a run, copy its table.json / results.json
# here under the name shown and rerun: python -m rso.train.report docs/results/pretrain-tiny-300
set -euo pipefail
cd "$(dirname "$0")/../../.."

# -> pretrain_tiny_300_seeds.json
python -m rso.train.compare --config tiny --max-steps 300 --rank 64 --tau 200 --jobs 2 --threads-per-job 1 --seeds 0,1,2 --methods adamw=2e-3,galore=3e-3,golore@20=3e-3,rso:stiefel=3e-3,rso:svd=3e-3,rso:hybrid=3e-3 --output-dir runs/seeds300

# -> pretrain_tiny_300_seeds_noshare.json
python -m rso.train.compare --config tiny --max-steps 300 --rank 64 --tau 200 --jobs 1 --threads-per-job 1 --seeds 0,1,2 --methods rso:svd=3e-3 --output-dir runs/seeds300-noshare --no-share-projections

# -> pretrain_tiny_300_seeds_rank1of4.json
python -m rso.train.compare --config tiny --max-steps 300 --rank 1/4 --tau 200 --jobs 1 --threads-per-job 1 --seeds 0,1,2 --methods rso:svd=3e-3,rso:stiefel=3e-3 --output-dir runs/seeds300-rank1of4

# -> pretrain_tiny_300_seeds_keep.json
python -m rso.train.compare --config tiny --max-steps 300 --rank 64 --tau 200 --jobs 2 --threads-per-job 1 --seeds 0,1,2 --methods rso:svd=3e-3 --output-dir runs/seeds300-keep --subspace-state keep

# -> pretrain_tiny_300_seeds_noclip.json
python -m rso.train.compare --config tiny --max-steps 300 --rank 64 --tau 200 --jobs 2 --threads-per-job 1 --seeds 0,1,2 --methods galore=3e-3,rso:svd=3e-3 --output-dir runs/seeds300-noclip --grad-clip 0

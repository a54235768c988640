#!/usr/bin/env bash
# The commands whose results are in this folder (docs/results/finetune-boolq), each exactly as the JSON it wrote
# records it. Long: read the notes for how long each took. After a run, copy its table.json / results.json
# here under the name shown and rerun: python -m rso.train.report docs/results/finetune-boolq
set -euo pipefail
cd "$(dirname "$0")/../../.."

# -> finetune_boolq_3epochs.json
python -m rso.train.compare_finetune --task boolq --methods adamw=1e-4,rso:stiefel=8e-4 --seeds 0 --val-from-train 500 --jobs 2 --threads-per-job 1 --resume --output-dir runs/boolq-3epochs -- --epochs 3 --batch-size 32 --max-length 128 --max-eval 2000 --eval-every 279

# -> finetune_boolq_3epochs_adamw.json
python -m rso.train.compare_finetune --task boolq --seeds 0,1,2 --val-from-train 500 --jobs 1 --threads-per-job 1 --resume --output-dir runs/boolq-3epochs --methods adamw=5e-5/1e-4/2e-4 -- --epochs 3 --batch-size 32 --max-length 128 --max-eval 2000 --eval-every 279

# -> finetune_boolq_3epochs_galore.json
python -m rso.train.compare_finetune --task boolq --seeds 0,1,2 --val-from-train 500 --jobs 1 --threads-per-job 1 --resume --output-dir runs/boolq-3epochs-galore --methods galore=1e-4/2e-4/4e-4 -- --epochs 3 --batch-size 32 --max-length 128 --max-eval 2000 --eval-every 279

# -> finetune_boolq_3epochs_golore.json
python -m rso.train.compare_finetune --task boolq --seeds 0,1,2 --val-from-train 500 --jobs 2 --threads-per-job 1 --resume --output-dir runs/boolq-3epochs-golore --methods golore@20=1e-4/2e-4/4e-4 -- --epochs 3 --batch-size 32 --max-length 128 --max-eval 2000 --eval-every 279

# -> finetune_boolq_3epochs_lora.json
python -m rso.train.compare_finetune --task boolq --seeds 0,1,2 --val-from-train 500 --jobs 1 --threads-per-job 1 --resume --output-dir runs/boolq-3epochs-lora --methods lora=2.5e-4/5e-4/1e-3/2e-3 -- --epochs 3 --batch-size 32 --max-length 128 --max-eval 2000 --eval-every 279

# -> finetune_boolq_3epochs_lora_r16.json
python -m rso.train.compare_finetune --task boolq --seeds 0,1,2 --val-from-train 500 --jobs 2 --threads-per-job 1 --resume --output-dir runs/boolq-3epochs-lora-r16 --methods 'lora[rank=16]=2.5e-4/5e-4/1e-3' -- --epochs 3 --batch-size 32 --max-length 128 --max-eval 2000 --eval-every 279

# -> finetune_boolq_3epochs_rso.json
python -m rso.train.compare_finetune --task boolq --seeds 0,1,2 --val-from-train 500 --jobs 1 --threads-per-job 1 --resume --output-dir runs/boolq-3epochs-rso --methods rso:stiefel=1e-4/2e-4/4e-4/8e-4 -- --epochs 3 --batch-size 32 --max-length 128 --max-eval 2000 --eval-every 279

# -> finetune_boolq_3epochs_rso_frozen.json
python -m rso.train.compare_finetune --task boolq --seeds 0 --val-from-train 500 --jobs 1 --threads-per-job 1 --resume --output-dir runs/boolq-3epochs-rso-frozen --methods rso:stiefel=2e-4 -- --epochs 3 --batch-size 32 --max-length 128 --max-eval 2000 --eval-every 279 --freeze-embeddings

# -> finetune_boolq_3epochs_rso_hybrid.json
python -m rso.train.compare_finetune --task boolq --seeds 0,1,2 --val-from-train 500 --jobs 1 --threads-per-job 1 --resume --output-dir runs/boolq-3epochs-rso-hybrid --methods rso:hybrid=1e-4/2e-4/4e-4 -- --epochs 3 --batch-size 32 --max-length 128 --max-eval 2000 --eval-every 279

# -> finetune_boolq_3epochs_rso_rank128.json
python -m rso.train.compare_finetune --task boolq --seeds 0 --val-from-train 500 --jobs 1 --threads-per-job 1 --resume --output-dir runs/boolq-3epochs-rso-rank128 --methods 'rso:stiefel[rank=128]=2e-4' -- --epochs 3 --batch-size 32 --max-length 128 --max-eval 2000 --eval-every 279

# -> finetune_boolq_3epochs_rso_rank1of6.json
python -m rso.train.compare_finetune --task boolq --seeds 0,1,2 --val-from-train 500 --jobs 2 --threads-per-job 1 --resume --output-dir runs/boolq-3epochs-rso-rank1of6 --methods 'rso:stiefel[rank=1/6]=2e-4' -- --epochs 3 --batch-size 32 --max-length 128 --max-eval 2000 --eval-every 279

# -> finetune_boolq_3epochs_rso_rank1of6_sweep.json
python -m rso.train.compare_finetune --task boolq --seeds 0 --val-from-train 500 --jobs 2 --threads-per-job 1 --resume --output-dir runs/boolq-3epochs-rso-rank1of6-sweep --methods 'rso:stiefel[rank=1/6]=1e-4/4e-4' -- --epochs 3 --batch-size 32 --max-length 128 --max-eval 2000 --eval-every 279

# -> finetune_boolq_3epochs_rso_tau.json
python -m rso.train.compare_finetune --task boolq --seeds 0 --val-from-train 500 --jobs 2 --threads-per-job 1 --resume --output-dir runs/boolq-3epochs-rso-tau --methods 'rso:stiefel[tau=25]=2e-4,rso:stiefel[tau=10]=2e-4' -- --epochs 3 --batch-size 32 --max-length 128 --max-eval 2000 --eval-every 279

# -> finetune_boolq_3epochs_rso_tau300_rank128.json
python -m rso.train.compare_finetune --task boolq --seeds 0 --val-from-train 500 --jobs 2 --threads-per-job 1 --resume --output-dir runs/boolq-3epochs-rso-r2 --methods 'rso:stiefel[tau=300]=2e-4,rso:stiefel[rank=128]=1e-4' -- --epochs 3 --batch-size 32 --max-length 128 --max-eval 2000 --eval-every 279

# -> finetune_boolq_pilot.json
# this JSON records no command; see the notes

# -> finetune_boolq_pilot.json (the runner's own command, stopped by hand after six runs):
# python -m rso.train.compare_finetune --task boolq --seeds 0,1,2 --val-from-train 500 --jobs 2 --threads-per-job 1 --output-dir runs/ft-boolq --resume -- --max-train 4000 --epochs 1 --batch-size 32 --max-length 128 --max-eval 2000 --eval-every 125

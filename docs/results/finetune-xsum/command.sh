#!/usr/bin/env bash
# The commands whose results are in this folder (docs/results/finetune-xsum), each exactly as the JSON it wrote
# records it. Long: read the notes for how long each took. After a run, copy its table.json / results.json
# here under the name shown and rerun: python -m rso.train.report docs/results/finetune-xsum
set -euo pipefail
cd "$(dirname "$0")/../../.."

# -> finetune_xsum.json
python -m rso.train.compare_finetune --task xsum --model smollm2 --val-from-train 100 --seeds 0,1,2 --jobs 2 --threads-per-job 1 --output-dir runs/xsum --resume --methods 'adamw=2.5e-5/5e-5/1e-4/2e-4,lora=2.5e-4/5e-4/1e-3/2e-3/4e-3/8e-3,rso:stiefel[rank=8,tau=100]=2e-4/4e-4/8e-4,rso:stiefel[rank=32,tau=8]=2e-4/4e-4/8e-4,rso:stiefel[rank=64,tau=8]=2e-4/4e-4/8e-4' -- --batch-size 8 --max-length 256 --max-steps 32 --eval-every 32

# -> finetune_xsum_2epochs_adamw.json
python -m rso.train.compare_finetune --task xsum --model smollm2 --val-from-train 100 --seeds 0 --jobs 1 --threads-per-job 1 --resume --output-dir runs/xsum-2epochs-adamw --methods adamw=1e-4 -- --batch-size 8 --max-length 256 --epochs 2 --eval-every 99

# -> finetune_xsum_2epochs_rso.json
python -m rso.train.compare_finetune --task xsum --model smollm2 --val-from-train 100 --seeds 0 --jobs 1 --threads-per-job 1 --resume --output-dir runs/xsum-2epochs-rso --methods 'rso:stiefel[rank=64,tau=8]=8e-4' -- --batch-size 8 --max-length 256 --epochs 2 --eval-every 99 --freeze-embeddings

# -> finetune_xsum_epoch.json
python -m rso.train.compare_finetune --task xsum --model smollm2 --val-from-train 100 --seeds 0,1,2 --jobs 2 --threads-per-job 1 --resume --output-dir runs/xsum-epoch --methods 'adamw=1e-4,lora=4e-3,rso:stiefel[rank=64,tau=8,seeds=1]=4e-4/8e-4' -- --batch-size 8 --max-length 256 --eval-every 50

# -> finetune_xsum_epoch_frozen.json
python -m rso.train.compare_finetune --task xsum --model smollm2 --val-from-train 100 --seeds 0,1,2 --jobs 2 --threads-per-job 1 --resume --output-dir runs/xsum-epoch-frozen --methods 'rso:stiefel[rank=64,tau=8]=8e-4/1.6e-3' -- --batch-size 8 --max-length 256 --eval-every 50 --freeze-embeddings

# -> finetune_xsum_epoch_frozen_lr2e-4.json
python -m rso.train.compare_finetune --task xsum --model smollm2 --val-from-train 100 --seeds 0 --jobs 1 --threads-per-job 1 --resume --output-dir runs/xsum-epoch-frozen-2e-4 --methods 'rso:stiefel[rank=64,tau=8]=2e-4' -- --batch-size 8 --max-length 256 --eval-every 50 --freeze-embeddings

# -> finetune_xsum_epoch_frozen_lr4e-4.json
python -m rso.train.compare_finetune --task xsum --model smollm2 --val-from-train 100 --seeds 0 --jobs 1 --threads-per-job 1 --resume --output-dir runs/xsum-epoch-frozen-4e-4 --methods 'rso:stiefel[rank=64,tau=8]=4e-4' -- --batch-size 8 --max-length 256 --eval-every 50 --freeze-embeddings

# -> finetune_xsum_epoch_hybrid.json
python -m rso.train.compare_finetune --task xsum --model smollm2 --val-from-train 100 --seeds 0 --jobs 1 --threads-per-job 1 --resume --output-dir runs/xsum-epoch-hybrid --methods 'rso:hybrid[rank=64,tau=8]=8e-4' -- --batch-size 8 --max-length 256 --eval-every 50 --freeze-embeddings

# -> finetune_xsum_epoch_rank128.json
python -m rso.train.compare_finetune --task xsum --model smollm2 --val-from-train 100 --seeds 0 --jobs 1 --threads-per-job 1 --resume --output-dir runs/xsum-epoch-frozen-rank128 --methods 'rso:stiefel[rank=128,tau=8]=4e-4/8e-4' -- --batch-size 8 --max-length 256 --eval-every 50 --freeze-embeddings

# -> finetune_xsum_epoch_rank128_lr2e-4.json
python -m rso.train.compare_finetune --task xsum --model smollm2 --val-from-train 100 --seeds 0 --jobs 1 --threads-per-job 1 --resume --output-dir runs/xsum-epoch-frozen-rank128-2e-4 --methods 'rso:stiefel[rank=128,tau=8]=2e-4' -- --batch-size 8 --max-length 256 --eval-every 50 --freeze-embeddings

# -> finetune_xsum_epoch_sweep_adamw.json
python -m rso.train.compare_finetune --task xsum --model smollm2 --val-from-train 100 --seeds 0 --jobs 1 --threads-per-job 1 --resume --output-dir runs/xsum-epoch-sweep-adamw --methods adamw=5e-5/2e-4 -- --batch-size 8 --max-length 256 --eval-every 50

# -> finetune_xsum_epoch_sweep_lora.json
python -m rso.train.compare_finetune --task xsum --model smollm2 --val-from-train 100 --seeds 0 --jobs 1 --threads-per-job 1 --resume --output-dir runs/xsum-epoch-sweep-lora --methods lora=2e-3 -- --batch-size 8 --max-length 256 --eval-every 50

# -> finetune_xsum_epoch_sweep_lora_8e-3.json
python -m rso.train.compare_finetune --task xsum --model smollm2 --val-from-train 100 --seeds 0 --jobs 1 --threads-per-job 1 --resume --output-dir runs/xsum-epoch-sweep-lora-8e-3 --methods lora=8e-3 -- --batch-size 8 --max-length 256 --eval-every 50

# -> finetune_xsum_epoch_tau16.json
python -m rso.train.compare_finetune --task xsum --model smollm2 --val-from-train 100 --seeds 0 --jobs 1 --threads-per-job 1 --resume --output-dir runs/xsum-epoch-tau16 --methods 'rso:stiefel[rank=64,tau=16]=8e-4' -- --batch-size 8 --max-length 256 --eval-every 50 --freeze-embeddings

# -> finetune_xsum_epoch_tau4.json
python -m rso.train.compare_finetune --task xsum --model smollm2 --val-from-train 100 --seeds 0 --jobs 1 --threads-per-job 1 --resume --output-dir runs/xsum-epoch-tau4 --methods 'rso:stiefel[rank=64,tau=4]=8e-4' -- --batch-size 8 --max-length 256 --eval-every 50 --freeze-embeddings

# -> finetune_xsum_frozen.json
python -m rso.train.compare_finetune --task xsum --model smollm2 --val-from-train 100 --threads-per-job 1 --jobs 1 --output-dir runs/xsum-frozen --resume --seeds 0 --methods 'rso:stiefel[rank=64,tau=8]=4e-4/8e-4' -- --batch-size 8 --max-length 256 --max-steps 32 --eval-every 32 --freeze-embeddings

# -> finetune_xsum_state_keep.json
python -m rso.train.compare_finetune --task xsum --model smollm2 --val-from-train 100 --seeds 0 --jobs 1 --threads-per-job 1 --resume --output-dir runs/xsum-epoch-state-keep --methods 'rso:stiefel[rank=64,tau=8,state=keep]=8e-4' -- --batch-size 8 --max-length 256 --eval-every 50 --freeze-embeddings

# -> finetune_xsum_state_project.json
python -m rso.train.compare_finetune --task xsum --model smollm2 --val-from-train 100 --seeds 0 --jobs 1 --threads-per-job 1 --resume --output-dir runs/xsum-epoch-state-project --methods 'rso:stiefel[rank=64,tau=8,state=project]=8e-4' -- --batch-size 8 --max-length 256 --eval-every 50 --freeze-embeddings

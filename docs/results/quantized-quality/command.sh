#!/usr/bin/env bash
# The commands whose results are in this folder (docs/results/quantized-quality), each exactly as the JSON it wrote
# records it. Long: 10–15 minutes per 300-step run, 35–55 per 2,000-step run, 22–34 per XSum run on the busy 2-core
# CPU (see notes.md). Each comparison ran as one lane
# (--jobs 1), two lanes beside each other; each JSON was written by a last invocation with --resume that read the runs
# the lane had finished (the same per-run commands). After a run, copy its table.json / curves.png here under the
# names shown and rerun: python -m rso.train.report docs/results/quantized-quality
set -euo pipefail
cd "$(dirname "$0")/../../.."

# -> quantized_tiny_300_tau200.json, quantized_tiny_300_tau200.png (curves.png)
python -m rso.train.compare --config tiny --max-steps 300 --rank 64 --tau 200 --jobs 2 --threads-per-job 1 --seeds 0,1,2 --methods 'rso:stiefel[quantize=int8]=3e-3,rso:stiefel[quantize=nf4]=3e-3' --output-dir runs/quant300 --resume

# -> quantized_tiny_300_tau50.json, quantized_tiny_300_tau50.png (curves.png)
python -m rso.train.compare --config tiny --max-steps 300 --rank 64 --tau 50 --jobs 2 --threads-per-job 1 --seeds 0,1,2 --methods 'rso:stiefel=3e-3,rso:stiefel[quantize=int8]=3e-3,rso:stiefel[quantize=nf4]=3e-3' --output-dir runs/quant300-tau50 --resume

# The setting check (no JSON: stopped after its step-60 evaluation, which equals the stored run's to every digit):
# python -m rso.train.pretrain --config tiny --method rso --max-steps 300 --output-dir runs/quant300-check/rso-stiefel_lr3e-3_s0 --seed 0 --rank 64 --tau 200 --projection stiefel --lr 0.003 --threads 1

# -> quantized_tiny_2000.json, quantized_tiny_2000.png (curves.png)
python -m rso.train.compare --config tiny --max-steps 2000 --rank 64 --tau 200 --jobs 2 --threads-per-job 1 --seeds 0,1,2 --methods 'rso:stiefel[quantize=int8]=3e-3,rso:stiefel[quantize=nf4]=3e-3' --output-dir runs/quant2000 --resume

# -> qlora_xsum.json, qlora_xsum.png (curves.png)
python -m rso.train.compare_finetune --task xsum --model smollm2 --val-from-train 100 --seeds 0,1,2 --jobs 2 --threads-per-job 1 --output-dir runs/xsum-nf4 --resume --methods 'rso:stiefel[rank=64,tau=8,embeddings=trained,quantize=nf4]=4e-4,lora[quantize=nf4]=4e-3' -- --batch-size 8 --max-length 256 --max-steps 32 --eval-every 32

# -> qlora_xsum_feedback.json (seed 0; the runner was stopped during seed 1, and this reread seed 0)
python -m rso.train.compare_finetune --task xsum --model smollm2 --val-from-train 100 --seeds 0 --jobs 1 --threads-per-job 1 --output-dir runs/xsum-nf4-feedback --resume --methods 'rso:stiefel[rank=64,tau=8,embeddings=trained,quantize=nf4,requantize=stochastic+feedback]=4e-4' -- --batch-size 8 --max-length 256 --max-steps 32 --eval-every 32

# -> qlora_xsum_tau32.json (seed 0: τ = 32, no merge inside the 32 steps)
python -m rso.train.compare_finetune --task xsum --model smollm2 --val-from-train 100 --seeds 0,1,2 --jobs 1 --threads-per-job 1 --output-dir runs/xsum-nf4-tau32 --resume --methods 'rso:stiefel[rank=64,tau=32,embeddings=trained,quantize=nf4,seeds=1]=4e-4' -- --batch-size 8 --max-length 256 --max-steps 32 --eval-every 32

# -> xsum_base_eval.json (the base before training: float and NF4)
python docs/results/quantized-quality/xsum_base_eval.py float nf4

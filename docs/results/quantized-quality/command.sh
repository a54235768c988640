#!/usr/bin/env bash
# The commands whose results are in this folder (docs/results/quantized-quality), each exactly as the JSON it wrote
# records it. Long: about 10–15 minutes per run on the busy 2-core CPU (see notes.md). Each comparison ran as one lane
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

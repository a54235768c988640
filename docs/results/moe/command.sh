#!/usr/bin/env bash
# The commands whose results are in this folder (docs/results/moe): issue 46's evidence. CPU, one thread per run,
# the embedded corpus (no downloads). compare: 12 runs of 300 steps, two at a time (27 min wall on 2 shared cores,
# an estimated 20 CPU-minutes at the measured one-thread step time); measure: under a minute; the fit tables: a second each. After compare, copy its
# table.json / curves.png here under the names shown and rerun: python -m rso.train.report docs/results/moe
set -euo pipefail
cd "$(dirname "$0")/../../.."
. .venv/bin/activate
export OMP_NUM_THREADS=1
out=docs/results/moe

# -> moe_pretrain_300.json (runs/moe/table.json), moe_pretrain_300.png (runs/moe/curves.png)
python -m rso.train.bench.moe compare --max-steps 300 --seeds 0,1,2 --jobs 2 --output-dir runs/moe
cp runs/moe/table.json $out/moe_pretrain_300.json
cp runs/moe/curves.png $out/moe_pretrain_300.png

# -> moe_step.json: one step per method under rso.memory.measure_step, 20 timed steps, one thread
python -m rso.train.bench.moe measure --timed-steps 20 --out $out/moe_step.json

# -> moe_p_choice.json: one P per stacked expert weight (rso) against one P per expert (rso-per-expert)
python -m rso.train.bench.moe p-choice --table $out/moe_pretrain_300.json --step $out/moe_step.json --out $out/moe_p_choice.json

# -> fit_<model>_<budget>.json: the estimator's plan for the two real MoE shapes (no model built)
for model in mixtral-8x7b qwen3-30b-a3b; do
  for budget in 24GB 80GB; do
    python -m rso.memory --model $model --fit $budget --json > $out/fit_${model}_$budget.json
  done
done
python -m rso.memory --model qwen3-30b-a3b --fit 80GB --rank 0.25,128 --method rso --json > $out/fit_qwen3-30b-a3b_80GB_rso_rank0.25_128.json

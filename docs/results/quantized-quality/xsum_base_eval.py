"""The summary-token loss of the packaged SmolLM2-135M before any fine-tuning, on XSum's 100 held-out articles and
the 100 validation articles of the fine-tuning protocol: the float model and the same model with W₀ of its block
linears quantized as ``rso.wrap(quantize=...)`` stores it (B = 0, so the model is the quantized base).

    python docs/results/quantized-quality/xsum_base_eval.py float nf4     # -> xsum_base_eval.json
"""
import contextlib
import copy
import json
import pathlib
import sys

import torch

import rso
from rso.train.config import RunConfig
from rso.train.finetune import build_parser, evaluate_all, load_data

torch.set_num_threads(1)
c = RunConfig.from_namespace(build_parser().parse_args(["--task", "xsum", "--model", "smollm2", "--val-from-train", "100",
                                                        "--batch-size", "8", "--max-length", "256", "--max-steps", "32"]))
data, model, _, _ = load_data(c, print)
out = {}
for kind in sys.argv[1:]:
    m = copy.deepcopy(model)
    if kind != "float":
        m = rso.wrap(m, rank=1, quantize=kind)  # rso.wrap's default targets: here the 210 block linears
    out[kind] = evaluate_all(m, data.task, data.eval, data.val, 8, data.pad_id, torch.device("cpu"), contextlib.nullcontext)
    print(kind, out[kind], flush=True)
(pathlib.Path(__file__).parent / "xsum_base_eval.json").write_text(json.dumps(out, indent=1) + "\n")

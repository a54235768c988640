"""Where a training step's time goes: ``torch.profiler`` over a few steps of each method, side by side.

    python -m rso.train.bench.profiling --config 60m --methods frozen,rso-stiefel --batch 8 --seq 256

Prints, per method, the self time of the top operators and a breakdown by part of the model (the
output head and its loss, attention, the decoder's linear layers, RSO's extra products, elementwise
work, the optimizer), and the difference between methods. Threads are pinned as in the benchmark.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import warnings


def profile(method, cfg_name, batch, seq, steps, threads, rank=None, sort_by="self_cpu_time_total"):
    import torch
    from torch.profiler import ProfilerActivity, profile as tprofile, record_function

    from rso.train.bench.step import _build_model, _pin, load_config, resolve_rank
    from rso.train.bench.recipes import setup

    _pin(threads, None)
    cfg = load_config(cfg_name)
    rank = rank or resolve_rank("quarter", cfg)
    spec = {"config": cfg, "max_seq": seq, "attn": "sdpa", "dtype": "fp32", "seed": 0, "device": "cpu"}
    model, config = _build_model(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = setup(method, model, rank=rank, gap=10_000, tau=10_000)
    model, opt = s.model, s.optimizer
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    data = {"input_ids": ids, "labels": ids}

    def step():
        with record_function("phase:forward"):
            loss = model(**data).loss
        with record_function("phase:backward"):
            loss.backward()
        with record_function("phase:optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer state, allocator
    with tprofile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / steps / 1e6
    ops = sorted(((e.key, e.self_cpu_time_total / steps / 1e6, e.count // steps) for e in events
                  if not e.key.startswith(("phase:", "part:"))), key=lambda t: -t[1])
    phases = {e.key: e.cpu_time_total / steps / 1e6 for e in events if e.key.startswith("phase:")}
    return {"method": method, "total_s": total, "phases": phases, "ops": ops[:25]}


def by_kind(ops):
    """Group operator self time into kinds."""
    kinds = collections.Counter()
    for name, t, _ in ops:
        n = name.lower()
        if any(k in n for k in ("log_softmax", "nll_loss")):
            kinds["loss (log-softmax, nll)"] += t
        elif "scaled_dot_product" in n or "flash_attention" in n:
            kinds["attention kernel"] += t
        elif any(k in n for k in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")):
            kinds["matmul"] += t
        elif "adam" in n or "lerp" in n or "addcdiv" in n or "sqrt" in n:
            kinds["optimizer math"] += t
        elif "index_select" in n or "index_copy" in n:
            kinds["coordinate index"] += t
        else:
            kinds["other (elementwise, copies, norms)"] += t
    return kinds


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m rso.train.bench.profiling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="60m")
    parser.add_argument("--methods", default="frozen,rso-stiefel,adamw")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the profiles here")
    args = parser.parse_args(argv)
    results = []
    for method in args.methods.split(","):
        r = profile(method.strip(), args.config, args.batch, args.seq, args.steps, args.threads, args.rank)
        results.append(r)
        print(f"\n== {r['method']}: {r['total_s']:.3f} s of operator self time per step; phases: "
              + ", ".join(f"{k[6:]} {v:.3f} s" for k, v in r["phases"].items()))
        for name, t, count in r["ops"][:15]:
            print(f"  {name:<45} {t:8.3f} s  ×{count}")
        print("  by kind: " + ", ".join(f"{k} {v:.3f} s" for k, v in by_kind(r["ops"]).most_common()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One linear layer, forward + backward: full, frozen, and ``SubspaceLinear`` in both evaluation orders.

    python -m rso.train.bench.layer --device cuda --dtype bf16 --shapes 2048x2048,5461x2048 --tokens 4096 --rank 512

Isolates the layer's own cost from the rest of the model: the frozen layer (no weight gradient) is
the floor for any method that trains linear layers in a subspace. Prints a Markdown table of median
times (ms) and ratios to the frozen floor; ``--json`` writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from rso.layers import SubspaceLinear, use_merged
from rso.projections import StiefelSampler, generator_for


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_layer(layer, x, steps, warmup, autocast_dtype):
    device = x.device
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            y = layer(x)
        y.float().sum().backward()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        layer.zero_grad(set_to_none=True)
        x.grad = None
    return statistics.median(times) * 1e3


def run(shapes, tokens, rank, device, dtype, steps, warmup):
    device = torch.device(device)
    autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    rows = []
    for out_f, in_f in shapes:
        x = torch.randn(tokens, in_f, device=device, requires_grad=True)
        full = nn.Linear(in_f, out_f, bias=False, device=device)
        frozen = nn.Linear(in_f, out_f, bias=False, device=device).requires_grad_(False)
        sub = SubspaceLinear.from_module(nn.Linear(in_f, out_f, bias=False, device=device), rank)
        sub.set_projection_(StiefelSampler().sample(rank, in_f, generator_for(0), device=device))
        result = {"shape": f"{out_f}x{in_f}", "tokens": tokens, "rank": rank,
                  "full": time_layer(full, x, steps, warmup, autocast_dtype),
                  "frozen": time_layer(frozen, x, steps, warmup, autocast_dtype)}
        for mode in ("merged", "split"):
            sub.evaluation = mode
            result[f"rso_{mode}"] = time_layer(sub, x, steps, warmup, autocast_dtype)
        result["auto_choice"] = "merged" if use_merged(tokens, out_f, in_f, rank) else "split"
        rows.append(result)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m rso.train.bench.layer", description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="2048x2048,5461x2048,2048x5461", help="out x in, comma-separated")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=512)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows = run(shapes, args.tokens, args.rank, args.device, args.dtype, args.steps, args.warmup)
    print(f"device {args.device}, {args.dtype}, {args.tokens} tokens, rank {args.rank}: median ms of forward+backward\n")
    print("| shape (out×in) | full | frozen | RSO merged | RSO split | auto picks | best RSO / frozen |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for r in rows:
        best = min(r["rso_merged"], r["rso_split"])
        print(f"| {r['shape']} | {r['full']:.3f} | {r['frozen']:.3f} | {r['rso_merged']:.3f} | {r['rso_split']:.3f} "
              f"| {r['auto_choice']} | {best / r['frozen']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

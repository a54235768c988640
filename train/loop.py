"""The pieces that ``train.pretrain`` and ``train.finetune`` share around their training loops.

One job each: the common command-line options, ``main``'s handling of user errors, device and
autocast, the method's options, when a periodic action is due, gradient accumulation, the optimizer
step, the progress record (``metrics.jsonl`` and the tqdm bar) and ``--stop-after``. Saving and
restoring a run is in ``train.checkpoint``; the loops themselves stay in the entry points.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import pathlib
import sys
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from .checkpoint import CHECKPOINT_NAME, CheckpointError
from .data import DataError
from .methods import MethodError, MethodOptions
from .metrics import MetricsLog, Throughput, memory_label, memory_mb
from .models import ConfigError

__all__ = ["add_optimizer_args", "add_session_args", "add_runtime_args", "cli_main", "parse_optimizer_args",
           "fill_step_defaults", "setup_device", "method_options", "eval_mode", "due", "accumulate_gradients",
           "optimizer_step", "Progress", "stop_early"]


# ----------------------------------------------------------------------------- command line
def add_optimizer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--optimizer", default="adamw", help="any torch.optim or torch_optimizer class by name")
    p.add_argument("--optimizer-args", default="{}", help='extra optimizer keywords as JSON, e.g. \'{"momentum": 0.9}\'')


def add_session_args(p: argparse.ArgumentParser, output_dir: str) -> None:
    """Checkpoint and log cadence, the output folder, ``--resume`` and ``--stop-after``."""
    p.add_argument("--save-every", type=int, default=None, help="steps between checkpoints (default: eval-every)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--output-dir", default=output_dir)
    p.add_argument("--resume", action="store_true", help="continue the run saved in --output-dir")
    p.add_argument("--stop-after", type=int, default=None,
                   help="end this session after N more steps (as if killed); --resume continues")


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """Cache folder, device, precision, CPU threads, compilation and the progress bar."""
    p.add_argument("--cache-dir", default=None, help="tokenizer/token cache (default: $RSO_CACHE or ~/.cache/rso-train)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--dtype", default="bf16", help="autocast dtype on GPU: bf16 | fp32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--compile", action="store_true",
                   help="train through torch.compile(model) (the first step compiles; evaluation stays eager)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def cli_main(run, parser: argparse.ArgumentParser, argv=None) -> int:
    """Parse ``argv`` and ``run`` it; a user error (config, data, method, checkpoint) prints one line, exit status 2."""
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ConfigError, DataError, MethodError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# ----------------------------------------------------------------------------- set-up
def parse_optimizer_args(args) -> None:
    """``--optimizer-args`` from its JSON text to a dict (a resumed run's is a dict already)."""
    if isinstance(args.optimizer_args, str):
        try:
            args.optimizer_args = json.loads(args.optimizer_args)
        except json.JSONDecodeError as e:
            raise MethodError(f"--optimizer-args is not valid JSON: {e}") from e


def fill_step_defaults(args, warmup: int, evals_per_run: int) -> None:
    """Fill ``--warmup``, ``--eval-every`` (``evals_per_run`` evaluations) and ``--save-every`` (= eval-every) if unset."""
    if args.warmup is None:
        args.warmup = warmup
    if args.eval_every is None:
        args.eval_every = max(1, args.max_steps // evals_per_run)
    if args.save_every is None:
        args.save_every = args.eval_every


def setup_device(args) -> tuple[torch.device, bool, Callable]:
    """Apply ``--threads``; (device, whether bf16 autocast is on, a fresh autocast context per call)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_bf16 = device.type == "cuda" and args.dtype == "bf16"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    return device, use_bf16, autocast


def method_options(args, **entry_point_options) -> MethodOptions:
    """The method's options from the shared flags, plus those only one entry point sets."""
    return MethodOptions(rank=args.rank, tau=args.tau, scale=args.scale, lr=args.lr, weight_decay=args.weight_decay,
                         optimizer=args.optimizer, optimizer_args=dict(args.optimizer_args),
                         projection=args.projection, total_steps=args.max_steps, seed=args.seed, **entry_point_options)


@contextlib.contextmanager
def eval_mode(model):
    """``model.eval()`` inside the block; the previous train/eval mode after it."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------- the loop
def due(step: int, every: int, max_steps: int) -> bool:
    """Whether a periodic action (log, eval, save) runs after ``step``: every ``every`` steps and at the end."""
    return step % every == 0 or step == max_steps


def accumulate_gradients(model, micro_batches: list[dict], device, autocast) -> float:
    """Forward and backward each micro-batch (the model's inputs, moved to ``device``), its loss divided by
    their number so that the gradients add up to the step's mean; returns the step's loss."""
    loss_sum = 0.0
    for batch in micro_batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            loss = model(**batch).loss / len(micro_batches)
        loss.backward()
        loss_sum += loss.item()
    return loss_sum


def optimizer_step(loss: float, step: int, params, grad_clip: float, optimizer, scheduler) -> tuple[torch.Tensor, float]:
    """Step ``step`` (1-based) after its backward passes: clip the gradients (``grad_clip`` 0: off), step the
    optimizer and the LR schedule, clear the gradients. Returns (gradient norm, LR used); a non-finite ``loss`` raises."""
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {step}; lower --lr")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr


class Progress:
    """What a session reports as it trains: records in ``<out>/metrics.jsonl`` (on resume, those past the
    checkpoint's step dropped), the tqdm bar, and throughput and memory with each training record."""

    def __init__(self, out: pathlib.Path, device: torch.device, step: int, resumed: bool, args, desc: str):
        if resumed:
            tqdm.write(f"resumed from {out / CHECKPOINT_NAME} at step {step}")
        self.metrics = MetricsLog(out / "metrics.jsonl", resume_step=step if resumed else None)
        self.device = device
        self.memory_key = memory_label(device)
        self.bar = tqdm(total=args.max_steps, initial=step, desc=desc, dynamic_ncols=True, disable=args.no_progress,
                        file=sys.stderr)
        self.throughput = Throughput()
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since this session's progress began."""
        return time.perf_counter() - self.started

    def log_train(self, step: int, loss: float, lr: float, new_tokens: int, **extra) -> None:
        """A training record (``extra`` after the LR); ``new_tokens``: tokens trained on since the last one."""
        tokens_per_s, mem = self.throughput(new_tokens), memory_mb(self.device)
        self.metrics.log({"step": step, "loss": loss, "lr": lr, **extra, "tokens_per_s": round(tokens_per_s, 1),
                          self.memory_key: round(mem, 1), "elapsed_s": round(self.elapsed(), 2)})
        self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", mem=f"{mem:,.0f}MB", refresh=False)

    def log_eval(self, step: int, result: dict, line: str) -> None:
        """An evaluation record and its log line; its time does not count as training throughput."""
        self.metrics.log({"step": step, **result})
        tqdm.write(line)
        self.throughput(0)


def stop_early(args, step: int, start_step: int, progress: Progress) -> bool:
    """``--stop-after N``: once this session has run N steps short of the end, close the bar, say so, return True."""
    if args.stop_after is None or step - start_step < args.stop_after or step >= args.max_steps:
        return False
    progress.bar.close()
    tqdm.write(f"stopped after {args.stop_after} steps at step {step} (--stop-after); last checkpoint: "
               f"{pathlib.Path(args.output_dir) / CHECKPOINT_NAME}")
    return True

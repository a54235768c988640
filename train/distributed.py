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

It runs ``rso.train.pretrain``'s loop (``loop.train_loop``); the process group only picks its components
(``components``): one process trains plainly, more run DDP or FSDP2 (``--parallel``). Rank 0 writes
``metrics.jsonl``, ``results.json``, ``run.toml`` and ``checkpoint.pt``, the format ``rso.train.pretrain``
writes: full (gathered) model and optimizer states, so a run saved by one process resumes on several and back
(equal up to float rounding: the ranks' all-reduced means sum in another order). For DDP the log also shows
the bytes all-reduced per step (``comm_bytes``).
"""
import contextlib
import inspect
import json
import os
import pathlib
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from rso import distributed as rd
from torch.distributed.tensor import DTensor, distribute_tensor

from . import pretrain
from .checkpoint import CHECKPOINT_NAME, CheckpointError, load_run
from .config import RunConfig
from .loop import (Parallel, Parser, UsageError, apply_activation_checkpointing, check_checkpointing, check_rank,
                   cli_main, method_options, resume_args, start_session, train_loop)
from .methods import setup_method
from .metrics import perplexity
from .models import load_config

__all__ = ["build_parser", "run", "main", "synthetic_tokens", "PER_PROCESS"]

#: Saved and identity fields that follow the world size (the global batch, ``data.global_batch``, does not).
PER_PROCESS = ("batch_size", "grad_accum")


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


def settle(c: RunConfig, world: int, log) -> tuple[dict, dict | None]:
    """The run's settings (with ``--resume``: the checkpoint's, the micro-batch and accumulation fitted to the
    world size so that the global batch stays); (model config, checkpoint or None)."""
    out = pathlib.Path(c.checkpoint.output_dir)
    if c.checkpoint.resume and not (out / CHECKPOINT_NAME).exists() and any((out / "checkpoints").glob("step_*")):
        raise CheckpointError(f"--resume: {out / 'checkpoints'} holds torch.distributed.checkpoint folders of an "
                              f"older rso.train.distributed, which now writes {CHECKPOINT_NAME}; load one with "
                              "rso.distributed.load_checkpoint, or start a new --output-dir")
    latest = load_run(out) if c.checkpoint.resume else None
    saved, d = {}, c.data
    if latest is not None:
        saved = latest["args"]
        if saved.get("global_batch") is None:  # a checkpoint of rso.train.pretrain from before it saved one
            saved = {**saved, "global_batch": saved["batch_size"] * saved["grad_accum"]}
        resume_args(c, saved, latest["step"], log, exempt=PER_PROCESS)
    cfg = load_config(c.model.config)
    user_accum = d.grad_accum
    if saved and d.batch_size is None:  # the largest micro-batch up to the saved one that fits
        per_rank = max(1, saved["global_batch"] // world)
        d.batch_size = max(b for b in range(1, min(saved["batch_size"], per_rank) + 1) if per_rank % b == 0)
    c = pretrain.resolve_args(c, cfg)
    check_checkpointing(c, cfg)
    check_rank(c.rso, cfg)
    if user_accum is None:
        total = d.global_batch or cfg["training"].get("total_batch_size", d.batch_size * world)
        if latest is not None and total % (d.batch_size * world):
            raise UsageError(f"--resume: the run's global batch {total} is not a multiple of --batch-size "
                             f"{d.batch_size} x {world} ranks; pick a --batch-size that divides it")
        d.grad_accum = max(1, total // (d.batch_size * world))
    if saved and d.batch_size * d.grad_accum * world != saved["global_batch"]:
        raise UsageError(f"--resume: the run's global batch is {saved['global_batch']} sequences; --batch-size "
                         f"{d.batch_size} x --grad-accum {d.grad_accum} x {world} ranks would make it "
                         f"{d.batch_size * d.grad_accum * world} (leave --grad-accum out to have it computed)")
    d.global_batch = d.batch_size * d.grad_accum * world
    return cfg, latest


def load_data(c: RunConfig, cfg: dict, rank: int, world: int, log):
    """(train loader of the global micro-batch, eval loader, vocab, bos, eos): every rank reads the same global
    micro-batch and keeps its rows."""
    from .data import BlockLoader, build_pretraining_data, default_cache_dir
    d, seed = c.data, c.training.seed
    global_micro = d.batch_size * world
    if d.dataset == "synthetic":
        tokens = synthetic_tokens(d.synthetic_tokens, cfg.get("vocab_size", 32000), seed=1234)
        cut = int(len(tokens) * 0.98)
        return (BlockLoader(tokens[:cut], d.seq_len, global_micro, seed=seed),
                BlockLoader(tokens[cut:], d.seq_len, d.batch_size, seed=seed, shuffle=False),
                cfg.get("vocab_size", 32000), None, None)
    cache_dir = pathlib.Path(c.runtime.cache_dir) if c.runtime.cache_dir else default_cache_dir()
    if rank != 0:
        dist.barrier()  # rank 0 tokenizes and fills the cache first
    tok, train_loader, eval_loader = build_pretraining_data(
        d.dataset, c.model.tokenizer, d.seq_len, global_micro, seed, cache_dir, d.eval_fraction, d.max_docs,
        d.text_field, log=log)
    if rank == 0:
        dist.barrier()
    eos = tok.eos_token_id if tok.eos_token_id is not None else 0
    eval_loader.batch_size = d.batch_size
    return train_loader, eval_loader, len(tok), tok.bos_token_id if tok.bos_token_id is not None else eos, eos


def _full(value):
    return value.full_tensor() if isinstance(value, DTensor) else value


def _like(full, current):
    """``full`` laid out as ``current``: sharded the same way if that is a DTensor."""
    if isinstance(current, DTensor) and torch.is_tensor(full) and full.shape == current.shape:
        return distribute_tensor(full.to(current.device), current.device_mesh, current.placements)
    return full


class FullModelState:
    """An FSDP2 model's state as one process holds it: DTensors gathered to save, sharded again to load."""

    def __init__(self, model):
        self.model = model

    def state_dict(self) -> dict:
        return {k: _full(v) for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        current = self.model.state_dict()
        self.model.load_state_dict({k: _like(v, current.get(k)) for k, v in state.items()})


class FullOptimizerState:
    """An optimizer of FSDP2 parameters, its state as one process holds it (per-parameter tensors gathered)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def _params(self) -> list:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def state_dict(self) -> dict:
        state = self.optimizer.state_dict()
        return {**state, "state": {i: {k: _full(v) for k, v in st.items()} for i, st in state["state"].items()}}

    def load_state_dict(self, state: dict) -> None:
        params = self._params()
        self.optimizer.load_state_dict({**state, "state": {
            i: {k: _like(v, params[i]) for k, v in st.items()} for i, st in state["state"].items()}})


def components(c: RunConfig, model, optimizer, device, use_bf16) -> tuple[object, Parallel, object]:
    """(optimizer, how the session runs on the process group, DDP's communication counter or None): one process
    trains plainly; more run DDP or FSDP2 ``fully_shard`` per block (``--parallel``; the optimizer rebuilt on
    the sharded parameters). Checkpoints hold full states either way."""
    world = dist.get_world_size()

    def mean(loss: float) -> float:
        total = torch.tensor(loss, dtype=torch.float64, device=device)
        dist.all_reduce(total)
        return total.item() / world

    common = {"reduce_loss": mean, "writer": dist.get_rank() == 0, "world": world, "echo": True}
    if world == 1:
        return optimizer, Parallel(**common), None
    if c.runtime.parallel == "fsdp":
        names = {id(p): n for n, p in model.named_parameters()}
        group_names = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
        mp_policy = rd.mixed_precision_policy() if use_bf16 else None
        rd.fully_shard_model(model, mp_policy=mp_policy, reshard_after_forward=bool(c.runtime.reshard_after_forward))
        by_name = dict(model.named_parameters())
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [by_name[n] for n in ns]}
                  for g, ns in zip(optimizer.param_groups, group_names)]
        accepted = inspect.signature(type(optimizer).__init__).parameters
        optimizer = type(optimizer)(groups, **{k: v for k, v in optimizer.defaults.items() if k in accepted})

        def sync(last):
            model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()

        return optimizer, Parallel(sync=sync, model_state=FullModelState(model),
                                   optimizer_state=FullOptimizerState(optimizer), **common), None
    counter = rd.CommCounter()
    wrapped = rd.ddp(model, counter=counter, device_ids=[device.index] if device.type == "cuda" else None)
    return optimizer, Parallel(train_model=wrapped, sync=lambda last: contextlib.nullcontext() if last
                               else wrapped.no_sync(), **common), counter


def _evaluate(c: RunConfig, model, eval_loader, device, autocast) -> float:
    """Mean held-out loss: DDP's ranks split the batches (then all-reduce); FSDP2's all run each (collectives)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    ddp = c.runtime.parallel == "ddp" and world > 1
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for i, batch in enumerate(eval_loader.eval_batches(c.logging.eval_batches)):
            if i % world != rank and ddp:
                continue
            batch = batch.to(device)
            with autocast():
                loss = model(input_ids=batch, labels=batch).loss
            n = batch.numel() - batch.shape[0]
            total += torch.tensor([loss.float().item() * n, n], dtype=torch.float64, device=device)
    if ddp:
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1].clamp(min=1)).item()


def run(c) -> dict:
    """Train as ``c`` (a RunConfig, or parsed flags) says on the current process group; every rank calls it."""
    from .models import build_model
    rank, world = dist.get_rank(), dist.get_world_size()
    log = print if rank == 0 else (lambda *a, **k: None)
    c = RunConfig.from_namespace(c)
    cfg, ckpt = settle(c, world, log)
    d, out = c.data, pathlib.Path(c.checkpoint.output_dir)
    if c.runtime.threads:
        torch.set_num_threads(c.runtime.threads)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() and \
        dist.get_backend() == "nccl" else torch.device(c.runtime.device or "cpu")
    use_bf16 = device.type == "cuda" and c.training.dtype == "bf16"
    train_loader, eval_loader, vocab, bos, eos = load_data(c, cfg, rank, world, log)
    torch.manual_seed(c.training.seed)  # the same weights on every rank; DDP also broadcasts rank 0's
    model = build_model(cfg, vocab_size=vocab, bos_token_id=bos, eos_token_id=eos).to(device)
    model, optimizer = setup_method(c.rso.method, model, method_options(c))
    model = apply_activation_checkpointing(c, model, log)  # before sharding: FSDP2 wraps the checkpointed blocks
    optimizer, par, counter = components(c, model, optimizer, device, use_bf16)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) \
        if (use_bf16 and c.runtime.parallel == "ddp") else contextlib.nullcontext
    tokens_per_step = d.global_batch * d.seq_len
    comm = rd.gradient_bytes(model) if c.rso.method == "rso" else None
    log(f"{c.runtime.parallel if world > 1 else 'one process'} x{world} on {device}: model {c.model.config}, "
        f"method {c.rso.method}, {sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable "
        f"parameters; global batch {d.batch_size}x{d.grad_accum}x{world} seqs of {d.seq_len}"
        + (f"; gradient bytes per step {comm['total']:,} = {comm['ratio']:.3f} of full training" if comm else ""))
    s = start_session(c, ckpt, model, optimizer, train_loader, device, autocast, min_lr_ratio=c.optimizer.min_lr_ratio,
                      desc=c.rso.method, log=log, extra={"config": cfg, "world_size": world}, parallel=par)
    if rank == 0:
        (out / "args.json").write_text(json.dumps(c.flat(), indent=2, default=str))

    def evaluate_now(step):
        loss = _evaluate(c, model, eval_loader, device, autocast)
        s.progress.log_eval(step, {"eval_loss": loss, "eval_ppl": perplexity(loss)},
                            f"step {step}: eval loss {loss:.4f}, perplexity {perplexity(loss):.2f}")
        return loss

    def micro_batches():
        return [{"input_ids": rows, "labels": rows} for rows in
                (train_loader.next_batch()[rank * d.batch_size:(rank + 1) * d.batch_size] for _ in range(d.grad_accum))]

    def log_fields(step, norm, _):
        sent = counter.bytes_per_step if counter is not None else None
        return {"grad_norm": norm, "tokens": step * tokens_per_step, **({"comm_bytes": sent} if sent else {})}

    t0 = time.perf_counter()
    done = train_loop(s, micro_batches, evaluate_now, log_fields, save_on_stop=True)
    last_eval = done.last_eval or (done.step, _evaluate(c, model, eval_loader, device, autocast))
    results = {"config": c.model.config, "method": c.rso.method, "parallel": c.runtime.parallel, "world_size": world,
               "steps": done.step, "tokens": done.step * tokens_per_step, "final_eval_loss": last_eval[1],
               "train_losses": done.losses, "comm_bytes_per_step": counter.bytes_per_step if counter else None,
               "gradient_bytes": comm, "wall_s": round(time.perf_counter() - t0, 2)}
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def _run_in_process_group(c: RunConfig) -> None:
    started = _init_distributed(c.runtime.backend)
    try:
        run(c)
    finally:
        if started:
            dist.destroy_process_group()


def main(argv=None) -> int:
    """The torchrun entry point; its arguments are checked before the process group starts."""
    return cli_main(_run_in_process_group, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

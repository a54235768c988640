"""Memory and speed of AdamW, GaLore, GoLore, APOLLO, LoRA and RSO side by side (``python -m rso.train.bench.step``).

For each LLaMA config and method, one subprocess (threads pinned on CPU) builds the model, sets the
method up (see :mod:`rso.train.bench.recipes`) and measures in one run:

* exact bytes of one steady-state step with :func:`rso.memory.measure_step`: parameters, buffers,
  gradients, optimizer state (plus tensors a peer hides in Python objects, e.g. galore-torch's
  projector), activations saved for backward, peak live bytes (CUDA allocator peak on GPU; there
  also ``timed_peak``, the allocator's peak over the timed steps, compiled ones under ``--compile``);
* FLOPs of one forward + backward (``torch.utils.flop_counter``);
* step time after warm-up (median, min, max of ``--steps``), the step that ends a cycle (RSO's
  merge + resample, GaLore's SVD, APOLLO's new projection) timed separately, and tokens/s;
* with ``--merge-every K`` (rso-* methods): after the timed steps the outer loop's cycle is set to K
  steps and ``--merge-cycles`` cycles are run, each step timed: the merge steps (merge + resample
  after the optimizer step) against the ordinary ones and the first step after a merge (B's
  optimizer state re-created), and the merge + resample alone (``rso.outer_step``) timed as well;
* with ``--sweep``: activation and peak bytes against sequence length and batch (PNG plot).

With ``--compile`` the timed steps run ``torch.compile(model)`` (inductor; the first step, which
compiles, is reported as ``first_step_s``; ``--compile-backend`` picks another backend, e.g. ``eager``
to try the plumbing in seconds); memory and FLOPs are always those of the eager model.
``--activation-checkpointing`` checkpoints every decoder block (activations are then what the step
keeps plus one block's recomputation, shown as ``kept + recomputed``); ``--optimizer adamw8bit`` runs
bitsandbytes' 8-bit AdamW for the methods that use ``torch.optim.AdamW`` (adamw, frozen, lora, rso-*).

Results go to ``--out`` as ``results.json``, ``results.md`` (Markdown tables, the command on top) and
``sweep_<config>.png``. Timings are quoted as ratios to AdamW (and to the frozen-linear floor) from
the same run.

Examples::

    python -m rso.train.bench.step --configs tiny,60m --batch 8 --seq 256 --threads 2
    python -m rso.train.bench.step --configs 60m --methods adamw,frozen,rso-stiefel --sweep
    python -m rso.train.bench.step --configs 350m,1b --device cuda --dtype bf16 --batch 1 --seq 2048
    python -m rso.train.bench.step --configs 60m --methods adamw,rso-stiefel --activation-checkpointing --optimizer adamw8bit
    python -m rso.train.bench.step --configs 1b --methods rso-stiefel --device cuda --merge-every 4 --merge-cycles 3
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shlex
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "train" / "configs"

DEFAULT_METHODS = ("adamw", "frozen", "galore-torch", "galore", "golore", "apollo", "apollo-mini", "lora",
                   "rso-stiefel", "rso-coordinate", "rso-svd", "frozen+ce", "rso-stiefel+ce")
SWEEP_METHODS = ("adamw", "galore-torch", "frozen", "rso-stiefel", "rso-stiefel+ce")

__all__ = ["main", "run_worker", "load_config", "format_markdown"]


# ----------------------------------------------------------------------------------------------- configs
def load_config(name: str) -> dict:
    """A config JSON by name (``train/configs/<name>.json``) or path; ``training`` holds defaults."""
    path = pathlib.Path(name)
    if not path.suffix == ".json":
        path = CONFIG_DIR / f"{name.lower().removeprefix('llama-')}.json"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
        raise SystemExit(f"unknown config {name!r}; available: {known}")
    cfg = json.loads(path.read_text())
    cfg.setdefault("training", {})
    return cfg


def resolve_rank(spec: str, cfg: dict) -> int:
    """``quarter`` (hidden/4, the issue's speed goal), ``peer`` (the papers' rank) or an int."""
    if spec == "quarter":
        return cfg["hidden_size"] // 4
    if spec == "peer":
        return int(cfg["training"].get("rank", cfg["hidden_size"] // 4))
    return int(spec)


# ------------------------------------------------------------------------------------------------ worker
def _pin(threads: int, cores: list[int] | None):
    import torch
    if cores is None and hasattr(os, "sched_getaffinity"):
        cores = sorted(os.sched_getaffinity(0))[:threads]
    if cores and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, cores)
        except OSError:
            pass
    torch.set_num_threads(threads)
    return cores


def _build_model(spec):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    fields = {k: v for k, v in spec["config"].items() if k not in ("training", "model_type") and not k.startswith("_")}
    fields["max_position_embeddings"] = max(fields.get("max_position_embeddings", 0), spec["max_seq"])
    config = LlamaConfig(**fields, attn_implementation=spec["attn"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec["dtype"]]
    torch.manual_seed(spec["seed"])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(spec["device"]):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.train()
    return model, config


def _sync(device):
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _batch(spec, batch, seq, vocab):
    import torch
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(spec["device"])
    return {"input_ids": ids, "labels": ids}


def _train_step(model, optimizer, batch):
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def _flops(model, batch):
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        loss = model(**batch).loss
        loss.backward()
    for p in model.parameters():
        p.grad = None
    return counter.get_total_flops()


def run_worker(spec: dict) -> dict:
    """One method on one config in this process: memory, FLOPs, timings (and the sweep)."""
    import torch

    cores = _pin(spec["threads"], spec.get("cores")) if spec["device"] == "cpu" else None
    out = {"method": spec["method"], "config": spec["config_name"], "device": spec["device"], "dtype": spec["dtype"],
           "batch": spec["batch"], "seq": spec["seq"], "rank": spec["rank"], "threads": spec["threads"],
           "cores": cores, "attn": spec["attn"], "torch": torch.__version__, "compile": bool(spec.get("compile"))}
    if spec.get("compile"):
        out["compile_backend"] = spec.get("compile_backend") or "inductor"
    model, opt, config = _worker_model(spec, out)
    batch = _batch(spec, spec["batch"], spec["seq"], config.vocab_size)
    device = spec["device"]
    stepper = torch.compile(model, backend=spec.get("compile_backend") or "inductor") if spec.get("compile") else model

    _sync(device)
    t0 = time.perf_counter()
    _train_step(stepper, opt, batch)  # creates optimizer state (GaLore's first SVD, APOLLO's projection)
    _sync(device)
    out["first_step_s"] = time.perf_counter() - t0
    _worker_memory(spec, model, opt, batch, out)

    if spec["steps"] == 0:  # --steps 0: memory only (does it fit?), no timing
        if spec.get("sweep"):
            out["sweep"] = _sweep(spec, model, opt, config)
        return out
    _time_steps(spec, stepper, opt, batch, out)
    _time_cycle_end(spec, stepper, model, opt, batch, out)
    if spec.get("sweep"):
        out["sweep"] = _sweep(spec, model, opt, config)
    if spec.get("compile"):  # graphs dynamo compiled over the whole run (more than one: a recompile)
        from torch._dynamo.utils import counters
        out["dynamo"] = dict(counters["stats"])
    return out


def _worker_model(spec: dict, out: dict):
    """(model, optimizer, config): the model built, the method set up with its cycle-ending step right after the
    timed ones (first step, measured step, warm-up, timed), checkpointing and the optimizer as ``spec`` asks;
    the parameter count and the setup's facts go to ``out``."""
    from rso.train.bench.recipes import setup

    model, config = _build_model(spec)
    out["n_parameters"] = sum(p.numel() for p in model.parameters())
    boundary = 2 + spec["warmup"] + spec["steps"]
    s = setup(spec["method"], model, rank=spec["rank"], gap=boundary, tau=boundary + 1, seed=spec["seed"],
              chunk_size=spec["chunk_size"], ce_mode=spec["ce_mode"])
    model, opt = s.model, s.optimizer
    if spec.get("activation_checkpointing"):
        from rso.train.methods import enable_activation_checkpointing
        enable_activation_checkpointing(model)
        s.info["activation_checkpointing"] = True
    if spec.get("optimizer", "adamw") != "adamw":  # an 8-bit AdamW with the same groups and learning rate
        from rso.train.methods import resolve_optimizer
        cls = resolve_optimizer(spec["optimizer"])
        opt = cls([{"params": g["params"], "lr": g["lr"]} for g in opt.param_groups])
        s.info["optimizer"] = spec["optimizer"]
    out["setup"] = s.info
    return model, opt, config


def _worker_memory(spec: dict, model, opt, batch, out: dict) -> None:
    """Exact bytes of one step (:func:`rso.memory.measure_step`) and, unless ``--no-flops``, its FLOPs."""
    import torch
    from rso.memory import measure_step

    if spec["device"].startswith("cuda"):
        torch.cuda.empty_cache()
    report = measure_step(model, batch, opt, track_peak=spec["track_peak"])
    out["memory"] = {"parameters": report.parameters, "trainable": report.trainable_parameters,
                     "buffers": report.buffers, "gradients": report.gradients,
                     "optimizer_state": report.optimizer_state,
                     "activations": report.activations, "recomputed": report.recomputed,
                     "peak": report.peak, "peak_source": report.peak_source}
    if spec["flops"]:
        out["flops"] = _flops(model, batch)


def _time_steps(spec: dict, stepper, opt, batch, out: dict) -> None:
    """``warmup`` steps, then ``steps`` timed ones: wall and process CPU time (median, min, max), tokens/s at the
    median and, on CUDA, the allocator's peak over them (the compiled model's under ``--compile``)."""
    import torch

    device = spec["device"]
    times, cpu = [], []
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for i in range(spec["warmup"] + spec["steps"]):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        _train_step(stepper, opt, batch)
        _sync(device)
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    out["step_s"] = {"median": statistics.median(times), "min": min(times), "max": max(times), "all": times}
    # CPU time of this process (all its threads): less sensitive than wall time to other processes
    out["step_cpu_s"] = {"median": statistics.median(cpu), "min": min(cpu), "max": max(cpu)}
    out["tokens_per_s"] = spec["batch"] * spec["seq"] / out["step_s"]["median"]
    if device.startswith("cuda"):
        out["timed_peak"] = torch.cuda.max_memory_allocated()


def _time_cycle_end(spec: dict, stepper, model, opt, batch, out: dict) -> None:
    """The step that ends a cycle: with ``--merge-every`` (rso-*) the merge phase (:func:`_time_merges`), else
    one step timed for the methods that have a cycle (merge + resample / SVD / new random projection)."""
    device = spec["device"]
    base = spec["method"].removesuffix("+ce")
    if spec.get("merge_every") and base.startswith("rso-"):
        out["merge"] = _time_merges(stepper, model, opt, batch, device, spec["merge_every"],
                                    spec.get("merge_cycles", 3), out["step_s"]["median"])
        if out["merge"]["merge_step_s"]:
            out["cycle_step_s"] = out["merge"]["merge_step_s"]["median"]
    elif base not in ("adamw", "frozen", "lora") and not spec.get("no_cycle_step"):
        _sync(device)
        t0 = time.perf_counter()
        _train_step(stepper, opt, batch)
        _sync(device)
        out["cycle_step_s"] = time.perf_counter() - t0
        if base.startswith("rso-"):
            import rso
            out["cycle_check"] = rso.state(model)["cycle"]  # 1: the merge happened in that step


def _stats(times):
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "all": times} if times else None


def _time_merges(stepper, model, opt, batch, device, every: int, cycles: int, step_median: float) -> dict:
    """RSO's merge step against an ordinary step: ``cycles`` cycles of ``every`` steps, each step timed.

    The outer loop's cycle length is set to ``every`` from here on (the timed steps before ran inside
    one long cycle). A step that advances the cycle counter ran the merge + resample after its
    optimizer step; the step after it re-creates B's optimizer state (``state_on_merge="reset"``).
    Then the merge + resample alone (``rso.outer_step(model, optimizer)``) is timed ``cycles`` times. The
    ordinary step the merge step is set against is the median of this phase's ordinary steps (cycles of
    3 steps or more have some), else ``step_median``, the timed steps' median (``ordinary_from``)."""
    import rso
    from rso.wrapping import _loop
    loop = _loop(model, "benchmark")
    loop.tau = every
    ordinary, merges, after = [], [], []
    start = rso.state(model)["cycle"]
    previous_merged = False
    for _ in range(every * (cycles + 1)):
        if rso.state(model)["cycle"] - start >= cycles:
            break
        cycle = rso.state(model)["cycle"]
        _sync(device)
        t0 = time.perf_counter()
        _train_step(stepper, opt, batch)
        _sync(device)
        dt = time.perf_counter() - t0
        merged = rso.state(model)["cycle"] > cycle
        (merges if merged else after if previous_merged else ordinary).append(dt)
        previous_merged = merged
    alone = []
    for _ in range(cycles):
        _sync(device)
        t0 = time.perf_counter()
        rso.outer_step(model, opt)
        _sync(device)
        alone.append(time.perf_counter() - t0)
    res = {"every": every, "cycles": len(merges), "ordinary_s": _stats(ordinary), "merge_step_s": _stats(merges),
           "after_merge_s": _stats(after), "outer_step_s": _stats(alone),
           "state_on_merge": loop.state_policy}
    reference = res["ordinary_s"]["median"] if ordinary else step_median
    res["ordinary_from"] = "merge phase" if ordinary else "timed steps"
    if merges:
        res["merge_over_ordinary"] = res["merge_step_s"]["median"] / reference
        res["merge_cost_s"] = res["merge_step_s"]["median"] - reference
    return res


def _sweep(spec, model, opt, config):
    import torch
    from rso.memory import measure_step
    points = []
    grid = [(1, s) for s in spec["sweep_seqs"]] + [(b, spec["sweep_batch_seq"]) for b in spec["sweep_batches"]]
    seen = set()
    for b, s in grid:
        if (b, s) in seen:
            continue
        seen.add((b, s))
        batch = _batch(spec, b, s, config.vocab_size)
        try:
            if spec["device"].startswith("cuda"):
                torch.cuda.empty_cache()
            r = measure_step(model, batch, opt, track_peak=True)
            points.append({"batch": b, "seq": s, "activations": r.activations, "peak": r.peak})
        except torch.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            points.append({"batch": b, "seq": s, "activations": None, "peak": None, "error": "OOM"})
    return points


# ------------------------------------------------------------------------------------------------ parent
def _launch(spec: dict, timeout: int) -> dict:
    env = dict(os.environ)
    if spec["device"] == "cpu":
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(spec["threads"])
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env["PYTHONWARNINGS"] = "ignore"
    cmd = [sys.executable, "-m", "rso.train.bench.step", "--worker", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"method": spec["method"], "config": spec["config_name"], "error": f"timeout after {timeout} s"}
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result["wall_s"] = wall
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    error = " | ".join(tail) if tail else f"exit code {proc.returncode}"
    if "OutOfMemoryError" in (proc.stderr or "") or "out of memory" in (proc.stderr or "").lower():
        error = "OOM"
    return {"method": spec["method"], "config": spec["config_name"], "error": error}


def _fmt_bytes(n):
    if n is None:
        return "—"
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:,.1f} {unit}" if unit != "GiB" else f"{n / size:,.2f} {unit}"
    return f"{n} B"


def _fmt_act(memory):
    """Saved activations; with checkpointing, what the step keeps + one block's recomputation."""
    if memory.get("recomputed"):
        return f"{_fmt_bytes(memory['activations'])} + {_fmt_bytes(memory['recomputed'])}"
    return _fmt_bytes(memory["activations"])


def _fmt_peak(memory):
    return "not tracked" if memory.get("peak_source") == "not tracked" else _fmt_bytes(memory["peak"])


def format_markdown(results: list[dict], command: str, meta: dict) -> str:
    """``results.md``: the command, the run's setting, then per config a table of every method (ratios to AdamW
    and to the frozen floor from the same run), merge timings, the spread over rounds, memory relative to AdamW
    and the activation sweep."""
    lines = [f"Command: `{command}`", "",
             f"{meta['device_name']}, torch {meta['torch']}, {meta['dtype']}, batch {meta['batch']} × seq "
             f"{meta['seq']}, {meta['attn']} attention"
             + (f", torch.compile ({meta.get('compile_backend') or 'inductor'})" if meta.get("compile") else "")
             + (", activation checkpointing" if meta.get("activation_checkpointing") else "")
             + (f", optimizer {meta['optimizer']}" if meta.get("optimizer", "adamw") != "adamw" else "")
             + (f", {meta['threads']} threads pinned per method (one process each)" if meta["device"] == "cpu" else ""),
             ""]
    for config in dict.fromkeys(r["config"] for r in results):
        lines += _config_section(config, [r for r in results if r["config"] == config], meta)
    return "\n".join(lines)


def _config_section(config: str, rows: list[dict], meta: dict) -> list[str]:
    """One config's table and the notes under it."""
    ok = {r["method"]: r for r in rows if "error" not in r}
    ref, floor = (ok[name] if name in ok and "step_s" in ok[name] else None for name in ("adamw", "frozen"))
    rank = next((r["rank"] for r in ok.values()), None)
    lines = [f"### {config} (rank {rank})", "",
             "| method | trainable | gradients | optimizer state | activations | peak | GFLOP f+b | "
             "step s: median (min–max) | × AdamW | × floor | CPU s/step (× AdamW) | tokens/s | "
             "cycle-end step s (× median) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_method_row(r, ref, floor, meta) for r in rows]
    lines += _merge_lines(ok)
    spread = [f"{name} {min(r['round_medians']):.3f}–{max(r['round_medians']):.3f}"
              for name, r in ok.items() if len(r.get("round_medians", [])) > 1]
    if spread:
        lines += ["", "Median step time across rounds (the table keeps each method's fastest round): "
                  + ", ".join(spread)]
    mem_ref = ok.get("adamw")
    if mem_ref:
        lines += ["", "Memory relative to AdamW: " + ", ".join(
            f"{name} activations {r['memory']['activations'] / mem_ref['memory']['activations']:.3f} / "
            f"optimizer {r['memory']['optimizer_state'] / mem_ref['memory']['optimizer_state']:.3f}"
            for name, r in ok.items() if name != "adamw")]
    return lines + _sweep_lines(config, rows) + [""]


def _method_row(r: dict, ref: dict | None, floor: dict | None, meta: dict) -> str:
    """A method's table row: its error, its memory only (``--steps 0``), or memory and timings, the median step
    as a ratio to AdamW's (``ref``) and to the frozen floor's (``floor``; None: not timed in this run)."""
    if "error" in r:
        return f"| {r['method']} | {r['error']} |" + " |" * 11
    m = r["memory"]
    memory = (f"| {r['method']} | {_fmt_bytes(m['trainable'])} | {_fmt_bytes(m['gradients'])} | "
              f"{_fmt_bytes(m['optimizer_state'])} | {_fmt_act(m)} | {_fmt_peak(m)} | ")
    if "step_s" not in r:
        return memory + "memory only (--steps 0) |" + " |" * 6
    st = r["step_s"]
    ratio = f"{st['median'] / ref['step_s']['median']:.3f}" if ref else "—"
    fr = f"{st['median'] / floor['step_s']['median']:.3f}" if floor else "—"
    cyc = f"{r['cycle_step_s']:.3f} ({r['cycle_step_s'] / st['median']:.2f}×)" if "cycle_step_s" in r else "—"
    flops = f"{r['flops'] / 1e9:,.0f}" if r.get("flops") else "—"
    cpu = r.get("step_cpu_s", {}).get("median")
    cpu_txt = "—" if cpu is None or meta["device"] != "cpu" else (
        f"{cpu:.2f} ({cpu / ref['step_cpu_s']['median']:.3f})" if ref and "step_cpu_s" in ref else f"{cpu:.2f}")
    return (memory + f"{flops} | {st['median']:.3f} ({st['min']:.3f}–{st['max']:.3f}) | {ratio} | {fr} | "
            f"{cpu_txt} | {r['tokens_per_s']:,.0f} | {cyc} |")


def _merge_lines(ok: dict) -> list[str]:
    """One line per rso-* method timed with ``--merge-every``: ordinary, merge and after-merge steps, and the
    merge + resample alone (the ordinary step is the timed steps' median when the merge phase had none)."""
    lines = []
    for name, m in ((name, r["merge"]) for name, r in ok.items() if r.get("merge")):
        def _med(key, m=m):
            return f"{m[key]['median']:.3f} s" if m.get(key) else "—"
        ratio = f" ({m['merge_over_ordinary']:.2f}×)" if "merge_over_ordinary" in m else ""
        ordinary = (_med("ordinary_s") if m.get("ordinary_s")
                    else f"{ok[name]['step_s']['median']:.3f} s (the timed steps)")
        lines += ["", f"Merge step, {name} (cycle {m['every']} steps, {m['cycles']} merges, state on merge "
                  f"{m['state_on_merge']}): ordinary step {ordinary}, merge step {_med('merge_step_s')}"
                  f"{ratio}, step after a merge {_med('after_merge_s')}, merge + resample alone "
                  f"(rso.outer_step) {_med('outer_step_s')}"]
    return lines


def _sweep_lines(config: str, rows: list[dict]) -> list[str]:
    """The activation sweep: activations / peak per batch × seq (the first swept method's points) and method."""
    sweeps = [r for r in rows if r.get("sweep")]
    if not sweeps:
        return []
    lines = ["", f"Activation sweep ({config}): activations / peak", "",
             "| batch × seq | " + " | ".join(r["method"] for r in sweeps) + " |",
             "|---|" + "---|" * len(sweeps)]
    for b, s in [(p["batch"], p["seq"]) for p in sweeps[0]["sweep"]]:
        cells = []
        for r in sweeps:
            p = next((q for q in r["sweep"] if (q["batch"], q["seq"]) == (b, s)), None)
            cells.append("—" if p is None or p.get("activations") is None else
                         f"{_fmt_bytes(p['activations'])} / {_fmt_bytes(p['peak'])}")
        lines.append(f"| {b} × {s} | " + " | ".join(cells) + " |")
    return lines


def plot_sweep(results: list[dict], path: pathlib.Path, config: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in results if r["config"] == config and r.get("sweep")]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        seq_pts = sorted((p for p in r["sweep"] if p["batch"] == 1 and p.get("activations") is not None),
                         key=lambda p: p["seq"])
        bat_pts = sorted((p for p in r["sweep"] if p["seq"] == r.get("sweep_batch_seq", 256)
                          and p.get("activations") is not None), key=lambda p: p["batch"])
        for ax, pts, key in ((axes[0], seq_pts, "seq"), (axes[1], bat_pts, "batch")):
            if not pts:
                continue
            line, = ax.plot([p[key] for p in pts], [p["activations"] / 2 ** 20 for p in pts], marker="o",
                            label=f"{r['method']} activations")
            ax.plot([p[key] for p in pts], [p["peak"] / 2 ** 20 for p in pts], marker="x", linestyle="--",
                    color=line.get_color(), alpha=0.6, label=f"{r['method']} peak")
    axes[0].set(xscale="log", xlabel="sequence length (batch 1)", ylabel="MiB",
                title=f"{config}: bytes vs sequence length")
    axes[1].set(xscale="log", xlabel=f"batch (seq {rows[0].get('sweep_batch_seq', 256)})",
                ylabel="MiB", title=f"{config}: bytes vs batch")
    for ax in axes:
        ax.minorticks_off()
        ticks = sorted({x for line in ax.get_lines() for x in line.get_xdata()})
        if ticks:
            ax.set_xticks(ticks, [str(int(t)) for t in ticks])
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _device_name(device):
    if device.startswith("cuda"):
        try:
            import torch
            return torch.cuda.get_device_name(0)
        except Exception:  # noqa: BLE001
            return "CUDA GPU"
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU ({name})"


#: methods whose optimizer is torch.optim.AdamW (``--optimizer adamw8bit`` replaces it), each also with +ce
ADAMW_METHODS = ("adamw", "frozen", "lora") + tuple(f"rso-{s}" for s in ("stiefel", "gaussian", "coordinate", "svd"))


def _check_memory_options(args, methods) -> str | None:
    """The one-line error for --optimizer / --activation-checkpointing values that cannot run, else None."""
    if args.optimizer != "adamw":
        from rso.train.methods import MethodError, check_optimizer
        others = [m for m in methods if m.removesuffix("+ce") not in ADAMW_METHODS]
        if others:
            return (f"--optimizer {args.optimizer}: only for {', '.join(ADAMW_METHODS)} (each also +ce); "
                    f"{', '.join(others)} run their own optimizer")
        try:
            check_optimizer("adamw", args.optimizer)
        except MethodError as e:
            return f"--optimizer: {e}"
    return None


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        result = run_worker(json.loads(args.worker))
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    from rso.train.bench.recipes import METHODS
    dtype = args.dtype or ("fp32" if args.device == "cpu" else "bf16")
    methods = list(METHODS) + ["frozen+ce", "rso-stiefel+ce"] if args.methods == "all" else \
        [m.strip() for m in args.methods.split(",") if m.strip()]
    error = _check_memory_options(args, methods)
    if error is None and (args.merge_every < 0 or args.merge_cycles < 1):
        error = f"--merge-every must be ≥ 0 and --merge-cycles ≥ 1, got {args.merge_every} and {args.merge_cycles}"
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python -m rso.train.bench.step " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    import torch
    meta = {"device": args.device, "device_name": _device_name(args.device), "torch": torch.__version__,
            "dtype": dtype, "batch": args.batch, "seq": args.seq, "attn": args.attn, "threads": args.threads,
            "compile": args.compile, "compile_backend": args.compile_backend if args.compile else None,
            "merge_every": args.merge_every, "command": command,
            "activation_checkpointing": args.activation_checkpointing, "optimizer": args.optimizer}
    results = []
    for config_name in [c.strip() for c in args.configs.split(",") if c.strip()]:
        results.extend(_run_config(args, config_name, methods, dtype, results, meta, out_dir))
        (out_dir / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    md = format_markdown(results, command, meta)
    (out_dir / "results.md").write_text(md)
    for config_name in dict.fromkeys(r["config"] for r in results):
        png = plot_sweep(results, out_dir / f"sweep_{config_name}.png", config_name)
        if png:
            print(f"plot: {png}")
    print(md)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rso.train.bench.step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--configs", default="tiny,60m", help="comma-separated config names (train/configs)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated methods (train/bench/recipes.py), or 'all'")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"),
                        help="default: fp32 on CPU, bf16 on GPU")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
    parser.add_argument("--rank", default="quarter", help="int, 'quarter' (hidden/4) or 'peer' (papers' rank)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per method (pinned)")
    parser.add_argument("--cores", default=None, help="comma-separated CPU cores to pin to (default: first N)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after warm-up (0: memory only)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=1024, help="tokens per chunk of the +ce head")
    parser.add_argument("--ce-mode", default="recompute", choices=("recompute", "fused"))
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    parser.add_argument("--no-peak", action="store_true", help="CPU: skip tracking peak live bytes")
    parser.add_argument("--sweep", action="store_true", help="activation/peak sweep over seq and batch")
    parser.add_argument("--sweep-methods", default=",".join(SWEEP_METHODS))
    parser.add_argument("--sweep-seqs", default="256,512,1024,2048,4096")
    parser.add_argument("--sweep-batches", default="1,2,4,8,16")
    parser.add_argument("--sweep-batch-seq", type=int, default=256)
    parser.add_argument("--compile", action="store_true",
                        help="time torch.compile(model) (inductor); memory and FLOPs stay eager")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend with --compile (eager / aot_eager: the plumbing, no codegen)")
    parser.add_argument("--merge-every", type=int, default=0, metavar="K",
                        help="rso-* methods: after the timed steps, run --merge-cycles cycles of K steps and time the "
                             "merge steps against the ordinary ones (and rso.outer_step alone)")
    parser.add_argument("--merge-cycles", type=int, default=3, help="merges timed with --merge-every")
    parser.add_argument("--no-cycle-step", action="store_true",
                        help="do not time the step that ends a cycle (GaLore's SVD step: its first step has one)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="checkpoint every decoder block (non-reentrant): activations = kept + one block's "
                             "recomputation")
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "adamw8bit"),
                        help="adamw8bit: bitsandbytes' 8-bit AdamW for adamw, frozen, lora and rso-* (each +ce)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per method process")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the method list this many times, interleaved; keep each method's fastest "
                             "round (less exposed to other load on a shared machine) and report the spread")
    parser.add_argument("--out", default="bench_results", help="output folder")
    return parser


def _run_config(args, config_name: str, methods: list, dtype: str, done: list, meta: dict, out_dir) -> list:
    """Every method on one config, ``--rounds`` times interleaved: each method's fastest round (its first
    error, or why it was skipped), in ``methods``' order; ``results.json`` (``done`` and these) rewritten
    after each run."""
    from rso.train.bench.recipes import available
    cfg = load_config(config_name)
    run = {"config_name": config_name, "config": cfg, "rank": resolve_rank(args.rank, cfg), "dtype": dtype,
           "sweep_seqs": [int(x) for x in args.sweep_seqs.split(",")],
           "sweep_batches": [int(x) for x in args.sweep_batches.split(",")]}
    best: dict[str, dict] = {}
    medians: dict[str, list] = {}
    for round_ in range(args.rounds):
        for method in methods:
            reason = available(method)
            if reason:
                if round_ == 0:
                    print(f"[{config_name}] {method}: skipped ({reason})", flush=True)
                    best[method] = {"method": method, "config": config_name, "error": f"skipped: {reason}"}
                continue
            print(f"[{config_name}] round {round_ + 1}/{args.rounds} {method} ...", end=" ", flush=True)
            res = _launch(_spec(args, method, round_, run), args.timeout)
            res["sweep_batch_seq"] = args.sweep_batch_seq
            if "error" in res:
                print(res["error"], flush=True)
                best.setdefault(method, res)
                continue
            timed = "step_s" in res
            print((f"step {res['step_s']['median']:.3f} s (cpu {res['step_cpu_s']['median']:.3f} s), "
                   if timed else "") + f"activations {_fmt_bytes(res['memory']['activations'])}, "
                  f"peak {_fmt_peak(res['memory'])} ({res['wall_s']:.0f} s)", flush=True)
            medians.setdefault(method, []).append(res["step_s"]["median"] if timed else 0.0)
            _keep_faster(best, method, res)
            best[method]["round_medians"] = medians[method]
            snapshot = done + [best[m] for m in methods if m in best]
            (out_dir / "results.json").write_text(json.dumps({"meta": meta, "results": snapshot}, indent=1))
    return [best[m] for m in methods if m in best]


def _spec(args, method: str, round_: int, run: dict) -> dict:
    """The worker's instructions for one method in round ``round_`` (FLOPs and the sweep in the first round
    only); ``run``: the config's name, fields, rank, dtype and sweep grid."""
    sweep_methods = {m.strip() for m in args.sweep_methods.split(",")} if args.sweep else set()
    sweep_seqs, sweep_batches = run["sweep_seqs"], run["sweep_batches"]
    return {"method": method, "config_name": run["config_name"], "config": run["config"], "rank": run["rank"],
            "batch": args.batch, "seq": args.seq, "dtype": run["dtype"], "device": args.device,
            "attn": args.attn, "threads": args.threads, "steps": args.steps, "warmup": args.warmup,
            "seed": args.seed, "cores": [int(c) for c in args.cores.split(",")] if args.cores else None,
            "chunk_size": args.chunk_size, "ce_mode": args.ce_mode, "compile": args.compile,
            "compile_backend": args.compile_backend, "merge_every": args.merge_every,
            "merge_cycles": args.merge_cycles, "no_cycle_step": args.no_cycle_step,
            "activation_checkpointing": args.activation_checkpointing, "optimizer": args.optimizer,
            "flops": not args.no_flops and round_ == 0, "track_peak": not args.no_peak,
            "sweep": method in sweep_methods and round_ == 0,
            "sweep_seqs": sweep_seqs, "sweep_batches": sweep_batches,
            "sweep_batch_seq": args.sweep_batch_seq,
            "max_seq": max([args.seq] + (sweep_seqs + [args.sweep_batch_seq] if args.sweep else []))}


def _keep_faster(best: dict, method: str, res: dict) -> None:
    """``best[method]`` becomes ``res`` when it has no timed result yet or ``res`` is faster (median step);
    the FLOPs and sweep of the first round move to whichever result is kept."""
    prev = best.get(method)
    timed = "step_s" in res
    if prev is None or "error" in prev or not timed or res["step_s"]["median"] < prev["step_s"]["median"]:
        for key in ("flops", "sweep"):
            if prev is not None and key in prev and key not in res:
                res[key] = prev[key]
        best[method] = res
    else:
        for key in ("flops", "sweep"):
            if key in res and key not in prev:
                prev[key] = res[key]


if __name__ == "__main__":
    sys.exit(main())

"""Measured, not only estimated: one real training step of a large LLaMA on this machine, byte by byte.

    python -m rso.train.bench.memory_frontier --config llama-1b --cases rso,rso+ckpt,adamw --batch 1 --seq 64
    python -m rso.train.bench.memory_frontier --config llama-7b --cases rso+ckpt+ce --rank 256 --batch 1 --seq 128 \\
        --out docs/memory_frontier_7b.json
    python -m rso.train.bench.memory_frontier --config llama-7b --cases rso+ckpt+ce+nf4 --rank 256 --batch 1 --seq 128
    python -m rso.train.bench.memory_frontier --device cuda --memory-limit-gb 24 --config llama-7b \\
        --cases rso+ckpt+ce,rso+ckpt --rank 256 --batch 16 --seq 256 --timed-steps 2
    python -m rso.train.bench.memory_frontier --device cuda --memory-limit-gb 24 --config llama-7b \\
        --cases rso+ckpt+ce --rank 256 --batch max --seq 256

Each case runs in its own process, which

1. checks the memory it may use first: the estimate of the step (``rso.memory.estimate``) plus a margin
   must be below ``MemAvailable``, else the case is recorded as "does not fit here" and not started;
   the process then sets a hard address-space limit (``RLIMIT_AS``, as ``prlimit --as`` does) so a miss
   ends that process with an out-of-memory error and nothing else;
2. builds the model with random init directly in bf16 (``from_config(config, dtype=bfloat16)``: no fp32
   copy is ever materialized), sets the method up (``rso.train.bench.recipes.setup``; the cycle length is
   set past the step, so no merge happens in it), optionally checkpoints every block
   (``rso.train.methods.enable_activation_checkpointing``) and swaps in 8-bit AdamW;
3. runs one training step under :func:`rso.memory.measure_step` (exact bytes of parameters, gradients,
   optimizer state, saved activations, one block's recomputation, and the peak of live tensors) and
   reads the process's peak resident memory (``ru_maxrss``) and the step's wall time.

Cases are ``<method>[+ckpt][+ce][+8bit][+int8|+nf4]`` with method ``rso`` (``rso-stiefel``), ``adamw``, ``lora``
or ``frozen``; ``+int8`` / ``+nf4`` (RSO only) wrap with ``rso.wrap(quantize=...)`` and estimate with the same
``quantize``. Their model is built on the meta device with the decoder's linear weights pointing at one random
bf16 tensor per shape (N(0, initializer_range²), HF's init) until the wrap quantizes each into its own storage:
``rso.wrap`` builds every quantized layer before it swaps any in, so a model holding a float W₀ per layer would
peak at the float and the quantized W₀ together (7B int8: about 20 GiB). Every layer's W₀ thus starts from the
same values, in its own storage: bytes and step time are those of distinct values. The parent prints estimate
against measurement term by term and writes JSON (``--out``); a quantized estimate's ``total`` also holds one
layer's W₀ dequantized (``dequantize_transient``), which is no tensor the step keeps, so the measured sum is
compared with the estimate less it.

``--device cuda`` builds the model on the GPU (random init in bf16 there) and replaces the host checks
by a cap on the CUDA caching allocator: ``--memory-limit-gb G`` sets
``torch.cuda.set_per_process_memory_fraction(G GiB / the device's memory)`` before anything is
allocated (after checking that G GiB are free), so the step sees the memory of a G GiB card; a step
that needs more ends with CUDA's out-of-memory error, recorded as the case's result. The CUDA
context itself is outside the cap (on a real 24 GB card it takes some of the 24 GiB: the estimator's
2 GiB reserve covers it). The record holds the allocator's peaks (the measured step's allocated peak
beside the estimate, and the reserved peak of every phase, checked against the cap). On CPU
``--memory-limit-gb`` is only the budget ``--batch max`` plans against (the address-space limit
stays derived from the estimate: torch's own mappings alone exceed a small one). ``--batch max``
runs each case at the largest batch the estimator says fits in the limit less ``--reserve-gb`` (the
planner's rule, 2 GiB by default). ``--timed-steps N`` times N ordinary steps after the measured one
(tokens/s; on CUDA with their own peaks).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

GiB = 2 ** 30
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

__all__ = ["main", "parse_case", "estimate_case", "run_case", "largest_batch", "memory_fraction"]

_BASES = {"rso": ("rso-stiefel", "rso"), "adamw": ("adamw", "adamw"), "lora": ("lora", "lora"),
          "frozen": ("frozen", "frozen")}


_QUANTIZE = ("int8", "nf4")


def parse_case(case: str) -> dict:
    """``"rso+ckpt+ce+8bit+nf4"`` -> its method, memory savers and W₀ storage (``quantize``: None, int8, nf4)."""
    base, *flags = case.strip().lower().split("+")
    unknown = [f for f in flags if f not in ("ckpt", "ce", "8bit", *_QUANTIZE)]
    if base not in _BASES or unknown:
        raise ValueError(f"case {case!r}: write <method>[+ckpt][+ce][+8bit][+int8|+nf4] with method one of "
                         f"{', '.join(_BASES)}")
    kinds = [f for f in flags if f in _QUANTIZE]
    if len(kinds) > 1 or (kinds and base != "rso"):
        raise ValueError(f"case {case!r}: +int8 / +nf4 store RSO's W₀ quantized: one of them, with method rso "
                         f"(e.g. rso+ckpt+ce+nf4)")
    return {"case": case, "method": base, "checkpointing": "ckpt" in flags, "chunked_ce": "ce" in flags,
            "eight_bit": "8bit" in flags, "quantize": kinds[0] if kinds else None}


def model_config(name: str, seq: int) -> dict:
    from rso.memory.estimate import _load_config
    cfg, _ = _load_config(name)
    cfg = dict(cfg)
    cfg.setdefault("vocab_size", 32000)
    cfg.setdefault("tie_word_embeddings", False)
    cfg["max_position_embeddings"] = max(int(cfg.get("max_position_embeddings", 0) or 0), seq, 2048)
    return {k: v for k, v in cfg.items() if k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                      "num_key_value_heads", "num_hidden_layers", "vocab_size",
                                                      "tie_word_embeddings", "max_position_embeddings", "head_dim")}


def _estimate_options(c: dict, rank: int) -> dict:
    options = {"lora_train_other": True} if c["method"] == "lora" else {}
    if c["quantize"]:
        options["quantize"] = c["quantize"]
    return dict(rank=rank, dtype="bf16", activation_checkpointing=c["checkpointing"],
                chunked_ce="recompute" if c["chunked_ce"] else False, optimizer_bits=8 if c["eight_bit"] else None,
                **options)


def estimate_case(spec: dict) -> dict:
    from rso.memory import estimate
    c = parse_case(spec["case"])
    return estimate(spec["model"], method=_BASES[c["method"]][1], batch=spec["batch"], seq=spec["seq"],
                    **_estimate_options(c, spec["rank"]))


def largest_batch(case: str, model: dict, rank: int, seq: int, usable: int) -> int:
    """The largest batch whose estimated step fits in ``usable`` bytes (0: not even batch 1), by the planner's rule."""
    from rso.memory.planner import _largest_batch
    c = parse_case(case)
    batch, _ = _largest_batch(model, _BASES[c["method"]][1], _estimate_options(c, rank), seq, usable)
    return batch


def memory_fraction(limit: int, total: int, free: int) -> tuple[float | None, str | None]:
    """(fraction for ``torch.cuda.set_per_process_memory_fraction``, None) or (None, why the cap cannot be set)."""
    if limit <= 0:
        return None, f"the memory limit must be positive, got {limit} bytes"
    if limit > total:
        return None, f"the cap {limit / GiB:.1f} GiB is above the device's {total / GiB:.1f} GiB"
    if limit > free:
        return None, f"the device has {free / GiB:.1f} GiB free, below the cap {limit / GiB:.1f} GiB; not started"
    return limit / total, None


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _cuda_cap(torch, limit):
    """Cap the CUDA caching allocator at ``limit`` bytes (None: no cap); the device's facts for the record."""
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info()
    info = {"name": props.name, "total_memory": total, "free_before": free, "limit": limit, "fraction": None,
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), "cuda": torch.version.cuda}
    if limit is not None:
        fraction, error = memory_fraction(limit, total, free)
        if error:
            info["error"] = error
            return info
        torch.cuda.set_per_process_memory_fraction(fraction, 0)
        info["fraction"] = fraction
    return info


def _phase_peaks(torch, info, phase):
    """Record the allocator's peaks since the last reset under ``phase`` and reset them."""
    torch.cuda.synchronize()
    info.setdefault("peaks", {})[phase] = {"allocated": torch.cuda.max_memory_allocated(),
                                           "reserved": torch.cuda.max_memory_reserved()}
    torch.cuda.reset_peak_memory_stats()


def run_case(spec: dict) -> dict:
    """One case in this process (the worker): build, set up, one measured step (and ``timed_steps`` more)."""
    import warnings

    import torch

    warnings.simplefilter("ignore")
    torch.set_num_threads(spec["threads"])
    c = parse_case(spec["case"])
    device = spec.get("device", "cpu")
    cuda = device.startswith("cuda")
    out = {"case": spec["case"], "threads": spec["threads"], "device": device, "batch": spec["batch"],
           "seq": spec["seq"]}
    info = None
    if cuda:
        out["cuda"] = info = _cuda_cap(torch, spec.get("memory_limit"))
        if "error" in info:
            out["error"] = info["error"]
            return out
    limit = spec.get("memory_limit")
    phase = "build"
    try:
        model, opt, ids = _build_case(spec, c, out)
        if cuda:
            _phase_peaks(torch, info, "build")
        phase = "measured step"
        _measured_step(torch, model, opt, ids, out, info)
        phase = "timed steps"
        _timed_steps(torch, model, opt, ids, spec, out, info)
    except torch.OutOfMemoryError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "CUDA out of memory"
        cap = f"the {limit / GiB:.1f} GiB cap" if limit else "the device's memory"
        out["error"] = f"out of memory under {cap} in the {phase}: {first[:300]}"
        out["oom"] = True
        if cuda:
            _phase_peaks(torch, info, phase + " (out of memory)")
    if cuda and limit:
        info["cap_respected"] = all(p["reserved"] <= limit for p in info.get("peaks", {}).values())
    out["rss_peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def _build_case(spec: dict, c: dict, out: dict):
    """(model, optimizer, input ids): the model built with random init in bf16 on its device (no fp32 copy, no
    host copy; a quantized case's as :func:`_build_lean`), the method set up (no merge within the step),
    checkpointing and 8-bit AdamW as the case asks; the build's time, resident memory and parameter dtypes /
    devices go to ``out``, and the resident peak after the set-up (the quantizing wrap)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rso.train.bench.recipes import setup
    from rso.train.methods import enable_activation_checkpointing, resolve_optimizer

    device = spec.get("device", "cpu")
    t0 = time.perf_counter()
    config = LlamaConfig(**spec["model"], attn_implementation="sdpa")
    torch.manual_seed(0)
    if c["quantize"]:
        model = _build_lean(config, device)
    else:
        with torch.device(device):
            model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.train()
    out["build_s"] = round(time.perf_counter() - t0, 1)
    out["rss_after_build"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["parameter_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
    out["parameter_devices"] = sorted({str(p.device) for p in model.parameters()})
    t0 = time.perf_counter()
    if c["quantize"]:
        model, opt = _setup_quantized(model, c, spec)
    else:
        method = _BASES[c["method"]][0] + ("+ce" if c["chunked_ce"] else "")
        s = setup(method, model, rank=spec["rank"], gap=10 ** 9, tau=10 ** 9, chunk_size=spec.get("chunk_size", 1024))
        model, opt = s.model, s.optimizer
    out["setup_s"] = round(time.perf_counter() - t0, 1)
    out["rss_after_setup"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if c["checkpointing"]:
        enable_activation_checkpointing(model)
    if c["eight_bit"]:
        opt = resolve_optimizer("adamw8bit")([{"params": g["params"], "lr": g["lr"]} for g in opt.param_groups])
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (spec["batch"], spec["seq"]), generator=gen).to(device)
    return model, opt, ids


def _build_lean(config, device):
    """The bf16 LLaMA of ``config`` without a float W₀ per layer: built on meta, each decoder linear's weight a
    view of one random bf16 tensor per shape (N(0, initializer_range²)), the rest materialized on ``device`` and
    initialized by the model's own ``_init_weights`` (embeddings, norms, head, RoPE's fp32 ``inv_freq``)."""
    from itertools import chain

    import torch
    from transformers import LlamaForCausalLM

    from rso.train.bench.recipes import BLOCK_LINEARS

    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    shared = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rpartition(".")[2] in BLOCK_LINEARS:
            shape = tuple(module.weight.shape)
            if shape not in shared:
                shared[shape] = torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(
                    0.0, config.initializer_range)
            module.weight = torch.nn.Parameter(shared[shape].detach())
            if module.bias is not None:
                module.bias = torch.nn.Parameter(torch.zeros(shape[0], dtype=torch.bfloat16, device=device))
    for module in model.modules():
        if any(t.is_meta for t in chain(module.parameters(recurse=False), module.buffers(recurse=False))):
            module.to_empty(device=device, recurse=False)
            model._init_weights(module)
    return model


def _setup_quantized(model, c: dict, spec: dict):
    """(model, AdamW): ``recipes.setup``'s rso-stiefel recipe (its wrap arguments, no merge within the step) with
    W₀ stored as ``c["quantize"]``, and the chunked head when the case asks."""
    import torch

    import rso
    import rso.heads
    from rso.train.bench.recipes import BLOCK_LINEARS

    rso.wrap(model, rank=spec["rank"], tau=10 ** 9, projection="stiefel", target_modules=list(BLOCK_LINEARS), seed=0,
             quantize=c["quantize"])
    if c["chunked_ce"]:
        rso.heads.use_chunked_head(model, chunk_size=spec.get("chunk_size", 1024), mode="recompute")
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)


def _sync(torch, info):
    """Wait for the GPU (``info``: the CUDA record, None on CPU)."""
    if info is not None:
        torch.cuda.synchronize()


def _measured_step(torch, model, opt, ids, out: dict, info) -> None:
    """One step under :func:`rso.memory.measure_step` (with the peak of live tensors): its bytes and wall time."""
    from rso.memory import measure_step
    _sync(torch, info)
    t0 = time.perf_counter()
    report = measure_step(model, {"input_ids": ids, "labels": ids}, opt, track_peak=True)
    _sync(torch, info)
    out["step_s"] = round(time.perf_counter() - t0, 1 if info is None else 3)
    out["measured"] = report.as_dict()
    if info is not None:
        _phase_peaks(torch, info, "measured step")


def _timed_steps(torch, model, opt, ids, spec: dict, out: dict, info) -> None:
    """``spec["timed_steps"]`` ordinary steps, each timed: their times and tokens/s at the median."""
    import statistics
    times = []
    for _ in range(spec.get("timed_steps", 0)):
        _sync(torch, info)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(torch, info)
        times.append(time.perf_counter() - t0)
    if times:
        out["timed_steps_s"] = times
        out["tokens_per_s"] = spec["batch"] * spec["seq"] / statistics.median(times)
        if info is not None:
            _phase_peaks(torch, info, "timed steps")


def _estimate_terms(est: dict) -> dict:
    terms = {k: est[k] for k in ("weights", "gradients", "optimizer", "activations", "activations_kept",
                                 "activations_recompute", "total")}
    if est.get("quantize"):
        terms.update(quantize=est["quantize"], quantized_weights=est["quantized_weights"],
                     dequantize_transient=est["dequantize_transient"])
    return terms


def _held(e: dict) -> int:
    """The estimate of what the step holds, the terms ``measure_step`` measures: total less a quantized W₀'s
    dequantization transient (one layer's, alive only inside its forward / backward)."""
    return e["total"] - e.get("dequantize_transient", 0)


def _launch(spec: dict, timeout: int) -> dict:
    est = estimate_case(spec)
    cuda = spec.get("device", "cpu").startswith("cuda")
    record = {"case": spec["case"], "batch": spec["batch"], "seq": spec["seq"], "estimate": _estimate_terms(est),
              "limit": spec.get("memory_limit")}
    if not cuda:  # the host's memory: check it first, then cap the worker's address space
        # the step's estimate, transients (1B measured: tracked peak 1.02× the estimate), Python / torch themselves
        need = int(est["total"] * 1.1) + int(1.5 * GiB)
        available = _mem_available()
        record["mem_available_before"] = available
        if need > available:
            record["error"] = (f"does not fit here: the step needs about {need / GiB:.1f} GiB (estimate "
                               f"{est['total'] / GiB:.1f} GiB + margin), {available / GiB:.1f} GiB available; not started")
            return record
        limit = min(available, max(need, int(est["total"] * 1.5) + 6 * GiB))
        record["limit"] = limit  # virtual: torch reserves some
        record["budget"] = spec.get("memory_limit")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"])}
    cmd = [sys.executable, "-m", "rso.train.bench.memory_frontier", "--worker", json.dumps(spec)]
    if not cuda:  # RLIMIT_AS would starve CUDA, which reserves address space far beyond the memory it uses
        cmd = ["prlimit", f"--as={limit}", "--"] + cmd
    if spec.get("nice"):
        cmd = ["nice", "-n", str(spec["nice"])] + cmd
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        record["error"] = f"timeout after {timeout} s"
        return record
    record["wall_s"] = round(time.perf_counter() - t0, 1)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            record.update(json.loads(line[len("RESULT "):]))
            return record
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    text = " | ".join(tail) or f"exit code {proc.returncode}"
    if "can't allocate memory" in text or "MemoryError" in text or "out of memory" in text.lower():
        cap = record["limit"] / GiB if record["limit"] else None
        text = f"out of memory under the {cap:.1f} GiB limit: {text}" if cap else f"out of memory: {text}"
    record["error"] = text
    return record


def _measured_terms(m: dict) -> dict:
    return {"weights": m["parameters"] + m["buffers"], "gradients": m["gradients"], "optimizer": m["optimizer_state"],
            "activations": m["activations"] + m.get("recomputed", 0), "activations_kept": m["activations"],
            "activations_recompute": m.get("recomputed", 0),
            "total": m["parameters"] + m["buffers"] + m["gradients"] + m["optimizer_state"] + m["activations"]
            + m.get("recomputed", 0)}


def _cap_text(meta) -> str:
    if meta.get("device", "cpu").startswith("cuda"):
        cap = meta.get("memory_limit")
        return (f"CUDA allocator capped at {cap / GiB:g} GiB (set_per_process_memory_fraction)" if cap
                else "CUDA, no cap")
    return f"{meta['threads']} threads · {meta['host']}"


def format_table(records: list[dict], meta: dict) -> str:
    cuda = meta.get("device", "cpu").startswith("cuda")
    device_name = next((r["cuda"]["name"] for r in records if r.get("cuda", {}).get("name")), None)
    lines = [f"{meta['model']} · bf16 · batch {meta['batch']} × seq {meta['seq']} · rank {meta['rank']} · "
             + (f"{device_name} · " if device_name else "") + _cap_text(meta), ""]
    if cuda:
        lines += ["| case | batch × seq | weights | gradients | optimizer | activations kept + recomputed | total | "
                  "est. total | meas./est. | step peak allocated | peak reserved (all phases) | measured step s | "
                  "steady step s | tokens/s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    else:
        lines += ["| case | batch × seq | weights | gradients | optimizer | activations kept + recomputed | total | "
                  "est. total | meas./est. | peak live tensors | peak RSS | step s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        e = r["estimate"]
        bs = f"{r.get('batch', meta['batch'])} × {r.get('seq', meta['seq'])}"
        if "error" in r or "measured" not in r:
            lines.append(f"| {r['case']} | {bs} |" + " — |" * 5 + f" {e['total'] / GiB:.2f} GiB |"
                         + f" {str(r.get('error', 'no result')).replace('|', '/')} |"
                         + " |" * ((14 if cuda else 12) - 9))
            continue
        m = _measured_terms(r["measured"])
        row = (f"| {r['case']} | {bs} | {m['weights'] / GiB:.3f} GiB | {m['gradients'] / GiB:.3f} GiB | "
               f"{m['optimizer'] / GiB:.3f} GiB | {m['activations_kept'] / 2 ** 20:.1f} + "
               f"{m['activations_recompute'] / 2 ** 20:.1f} MiB | {m['total'] / GiB:.3f} GiB | {_held(e) / GiB:.3f} GiB | "
               f"{m['total'] / _held(e):.4f} | {r['measured']['peak'] / GiB:.2f} GiB | ")
        if cuda:
            peaks = r.get("cuda", {}).get("peaks", {})
            reserved = max((p["reserved"] for p in peaks.values()), default=0)
            steady = r.get("timed_steps_s")
            row += (f"{reserved / GiB:.2f} GiB | {r['step_s']:.2f} | "
                    + (f"{sorted(steady)[len(steady) // 2]:.2f} | {r['tokens_per_s']:,.0f} |" if steady else "— | — |"))
        else:
            row += f"{r['rss_peak'] / GiB:.2f} GiB | {r['step_s']:.0f} |"
        lines.append(row)
    lines += ["", "Term by term, measured / estimated:"]
    for r in records:
        if "error" in r or "measured" not in r:
            continue
        m, e = _measured_terms(r["measured"]), r["estimate"]
        lines.append(f"  {r['case']}: " + ", ".join(
            f"{k} {m[k] / e[k]:.4f}" for k in ("weights", "gradients", "optimizer", "activations_kept",
                                               "activations_recompute") if e[k])
            + f", total {m['total'] / _held(e):.4f} (measured − estimated: {m['total'] - _held(e):+,} bytes)"
            + (f"; W₀ stored {e['quantize']}, the estimate's total {e['total'] / GiB:.3f} GiB adds one layer's W₀ "
               f"dequantized ({e['dequantize_transient'] / 2 ** 20:.1f} MiB)" if e.get("quantize") else "")
            + (f"; step peak allocated / estimated total {r['measured']['peak'] / e['total']:.3f}" if cuda else ""))
    return "\n".join(lines)


def _parse_batch(text: str):
    if text.strip().lower() == "max":
        return "max"
    value = int(text)
    if value < 1:
        raise ValueError(f"--batch must be ≥ 1 or 'max', got {text!r}")
    return value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rso.train.bench.memory_frontier", description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--config", default="llama-1b", help="an rso.memory preset (llama-1b, llama-7b, …) or config.json")
    p.add_argument("--cases", default="rso,rso+ckpt,adamw",
                   help="comma-separated <method>[+ckpt][+ce][+8bit][+int8|+nf4], method rso | adamw | lora | "
                        "frozen; +int8 / +nf4: RSO's W₀ stored quantized (rso.wrap(quantize=))")
    p.add_argument("--rank", type=int, default=None, help="default: the peers' rank for the preset")
    p.add_argument("--batch", default="1", help="an int, or 'max': the largest batch the estimator fits in "
                                                "--memory-limit-gb less --reserve-gb, per case")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--memory-limit-gb", type=float, default=None,
                   help="cuda: cap the caching allocator at this many GiB (set_per_process_memory_fraction); "
                        "both: the budget --batch max plans against")
    p.add_argument("--reserve-gb", type=float, default=2.0,
                   help="GiB of the limit left out when --batch max plans the batch (CUDA context, slack)")
    p.add_argument("--timed-steps", type=int, default=None,
                   help="ordinary steps timed after the measured one (default: 2 on cuda, 0 on cpu)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--nice", type=int, default=10, help="run each case under nice -n N (0: not niced)")
    p.add_argument("--timeout", type=int, default=7200, help="seconds per case")
    p.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_case(json.loads(args.worker))), flush=True)
        return 0
    from rso.memory.estimate import PEER_RANKS, _load_config
    try:
        cases = [parse_case(c)["case"] for c in args.cases.split(",") if c.strip()]
        _, preset = _load_config(args.config)
        model = model_config(args.config, args.seq)
        batch = _parse_batch(args.batch)
        if batch == "max" and not args.memory_limit_gb:
            raise ValueError("--batch max plans against --memory-limit-gb: give it")
        if args.memory_limit_gb is not None and args.memory_limit_gb <= 0:
            raise ValueError(f"--memory-limit-gb must be positive, got {args.memory_limit_gb}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rank = args.rank or PEER_RANKS.get(preset, model["hidden_size"] // 4)
    limit = int(args.memory_limit_gb * GiB) if args.memory_limit_gb else None
    timed_steps = args.timed_steps if args.timed_steps is not None else (2 if args.device == "cuda" else 0)
    from importlib.metadata import version
    meta = {"model": preset or args.config, "config": model, "rank": rank, "batch": batch, "seq": args.seq,
            "device": args.device, "memory_limit": limit, "reserve": int(args.reserve_gb * GiB),
            "timed_steps": timed_steps, "threads": args.threads,
            "host": f"{platform.machine()} CPU, {os.cpu_count()} cores, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GiB:.0f} GiB RAM",
            "torch": version("torch"), "transformers": version("transformers"),
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
            "command": "python -m rso.train.bench.memory_frontier " + " ".join(argv if argv is not None else sys.argv[1:])}
    records = []
    for case in cases:
        spec = {"case": case, "model": model, "rank": rank, "batch": batch, "seq": args.seq,
                "threads": args.threads, "nice": args.nice, "device": args.device, "memory_limit": limit,
                "timed_steps": timed_steps}
        print(f"[{case}] ...", end=" ", flush=True)
        if batch == "max":
            spec["batch"] = largest_batch(case, model, rank, args.seq, limit - meta["reserve"])
            print(f"batch {spec['batch']} (the largest the estimator fits in {(limit - meta['reserve']) / GiB:g} GiB)",
                  end=" ", flush=True)
        if spec["batch"] == 0:
            spec["batch"] = 1
            rec = {"case": case, "batch": 0, "seq": args.seq, "estimate": _estimate_terms(estimate_case(spec)),
                   "limit": limit,
                   "error": "does not fit at batch 1 by the estimate; not started"}
        else:
            rec = _launch(spec, args.timeout)
        rec["planned_batch"] = batch == "max"
        print(rec.get("error") or f"step {rec['step_s']} s, peak " + (
            f"allocated {rec['measured']['peak'] / GiB:.2f} GiB (estimate {rec['estimate']['total'] / GiB:.2f} GiB)"
            if args.device == "cuda" else f"RSS {rec['rss_peak'] / GiB:.2f} GiB"), flush=True)
        records.append(rec)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"meta": meta, "results": records}, f, indent=1)
    print()
    print(format_table(records, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())

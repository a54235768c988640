"""Measured, not only estimated: one real training step of a large LLaMA on this machine, byte by byte.

    python -m train.bench.memory_frontier --config llama-1b --cases rso,rso+ckpt,adamw --batch 1 --seq 64
    python -m train.bench.memory_frontier --config llama-7b --cases rso+ckpt+ce --rank 256 --batch 1 --seq 128 \\
        --out docs/memory_frontier_7b.json

Each case runs in its own process, which

1. checks the memory it may use first: the estimate of the step (``rso.memory.estimate``) plus a margin
   must be below ``MemAvailable``, else the case is recorded as "does not fit here" and not started;
   the process then sets a hard address-space limit (``RLIMIT_AS``, as ``prlimit --as`` does) so a miss
   ends that process with an out-of-memory error and nothing else;
2. builds the model with random init directly in bf16 (``from_config(config, dtype=bfloat16)``: no fp32
   copy is ever materialized), sets the method up (``train.bench.recipes.setup``; the cycle length is
   set past the step, so no merge happens in it), optionally checkpoints every block
   (``train.methods.enable_activation_checkpointing``) and swaps in 8-bit AdamW;
3. runs one training step under :func:`rso.memory.measure_step` (exact bytes of parameters, gradients,
   optimizer state, saved activations, one block's recomputation, and the peak of live tensors) and
   reads the process's peak resident memory (``ru_maxrss``) and the step's wall time.

Cases are ``<method>[+ckpt][+ce][+8bit]`` with method ``rso`` (``rso-stiefel``), ``adamw``, ``lora`` or
``frozen``. The parent prints estimate against measurement term by term and writes JSON (``--out``).
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

__all__ = ["main", "parse_case", "estimate_case", "run_case"]

_BASES = {"rso": ("rso-stiefel", "rso"), "adamw": ("adamw", "adamw"), "lora": ("lora", "lora"),
          "frozen": ("frozen", "frozen")}


def parse_case(case: str) -> dict:
    """``"rso+ckpt+ce+8bit"`` -> its method and memory savers."""
    base, *flags = case.strip().lower().split("+")
    unknown = [f for f in flags if f not in ("ckpt", "ce", "8bit")]
    if base not in _BASES or unknown:
        raise ValueError(f"case {case!r}: write <method>[+ckpt][+ce][+8bit] with method one of {', '.join(_BASES)}")
    return {"case": case, "method": base, "checkpointing": "ckpt" in flags, "chunked_ce": "ce" in flags,
            "eight_bit": "8bit" in flags}


def model_config(name: str, seq: int) -> dict:
    from rso.memory.estimate import PRESETS, _load_config
    cfg, _ = _load_config(name)
    cfg = dict(cfg)
    cfg.setdefault("vocab_size", 32000)
    cfg.setdefault("tie_word_embeddings", False)
    cfg["max_position_embeddings"] = max(int(cfg.get("max_position_embeddings", 0) or 0), seq, 2048)
    return {k: v for k, v in cfg.items() if k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                      "num_key_value_heads", "num_hidden_layers", "vocab_size",
                                                      "tie_word_embeddings", "max_position_embeddings", "head_dim")}


def estimate_case(spec: dict) -> dict:
    from rso.memory import estimate
    c = parse_case(spec["case"])
    options = {"lora_train_other": True} if c["method"] == "lora" else {}
    return estimate(spec["model"], method=_BASES[c["method"]][1], rank=spec["rank"], batch=spec["batch"],
                    seq=spec["seq"], dtype="bf16", activation_checkpointing=c["checkpointing"],
                    chunked_ce="recompute" if c["chunked_ce"] else False, optimizer_bits=8 if c["eight_bit"] else None,
                    **options)


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def run_case(spec: dict) -> dict:
    """One case in this process (the worker): build, set up, one measured step."""
    import warnings

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rso.memory import measure_step
    from train.bench.recipes import setup
    from train.methods import enable_activation_checkpointing, resolve_optimizer

    warnings.simplefilter("ignore")
    torch.set_num_threads(spec["threads"])
    c = parse_case(spec["case"])
    out = {"case": spec["case"], "threads": spec["threads"]}
    t0 = time.perf_counter()
    config = LlamaConfig(**spec["model"], attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)  # random init in bf16, no fp32 copy
    model.train()
    out["build_s"] = round(time.perf_counter() - t0, 1)
    out["rss_after_build"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["parameter_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
    method = _BASES[c["method"]][0] + ("+ce" if c["chunked_ce"] else "")
    s = setup(method, model, rank=spec["rank"], gap=10 ** 9, tau=10 ** 9, chunk_size=spec.get("chunk_size", 1024))
    model, opt = s.model, s.optimizer
    if c["checkpointing"]:
        enable_activation_checkpointing(model)
    if c["eight_bit"]:
        opt = resolve_optimizer("adamw8bit")([{"params": g["params"], "lr": g["lr"]} for g in opt.param_groups])
    ids = torch.randint(0, config.vocab_size, (spec["batch"], spec["seq"]), generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    report = measure_step(model, {"input_ids": ids, "labels": ids}, opt, track_peak=True)
    out["step_s"] = round(time.perf_counter() - t0, 1)
    out["measured"] = report.as_dict()
    out["rss_peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def _launch(spec: dict, timeout: int) -> dict:
    est = estimate_case(spec)
    # the step's estimate, transients (1B measured: tracked peak 1.02× the estimate), Python / torch themselves
    need = int(est["total"] * 1.1) + int(1.5 * GiB)
    available = _mem_available()
    record = {"case": spec["case"], "estimate": {k: est[k] for k in (
        "weights", "gradients", "optimizer", "activations", "activations_kept", "activations_recompute", "total")},
        "mem_available_before": available, "limit": None}
    if need > available:
        record["error"] = (f"does not fit here: the step needs about {need / GiB:.1f} GiB (estimate "
                           f"{est['total'] / GiB:.1f} GiB + margin), {available / GiB:.1f} GiB available; not started")
        return record
    limit = min(available, max(need, int(est["total"] * 1.5) + 6 * GiB))  # virtual: torch reserves some
    record["limit"] = limit
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"])}
    cmd = ["prlimit", f"--as={limit}", "--", sys.executable, "-m", "train.bench.memory_frontier",
           "--worker", json.dumps(spec)]
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
        text = f"out of memory under the {limit / GiB:.1f} GiB limit: {text}"
    record["error"] = text
    return record


def _measured_terms(m: dict) -> dict:
    return {"weights": m["parameters"] + m["buffers"], "gradients": m["gradients"], "optimizer": m["optimizer_state"],
            "activations": m["activations"] + m.get("recomputed", 0), "activations_kept": m["activations"],
            "activations_recompute": m.get("recomputed", 0),
            "total": m["parameters"] + m["buffers"] + m["gradients"] + m["optimizer_state"] + m["activations"]
            + m.get("recomputed", 0)}


def format_table(records: list[dict], meta: dict) -> str:
    lines = [f"{meta['model']} · bf16 · batch {meta['batch']} × seq {meta['seq']} · rank {meta['rank']} · "
             f"{meta['threads']} threads · {meta['host']}", "",
             "| case | weights | gradients | optimizer | activations kept + recomputed | total | est. total | "
             "meas./est. | peak live tensors | peak RSS | step s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        e = r["estimate"]
        if "error" in r:
            lines.append(f"| {r['case']} | — | — | — | — | — | {e['total'] / GiB:.2f} GiB | — | — | — | {r['error']} |")
            continue
        m = _measured_terms(r["measured"])
        lines.append(
            f"| {r['case']} | {m['weights'] / GiB:.3f} GiB | {m['gradients'] / GiB:.3f} GiB | "
            f"{m['optimizer'] / GiB:.3f} GiB | {m['activations_kept'] / 2 ** 20:.1f} + "
            f"{m['activations_recompute'] / 2 ** 20:.1f} MiB | {m['total'] / GiB:.3f} GiB | {e['total'] / GiB:.3f} GiB | "
            f"{m['total'] / e['total']:.4f} | {r['measured']['peak'] / GiB:.2f} GiB | {r['rss_peak'] / GiB:.2f} GiB | "
            f"{r['step_s']:.0f} |")
    lines += ["", "Term by term, measured / estimated:"]
    for r in records:
        if "error" in r:
            continue
        m, e = _measured_terms(r["measured"]), r["estimate"]
        lines.append(f"  {r['case']}: " + ", ".join(
            f"{k} {m[k] / e[k]:.4f}" for k in ("weights", "gradients", "optimizer", "activations_kept",
                                               "activations_recompute", "total") if e[k]))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.bench.memory_frontier", description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--config", default="llama-1b", help="an rso.memory preset (llama-1b, llama-7b, …) or config.json")
    p.add_argument("--cases", default="rso,rso+ckpt,adamw",
                   help="comma-separated <method>[+ckpt][+ce][+8bit], method rso | adamw | lora | frozen")
    p.add_argument("--rank", type=int, default=None, help="default: the peers' rank for the preset")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=64)
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
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rank = args.rank or PEER_RANKS.get(preset, model["hidden_size"] // 4)
    import torch
    import transformers
    meta = {"model": preset or args.config, "config": model, "rank": rank, "batch": args.batch, "seq": args.seq,
            "threads": args.threads, "host": f"{platform.machine()} CPU, {os.cpu_count()} cores, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GiB:.0f} GiB RAM",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "command": "python -m train.bench.memory_frontier " + " ".join(argv if argv is not None else sys.argv[1:])}
    records = []
    for case in cases:
        spec = {"case": case, "model": model, "rank": rank, "batch": args.batch, "seq": args.seq,
                "threads": args.threads, "nice": args.nice}
        print(f"[{case}] ...", end=" ", flush=True)
        rec = _launch(spec, args.timeout)
        print(rec.get("error") or f"step {rec['step_s']} s, peak RSS {rec['rss_peak'] / GiB:.2f} GiB", flush=True)
        records.append(rec)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"meta": meta, "results": records}, f, indent=1)
    print()
    print(format_table(records, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Issue 14, item 5, the GPU measurements of the memory frontier, in one prepared call.

On the device (one H100/H200, no internet; see docs/benchmarks.md, "GPU rows", for the ``run`` command)::

    python3 -m rso.train.bench.gpu_session --out $OUT --wheels .whl

runs, in this order (most valuable first), each part in its own process group under its own timeout,
going on past a part that fails or times out, all within ``--budget-s`` (default 480 s, so the
call ends well inside the device's 10 minutes):

1. ``7b-16x256``: LLaMA-7B RSO (rank 256, bf16) at batch 16 × 256 with activation checkpointing, with
   and without the chunked head, one step under ``rso.memory.measure_step`` with the CUDA caching
   allocator capped at 24 GiB (``torch.cuda.set_per_process_memory_fraction``), the allocator's peak
   beside the estimator's total, then two timed steps (``rso.train.bench.memory_frontier --device cuda``);
2. ``7b-1x128``: the fallback, batch 1 × 128 — only when the 16 × 256 checkpointed + chunked step
   gave no measurement;
3. ``7b-max``: the same step at the largest batch the estimator fits in 24 GiB less the planner's
   2 GiB reserve (``--batch max``): the estimate at its edge;
4. ``step-eager``: LLaMA-350M and 1B at batch 4 × 1024 (as docs/benchmarks.md §5): tokens/s and
   peak memory of RSO, AdamW and galore-torch (``rso.train.bench.step``); for RSO also the merge step
   against an ordinary step (``--merge-every 4 --merge-cycles 3``: three merges, each step timed, and
   ``rso.outer_step`` alone);
5. ``step-compile``: the same under ``torch.compile`` (inductor), 1B first, with whatever time is left.

Everything goes under ``--out``: ``gpu_session.log`` (every part's output, also echoed), each part's
own JSON (``7b_16x256.json``, ``7b_1x128.json``, ``7b_max.json``, ``step_eager/results.json``,
``step_compile/results.json``), and ``gpu_session.json`` / ``gpu_session.md`` (what each part did and
the numbers pulled together; ``rso.train.bench.step``'s own ``results.md`` tables are folded into the
Markdown and removed), rewritten after every part so a session cut short keeps what finished: at
most 8 files, two folders deep at most, as the device tool returns them.

``--device cpu --dry-run`` runs the same parts, same code paths, on a micro LLaMA on this CPU (the
7B parts become 4 × 16 and 1 × 8 steps of it, ``torch.compile`` uses the ``eager`` backend): the
plumbing in a few minutes on two busy cores, without a GPU. ``--only`` picks parts by name.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import pathlib
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

ROOT = pathlib.Path(__file__).resolve().parents[2]
GiB = 2 ** 30

#: seconds for all parts together: a 10-minute device call less the wheels, the summary and some slack
DEFAULT_BUDGET_S = 480
#: below this many seconds of budget left a part is not started (recorded as skipped)
MIN_PART_S = 20
#: seconds kept back from the budget for writing the summary after the last part
SLACK_S = 10

#: the micro LLaMA of the dry run: bf16 matrix products are slow on CPUs without AVX-512 BF16
DRY_RUN_MODEL = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                 "num_key_value_heads": 4, "num_hidden_layers": 2, "vocab_size": 512, "max_position_embeddings": 64,
                 "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "training": {"rank": 16}}

__all__ = ["Part", "plan", "run_parts", "main", "summarize", "format_summary", "DRY_RUN_MODEL", "DEFAULT_BUDGET_S"]


@dataclass
class Part:
    name: str
    title: str
    cmd: list
    timeout: int
    result: str | None = None          #: the part's own JSON, relative to the output folder
    kind: str = "step"                 #: "frontier" (memory_frontier JSON) or "step" (rso.train.bench.step JSON)
    skip_if: Callable[[dict], str | None] | None = field(default=None, repr=False)  #: records so far -> reason


def _frontier_measured(records: dict, part: str, case: str) -> bool:
    data = (records.get(part) or {}).get("data") or {}
    return any(r.get("case") == case and "measured" in r and "error" not in r for r in data.get("results", []))


def plan(out: pathlib.Path, device: str = "cuda", dry_run: bool = False, memory_limit_gb: float = 24.0,
         python: str = sys.executable) -> list[Part]:
    """The parts of the session, most valuable first."""
    out = pathlib.Path(out)
    cuda = device == "cuda"
    mf = [python, "-m", "rso.train.bench.memory_frontier", "--device", device, "--nice", "0"]
    st = [python, "-m", "rso.train.bench.step", "--device", device, "--dtype", "bf16" if cuda else "fp32", "--no-flops",
          "--methods", "rso-stiefel,adamw,galore-torch", "--merge-every", "4" if cuda else "3",
          "--merge-cycles", "3" if cuda else "2", "--no-cycle-step"]
    if dry_run:
        model = str(out / "dry_run_config.json")
        # the budget --batch max plans against: 4 micro steps of 16 tokens (see the test); reserve 0
        mf += ["--config", model, "--rank", "16", "--memory-limit-gb", "0.001", "--reserve-gb", "0",
               "--timed-steps", "1", "--threads", "1"]
        big, small, seq_small, case_timeout = ("4", "16"), ("1", "8"), "8", 120
        st += ["--batch", "2", "--seq", "16", "--steps", "2", "--warmup", "1", "--threads", "1", "--rank", "16"]
        configs_eager = configs_compile = ["--configs", model]
        compile_opts, method_timeout = ["--compile", "--compile-backend", "eager"], 120
    else:
        mf += ["--config", "llama-7b", "--rank", "256", "--memory-limit-gb", f"{memory_limit_gb:g}", "--timed-steps",
               "2"]
        big, small, seq_small, case_timeout = ("16", "256"), ("1", "128"), "128", 100
        st += ["--batch", "4", "--seq", "1024", "--steps", "5", "--warmup", "2"]
        configs_eager, configs_compile = ["--configs", "350m,1b"], ["--configs", "1b,350m"]
        compile_opts, method_timeout = ["--compile"], 90
    goal = f"{big[0]}x{big[1]}"
    parts = [
        Part("7b-16x256", f"LLaMA-7B RSO step at batch {big[0]} × {big[1]}, checkpointing, with and without the "
             "chunked head, " + ("dry run: a micro LLaMA on CPU, no cap" if dry_run else
                                 f"allocator capped at {memory_limit_gb:g} GiB"),
             mf + ["--cases", "rso+ckpt+ce,rso+ckpt", "--batch", big[0], "--seq", big[1], "--timeout",
                   str(case_timeout), "--out", str(out / "7b_16x256.json")], 200, "7b_16x256.json", "frontier"),
        Part("7b-1x128", f"fallback: the 7B step at batch {small[0]} × {small[1]}",
             mf + ["--cases", "rso+ckpt+ce", "--batch", small[0], "--seq", seq_small, "--timeout", str(case_timeout),
                   "--out", str(out / "7b_1x128.json")], 100, "7b_1x128.json", "frontier",
             skip_if=lambda rec: (f"not needed: the {goal} step (rso+ckpt+ce) was measured"
                                  if _frontier_measured(rec, "7b-16x256", "rso+ckpt+ce") else None)),
        Part("7b-max", "the 7B step at the largest batch the estimator fits in the cap less 2 GiB "
             "(checkpointing + chunked head)",
             mf + ["--cases", "rso+ckpt+ce", "--batch", "max", "--seq", big[1], "--timeout", str(case_timeout),
                   "--out", str(out / "7b_max.json")], 100, "7b_max.json", "frontier"),
        Part("step-eager", "350M and 1B: tokens/s and peak of RSO, AdamW, galore-torch (eager); RSO's merge step "
             "against an ordinary step",
             st + configs_eager + ["--timeout", str(method_timeout), "--out", str(out / "step_eager")],
             220, "step_eager/results.json", "step"),
        Part("step-compile", "the same under torch.compile",
             st + compile_opts + configs_compile + ["--timeout", str(int(method_timeout * 5 / 3)),
                                                    "--out", str(out / "step_compile")],
             400, "step_compile/results.json", "step"),
    ]
    return parts


# ------------------------------------------------------------------------------------------ running parts
class _Log:
    """Lines to the session log and to stdout (the device tool returns stdout's tail)."""

    def __init__(self, path: pathlib.Path, echo: bool = True):
        self.file = open(path, "a", buffering=1)
        self.echo = echo
        self.lock = threading.Lock()

    def write(self, text: str):
        with self.lock:
            self.file.write(text)
            if self.echo:
                sys.stdout.write(text)
                sys.stdout.flush()

    def close(self):
        self.file.close()


def _run(cmd, env, timeout: float, log: _Log) -> tuple[int | None, bool, float]:
    """(exit code, timed out, seconds) of ``cmd`` in its own process group, output to ``log``."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            start_new_session=True, bufsize=1)

    def pump():
        for line in proc.stdout:
            log.write(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)  # the part's own process group: its parent and its workers
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    reader.join(timeout=5)
    return proc.returncode, timed_out, time.monotonic() - t0


def run_parts(parts: list[Part], out: pathlib.Path, env: dict, budget_s: float, log: _Log,
              on_record: Callable[[dict], None] | None = None) -> dict:
    """Run ``parts`` in order within ``budget_s`` seconds; one record per part (none is left out)."""
    out = pathlib.Path(out)
    deadline = time.monotonic() + budget_s
    records: dict[str, dict] = {}
    for part in parts:
        rec = {"name": part.name, "title": part.title, "kind": part.kind,
               "command": " ".join(shlex.quote(str(c)) for c in part.cmd), "timeout_s": part.timeout}
        reason = part.skip_if(records) if part.skip_if else None
        left = deadline - time.monotonic() - SLACK_S
        if reason is None and left < MIN_PART_S:
            reason = f"out of budget: {max(0, left):.0f} s left of {budget_s:.0f} s"
        if reason:
            rec.update(status="skipped", reason=reason)
            log.write(f"\n=== {part.name}: skipped ({reason})\n")
        else:
            timeout = int(min(part.timeout, left))
            rec["timeout_s"] = timeout
            log.write(f"\n=== {part.name}: {part.title}\n=== timeout {timeout} s: {rec['command']}\n")
            rc, timed_out, wall = _run([str(c) for c in part.cmd], env, timeout, log)
            rec.update(rc=rc, wall_s=round(wall, 1),
                       status="timeout" if timed_out else ("ok" if rc == 0 else "failed"))
            log.write(f"=== {part.name}: {rec['status']} (exit code {rc}, {wall:.0f} s)\n")
        if part.kind == "step" and part.result:  # the device returns at most 8 files: fold results.md in
            md = (out / part.result).with_name("results.md")
            if md.exists():
                rec["markdown"] = md.read_text()
                md.unlink()
        path = out / part.result if part.result else None
        if path is not None and path.exists():
            try:
                rec["data"] = json.loads(path.read_text())
                rec["result_file"] = part.result
            except (OSError, ValueError) as exc:
                rec["result_error"] = f"{part.result}: {exc}"
        records[part.name] = rec
        if on_record:
            on_record(records)
    return records


# ------------------------------------------------------------------------------------------------ summary
def _frontier_rows(rec: dict) -> list[dict]:
    rows = []
    for r in (rec.get("data") or {}).get("results", []):
        est = r.get("estimate", {}).get("total")
        row = {"part": rec["name"], "case": r.get("case"), "batch": r.get("batch"), "seq": r.get("seq"),
               "estimate_total": est, "error": r.get("error")}
        if "measured" in r:
            m = r["measured"]
            total = (m["parameters"] + m["buffers"] + m["gradients"] + m["optimizer_state"] + m["activations"]
                     + m.get("recomputed", 0))
            cuda = r.get("cuda", {})
            row.update(measured_total=total, measured_over_estimate=total / est if est else None,
                       step_peak=m.get("peak"), peak_source=m.get("peak_source"), step_s=r.get("step_s"),
                       tokens_per_s=r.get("tokens_per_s"), timed_steps_s=r.get("timed_steps_s"),
                       peak_reserved=max((p["reserved"] for p in cuda.get("peaks", {}).values()), default=None),
                       cap=cuda.get("limit"), cap_respected=cuda.get("cap_respected"), device_name=cuda.get("name"))
        rows.append(row)
    return rows


def _step_rows(rec: dict) -> list[dict]:
    rows = []
    for r in (rec.get("data") or {}).get("results", []):
        row = {"part": rec["name"], "config": _config_name(r.get("config")), "method": r.get("method"),
               "compile": r.get("compile", rec["name"].endswith("compile")), "error": r.get("error")}
        if "error" not in r:
            mem = r.get("memory", {})
            row.update(tokens_per_s=r.get("tokens_per_s"), step_median_s=(r.get("step_s") or {}).get("median"),
                       first_step_s=r.get("first_step_s"), peak=mem.get("peak"), peak_source=mem.get("peak_source"),
                       timed_peak=r.get("timed_peak"),
                       activations=mem.get("activations"), optimizer_state=mem.get("optimizer_state"),
                       batch=r.get("batch"), seq=r.get("seq"), rank=r.get("rank"), dynamo=r.get("dynamo"))
            if r.get("merge"):
                mg = r["merge"]
                row["merge"] = {k: (mg[k]["median"] if isinstance(mg.get(k), dict) else mg.get(k))
                                for k in ("every", "cycles", "ordinary_s", "merge_step_s", "after_merge_s",
                                          "outer_step_s", "merge_over_ordinary", "merge_cost_s", "ordinary_from")}
        rows.append(row)
    return rows


def summarize(records: dict) -> dict:
    frontier = [row for rec in records.values() if rec["kind"] == "frontier" for row in _frontier_rows(rec)]
    steps = [row for rec in records.values() if rec["kind"] == "step" for row in _step_rows(rec)]
    return {"parts": {n: r["status"] for n, r in records.items()}, "frontier": frontier, "steps": steps,
            "merge": [{"config": s["config"], "method": s["method"], "compile": s["compile"], **s["merge"]}
                      for s in steps if s.get("merge")]}


def _gib(x):
    if x is None:
        return "—"
    for unit, size in (("GiB", GiB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(x) >= size:
            return f"{x / size:.2f} {unit}"
    return f"{x} B"


def _config_name(name):
    return pathlib.Path(name).stem if str(name).endswith(".json") else name


def _yes(x):
    return "—" if x is None else ("yes" if x else "**no**")


def _sec(x):
    return "—" if x is None else f"{x:.3f} s"


def format_summary(meta: dict, records: dict, summary: dict) -> str:
    lines = [f"# GPU session, issue 14 item 5 ({'dry run, ' if meta['dry_run'] else ''}{meta['device']})", "",
             f"Command: `{meta['command']}`  ", f"Started {meta['started']}, {meta.get('elapsed_s', 0):.0f} s; "
             f"{meta.get('gpu') or meta['host']}; torch {meta['versions'].get('torch')}, transformers "
             f"{meta['versions'].get('transformers')}, galore-torch {meta['versions'].get('galore-torch')}", "",
             "| part | status | seconds | note |", "|---|---|---:|---|"]
    for r in records.values():
        note = r.get("reason") or ("" if r["status"] == "ok" else f"exit code {r.get('rc')}")
        lines.append(f"| {r['name']} | {r['status']} | {r.get('wall_s', '—')} | {note} |")
    if summary["frontier"]:
        lines += ["", "## The 7B step under the cap", "",
                  "| part | case | batch × seq | estimate | measured (exact terms) | meas./est. | step peak allocated | "
                  "peak reserved | cap respected | measured step s | steady step s | tokens/s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
        for f in summary["frontier"]:
            if f.get("error") or "measured_total" not in f:
                lines.append(f"| {f['part']} | {f['case']} | {f['batch']} × {f['seq']} | {_gib(f['estimate_total'])} | "
                             f"{str(f.get('error') or 'no result').replace('|', '/')} |" + " |" * 7)
                continue
            steady = f.get("timed_steps_s")
            timed = f"{sorted(steady)[len(steady) // 2]:.3f} | {f['tokens_per_s']:,.0f}" if steady else "— | —"
            lines.append(
                f"| {f['part']} | {f['case']} | {f['batch']} × {f['seq']} | {_gib(f['estimate_total'])} | "
                f"{_gib(f['measured_total'])} | {f['measured_over_estimate']:.4f} | {_gib(f['step_peak'])} "
                f"({f['peak_source']}) | {_gib(f.get('peak_reserved'))} | {_yes(f.get('cap_respected'))} | "
                f"{f['step_s']} | {timed} |")
    if summary["steps"]:
        lines += ["", "## Tokens/s and peak memory", "",
                  "| config | method | mode | batch × seq | tokens/s | step median | first step | peak (measured eager "
                  "step) | peak (timed steps) | activations |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for s in summary["steps"]:
            mode = "compile" if s["compile"] else "eager"
            if s.get("error"):
                lines.append(f"| {s['config']} | {s['method']} | {mode} | {str(s['error']).replace('|', '/')} |"
                             + " |" * 6)
                continue
            lines.append(f"| {s['config']} | {s['method']} | {mode} | {s['batch']} × {s['seq']} | "
                         f"{s['tokens_per_s']:,.0f} | {_sec(s['step_median_s'])} | {_sec(s['first_step_s'])} | "
                         f"{_gib(s['peak'])} | {_gib(s.get('timed_peak'))} | {_gib(s['activations'])} |")
    if summary["merge"]:
        lines += ["", "## RSO's merge step against an ordinary step", "",
                  "| config | method | mode | cycle | merges | ordinary step | merge step | × ordinary | "
                  "step after a merge | merge + resample alone |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for m in summary["merge"]:
            ratio = f"{m['merge_over_ordinary']:.2f}" if m.get("merge_over_ordinary") else "—"
            lines.append(f"| {m['config']} | {m['method']} | {'compile' if m['compile'] else 'eager'} | {m['every']} | "
                         f"{m['cycles']} | {_sec(m['ordinary_s'])} | {_sec(m['merge_step_s'])} | {ratio} | "
                         f"{_sec(m['after_merge_s'])} | {_sec(m['outer_step_s'])} |")
    for r in records.values():
        if r.get("markdown"):
            lines += ["", f"## {r['name']}: rso.train.bench.step's tables", "", r["markdown"].strip()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- main
def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    found = {}
    for name in ("torch", "transformers", "galore-torch", "peft", "bitsandbytes"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _gpu_facts() -> str | None:
    try:
        text = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip()
        return text or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _install_wheels(wheels: str, site: pathlib.Path, log: _Log) -> dict:
    """Install the carried wheels (galore-torch, …) into ``site`` without an index or dependencies."""
    files = sorted(glob.glob(os.path.join(os.path.abspath(wheels), "*.whl")))
    if not files:
        return {"status": "skipped", "reason": f"no wheels in {wheels!r}"}
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(site)] + files
    log.write(f"=== wheels: {' '.join(shlex.quote(c) for c in cmd)}\n")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    log.write(proc.stdout + proc.stderr)
    return {"status": "ok" if proc.returncode == 0 else "failed", "rc": proc.returncode,
            "wheels": [os.path.basename(f) for f in files], "site": str(site)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rso.train.bench.gpu_session", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder ($OUT on the device)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--dry-run", action="store_true", help="micro LLaMA stand-ins for every part (with --device cpu)")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="seconds for all parts together")
    p.add_argument("--memory-limit-gb", type=float, default=24.0, help="GiB the 7B steps may allocate (the cap)")
    p.add_argument("--wheels", default=None, help="folder of carried wheels to install first (.whl)")
    p.add_argument("--only", default=None, help="comma-separated part names (default: all)")
    p.add_argument("--quiet", action="store_true", help="log to the file only, not to stdout")
    args = p.parse_args(argv)
    if args.device == "cpu" and not args.dry_run:
        print("error: --device cpu runs only as --dry-run (the real parts need a GPU)", file=sys.stderr)
        return 2
    out = pathlib.Path(args.out).resolve()
    parts = plan(out, args.device, args.dry_run, args.memory_limit_gb)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(names) - {q.name for q in parts})
        if unknown:
            print(f"error: unknown part(s) {', '.join(unknown)}; parts: {', '.join(q.name for q in parts)}",
                  file=sys.stderr)
            return 2
        parts = [q for q in parts if q.name in names]
    out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        (out / "dry_run_config.json").write_text(json.dumps(DRY_RUN_MODEL, indent=1))
    log = _Log(out / "gpu_session.log", echo=not args.quiet)
    t_start = time.monotonic()
    env = dict(os.environ)
    extra = []
    meta = {"device": args.device, "dry_run": args.dry_run, "budget_s": args.budget_s,
            "memory_limit_gb": args.memory_limit_gb, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": "python -m rso.train.bench.gpu_session " + " ".join(
                shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
            "host": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
            "gpu": _gpu_facts() if args.device == "cuda" else None}
    try:
        meta["git"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                                     timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        meta["git"] = None
    if args.wheels:
        site = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / "rso_gpu_session_site"
        meta["wheels"] = _install_wheels(args.wheels, site, log)
        if meta["wheels"]["status"] == "ok":
            extra.append(str(site))
    env["PYTHONPATH"] = os.pathsep.join(extra + [str(ROOT)] + [q for q in env.get("PYTHONPATH", "").split(os.pathsep)
                                                               if q])
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if args.device == "cuda":
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    meta["alloc_conf"] = env.get("PYTORCH_CUDA_ALLOC_CONF")
    sys.path[:0] = extra  # the versions below then include the wheels
    meta["versions"] = _versions()
    galore = meta["versions"].get("galore-torch")
    log.write(f"=== gpu_session: {meta['device']}{' dry run' if args.dry_run else ''}, budget {args.budget_s:.0f} s, "
              f"GPU {meta['gpu']}, versions {meta['versions']}, out {out}\n")
    if not galore:
        log.write("=== note: galore-torch is not installed: its rows will read 'skipped' (carry .whl, --wheels)\n")

    def write(records):
        meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
        summary = summarize(records)
        (out / "gpu_session.json").write_text(json.dumps({"meta": meta, "summary": summary, "parts": [
            {k: v for k, v in r.items() if k != "data"} for r in records.values()]}, indent=1))
        (out / "gpu_session.md").write_text(format_summary(meta, records, summary))

    records = run_parts(parts, out, env, args.budget_s - (time.monotonic() - t_start), log, on_record=write)
    write(records)
    log.write("\n" + (out / "gpu_session.md").read_text())
    log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

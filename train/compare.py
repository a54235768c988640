"""Run several pre-training methods under equal steps and tokens, over seeds, and tabulate their final eval loss.

    python -m rso.train.compare --config tiny --max-steps 300 --rank 64 --tau 200 --seeds 0,1,2 --output-dir runs/compare

Each entry of ``--methods`` is ``method[:projection][[quantize=int8|nf4]][=lr]``, e.g. ``adamw=3e-3``, ``rso:svd``,
``golore@20=1e-2``, ``rso:stiefel[quantize=nf4]=3e-3`` (an option becomes that run's ``--quantize nf4``). Every run
is an ordinary ``python -m rso.train.pretrain`` process (for a seed: the same data order, schedule and token count
for every method), in ``<output-dir>/<entry>_s<seed>``; ``--jobs N`` runs N at once, each pinned to its own
``--threads-per-job`` CPU cores when ``taskset`` is there. Writes ``table.md`` and ``table.json`` (per entry, the
eval loss of each seed and their mean ± std, the sample std; per run, each evaluation's step and loss) and
``curves.png`` (train and eval loss against step, averaged over the seeds). ``--resume`` in the same
``--output-dir`` with the same arguments picks up an interrupted comparison: finished runs are read (if their
settings are still what the command means), a run stopped part-way continues from its last checkpoint
(``rso.train.pretrain --resume``), the rest run. Fine-tuning has its runner in ``rso.train.compare_finetune``, on
the same job runner (:func:`run_jobs`).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time

from . import pretrain
from .checkpoint import CHECKPOINT_NAME
from .loop import UsageError, option_flag, rank_value
from .methods import MethodError, option_applies
from .metrics import MetricsLog, plot_comparison

DEFAULT_METHODS = "adamw,galore,golore@20,rso:stiefel,rso:svd,rso:hybrid"


#: The ``[key=value]`` options of a ``--methods`` entry: each becomes that run's ``--key value``.
ENTRY_OPTIONS = ("quantize", "requantize")
_ENTRY = re.compile(r"^(?P<spec>[^\[\]=]+)(?:\[(?P<options>[^\]]*)\])?(?:=(?P<lr>[^\[\]]+))?$")


def parse_entry(entry: str) -> dict:
    """``method[:projection][[quantize=int8|nf4]][=lr]`` → the entry (a ValueError that names it otherwise)."""
    m = _ENTRY.match(entry)
    items = [item.partition("=") for item in (m["options"] or "").split(",") if item] if m else []
    bad = [k + s + v for k, s, v in items if k not in ENTRY_OPTIONS or not v]
    if not m or bad:
        raise ValueError(f"--methods entry {entry!r}: cannot read {bad[0] if bad else entry!r}; write "
                         f"method[:projection][[key=value,...]][=lr] with keys {', '.join(ENTRY_OPTIONS)}")
    spec, lr, options = m["spec"], m["lr"], {k: v for k, _, v in items}
    method, _, projection = spec.partition(":")
    return {"method": method, "projection": projection or None, "lr": float(lr) if lr else None, "options": options,
            "name": (spec.replace(":", "-").replace("@", "at") + "".join(f"-{k}{v}" for k, v in options.items())
                     + (f"_lr{lr}" if lr else ""))}


def command(entry: dict, seed: int, args, extra: list[str], out: pathlib.Path) -> list[str]:
    cmd = [sys.executable, "-m", "rso.train.pretrain", "--config", args.config, "--method", entry["method"],
           "--max-steps", str(args.max_steps), "--output-dir", str(out), "--no-progress", "--seed", str(seed)]
    for dest in ("rank", "tau"):  # for the methods that read them: an adamw row trains without
        if getattr(args, dest) and option_applies(dest, entry["method"]):
            cmd += [option_flag(dest), str(getattr(args, dest))]
    if entry["projection"]:
        cmd += ["--projection", entry["projection"]]
    for key, value in entry.get("options", {}).items():
        cmd += [option_flag(key), value]
    lr = entry["lr"] if entry["lr"] is not None else args.lr
    if lr is not None:
        cmd += ["--lr", str(lr)]
    if args.threads_per_job:
        cmd += ["--threads", str(args.threads_per_job)]
    return cmd + extra


def display(cmd: list[str]) -> str:
    return "python " + " ".join(shlex.quote(c) for c in cmd[1:] if c != "--no-progress")


def parse_seeds(text: str) -> list[int]:
    """``--seeds``: comma-separated distinct integers (a ValueError that names the flag otherwise)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds: give distinct integer seeds: {text!r} is not a comma-separated list of integers") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: give distinct integer seeds, got {text!r}")
    return seeds


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n − 1; None for fewer than two values)."""
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(entry: dict, runs: list[dict]) -> dict:
    """One entry's row: its runs' final eval losses by seed, their mean ± std, and its size and speed."""
    mine = sorted((r for r in runs if r["entry_name"] == entry["name"]), key=lambda r: r["run_seed"])
    ok = [r for r in mine if r.get("final_eval_loss") is not None]
    mean, std = mean_std([r["final_eval_loss"] for r in ok])
    mem = [v for r in ok for k, v in r.items() if k.startswith("peak_") and v is not None]
    speeds = sorted(r["median_tokens_per_s"] for r in ok if r.get("median_tokens_per_s") is not None)
    return {"name": entry["name"], "method": entry["method"], "projection": entry["projection"],
            "options": entry.get("options", {}), "lr": ok[0]["lr"] if ok else entry["lr"],
            "seeds": [r["run_seed"] for r in ok],
            "eval_losses": [r["final_eval_loss"] for r in ok], "mean": mean, "std": std,
            "failed": {r["run_seed"]: r["error"] for r in mine if r.get("error")},
            "trainable_params": ok[0]["trainable_params"] if ok else None,
            "median_tokens_per_s": speeds[len(speeds) // 2] if speeds else None,
            "peak_memory_mb": max(mem) if mem else None,
            "mean_wall_s": statistics.mean(r["wall_s_this_session"] for r in ok) if ok else None}


def row_label(row: dict) -> str:
    options = ", ".join(f"{k}={v}" for k, v in row.get("options", {}).items())
    return (row["method"] + (f" ({row['projection']})" if row.get("projection") else "")
            + (f" [{options}]" if options else ""))


def table(rows: list[dict], seeds: list[int]) -> str:
    """Markdown: a row per entry, a column per seed, mean ± std and the change against the best AdamW and
    the best GaLore row (by mean; lower is better). Tokens/s is the median run's, peak memory the largest, wall
    time the mean over the seeds of each run's last session (a run continued with ``--resume`` counts from
    there)."""
    def best(method):
        rows_of = [r for r in rows if r["method"] == method and r["mean"] is not None]
        return min(rows_of, key=lambda r: r["mean"]) if rows_of else None

    def vs(r, base):
        return "—" if base is None or base is r else f"{100 * (r['mean'] / base['mean'] - 1):+.2f}%"

    adamw, galore = best("adamw"), best("galore")
    lines = ["| method | lr | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | vs best AdamW | "
             "vs best GaLore | trainable params | tokens/s | peak memory (MB) | wall, last session (s) |",
             "|---|---|" + "---|" * len(seeds) + "---|---|---|---|---|---|---|"]
    for r in rows:
        label = row_label(r)
        by_seed = dict(zip(r["seeds"], r["eval_losses"]))
        cells = [f"{by_seed[s]:.4f}" if s in by_seed else ("failed" if s in r["failed"] else "—") for s in seeds]
        if r["mean"] is None:
            lines.append(f"| {label} | {r['lr']} | " + " | ".join(cells) + " | failed | | | | | | |")
            continue
        spread = f" ± {r['std']:.4f}" if r["std"] is not None else ""
        lines.append(f"| {label} | {r['lr']:g} | " + " | ".join(cells) + f" | {r['mean']:.4f}{spread} | "
                     f"{vs(r, adamw)} | {vs(r, galore)} | {r['trainable_params'] / 1e6:.2f}M | "
                     f"{r['median_tokens_per_s']:,.0f} | {r['peak_memory_mb']:,.0f} | {r['mean_wall_s']:.0f} |")
    failed = [f"{r['name']} seed {s}: {e}" for r in rows for s, e in r["failed"].items()]
    return "\n".join(lines + ([""] + [f"Failed: {f}" for f in failed] if failed else []))


def settings_differ(job: dict, results: dict) -> str:
    """The settings in ``results`` that are not ``job["settings"]`` ("" if none; a key ``results`` lacks is not compared)."""
    return ", ".join(f"{key} {results[key]!r} where the command now means {value!r}"
                     for key, value in job.get("settings", {}).items() if key in results and results[key] != value)


def eval_curve(metrics: str) -> list[list]:
    """A run's evaluations, ``[[step, eval loss], ...]`` by step, from its ``metrics.jsonl`` (a step logged again by
    a resumed run: its last record)."""
    losses = {row["step"]: row["eval_loss"] for row in MetricsLog.read(metrics) if "eval_loss" in row}
    return [[step, losses[step]] for step in sorted(losses)]


def run_records(jobs: list[dict]) -> list[dict]:
    """The jobs as ``table.json`` lists them: name, command and results, without argv, folder and settings."""
    return [{k: v for k, v in j.items() if k not in ("cmd", "output", "settings")} for j in jobs]


def run_jobs(jobs: list[dict], out: pathlib.Path, n_jobs: int = 1, threads_per_job: int | None = None,
             on_done=None, summary=None, spawn=subprocess.Popen, poll_s: float = 1.0,
             reuse: bool = False) -> list[dict]:
    """Run ``jobs``, ``n_jobs`` at once, each a process; returns them in the order they finished.

    A job is a dict with ``name`` (its log: ``<out>/<name>.log``), ``cmd`` (an argv) and ``output`` (the
    folder its ``results.json`` appears in). With ``n_jobs > 1``, ``threads_per_job`` and ``taskset`` on the
    PATH, slot i runs pinned to cores i·t … i·t + t − 1. A job that exits 0 and wrote its results gets them
    (``job.update``); any other gets ``error`` (exit status and the log's last line). ``job["command"]`` is
    the command as a user would type it. ``on_done(job)`` may return more jobs, queued behind the others;
    ``summary(job)`` words a finished job's line. ``spawn`` starts a process (``subprocess.Popen``'s
    signature, its ``poll()`` and ``returncode``). Each started job's command goes to ``<out>/<name>.cmd``;
    with ``reuse``, a job whose ``.cmd`` holds the same command and whose ``results.json`` exists (a run
    finished by an earlier, interrupted invocation) is not run again: its results are read; one whose
    folder holds only a checkpoint (stopped part-way) runs with ``--resume`` added, continuing from it.
    A job may carry ``settings`` (what its command means now, :func:`loop.run_settings`): a results.json that
    says otherwise (the same text under a changed default) is run again from the start, and a continued run
    that ends with other settings (its checkpoint's) gets an ``error``.
    """
    pin = shutil.which("taskset") and n_jobs > 1 and threads_per_job
    pending, running, done = list(jobs), [], []
    slots = list(range(n_jobs))
    while pending or running:
        while pending and slots:
            job = pending.pop(0)
            cmd = job["cmd"]
            job.setdefault("command", display(cmd))
            cmd_file, res_path = out / f"{job['name']}.cmd", pathlib.Path(job["output"]) / "results.json"
            same = reuse and cmd_file.exists() and cmd_file.read_text() == job["command"]
            if same and res_path.exists():
                results = json.loads(res_path.read_text())
                stale = settings_differ(job, results)
                if not stale:
                    job.update(results, reused=True)
                    print(f"reuse {job['name']}: {summary(job) if summary else 'ok'} (finished earlier)", flush=True)
                    done.append(job)
                    pending += (on_done(job) if on_done else None) or []
                    continue
                print(f"rerun {job['name']}: its results.json has {stale}", flush=True)
                same = False  # from the start: its checkpoint, if kept, has the old settings too
            checkpoint = pathlib.Path(job["output"]) / CHECKPOINT_NAME
            resume = same and checkpoint.exists()
            if not resume:  # a run from the start: the runner's own folder, its old checkpoint is stale
                checkpoint.unlink(missing_ok=True)
            cmd_file.write_text(job["command"])
            slot = slots.pop(0)
            if resume:
                cmd = cmd + ["--resume"]
            if pin:
                cores = ",".join(str(slot * threads_per_job + i) for i in range(threads_per_job))
                cmd = ["taskset", "-c", cores] + cmd
            log = open(out / f"{job['name']}.log", "a" if resume else "w")
            print(f"{'continue' if resume else 'start'} {job['name']}: {job['command']}"
                  + (" --resume (from its checkpoint)" if resume else ""), flush=True)
            running.append((job, slot, spawn(cmd, stdout=log, stderr=subprocess.STDOUT), log, time.time()))
        if running and all(proc.poll() is None for _, _, proc, _, _ in running):
            time.sleep(poll_s)
        for item in list(running):
            job, slot, proc, log, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            slots.append(slot)
            log.close()
            res_path = pathlib.Path(job["output"]) / "results.json"
            results = json.loads(res_path.read_text()) if proc.returncode == 0 and res_path.exists() else None
            stale = results is not None and settings_differ(job, results)
            if results is not None and not stale:
                job.update(results)
                line = summary(job) if summary else "ok"
                print(f"done  {job['name']}: {line} ({time.time() - t0:.0f}s)", flush=True)
            elif stale:
                job["error"] = (f"it ran with {stale}, continued from a checkpoint saved under other settings: "
                                f"remove {job['output']} and run again")
            else:
                tail = (out / f"{job['name']}.log").read_text().strip().splitlines()[-1:] or ["?"]
                job["error"] = f"exit {proc.returncode}: {tail[0][:200]}"
            if "error" in job:
                print(f"FAIL  {job['name']}: {job['error']}", flush=True)
            done.append(job)
            pending += (on_done(job) if on_done else None) or []
    return done


def main(argv=None, *, spawn=subprocess.Popen) -> int:
    p = argparse.ArgumentParser(prog="python -m rso.train.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated method[:projection][[quantize=int8|nf4]][=lr] entries")
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--rank", type=rank_value, default=None, help="passed to the runs whose method takes a rank")
    p.add_argument("--tau", type=int, default=None, help="passed to the runs whose method takes a τ")
    p.add_argument("--lr", type=float, default=None, help="LR for entries without their own")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; each entry runs once per seed")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads-per-job", type=int, default=None)
    p.add_argument("--resume", action="store_true",
                   help="read the runs an interrupted comparison finished, continue those it left part-way")
    p.add_argument("--output-dir", default="runs/compare")
    args, extra = p.parse_known_args(argv)
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as e:
        p.error(str(e))
    if args.jobs < 1:
        p.error(f"--jobs must be ≥ 1, got {args.jobs}")
    out = pathlib.Path(args.output_dir)
    try:
        entries = [parse_entry(e) for e in re.split(r",(?![^\[]*\])", args.methods) if e]
    except ValueError as e:
        p.error(str(e))
    jobs = []
    for seed in seeds:  # seed-major: every method has a first seed before any has a second
        for entry in entries:
            name = f"{entry['name']}_s{seed}"
            cmd = command(entry, seed, args, extra, out / name)
            try:  # each run's command line checked by rso.train.pretrain's parser, before any run
                settings = pretrain.command_settings(cmd[3:])
            except (UsageError, MethodError) as e:
                p.error(f"--methods entry {entry['name']!r}: {e}")
            jobs.append({"name": name, "entry_name": entry["name"], "run_seed": seed, "output": out / name,
                         "cmd": cmd, "settings": settings})
    out.mkdir(parents=True, exist_ok=True)
    run_jobs(jobs, out, args.jobs, args.threads_per_job, reuse=args.resume, spawn=spawn, poll_s=0.5,
             summary=lambda e: f"eval loss {e['final_eval_loss']:.4f}, ppl {e['final_eval_ppl']:.2f}")
    rows = [summarize(e, jobs) for e in entries]
    text = table(rows, seeds)
    finished = [j for j in jobs if "metrics" in j and not j.get("error")]
    for job in finished:
        job["evals"] = eval_curve(job["metrics"])
    png = plot_comparison({r["name"]: [j["metrics"] for j in finished if j["entry_name"] == r["name"]] for r in rows},
                          out / "curves.png", f"{args.config}, {args.max_steps} steps, seeds {args.seeds}")
    if png:
        text += f"\n\nLoss curves: {png}"
    command_line = display([sys.executable, "-m", "rso.train.compare", *(sys.argv[1:] if argv is None else argv)])
    (out / "table.md").write_text(text + f"\n\nCommand:\n\n    {command_line}\n\nRuns:\n\n"
                                  + "\n".join(f"    {j['command']}" for j in jobs) + "\n")
    (out / "table.json").write_text(json.dumps(
        {"command": command_line, "seeds": seeds, "methods": rows,
         "runs": run_records(jobs)}, indent=2, default=str))
    print(text)
    print(f"table: {out / 'table.md'}")
    return 0 if all("error" not in j for j in jobs) else 1


if __name__ == "__main__":
    sys.exit(main())

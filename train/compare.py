"""Run several pre-training methods under equal steps and tokens and tabulate their final eval loss.

    python -m train.compare --config tiny --max-steps 300 --rank 64 --tau 200 --output-dir runs/compare

Each entry of ``--methods`` is ``method[:projection][=lr]``, e.g. ``adamw=3e-3``, ``rso:svd``,
``golore@20=1e-2``. Every run is an ordinary ``python -m train.pretrain`` process (same seed, data
order, schedule and token count); ``--jobs N`` runs N at once, each pinned to its own
``--threads-per-job`` CPU cores when ``taskset`` is there. Writes ``table.md`` and ``table.json``.
Fine-tuning has its runner in ``train.compare_finetune``, on the same job runner (:func:`run_jobs`).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import shutil
import subprocess
import sys
import time

DEFAULT_METHODS = "adamw,galore,golore@20,rso:stiefel,rso:svd,rso:hybrid"


def parse_entry(entry: str) -> dict:
    spec, _, lr = entry.partition("=")
    method, _, projection = spec.partition(":")
    return {"method": method, "projection": projection or None, "lr": float(lr) if lr else None,
            "name": (spec.replace(":", "-").replace("@", "at") + (f"_lr{lr}" if lr else ""))}


def command(entry: dict, args, extra: list[str], out: pathlib.Path) -> list[str]:
    cmd = [sys.executable, "-m", "train.pretrain", "--config", args.config, "--method", entry["method"],
           "--max-steps", str(args.max_steps), "--output-dir", str(out), "--no-progress", "--seed", str(args.seed)]
    if args.rank:
        cmd += ["--rank", str(args.rank)]
    if args.tau:
        cmd += ["--tau", str(args.tau)]
    if entry["projection"]:
        cmd += ["--projection", entry["projection"]]
    lr = entry["lr"] if entry["lr"] is not None else args.lr
    if lr is not None:
        cmd += ["--lr", str(lr)]
    if args.threads_per_job:
        cmd += ["--threads", str(args.threads_per_job)]
    return cmd + extra


def display(cmd: list[str]) -> str:
    return "python " + " ".join(shlex.quote(c) for c in cmd[1:] if c != "--no-progress")


def table(rows: list[dict], baseline: str = "adamw") -> str:
    bases = [r for r in rows if r["method"] == baseline and r.get("final_eval_loss") is not None]
    base = min(bases, key=lambda r: r["final_eval_loss"]) if bases else None  # the best AdamW row
    lines = ["| method | lr | eval loss | eval ppl | Δ loss vs best AdamW | trainable params | tokens/s | peak memory (MB) | wall (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label = r["method"] + (f" ({r['projection']})" if r.get("projection") else "")
        if r.get("final_eval_loss") is None:
            lines.append(f"| {label} | {r.get('lr')} | failed: {r.get('error', '?')} | | | | | | |")
            continue
        delta = "" if base is None else f"{100 * (r['final_eval_loss'] / base['final_eval_loss'] - 1):+.2f}%"
        mem = next((v for k, v in r.items() if k.startswith("peak_")), None)
        lines.append(f"| {label} | {r['lr']:g} | {r['final_eval_loss']:.4f} | {r['final_eval_ppl']:.2f} | {delta} | "
                     f"{r['trainable_params'] / 1e6:.2f}M | {r['median_tokens_per_s']:,.0f} | "
                     f"{mem:,.0f} | {r['wall_s_this_session']:.0f} |")
    return "\n".join(lines)


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
    finished by an earlier, interrupted invocation) is not run again: its results are read.
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
            if reuse and res_path.exists() and cmd_file.exists() and cmd_file.read_text() == job["command"]:
                job.update(json.loads(res_path.read_text()), reused=True)
                print(f"reuse {job['name']}: {summary(job) if summary else 'ok'} (finished earlier)", flush=True)
                done.append(job)
                pending += (on_done(job) if on_done else None) or []
                continue
            cmd_file.write_text(job["command"])
            slot = slots.pop(0)
            if pin:
                cores = ",".join(str(slot * threads_per_job + i) for i in range(threads_per_job))
                cmd = ["taskset", "-c", cores] + cmd
            log = open(out / f"{job['name']}.log", "w")
            print(f"start {job['name']}: {job['command']}", flush=True)
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
            if proc.returncode == 0 and res_path.exists():
                job.update(json.loads(res_path.read_text()))
                line = summary(job) if summary else "ok"
                print(f"done  {job['name']}: {line} ({time.time() - t0:.0f}s)", flush=True)
            else:
                tail = (out / f"{job['name']}.log").read_text().strip().splitlines()[-1:] or ["?"]
                job["error"] = f"exit {proc.returncode}: {tail[0][:200]}"
                print(f"FAIL  {job['name']}: {job['error']}", flush=True)
            done.append(job)
            pending += (on_done(job) if on_done else None) or []
    return done


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated method[:projection][=lr] entries")
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--tau", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="LR for entries without their own")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads-per-job", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="reuse the runs an interrupted comparison finished")
    p.add_argument("--output-dir", default="runs/compare")
    args, extra = p.parse_known_args(argv)
    out = pathlib.Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = [parse_entry(e) for e in args.methods.split(",") if e]
    for entry in entries:
        entry["cmd"], entry["output"] = command(entry, args, extra, out / entry["name"]), out / entry["name"]
    done = run_jobs(entries, out, args.jobs, args.threads_per_job, reuse=args.resume,
                    summary=lambda e: f"eval loss {e['final_eval_loss']:.4f}, ppl {e['final_eval_ppl']:.2f}")
    order = {e["name"]: i for i, e in enumerate(entries)}
    done.sort(key=lambda e: order[e["name"]])
    text = table(done)
    (out / "table.md").write_text(text + "\n\nCommands:\n\n" + "\n".join(f"    {e['command']}" for e in done) + "\n")
    (out / "table.json").write_text(json.dumps([{k: v for k, v in e.items() if k not in ("cmd", "output")}
                                                for e in done], indent=2, default=str))
    print(text)
    print(f"table: {out / 'table.md'}")
    return 0 if all("error" not in e for e in done) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Fine-tune with several methods × learning rates × seeds and tabulate them, the LR chosen on a validation split.

    python -m rso.train.compare_finetune --task rotten_tomatoes --seeds 0,1,2 --val-from-train 500 \\
        --jobs 2 --threads-per-job 1 --output-dir runs/ft-compare/rt -- \\
        --max-train 4000 --epochs 1 --batch-size 32 --max-length 64 --max-eval 2000 --eval-every 125

Each entry of ``--methods`` is ``method[:projection][[key=value,...]][=lr/lr/...]``, e.g. ``adamw=2e-5/5e-5/1e-4``,
``rso:hybrid``, ``lora[rank=16]=5e-4/1e-3``, ``golore@20[rank=4,scale=4,tau=500]``, ``rso[state=project]``
(keys: rank (for rso also a fraction of each layer's input width: ``rso[rank=1/6]``), tau, scale, state:
rso.train.finetune's ``--subspace-state``, embeddings=frozen|trained: ``--[no-]freeze-embeddings``, quantize=int8|nf4:
``--quantize`` (rso: a quantized W₀; lora: QLoRA), e.g. ``lora[quantize=nf4]=4e-3``; and ``seeds=N``: this
entry runs only the first N of ``--seeds``, e.g. a one-seed diagnostic row in a 3-seed table);
an entry without learning rates sweeps ``--lr-factors`` × the method's default LR in ``rso.train.finetune``.

Every run is an ordinary ``python -m rso.train.finetune`` process with ``--val-from-train N``: N training
examples (the same fixed draw for every run) are held out as a validation split and not trained on
(``--max-train`` then counts the examples left). For each entry with
more than one LR, the first seed runs at each LR; the LR with the best validation metric (accuracy, or
the loss for causal-LM tasks; ties: the smaller LR) is chosen, and the other seeds run at it. The
held-out set (``task.eval``) is what the table reports, mean ± std over the seeds; it never takes part in
the choice. A finished run's checkpoint (and ``--keep-best``'s copy) is deleted unless ``--keep-checkpoints``; ``--eval-every`` set to the
run's length (after ``--``) evaluates once, at the end. Arguments after the runner's own (``--`` first, if you like) go to every run. ``--jobs N``
runs N at once, each pinned to its own ``--threads-per-job`` cores when ``taskset`` is there (the job
runner of ``rso.train.compare``). Runs evaluated more than once (``--eval-every``) get a second table, early stopping
on the validation split: each seed's evaluation with the best validation metric and its held-out metric (the lr
stays the one chosen above). Writes ``table.md``, ``table.json``, ``sweep.png`` (validation metric against lr) and
``curves.png`` (each method's loss curves at its chosen lr, mean over seeds) in ``--output-dir``. ``--resume`` in the same
``--output-dir`` with the same arguments picks up an interrupted comparison: finished runs are read (if their
settings are still what the command means: a changed default reruns them), a run stopped part-way continues
from its checkpoint (``rso.train.finetune --resume``), the rest run.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import re
import statistics
import subprocess
import sys
from fractions import Fraction

from rso.layers.quantized import KINDS, MERGE_MODES
from rso.outer_loop import STATE_POLICIES

from . import finetune
from .best import BEST_NAME
from .checkpoint import CHECKPOINT_NAME
from .compare import display, mean_std, parse_entry, parse_seeds, run_jobs, run_records
from .data import DataError
from .loop import Parser, UsageError, check_rank, given_options, option_flag, rank_value
from .methods import MethodError, option_applies, parse_method
from .metrics import MetricsLog, plot_comparison, plot_sweep
from .models import ConfigError
from .tasks import task_key

DEFAULT_METHODS = "adamw,galore,golore@20,rso:stiefel,rso:hybrid,lora"


def _one_of(*allowed: str):
    def read(text: str) -> str:
        if text not in allowed:
            raise ValueError(text)
        return text
    read.allowed = allowed
    return read


#: Entry options (their readers) and the rso.train.finetune option each sets (the same name unless named here).
ENTRY_OPTIONS = {"rank": rank_value, "tau": int, "scale": float, "state": _one_of(*STATE_POLICIES),
                 "embeddings": _one_of("frozen", "trained"), "quantize": _one_of(*KINDS),
                 "requantize": _one_of(*MERGE_MODES)}
ENTRY_DESTS = {"state": "subspace_state", "embeddings": "freeze_embeddings"}


def _entry_flag(key: str, negated: bool = False) -> str:
    """The rso.train.finetune flag an entry option sets (``embeddings``: the boolean pair's positive form, or with
    ``negated`` its ``--no-`` form)."""
    flag = option_flag(ENTRY_DESTS.get(key, key))
    return "--no-" + flag[2:] if negated else flag


#: Entry options the runner itself reads: ``seeds=N`` runs the entry with the first N of ``--seeds`` only.
RUNNER_OPTIONS = {"seeds": int}
#: rso.train.finetune options the runner sets itself (per entry, per job, or with its own flags).
RUNNER_SETS = {"method": "the entries of --methods", "projection": "an entry's method:projection",
               "lr": "an entry's =lr/lr/... or --lr-factors", "seed": "--seeds", "output_dir": "the runner's --output-dir",
               "val_from_train": "the runner's --val-from-train", "resume": "the runner's own --resume, before --",
               "stop_after": "nothing", "no_save_model": "the runner (--save-models keeps them)",
               "threads": "--threads-per-job"}
_ENTRY = re.compile(r"^(?P<spec>[^\[\]=]+)(?:\[(?P<options>[^\]]*)\])?(?:=(?P<lrs>[^\[\]]+))?$")


def build_parser() -> Parser:
    p = Parser(prog="python -m rso.train.compare_finetune", description=__doc__.split("\n\n")[0], allow_abbrev=False,
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="rotten_tomatoes", help="a rso.train.finetune task")
    p.add_argument("--model", default=None, help="a rso.train.finetune model (None: minilm for classification, smollm2 for xsum)")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma-separated method[:projection][[key=value,...]][=lr/lr/...] entries")
    p.add_argument("--lr-factors", default="0.5,1,2",
                   help="an entry without its own LRs sweeps these multiples of the method's default LR")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; the LR sweep runs the first")
    p.add_argument("--val-from-train", type=int, default=500,
                   help="training examples held out as the validation split the LR is chosen on")
    p.add_argument("--rank", type=rank_value, default=None,
                   help="rank for entries without their own whose method takes one (an int, or for rso a fraction "
                        "of each layer's input width)")
    p.add_argument("--tau", type=int, default=None,
                   help="steps per subspace for entries without their own whose method takes one")
    p.add_argument("--scale", type=float, default=None,
                   help="scale for entries without their own whose method takes one")
    p.add_argument("--jobs", type=int, default=1, help="runs at once")
    p.add_argument("--threads-per-job", type=int, default=None, help="CPU threads (and pinned cores) per run")
    p.add_argument("--save-models", action="store_true",
                   help="let each run save and reload its final model (default: --no-save-model)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each finished run's checkpoint.pt (and --keep-best's best.pt) (default: deleted once its "
                        "results are read)")
    p.add_argument("--resume", action="store_true",
                   help="rerun an interrupted comparison in the same --output-dir: runs that finished with the same "
                        "command and the settings it still means are read, not run again")
    p.add_argument("--output-dir", default="runs/compare-finetune")
    return p


# ----------------------------------------------------------------------------- the plan
def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace("/", ",").split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what}: {text!r} is not a list of numbers") from None
    if not values:
        raise UsageError(f"{what}: no values in {text!r}")
    bad = [v for v in values if not (math.isfinite(v) and v > 0)]
    if bad:
        raise UsageError(f"{what}: each value must be a finite number > 0, got {bad[0]}")
    return values


def split_entries(text: str) -> list[str]:
    """``text`` split at the commas outside brackets."""
    out, depth, word = [], 0, ""
    for ch in text:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            out.append(word)
            word = ""
        else:
            word += ch
    return [w.strip() for w in out + [word] if w.strip()]


def parse_ft_entry(text: str, lr_factors: list[float], task: str = "rotten_tomatoes") -> dict:
    """An entry of ``--methods``: method, projection, options (rank/tau/scale), its LRs, a file-safe name."""
    m = _ENTRY.match(text)
    if not m:
        raise UsageError(f"--methods: cannot read entry {text!r}; write method[:projection][[key=value,...]][=lr/lr]")
    entry = parse_entry(m["spec"])
    try:
        name, _ = parse_method(entry["method"])
    except MethodError as e:
        raise UsageError(f"--methods entry {text!r}: {e}") from None
    options, runner_options, known = {}, {}, {**ENTRY_OPTIONS, **RUNNER_OPTIONS}
    for item in filter(None, (s.strip() for s in (m["options"] or "").split(","))):
        key, eq, value = item.partition("=")
        if key not in known or not eq:
            raise UsageError(f"--methods entry {text!r}: unknown option {item!r}; options: "
                             f"{', '.join(f'{k}=VALUE' for k in known)}")
        try:
            (options if key in ENTRY_OPTIONS else runner_options)[key] = known[key](value)
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"--methods entry {text!r}: {key}: {e}") from None
        except ValueError:
            allowed = getattr(known[key], "allowed", None)
            kind = f"one of {', '.join(allowed)}" if allowed else "a number"
            raise UsageError(f"--methods entry {text!r}: {key} {value!r} is not {kind}") from None
    if runner_options.get("seeds", 1) < 1:
        raise UsageError(f"--methods entry {text!r}: seeds must be ≥ 1, got {runner_options['seeds']}")
    if m["lrs"]:
        lrs = _floats(m["lrs"], f"--methods entry {text!r}")
    else:
        default = finetune.method_defaults(task, entry["method"], entry["projection"]).lr
        lrs = [float(f"{default * f:.3g}") for f in lr_factors]
    lrs = sorted(set(lrs))
    label = entry["method"] + (f" ({entry['projection']})" if entry["projection"] else "")
    label += "".join(f", {k} {_show(v, k == 'rank')}" for k, v in options.items())
    return {"entry": text, "method": entry["method"], "projection": entry["projection"], "options": options,
            "n_seeds": runner_options.get("seeds"), "lrs": lrs, "label": label,
            "name": entry["name"] + "".join(f"-{k}{_show(v, k == 'rank').replace('/', 'of')}" for k, v in options.items())}


def _show(value, fraction: bool = False) -> str:
    """An option's value as written in names, labels and commands: short (``4``, ``0.25``) where that reads back
    as the same number, else (``fraction``: a rank, which ``--rank`` reads as ``1/6`` too) as a fraction with a
    denominator up to 1000 that is the same number, else in full (``0.16666666666666666``)."""
    if not isinstance(value, float):
        return str(value)
    short, ratio = f"{value:g}", Fraction(value).limit_denominator(1000)
    if float(short) == value:
        return short
    return str(ratio) if fraction and float(ratio) == value else repr(value)


def job_command(entry: dict, lr: float, seed: int, args, extra: list[str], folder: pathlib.Path) -> list[str]:
    cmd = [sys.executable, "-m", "rso.train.finetune", "--task", args.task, "--method", entry["method"],
           "--lr", f"{lr:g}", "--seed", str(seed), "--val-from-train", str(args.val_from_train),
           "--output-dir", str(folder), "--no-progress"]
    if args.model:
        cmd += ["--model", args.model]
    if entry["projection"]:
        cmd += ["--projection", entry["projection"]]
    for key in ENTRY_OPTIONS:
        value = entry["options"].get(key, getattr(args, key, None))
        if key not in entry["options"] and not option_applies(ENTRY_DESTS.get(key, key), entry["method"]):
            value = None  # the runner's --rank / --tau / --scale: for the entries whose method reads it
        if key == "embeddings" and value is not None:
            cmd += [_entry_flag(key, negated=value == "trained")]
        elif value is not None:
            cmd += [_entry_flag(key), _show(value, key == "rank")]
    if args.threads_per_job:
        cmd += ["--threads", str(args.threads_per_job)]
    if not args.save_models:
        cmd += ["--no-save-model"]
    return cmd + extra


def make_job(entry: dict, lr: float, seed: int, phase: str, args, extra, out: pathlib.Path) -> dict:
    name = f"{entry['name']}_lr{lr:g}_s{seed}"
    cmd = job_command(entry, lr, seed, args, extra, out / name)
    return {"name": name, "entry_name": entry["name"], "phase": phase, "run_lr": lr, "run_seed": seed,
            "cmd": cmd, "settings": finetune.command_settings(cmd[3:]), "output": out / name}


def plan(args, extra: list[str]) -> list[dict]:
    """The entries, every argument checked (each run's command line parsed by ``rso.train.finetune``'s parser,
    its rank checked against the model where the model's config is known) before any run or data."""
    task_key(args.task)  # an unknown task: a DataError now, not in every run
    for dest, low in (("jobs", 1), ("threads_per_job", 1), ("val_from_train", 1)):
        value = getattr(args, dest)
        if value is not None and value < low:
            raise UsageError(f"{option_flag(dest)} must be ≥ {low}, got {value}")
    try:
        args.seed_list = parse_seeds(args.seeds)
    except ValueError as e:
        raise UsageError(str(e)) from None
    extra[:] = [a for a in extra if a != "--"]
    parser = finetune.build_parser()
    given = given_options(parser, extra)
    taken = [d for d in given if d in RUNNER_SETS]
    if taken:
        raise UsageError(f"{option_flag(taken[0])}: the runner sets it (use {RUNNER_SETS[taken[0]]})")
    # the arguments passed on to every run, beside the runner's validation split: unknown or bad values
    parser.parse_args([*extra, "--val-from-train", str(args.val_from_train)])
    factors = _floats(args.lr_factors, "--lr-factors")
    entries = [parse_ft_entry(e, factors, args.task) for e in split_entries(args.methods)]
    if not entries:
        raise UsageError("--methods: no entries")
    names = [e["name"] for e in entries]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UsageError(f"--methods: two entries are both {dup!r}")
    for entry in entries:
        twice = [k for k in entry["options"] if ENTRY_DESTS.get(k, k) in given]
        if twice:
            flag = _entry_flag(twice[0])
            flag += f" (or {_entry_flag(twice[0], negated=True)})" if twice[0] == "embeddings" else ""
            raise UsageError(f"--methods entry {entry['entry']!r} sets {twice[0]}= and the arguments passed to every "
                             f"run set {flag} too: give it in one place")
    cfg = finetune.model_config(args.model)
    for entry in entries:
        if (entry["n_seeds"] or 0) > len(args.seed_list):
            raise UsageError(f"--methods entry {entry['entry']!r}: seeds={entry['n_seeds']} but --seeds gives "
                             f"{len(args.seed_list)}")
        entry["seed_list"] = args.seed_list[:entry["n_seeds"]]
        for lr in entry["lrs"]:
            argv = job_command(entry, lr, args.seed_list[0], args, extra, pathlib.Path("x"))[3:]
            try:
                check_rank(finetune.build_parser().parse_args(argv), cfg)
            except UsageError as e:
                raise UsageError(f"--methods entry {entry['entry']!r}: {e}") from None
    return entries


# ----------------------------------------------------------------------------- choosing the LR
def val_metric(run: dict) -> float | None:
    """A finished run's validation-split metric (``headline['val_key']`` of its results), or None."""
    if run.get("error") or "headline" not in run:
        return None
    value = run.get(run["headline"]["val_key"])
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def choose_lr(runs: list[dict]) -> float | None:
    """The LR of the sweep run with the best validation-split metric; ties go to the smaller LR.

    Only ``val_metric`` is read: the held-out (reported) metrics of the runs play no part. Failed runs and
    runs without a validation metric are passed over; None if no run has one.
    """
    scored = [(val_metric(r), r["run_lr"]) for r in runs if val_metric(r) is not None]
    if not scored:
        return None
    higher = next(r["headline"]["higher_is_better"] for r in runs if val_metric(r) is not None)
    return min(scored, key=lambda s: (-s[0] if higher else s[0], s[1]))[1]


def best_val_eval(job: dict) -> dict | None:
    """Early stopping on the validation split, read from a finished run's ``metrics.jsonl``: of its evaluations
    (every ``--eval-every`` steps and at the end), the one with the best validation metric (ties: the earlier),
    as ``{"step", "val", "eval", "evaluations"}``: its step, validation and held-out metrics, and how many
    evaluations there were to choose from. None without evaluations."""
    if job.get("error") or "headline" not in job:
        return None
    head, path = job["headline"], pathlib.Path(job["output"]) / "metrics.jsonl"
    val_key, eval_key = head["val_key"].removeprefix("final_"), head["eval_key"].removeprefix("final_")
    if not path.exists():
        return None
    evals = [row for row in MetricsLog.read(path) if val_key in row and eval_key in row]
    if not evals:
        return None
    sign = -1 if head["higher_is_better"] else 1
    best = min(evals, key=lambda row: (sign * row[val_key], row["step"]))
    return {"step": best["step"], "val": best[val_key], "eval": best[eval_key], "evaluations": len(evals)}


# ----------------------------------------------------------------------------- the table
def _fmt(value, metric: str, spread=None) -> str:
    if value is None:
        return "—"
    percent = metric in ("accuracy", "f1")
    scale, digits = (100, 2) if percent else (1, 2 if metric == "eval_ppl" else 4)
    text = f"{scale * value:.{digits}f}"
    if spread is not None:
        text += f" ± {scale * spread:.{digits}f}"
    return text + ("%" if percent else "")


def summarize(entry: dict, jobs: list[dict]) -> dict:
    """One entry's row: the sweep (validation metric per LR), the chosen LR, and over the seed runs at it the
    held-out metric's mean ± std, trainable parameters, peak memory, step time and (``early_stop``) the held-out
    metric at each run's best-validation evaluation (``best_val_eval``)."""
    sweep = [j for j in jobs if j["entry_name"] == entry["name"] and j["phase"] == "sweep"]
    chosen = entry.get("chosen_lr")
    seeds = [j for j in jobs if j["entry_name"] == entry["name"] and j["run_lr"] == chosen
             and j["phase"] in ("sweep", "seed")]
    seeds.sort(key=lambda j: j["run_seed"])
    ok = [j for j in seeds if not j.get("error")]
    row = {"name": entry["name"], "label": entry["label"], "method": entry["method"],
           "projection": entry["projection"], "options": entry["options"], "lrs": entry["lrs"],
           "swept": len(entry["lrs"]) > 1, "chosen_lr": chosen,
           "sweep": [{"lr": j["run_lr"], "seed": j["run_seed"], "val_metric": val_metric(j), "run": j["name"],
                      **({"error": j["error"]} if j.get("error") else {})} for j in sorted(sweep, key=lambda j: j["run_lr"])],
           "runs": [j["name"] for j in seeds], "failed": [j["name"] for j in seeds if j.get("error")]}
    if not ok:
        row["error"] = entry.get("error") or next((j["error"] for j in seeds + sweep if j.get("error")), "no run")
        return row
    head = ok[0]["headline"]
    if entry["projection"] is None and ok[0].get("projection"):  # rso's default projection, as the runs report it
        row["label"] = row["label"].replace(entry["method"], f"{entry['method']} ({ok[0]['projection']})", 1)
    eval_values = [j[head["eval_key"]] for j in ok]
    second = "final_eval_ppl" if head["metric"] == "loss" else "final_eval_loss"
    mean, std = mean_std(eval_values)
    second_mean, second_std = mean_std([j[second] for j in ok])
    memory_key = next((k for k in ok[0] if k.startswith("peak_")), None)
    row.update({"metric": head["metric"], "higher_is_better": head["higher_is_better"], "seeds": [j["run_seed"] for j in ok],
                "n": len(ok), "values": eval_values, "mean": mean, "std": std,
                "secondary": second.removeprefix("final_"), "secondary_mean": second_mean, "secondary_std": second_std,
                "val_at_chosen": val_metric(seeds[0]) if seeds[0]["run_seed"] == entry["seed0"] else None,
                "rank": ok[0].get("rank") if parse_method(entry["method"])[0] != "adamw" else None,
                "trainable_params": ok[0].get("trainable_params"),
                "memory_key": memory_key,
                "peak_memory_mb": max(j[memory_key] for j in ok) if memory_key else None,
                "median_step_s": statistics.median(j["median_step_s"] for j in ok)})
    stops = [best_val_eval(j) for j in ok]
    if all(stops):
        stop_mean, stop_std = mean_std([s["eval"] for s in stops])
        row["early_stop"] = {"values": [s["eval"] for s in stops], "steps": [s["step"] for s in stops],
                             "mean": stop_mean, "std": stop_std, "evaluations": min(s["evaluations"] for s in stops)}
    return row


def headline_metric(rows: list[dict]) -> str:
    """The name of the metric the rows report (the first row that finished has it)."""
    return next((r["metric"] for r in rows if "metric" in r), "metric")


def table(rows: list[dict], info: dict) -> str:
    metric = headline_metric(rows)
    second = next((r["secondary"] for r in rows if "secondary" in r), "eval loss")
    mem = next((r["memory_key"] for r in rows if r.get("memory_key")), "rss_mb")
    mem_label = "peak GPU memory (MB)" if "gpu" in mem else "peak RSS (MB)"
    split = info.get("eval_split", "held-out")
    lines = [f"| method | rank | lr (chosen of swept) | val {metric} at chosen lr | {split} {metric}, mean ± std "
             f"| {split} {second.replace('eval_', '')} | seeds | trainable params | {mem_label} | step time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lrs = "/".join(f"{lr:g}" for lr in r["lrs"])
        if "metric" not in r:
            lines.append(f"| {r['label']} | | {lrs} | failed: {r.get('error', '?')} | | | | | | |")
            continue
        chosen = f"{r['chosen_lr']:g}" + (f" of {lrs}" if r["swept"] else " (not swept)")
        seeds = f"{r['n']}" + (f" ({len(r['failed'])} failed)" if r["failed"] else "")
        lines.append(f"| {r['label']} | {_show(r['rank'], True) if r['rank'] is not None else '—'} | {chosen} | "
                     f"{_fmt(r['val_at_chosen'], r['metric'])} | {_fmt(r['mean'], r['metric'], r['std'])} | "
                     f"{_fmt(r['secondary_mean'], r['secondary'], r['secondary_std'])} | {seeds} | "
                     f"{r['trainable_params'] / 1e6:.2f}M | {r['peak_memory_mb']:,.0f} | {r['median_step_s']:.3f} |")
    stopped = [r for r in rows if "early_stop" in r and r["early_stop"]["evaluations"] > 1]
    if stopped:
        lines += ["", f"Early stopping on the validation split: at the chosen lr, each seed's evaluation with the best "
                  f"validation {metric} (the table above reports the last evaluation):", "",
                  f"| method | {split} {metric} at the best-validation evaluation, mean ± std | by seed (at step) |",
                  "|---|---|---|"]
        for r in stopped:
            stop = r["early_stop"]
            by_seed = ", ".join(f"{_fmt(v, metric)} ({step})" for v, step in zip(stop["values"], stop["steps"]))
            lines.append(f"| {r['label']} | {_fmt(stop['mean'], metric, stop['std'])} | {by_seed} |")
    if not any(r["sweep"] for r in rows):  # every entry ran at one given lr: no sweep to show
        return "\n".join(lines)
    lines += ["", "LR sweep (validation split only; seed "
              f"{info['seeds'][0]}):", "", f"| method | lr | val {metric} |", "|---|---|---|"]
    for r in rows:
        for s in r["sweep"]:
            value = "failed: " + s["error"] if s.get("error") else _fmt(s["val_metric"], metric)
            mark = "**" if s["lr"] == r.get("chosen_lr") else ""
            lines.append(f"| {r['label']} | {mark}{s['lr']:g}{mark} | {value} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def run(args, extra: list[str], entries: list[dict], spawn=subprocess.Popen) -> int:
    out = pathlib.Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed0 = args.seed_list[0]
    by_name = {e["name"]: e for e in entries}
    first = []
    for e in entries:
        e["seed0"] = seed0
        if len(e["lrs"]) > 1:  # sweep with the first seed
            first += [make_job(e, lr, seed0, "sweep", args, extra, out) for lr in e["lrs"]]
        else:
            e["chosen_lr"] = e["lrs"][0]
            first += [make_job(e, e["lrs"][0], s, "seed", args, extra, out) for s in e["seed_list"]]
    jobs = list(first)

    def on_done(job):
        if not args.keep_checkpoints and not job.get("error"):
            for name in (CHECKPOINT_NAME, BEST_NAME):
                (pathlib.Path(job["output"]) / name).unlink(missing_ok=True)
        entry = by_name[job["entry_name"]]
        sweep = [j for j in jobs if j["entry_name"] == entry["name"] and j["phase"] == "sweep"]
        if job["phase"] != "sweep" or any("error" not in j and "headline" not in j for j in sweep):
            return []  # not a sweep run, or the sweep is not over
        entry["chosen_lr"] = choose_lr(sweep)
        if entry["chosen_lr"] is None:
            entry["error"] = "no sweep run finished with a validation metric"
            print(f"FAIL  {entry['name']}: {entry['error']}", flush=True)
            return []
        swept, others = ", ".join(f"{j['run_lr']:g}" for j in sweep), entry["seed_list"][1:]
        print(f"lr    {entry['name']}: {entry['chosen_lr']:g} (the best validation metric of {swept}); "
              f"seeds to run at it: {', '.join(map(str, others)) or 'none'}", flush=True)
        more = [make_job(entry, entry["chosen_lr"], s, "seed", args, extra, out) for s in others]
        jobs.extend(more)
        return more

    def summary(job):
        head = job["headline"]
        val = job.get(head["val_key"])
        return (f"val {head['metric']} {val:.4f}, " if val is not None else "") + \
            f"{job.get('eval_split', 'held-out')} {head['metric']} {job[head['eval_key']]:.4f}"

    run_jobs(first, out, args.jobs, args.threads_per_job, on_done=on_done, summary=summary, spawn=spawn, poll_s=0.5,
             reuse=args.resume)
    rows = [summarize(e, jobs) for e in entries]
    done = [j for j in jobs if "headline" in j]
    info = {"task": args.task, "model": args.model or (done[0]["model"] if done else None),
            "eval_split": done[0]["eval_split"] if done else "held-out", "seeds": args.seed_list,
            "val_from_train": args.val_from_train,
            "train_examples": done[0]["train_examples"] if done else None,
            "val_examples": done[0]["val_examples"] if done else None,
            "eval_examples": done[0]["eval_examples"] if done else None,
            "selection": (f"each method's lr: the best validation-split metric of its sweep (seed {seed0}); the "
                          f"validation split is {args.val_from_train} examples carved from the training data (a fixed "
                          f"draw, the same for every run, not trained on); the held-out set is only reported"),
            "command": display([sys.executable, "-m", "rso.train.compare_finetune", *args.argv]), "extra_args": extra}
    text = table(rows, info)
    png = plot_sweep(rows, out / "sweep.png", headline_metric(rows), f"{info['task']}, {info['model']}: lr sweep, seed {seed0} "
                     "(ringed: the chosen lr)")
    if png:
        text += f"\n\nLR sweep plot: {png}"
    logs = {j["name"]: pathlib.Path(j["output"]) / "metrics.jsonl" for j in done if not j.get("error")}
    png = plot_comparison({r["label"]: [logs[n] for n in r["runs"] if n in logs] for r in rows},
                          out / "curves.png", f"{info['task']}, {info['model']}: each method at its chosen lr, "
                          f"seeds {', '.join(map(str, args.seed_list))}")
    if png:
        text += f"\nLoss curves (train loss; {info['eval_split']} loss): {png}"
    header = (f"Task {info['task']}, model {info['model']}: {info['train_examples']} training examples, "
              f"{info['val_examples']} validation (carved from train), {info['eval_examples']} {info['eval_split']}. "
              f"{info['selection'][0].upper() + info['selection'][1:]}. Mean ± std over seeds "
              f"{', '.join(map(str, args.seed_list))} at the chosen lr (sample std; — for one seed).")
    (out / "table.md").write_text(header + "\n\n" + text + f"\n\nCommand:\n\n    {info['command']}\n\nRuns:\n\n"
                                  + "\n".join(f"    {j['command']}" for j in jobs) + "\n")
    (out / "table.json").write_text(json.dumps(
        {**info, "methods": rows,
         "runs": run_records(jobs)}, indent=2, default=str))
    print(header + "\n\n" + text)
    print(f"table: {out / 'table.md'}")
    return 0 if all(not j.get("error") for j in jobs) and all("error" not in r for r in rows) else 1


def main(argv=None, *, spawn=subprocess.Popen) -> int:
    """Parse and check every argument (one line ``error: ...``, exit status 2, before any run), then run."""
    try:
        args, extra = build_parser().parse_known_args(argv)
        args.argv = list(argv) if argv is not None else sys.argv[1:]
        entries = plan(args, extra)
    except (UsageError, ConfigError, DataError, MethodError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run(args, extra, entries, spawn=spawn)


if __name__ == "__main__":
    sys.exit(main())

"""Metrics: a JSONL log, memory readings, throughput, the mean loss between log lines, and the loss-curve plot."""
from __future__ import annotations

import json
import math
import os
import pathlib
import time

import torch

__all__ = ["MetricsLog", "memory_mb", "memory_label", "plot_curves", "plot_comparison", "Throughput", "IntervalLoss", "perplexity"]


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def memory_mb(device: torch.device | str = "cpu") -> float:
    """Peak CUDA memory allocated on a GPU; the process's resident set size on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import psutil

        return psutil.Process(os.getpid()).memory_info().rss / 2**20
    except ImportError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_label(device) -> str:
    return "gpu_peak_mb" if torch.device(device).type == "cuda" else "rss_mb"


class Throughput:
    """Tokens per second over the interval since the last call."""

    def __init__(self):
        self.t = time.perf_counter()

    def __call__(self, tokens: int) -> float:
        now = time.perf_counter()
        rate = tokens / max(now - self.t, 1e-9)
        self.t = now
        return rate


class IntervalLoss:
    """The mean training loss over the steps since the last log line; checkpoints keep it as [sum, count]."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def add(self, loss: float) -> None:
        self.total += loss
        self.count += 1

    def pop_mean(self) -> float:
        """The mean so far; starts the next interval."""
        mean = self.total / max(self.count, 1)
        self.total, self.count = 0.0, 0
        return mean

    def state_dict(self) -> list:
        return [self.total, self.count]

    def load_state_dict(self, state) -> None:
        self.total, self.count = state


class MetricsLog:
    """Append-only JSONL records; on resume, records past the checkpoint's step are dropped."""

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [r for r in self.read(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    @staticmethod
    def read(path) -> list[dict]:
        out = []
        for line in pathlib.Path(path).read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by a killed run
        return out


def _save(fig, png_path) -> pathlib.Path:
    """Write ``fig`` to ``png_path`` through a temporary file (a reader never sees half a PNG)."""
    import matplotlib.pyplot as plt

    png_path = pathlib.Path(png_path)
    tmp = png_path.with_name(f".{png_path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path


def plot_curves(metrics_path, png_path, title: str = "") -> pathlib.Path | None:
    """Train loss (and eval loss where present) against step, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = MetricsLog.read(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1, alpha=0.8)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, png_path)


def plot_comparison(runs: dict[str, list], png_path, title: str = "") -> pathlib.Path | None:
    """Several methods over seeds: ``runs`` maps a label to its runs' ``metrics.jsonl`` paths. Left, the
    train loss averaged over the seeds at each logged step; right, the eval loss's mean over the seeds with
    a band from the lowest to the highest seed. A path that does not exist (a run moved or pruned) is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(12, 4.5))
    drawn = False
    for label, paths in runs.items():
        records = [MetricsLog.read(path) for path in paths if pathlib.Path(path).exists()]
        for ax, key in ((ax_train, "loss"), (ax_eval, "eval_loss")):
            by_step: dict[int, list[float]] = {}
            for run in records:
                for r in run:
                    if key in r:
                        by_step.setdefault(r["step"], []).append(r[key])
            steps = sorted(s for s, v in by_step.items() if len(v) == len(records))  # steps every seed reached
            if not steps:
                continue
            drawn = True
            mean = [sum(by_step[s]) / len(by_step[s]) for s in steps]
            if key == "loss":
                ax.plot(steps, mean, lw=1, label=label)
            else:
                line, = ax.plot(steps, mean, "o-", lw=1.5, ms=3, label=label)
                ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps],
                                color=line.get_color(), alpha=0.2)
    if not drawn:
        plt.close(fig)
        return None
    for ax, what in ((ax_train, "train loss (mean over seeds)"), (ax_eval, "eval loss (mean; band: min–max over seeds)")):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy loss")
        ax.set_title(what)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, png_path)


def plot_sweep(rows: list[dict], png_path, metric: str, title: str = "") -> pathlib.Path | None:
    """The learning-rate sweeps of a fine-tuning comparison: each swept row's validation ``metric`` against
    its lr (log scale), the chosen lr ringed. ``rows`` are ``rso.train.compare_finetune`` rows (``sweep``: lr,
    val_metric; ``chosen_lr``). None, and no file, when no row has two swept values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = [(r, [s for s in r.get("sweep", []) if s.get("val_metric") is not None]) for r in rows]
    swept = [(r, points) for r, points in swept if len(points) > 1]
    if not swept:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row, points in swept:
        line, = ax.plot([s["lr"] for s in points], [s["val_metric"] for s in points], "o-", lw=1.5, ms=4,
                        label=row["label"])
        chosen = [s for s in points if s["lr"] == row.get("chosen_lr")]
        if chosen:
            ax.plot([chosen[0]["lr"]], [chosen[0]["val_metric"]], "o", ms=11, mfc="none", color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel(f"validation {metric} (first seed)")
    ax.set_title(title or "learning-rate sweep (ringed: the chosen lr)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, png_path)


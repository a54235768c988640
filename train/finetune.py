"""Fine-tune a pretrained model on a task with full AdamW, GaLore, GoLore, RSO or LoRA.

    python -m rso.train.finetune --task rotten_tomatoes --method rso --rank 8 --max-steps 200 --output-dir runs/ft-rt
    python -m rso.train.finetune --task boolq --method golore@20 --output-dir runs/ft-boolq
    python -m rso.train.finetune --task sst2 --model <hub name> ...      # GLUE by name, when online
    python -m rso.train.finetune --task xsum --model smollm2 --method rso --output-dir runs/ft-smollm2

Offline defaults: the packaged MiniLM encoder (``--model minilm``) for classification and the packaged
SmolLM2-135M (``--model smollm2``) for the causal-LM task. At the end the model is unwrapped (RSO
merged, LoRA merged) and saved with ``save_pretrained`` to ``<output-dir>/final``; the script
reloads it with ``from_pretrained`` and checks that it gives the same predictions.

``--val-from-train N`` holds N training examples out as a validation split (the same N for every seed
and method), evaluated beside the held-out set and reported apart from it (``final_val_*`` in
``results.json``): ``python -m rso.train.compare_finetune`` chooses learning rates on it. ``--keep-best`` then stops
early on it: the run ends with the weights of its evaluation with the best validation metric (``rso.train.best``),
and those are what the final evaluation reports and what is saved.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import statistics
import sys
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from .best import BestWeights
from .checkpoint import load_run
from .config import RunConfig
from .data import DataError, default_cache_dir, load_tokenizer
from .loop import (Parser, UsageError, add_optimizer_args, add_runtime_args, add_session_args,
                   apply_activation_checkpointing, check_checkpointing, check_rank, cli_main, eval_mode,
                   fill_step_defaults, method_options, rank_value, resume_args, run_settings, setup_device,
                   start_session, steps_for_epochs, train_loop)
from .methods import MethodError, describe, parse_method, setup_method, unwrap_for_saving
from .metrics import MetricsLog, perplexity, plot_curves
from .models import ConfigError, build_model, load_config, load_smollm2
from .packages import minilm_dir
from .tasks import CAUSAL_LM_TASKS, EpochSampler, Task, compute_metrics, load_task, task_key

class MethodDefaults(NamedTuple):
    """A method's settings when ``--lr`` / ``--rank`` / ``--tau`` / ``--[no-]freeze-embeddings`` are not given."""
    lr: float
    rank: int | float
    tau: int = 100
    freeze_embeddings: bool = False


#: Defaults per method family and task kind. Classification: what the Rotten Tomatoes sweep chose for MiniLM,
#: one epoch of 4,000 examples (docs/finetune_rotten_tomatoes.md; GoLore's: the GoLore@20% sweep at rank 64,
#: for every golore@X). Causal LM: what the XSum sweeps chose for SmolLM2-135M (docs/finetune_xsum.md): AdamW's
#: and LoRA's lr, and RSO's rank and τ, from the 32-step grid (of RSO's rank 8, 32 and 64, rank 64 at τ = 8 did
#: best on the validation split); RSO's frozen embeddings and lr from one-epoch runs with the embeddings frozen
#: (2e-4 … 1.6e-3; 8e-4 and 4e-4 level on validation); GaLore and GoLore ("*") were not swept. "rso:hybrid" is
#: RSO with --projection hybrid (its own sweep); other projections take "rso"'s. A rank and τ are unused by adamw
#: (and τ by lora).
DEFAULTS = {
    "classification": {"adamw": MethodDefaults(2e-4, 8), "rso": MethodDefaults(8e-4, 64),
                       "rso:hybrid": MethodDefaults(4e-4, 64), "lora": MethodDefaults(1e-3, 8),
                       "galore": MethodDefaults(8e-4, 64), "golore": MethodDefaults(8e-4, 64)},
    "causal_lm": {"adamw": MethodDefaults(1e-4, 8), "lora": MethodDefaults(4e-3, 8),
                  "rso": MethodDefaults(8e-4, 64, tau=8, freeze_embeddings=True), "*": MethodDefaults(2e-4, 8)},
}
#: A task's own defaults, which come before its kind's (:data:`DEFAULTS`) key by key. BoolQ: the lrs its
#: three-epoch sweeps chose (docs/finetune_boolq.md; GoLore's: the GoLore@20% sweep, for every golore@X), and
#: RSO's rank 1/6 of each input width (ahead of rank 64 on validation on each of 3 seeds, lr 2e-4 of 1e-4 … 4e-4).
TASK_DEFAULTS = {
    "boolq": {"adamw": MethodDefaults(1e-4, 8), "galore": MethodDefaults(2e-4, 64), "rso": MethodDefaults(2e-4, 1 / 6),
              "rso:hybrid": MethodDefaults(2e-4, 64), "lora": MethodDefaults(5e-4, 8), "golore": MethodDefaults(2e-4, 64)},
}


def method_defaults(task: str, method: str, projection: str | None = None) -> MethodDefaults:
    """LR, rank, τ and the embedding freeze for ``method`` (RSO: with ``projection``) on ``task`` where the
    command line does not set them (:data:`TASK_DEFAULTS`, then :data:`DEFAULTS`)."""
    try:
        key = task_key(task)
    except DataError:  # an unknown task is reported where the task is read
        key = None
    tables = [TASK_DEFAULTS.get(key, {}), DEFAULTS["causal_lm" if key in CAUSAL_LM_TASKS else "classification"]]
    family = parse_method(method)[0].rstrip("@")  # golore@X is golore
    for name in (f"{family}:{projection}", family, "*"):
        for table in tables:
            if name in table:
                return table[name]


class FinetuneParser(Parser):
    """``loop.Parser`` plus the checks of the options only ``rso.train.finetune`` has (:func:`check_finetune_args`)."""

    def parse_known_args(self, args=None, namespace=None):
        parsed, rest = super().parse_known_args(args, namespace)
        check_finetune_args(parsed)
        if any(getattr(parsed, name) is None for name in MethodDefaults._fields):  # given flags and --resume's win
            try:
                defaults = method_defaults(parsed.task, parsed.method, parsed.projection)
            except MethodError as e:
                raise UsageError(str(e)) from None
            for name in MethodDefaults._fields:
                if getattr(parsed, name) is None:
                    setattr(parsed, name, getattr(defaults, name))
        return parsed, rest


def check_finetune_args(args, settled: bool = False) -> None:
    """A UsageError for a ``--val-from-train`` below 1 (one larger than the training set is a DataError once
    the task is read), or for ``--keep-best`` without a validation split: checked once the run's settings are
    ``settled`` (with ``--resume``, a checkpoint's may still come)."""
    if args.val_from_train is not None and args.val_from_train < 1:
        raise UsageError(f"--val-from-train must be ≥ 1, got {args.val_from_train}")
    if args.keep_best and not args.val_from_train and (settled or not args.resume):
        raise UsageError("--keep-best chooses among evaluations on a validation split: give --val-from-train N")


def build_parser() -> Parser:
    p = FinetuneParser(prog="rso-finetune", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="rotten_tomatoes",
                   help="rotten_tomatoes | boolq | xsum (causal LM) | a GLUE task (cola, sst2, mrpc, ...; online)")
    p.add_argument("--model", default=None,
                   help="minilm | smollm2 | a config name/JSON (random init) | an HF model path or name "
                        "(default: minilm for classification, smollm2 for xsum)")
    p.add_argument("--tokenizer", default=None, help="tokenizer spec (default: the model's own)")
    p.add_argument("--method", default="rso", help="adamw | galore | golore | golore@X | rso | lora")
    p.add_argument("--projection", default="stiefel", help="rso: stiefel | gaussian | coordinate | svd | hybrid")
    p.add_argument("--rank", type=rank_value, default=None,
                   help="subspace / LoRA rank (default: 64 rso, galore and golore, 8 lora; boolq: 1/6 rso except --projection hybrid; "
                        "causal LM: 64 rso, 8 others); "
                        "for rso also a fraction of each layer's input width, e.g. 1/6")
    p.add_argument("--tau", type=int, default=None,
                   help="optimizer steps per subspace (default: 100; causal LM: 8 for rso)")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--freeze-embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the token embeddings (and a head tied to them) frozen (default: on for rso on a causal "
                        "LM, off otherwise; lora always keeps them)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak LR (default, classification: 2e-4 adamw, 8e-4 rso, galore and golore, 4e-4 rso hybrid, 1e-3 lora; "
                        "boolq: 1e-4 adamw, 5e-4 lora, 2e-4 galore, golore, rso and rso hybrid; causal LM: 1e-4 adamw, 4e-3 lora, 8e-4 rso, "
                        "2e-4 galore/golore)")
    add_optimizer_args(p)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=128, help="tokens per example (truncation)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: --epochs over the data)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 6%% of the steps)")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--max-train", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--val-from-train", type=int, default=None, metavar="N",
                   help="hold out N training examples (a fixed draw, the same for every seed) as a validation split, "
                        "evaluated beside the held-out set and reported apart (final_val_*); --max-train then "
                        "takes the first examples of the rest")
    p.add_argument("--max-eval", type=int, default=None, help="use only the first N evaluation examples")
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: steps/4)")
    p.add_argument("--keep-best", action="store_true",
                   help="early stopping: end with the weights of the evaluation with the best validation metric "
                        "(needs --val-from-train; its copy is <output-dir>/best.pt)")
    add_session_args(p, output_dir="runs/finetune")
    p.add_argument("--no-save-model", action="store_true", help="skip the final save_pretrained + reload check")
    p.add_argument("--seed", type=int, default=0)
    add_runtime_args(p)
    return p


# ----------------------------------------------------------------------------- model + tokenizer
def model_config(spec: str | None) -> dict | None:
    """The config dict of ``--model`` where it is known without loading the model: a config or ``minilm``."""
    if spec == "minilm":
        return json.loads((minilm_dir() / "config.json").read_text())
    try:
        return load_config(spec) if spec else None
    except ConfigError:
        return None


def load_model_and_tokenizer(c, task: Task, cache_dir):
    """(model, tokenizer, model_class) for ``--model`` and the task's kind."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    c = RunConfig.from_namespace(c)
    tokenizer, seed = c.model.tokenizer, c.training.seed
    causal = task.kind == "causal_lm"
    spec = c.model.model or ("smollm2" if causal else "minilm")
    head = {} if causal else {"num_labels": task.num_labels}
    if spec == "smollm2":
        if not causal:
            raise ConfigError("--model smollm2 is a decoder for the causal-LM task (--task xsum)")
        model = load_smollm2()
        tok = load_tokenizer(tokenizer or "smollm2", cache_dir)
    elif spec == "minilm":
        if causal:
            raise ConfigError("--model minilm is an encoder: use a classification task, or --model smollm2 for xsum")
        path = str(minilm_dir())
        model = AutoModelForSequenceClassification.from_pretrained(path, **head)
        tok = AutoTokenizer.from_pretrained(path)
    else:
        cfg = None
        try:
            cfg = load_config(spec)
        except ConfigError:
            if not (pathlib.Path(spec).exists() or "/" in spec):
                raise
        if cfg is not None:  # a config: random initialization (tests, from-scratch baselines)
            tok = load_tokenizer(tokenizer or cfg["training"].get("tokenizer", "gpt2"), cache_dir)
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            torch.manual_seed(seed)
            model = build_model(cfg, vocab_size=len(tok), pad_token_id=tok.pad_token_id, **head)
        else:
            cls = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
            try:
                model = cls.from_pretrained(spec, **head)
                tok = load_tokenizer(tokenizer or spec, cache_dir)
            except OSError as e:
                raise ConfigError(f"cannot load model {spec!r}: {e}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    cls = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    return model, tok, cls


# ----------------------------------------------------------------------------- encoding
def encode(task: Task, tok, rows: list[dict], max_length: int) -> list[dict]:
    if task.kind != "causal_lm":
        out = []
        for r in rows:
            enc = tok(r["text"], r["text_pair"], truncation="only_second" if r["text_pair"] else True,
                      max_length=max_length) if r["text_pair"] else tok(r["text"], truncation=True, max_length=max_length)
            out.append({"input_ids": enc["input_ids"], "label": r["label"],
                        **({"token_type_ids": enc["token_type_ids"]} if "token_type_ids" in enc else {})})
        return out
    # causal LM: "Article: <document>\nSummary: <summary><eos>", loss on the summary only
    eos = tok.eos_token_id
    suffix = tok("\nSummary:", add_special_tokens=False)["input_ids"]
    out = []
    for r in rows:
        target = tok(" " + r["text_pair"].strip(), add_special_tokens=False)["input_ids"][: max_length // 4] + [eos]
        article = tok("Article: " + r["text"].strip(), add_special_tokens=False)["input_ids"]
        prompt = article[: max(1, max_length - len(target) - len(suffix))] + suffix
        out.append({"input_ids": prompt + target, "labels": [-100] * len(prompt) + target})
    return out


def collate(examples: list[dict], pad_id: int, kind: str) -> dict:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[i, : len(e["input_ids"])] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in examples[0]:  # a pair's segment ids (BERT: 0 for the first text, 1 for the second)
        segments = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            segments[i, : len(e["token_type_ids"])] = torch.tensor(e["token_type_ids"])
        batch["token_type_ids"] = segments
    if kind == "causal_lm":
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        for i, e in enumerate(examples):
            labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
        batch["labels"] = labels
    else:
        dtype = torch.float if kind == "regression" else torch.long
        batch["labels"] = torch.tensor([e["label"] for e in examples], dtype=dtype)
    return batch


def eval_batches(examples, batch_size, pad_id, kind):
    for i in range(0, len(examples), batch_size):
        yield collate(examples[i: i + batch_size], pad_id, kind)


@torch.no_grad()
def predict(model, examples, batch_size, pad_id, kind, device, autocast, max_batches=None) -> torch.Tensor:
    """Logits of a classifier over ``examples`` (or the first ``max_batches`` batches), float32 on CPU."""
    out = []
    with eval_mode(model):
        for i, batch in enumerate(eval_batches(examples, batch_size, pad_id, kind)):
            if max_batches is not None and i >= max_batches:
                break
            batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            with autocast():
                out.append(model(**batch).logits.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def evaluate(model, task: Task, examples, batch_size, pad_id, device, autocast) -> dict:
    total, count, preds, gold = 0.0, 0, [], []
    with eval_mode(model):
        for batch in eval_batches(examples, batch_size, pad_id, task.kind):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                out = model(**batch)
            if task.kind == "causal_lm":
                n = (batch["labels"][:, 1:] != -100).sum().item()
                total, count = total + out.loss.float().item() * n, count + n
            else:
                n = batch["labels"].shape[0]
                total, count = total + out.loss.float().item() * n, count + n
                logits = out.logits.float()
                preds.append(logits.squeeze(-1).cpu() if task.kind == "regression" else logits.argmax(-1).cpu())
                gold.append(batch["labels"].cpu())
    result = {"eval_loss": total / max(count, 1)}
    if task.kind == "causal_lm":
        result["eval_ppl"] = perplexity(result["eval_loss"])
    else:
        result.update(compute_metrics(task, torch.cat(preds), torch.cat(gold)))
    return result


def as_validation(result: dict) -> dict:
    """``evaluate``'s keys for the validation split: ``eval_loss`` -> ``val_loss``, ``accuracy`` -> ``val_accuracy``."""
    return {"val_" + k.removeprefix("eval_"): v for k, v in result.items()}


def headline(task: Task) -> dict:
    """The number a run is judged by: the task's first metric (higher is better), or the loss (causal LM);
    the ``results.json`` keys it has on the held-out set and on the validation split."""
    if task.metrics:
        name = task.metrics[0]
        return {"metric": name, "higher_is_better": True, "eval_key": f"final_{name}", "val_key": f"final_val_{name}"}
    return {"metric": "loss", "higher_is_better": False, "eval_key": "final_eval_loss", "val_key": "final_val_loss"}


def evaluate_all(model, task, eval_set, val_set, batch_size, pad_id, device, autocast) -> dict:
    """The held-out metrics, and the validation split's (``val_*``) where there is one."""
    result = evaluate(model, task, eval_set, batch_size, pad_id, device, autocast)
    if val_set:
        result.update(as_validation(evaluate(model, task, val_set, batch_size, pad_id, device, autocast)))
    return result


# ----------------------------------------------------------------------------- the run
def settle(c: RunConfig, log) -> dict | None:
    """With ``--resume``, the checkpoint's settings into ``c``; the argument checks that need them. The checkpoint."""
    ckpt = load_run(pathlib.Path(c.checkpoint.output_dir)) if c.checkpoint.resume else None
    if ckpt is not None:
        # a checkpoint from before --[no-]freeze-embeddings trained the embeddings, whatever the default is now
        resume_args(c, {"freeze_embeddings": False, "keep_best": False, **ckpt["args"]}, ckpt["step"], log)
    check_finetune_args(argparse.Namespace(val_from_train=c.data.val_from_train, keep_best=c.checkpoint.keep_best,
                                           resume=c.checkpoint.resume), settled=True)
    check_checkpointing(c, model_config(c.model.model))
    check_rank(c.rso, model_config(c.model.model))  # the last argument check: nothing before this reads data
    return ckpt


class Data(NamedTuple):
    task: Task
    train: list
    eval: list
    val: list
    pad_id: int


def load_data(c: RunConfig, log):
    """(data, model, tokenizer, model class): the task encoded, the model on no device yet; fills the run length."""
    d, t = c.data, c.training
    task = load_task(d.task, d.max_train, d.max_eval, val_from_train=d.val_from_train)
    torch.manual_seed(t.seed)
    cache_dir = pathlib.Path(c.runtime.cache_dir) if c.runtime.cache_dir else default_cache_dir()
    model, tok, model_cls = load_model_and_tokenizer(c, task, cache_dir)
    data = Data(task, *(encode(task, tok, rows, d.max_length) for rows in (task.train, task.eval, task.validation)),
                tok.pad_token_id)
    t.steps_per_epoch = max(1, len(data.train) // (d.batch_size * d.grad_accum))
    if t.max_steps is None:
        t.max_steps = steps_for_epochs(t.epochs, t.steps_per_epoch)
    fill_step_defaults(c, warmup=int(0.06 * t.max_steps), evals_per_run=4)
    log(f"task {task.name}: {len(data.train):,} train / "
        + (f"{len(data.val):,} validation (carved from train) / " if data.val else "")
        + f"{len(data.eval):,} {task.eval_split} examples; {task.notes}")
    return data, model, tok, model_cls


def run(c) -> dict:
    """Fine-tune as ``c`` (a RunConfig, or parsed flags) says; returns the results (also in ``results.json``)."""
    log, c = tqdm.write, RunConfig.from_namespace(c)
    ckpt = settle(c, log)
    device, use_bf16, autocast = setup_device(c)
    data, model, tok, model_cls = load_data(c, log)
    model.to(device)
    if c.rso.freeze_embeddings:  # before the optimizer is built: every method trains only what requires grad
        model.get_input_embeddings().weight.requires_grad_(False)
    kind = data.task.kind
    opts = method_options(c, task="causal_lm" if kind == "causal_lm" else "seq_cls", train_embeddings=False)
    model, optimizer = setup_method(c.rso.method, model, opts)
    model = apply_activation_checkpointing(c, model, log)
    batch_size, grad_accum = c.data.batch_size, c.data.grad_accum
    sampler = EpochSampler(len(data.train), batch_size, seed=c.training.seed)
    log(f"model {c.model.model or type(model).__name__}, method {c.rso.method}: {describe(model, optimizer)}")
    log(f"{c.training.max_steps} steps (batch {batch_size} x accum {grad_accum}), lr {c.optimizer.lr:g}, "
        f"warm-up {c.optimizer.warmup}, device {device}{' (bf16 autocast)' if use_bf16 else ''}")
    s = start_session(c, ckpt, model, optimizer, sampler, device, autocast, min_lr_ratio=0.0,
                      desc=f"{data.task.name}/{c.rso.method}", log=log)
    best = BestWeights(pathlib.Path(c.checkpoint.output_dir), headline(data.task),
                       resume_step=s.step if s.resumed else None) if c.checkpoint.keep_best else None

    def measure():
        return evaluate_all(model, data.task, data.eval, data.val, batch_size, data.pad_id, device, autocast)

    def evaluate_now(step):
        result = measure()
        s.progress.log_eval(step, result, f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        if best is not None:
            best.consider(step, result, model)
        return result

    done = train_loop(s, lambda: [collate([data.train[i] for i in sampler.next_indices()], data.pad_id, kind)
                                  for _ in range(grad_accum)],
                      evaluate_now, lambda step, norm, step_s: {"step_s": round(step_s, 4)})
    if done.stopped:
        return {"stopped_at": done.step}
    last_eval = done.last_eval
    if last_eval is None or last_eval[0] != done.step:
        last_eval = (done.step, measure())
        if best is not None:
            best.consider(done.step, last_eval[1], model)
    if best is not None and best.step != done.step:
        kept = best.restore(model)
        log(f"--keep-best: the weights of step {kept} ({best.key} {best.value:.4f}, the best), not of step {done.step}")
        last_eval = (kept, measure())
    return finish(c, s, data, done, last_eval, best, tok, model_cls)


def finish(c: RunConfig, s, data: Data, done, last_eval, best, tok, model_cls) -> dict:
    """``results.json``: the run's numbers, and (unless ``--no-save-model``) the merged model saved and reloaded."""
    out, task = pathlib.Path(c.checkpoint.output_dir), data.task
    png = plot_curves(out / "metrics.jsonl", out / "loss.png", f"{task.name} / {c.rso.method}")
    records = MetricsLog.read(out / "metrics.jsonl")
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    key = s.progress.memory_key
    results = {"task": task.name, "model": c.model.model or ("smollm2" if task.kind == "causal_lm" else "minilm"),
               **run_settings(c), "freeze_embeddings": c.rso.freeze_embeddings, "steps": done.step,
               "train_examples": len(data.train), "val_examples": len(data.val), "eval_examples": len(data.eval),
               "eval_split": task.eval_split, "headline": headline(task),
               **({"best_step": best.step} if best is not None else {}),
               **{f"final_{k}": v for k, v in last_eval[1].items()},
               "trainable_params": sum(p.numel() for p in s.params),
               f"peak_{key}": max((r.get(key, 0) for r in records), default=None),
               "median_step_s": statistics.median(done.step_times) if done.step_times else None,
               "median_tokens_per_s": statistics.median(speeds) if speeds else None,
               "wall_s_this_session": round(s.progress.elapsed(), 1),
               "metrics": str(out / "metrics.jsonl"), "plot": str(png) if png else None}
    if not c.checkpoint.no_save_model:  # unwrap, save a plain HF model, reload it and compare predictions
        results.update(save_and_verify(s.model, tok, model_cls, task, data.eval, c.data.batch_size, data.pad_id,
                                       s.device, out / "final"))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    head = task.metrics[0] if task.metrics else "eval_ppl"
    print(f"final {head} {results.get(f'final_{head}'):.4f}, eval loss {results['final_eval_loss']:.4f} after "
          f"{done.step} steps")
    if data.val:
        key = results["headline"]["val_key"]
        print(f"validation split (carved from train): {key.removeprefix('final_')} {results[key]:.4f}")
    if "saved_model" in results:
        print(f"saved plain model: {results['saved_model']} (reloaded: max |logit diff| "
              f"{results['reload_max_abs_diff']:.2e}, same predictions: {results['reload_same_predictions']})")
    print(f"metrics: {results['metrics']}\nplot: {results['plot']}\nresults: {out / 'results.json'}")
    return results


def save_and_verify(model, tok, model_cls, task, eval_set, batch_size, pad_id, device, folder) -> dict:
    """Unwrap (merge) the model, ``save_pretrained`` it, reload with ``from_pretrained``, compare logits."""
    probe = eval_set[: min(len(eval_set), 4 if task.kind == "causal_lm" else 2 * batch_size)]
    fp32 = contextlib.nullcontext
    before = predict(model, probe, batch_size, pad_id, task.kind, device, fp32)
    plain = unwrap_for_saving(model)
    merged = predict(plain, probe, batch_size, pad_id, task.kind, device, fp32)
    plain.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    reloaded = model_cls.from_pretrained(str(folder)).to(device)
    after = predict(reloaded, probe, batch_size, pad_id, task.kind, device, fp32)

    def same(a, b):
        return bool(torch.equal(a.argmax(-1), b.argmax(-1))) if a.shape[-1] > 1 else bool(torch.allclose(a, b, atol=1e-4))

    return {"saved_model": str(folder),
            "merge_max_abs_diff": (before - merged).abs().max().item(),
            "reload_max_abs_diff": (merged - after).abs().max().item(),
            "reload_same_predictions": same(merged, after) and same(before, after)}


def command_settings(argv: list[str]) -> dict:
    """The :func:`loop.run_settings` that ``rso-finetune argv`` trains with (a fresh run: the defaults filled)."""
    return run_settings(RunConfig.from_namespace(build_parser().parse_args(argv)))


def main(argv=None) -> int:
    """The ``rso-finetune`` command."""
    return cli_main(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

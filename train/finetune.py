"""Fine-tune a pretrained model on a task with full AdamW, GaLore, GoLore, RSO or LoRA.

    python -m train.finetune --task rotten_tomatoes --method rso --rank 8 --max-steps 200 --output-dir runs/ft-rt
    python -m train.finetune --task boolq --method golore@20 --output-dir runs/ft-boolq
    python -m train.finetune --task sst2 --model <hub name> ...      # GLUE by name, when online
    python -m train.finetune --task xsum --model smollm2 --method rso --rank 32 --output-dir runs/ft-smollm2

Offline defaults: the packaged MiniLM encoder (``--model minilm``) for classification and the packaged
SmolLM2-135M (``--model smollm2``) for the causal-LM task. At the end the model is unwrapped (RSO
merged, LoRA merged) and saved with ``save_pretrained`` to ``<output-dir>/final``; the script
reloads it with ``from_pretrained`` and checks that it gives the same predictions.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import pathlib
import sys
import time

import torch
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, find_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .data import DataError, default_cache_dir, load_tokenizer
from .methods import MethodError, MethodOptions, describe, parse_method, setup_method, unwrap_for_saving
from .metrics import MetricsLog, Throughput, memory_label, memory_mb, perplexity, plot_curves
from .models import ConfigError, build_model, load_config, load_smollm2, minilm_dir
from .schedule import cosine_schedule
from .tasks import EpochSampler, Task, compute_metrics, load_task

RUN_ARGS = ("task", "model", "tokenizer", "method", "projection", "rank", "tau", "scale", "lr", "weight_decay",
            "optimizer", "optimizer_args", "batch_size", "grad_accum", "max_length", "max_steps", "epochs", "warmup",
            "grad_clip", "seed", "max_train", "max_eval", "eval_every", "save_every", "log_every", "dtype")

#: Default peak learning rates per method family (full fine-tuning needs a smaller one).
DEFAULT_LR = {"adamw": 5e-5, "lora": 5e-4}
DEFAULT_LR_SUBSPACE = 2e-4


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rso-finetune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="rotten_tomatoes",
                   help="rotten_tomatoes | boolq | xsum (causal LM) | a GLUE task (cola, sst2, mrpc, ...; online)")
    p.add_argument("--model", default=None,
                   help="minilm | smollm2 | a config name/JSON (random init) | an HF model path or name "
                        "(default: minilm for classification, smollm2 for xsum)")
    p.add_argument("--tokenizer", default=None, help="tokenizer spec (default: the model's own)")
    p.add_argument("--method", default="rso", help="adamw | galore | golore | golore@X | rso | lora")
    p.add_argument("--projection", default="stiefel", help="rso: stiefel | gaussian | coordinate | svd | hybrid")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--tau", type=int, default=100, help="optimizer steps per subspace")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak LR (default: {DEFAULT_LR['adamw']:g} adamw, {DEFAULT_LR['lora']:g} lora, "
                        f"{DEFAULT_LR_SUBSPACE:g} rso/galore/golore)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--optimizer", default="adamw", help="any torch.optim or torch_optimizer class by name")
    p.add_argument("--optimizer-args", default="{}", help="extra optimizer keywords as JSON")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=128, help="tokens per example (truncation)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: --epochs over the data)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 6%% of the steps)")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--max-train", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--max-eval", type=int, default=None, help="use only the first N evaluation examples")
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: steps/4)")
    p.add_argument("--save-every", type=int, default=None, help="steps between checkpoints (default: eval-every)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--output-dir", default="runs/finetune")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --output-dir")
    p.add_argument("--stop-after", type=int, default=None,
                   help="end this session after N more steps (as if killed); --resume continues")
    p.add_argument("--no-save-model", action="store_true", help="skip the final save_pretrained + reload check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="bf16", help="autocast dtype on GPU: bf16 | fp32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    return p


# ----------------------------------------------------------------------------- model + tokenizer
def load_model_and_tokenizer(args, task: Task, cache_dir):
    """(model, tokenizer, model_class) for ``--model`` and the task's kind."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    causal = task.kind == "causal_lm"
    spec = args.model or ("smollm2" if causal else "minilm")
    head = {} if causal else {"num_labels": task.num_labels}
    if spec == "smollm2":
        if not causal:
            raise ConfigError("--model smollm2 is a decoder for the causal-LM task (--task xsum)")
        model = load_smollm2()
        tok = load_tokenizer(args.tokenizer or "smollm2", cache_dir)
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
            tok = load_tokenizer(args.tokenizer or cfg["training"].get("tokenizer", "gpt2"), cache_dir)
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            torch.manual_seed(args.seed)
            model = build_model(cfg, vocab_size=len(tok), pad_token_id=tok.pad_token_id, **head)
        else:
            cls = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
            try:
                model = cls.from_pretrained(spec, **head)
                tok = load_tokenizer(args.tokenizer or spec, cache_dir)
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
            out.append({"input_ids": enc["input_ids"], "label": r["label"]})
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
    was_training = model.training
    model.eval()
    out = []
    for i, batch in enumerate(eval_batches(examples, batch_size, pad_id, kind)):
        if max_batches is not None and i >= max_batches:
            break
        batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        with autocast():
            out.append(model(**batch).logits.float().cpu())
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def evaluate(model, task: Task, examples, batch_size, pad_id, device, autocast) -> dict:
    was_training = model.training
    model.eval()
    total, count, preds, gold = 0.0, 0, [], []
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
    model.train(was_training)
    result = {"eval_loss": total / max(count, 1)}
    if task.kind == "causal_lm":
        result["eval_ppl"] = perplexity(result["eval_loss"])
    else:
        result.update(compute_metrics(task, torch.cat(preds), torch.cat(gold)))
    return result


# ----------------------------------------------------------------------------- the run
def run(args) -> dict:
    out = pathlib.Path(args.output_dir)
    ckpt = None
    if args.resume:
        path = find_checkpoint(out)
        if path is None:
            raise CheckpointError(f"--resume: no checkpoint in {out} (expected {out / 'checkpoint.pt'})")
        ckpt = load_checkpoint(path)
        print(f"--resume: continuing {out} with the settings saved in its checkpoint", file=sys.stderr)
        for k in RUN_ARGS:
            if k in ckpt["args"]:
                setattr(args, k, ckpt["args"][k])
    name, _ = parse_method(args.method)  # unknown methods fail before any loading
    if isinstance(args.optimizer_args, str):
        try:
            args.optimizer_args = json.loads(args.optimizer_args)
        except json.JSONDecodeError as e:
            raise MethodError(f"--optimizer-args is not valid JSON: {e}") from e
    if args.lr is None:
        args.lr = DEFAULT_LR.get(name, DEFAULT_LR_SUBSPACE)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_bf16 = device.type == "cuda" and args.dtype == "bf16"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    log = tqdm.write
    cache_dir = pathlib.Path(args.cache_dir) if args.cache_dir else default_cache_dir()

    # ---- task, model, tokenizer
    task = load_task(args.task, args.max_train, args.max_eval)
    torch.manual_seed(args.seed)
    model, tok, model_cls = load_model_and_tokenizer(args, task, cache_dir)
    model.to(device)
    train_set = encode(task, tok, task.train, args.max_length)
    eval_set = encode(task, tok, task.eval, args.max_length)
    pad_id = tok.pad_token_id
    steps_per_epoch = max(1, len(train_set) // (args.batch_size * args.grad_accum))
    if args.max_steps is None:
        args.max_steps = max(1, math.ceil(args.epochs * steps_per_epoch))
    if args.warmup is None:
        args.warmup = int(0.06 * args.max_steps)
    if args.eval_every is None:
        args.eval_every = max(1, args.max_steps // 4)
    if args.save_every is None:
        args.save_every = args.eval_every
    log(f"task {task.name}: {len(train_set):,} train / {len(eval_set):,} {task.eval_split} examples; {task.notes}")

    # ---- method
    opts = MethodOptions(rank=args.rank, tau=args.tau, scale=args.scale, lr=args.lr, weight_decay=args.weight_decay,
                         optimizer=args.optimizer, optimizer_args=dict(args.optimizer_args),
                         projection=args.projection, total_steps=args.max_steps, seed=args.seed,
                         task="causal_lm" if task.kind == "causal_lm" else "seq_cls", train_embeddings=False)
    model, optimizer = setup_method(args.method, model, opts)
    scheduler = cosine_schedule(optimizer, args.warmup, args.max_steps, min_ratio=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    sampler = EpochSampler(len(train_set), args.batch_size, seed=args.seed)
    log(f"model {args.model or type(model).__name__}, method {args.method}: {describe(model, optimizer)}")
    log(f"{args.max_steps} steps (batch {args.batch_size} x accum {args.grad_accum}), lr {args.lr:g}, "
        f"warm-up {args.warmup}, device {device}{' (bf16 autocast)' if use_bf16 else ''}")

    step, interval = 0, [0.0, 0]  # interval: (sum, count) of step losses since the last log line
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        sampler.load_state_dict(ckpt["data"])
        set_rng_state(ckpt["rng"])
        step = int(ckpt["step"])
        interval = list(ckpt.get("log_interval", interval))
        log(f"resumed from {out / 'checkpoint.pt'} at step {step}")
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=step if ckpt is not None else None)

    def checkpoint():
        save_checkpoint(out / "checkpoint.pt", {
            "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "data": sampler.state_dict(), "rng": rng_state(),
            "log_interval": interval,
            "args": {k: getattr(args, k) for k in RUN_ARGS}})

    # ---- the loop
    start_step = step
    model.train()
    mem_key = memory_label(device)
    bar = tqdm(total=args.max_steps, initial=step, desc=f"{task.name}/{args.method}", dynamic_ncols=True,
               disable=args.no_progress, file=sys.stderr)
    speed, t_start, last_eval, tokens_seen = Throughput(), time.perf_counter(), None, 0
    while step < args.max_steps:
        loss_sum = 0.0
        for _ in range(args.grad_accum):
            batch = collate([train_set[i] for i in sampler.next_indices()], pad_id, task.kind)
            tokens_seen += int(batch["attention_mask"].sum())
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                loss = model(**batch).loss / args.grad_accum
            loss.backward()
            loss_sum += loss.item()
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"loss is {loss_sum} at step {step + 1}; lower --lr")
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        interval[0] += loss_sum
        interval[1] += 1

        if step % args.log_every == 0 or step == args.max_steps:
            tps, mem = speed(tokens_seen), memory_mb(device)
            tokens_seen = 0
            mean_loss, interval = interval[0] / max(interval[1], 1), [0.0, 0]
            metrics.log({"step": step, "loss": mean_loss, "lr": lr, "tokens_per_s": round(tps, 1),
                         mem_key: round(mem, 1), "elapsed_s": round(time.perf_counter() - t_start, 2)})
            bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{tps:,.0f}", mem=f"{mem:,.0f}MB", refresh=False)
        bar.update(1)
        if step % args.eval_every == 0 or step == args.max_steps:
            result = evaluate(model, task, eval_set, args.batch_size, pad_id, device, autocast)
            last_eval = (step, result)
            metrics.log({"step": step, **result})
            log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
            speed(0)
        if step % args.save_every == 0 or step == args.max_steps:
            checkpoint()
        if args.stop_after is not None and step - start_step >= args.stop_after and step < args.max_steps:
            bar.close()
            log(f"stopped after {args.stop_after} steps at step {step} (--stop-after); last checkpoint: "
                f"{out / 'checkpoint.pt'}")
            return {"stopped_at": step}
    bar.close()
    if last_eval is None or last_eval[0] != step:
        last_eval = (step, evaluate(model, task, eval_set, args.batch_size, pad_id, device, autocast))
    png = plot_curves(out / "metrics.jsonl", out / "loss.png", f"{task.name} / {args.method}")
    results = {"task": task.name, "model": args.model or ("smollm2" if task.kind == "causal_lm" else "minilm"),
               "method": args.method, "rank": args.rank, "tau": args.tau, "lr": args.lr, "steps": step,
               **{f"final_{k}": v for k, v in last_eval[1].items()},
               "metrics": str(out / "metrics.jsonl"), "plot": str(png) if png else None}

    # ---- unwrap, save a plain HF model, reload it and compare predictions
    if not args.no_save_model:
        results.update(save_and_verify(model, tok, model_cls, task, eval_set, args, pad_id, device, out / "final"))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    head = task.metrics[0] if task.metrics else "eval_ppl"
    value = results.get(f"final_{head}")
    print(f"final {head} {value:.4f}, eval loss {results['final_eval_loss']:.4f} after {step} steps")
    if "saved_model" in results:
        print(f"saved plain model: {results['saved_model']} (reloaded: max |logit diff| "
              f"{results['reload_max_abs_diff']:.2e}, same predictions: {results['reload_same_predictions']})")
    print(f"metrics: {results['metrics']}\nplot: {results['plot']}\nresults: {out / 'results.json'}")
    return results


def save_and_verify(model, tok, model_cls, task, eval_set, args, pad_id, device, folder) -> dict:
    """Unwrap (merge) the model, ``save_pretrained`` it, reload with ``from_pretrained``, compare logits."""
    probe = eval_set[: min(len(eval_set), 4 if task.kind == "causal_lm" else 2 * args.batch_size)]
    fp32 = contextlib.nullcontext
    before = predict(model, probe, args.batch_size, pad_id, task.kind, device, fp32)
    plain = unwrap_for_saving(model)
    merged = predict(plain, probe, args.batch_size, pad_id, task.kind, device, fp32)
    plain.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    reloaded = model_cls.from_pretrained(str(folder)).to(device)
    after = predict(reloaded, probe, args.batch_size, pad_id, task.kind, device, fp32)

    def same(a, b):
        return bool(torch.equal(a.argmax(-1), b.argmax(-1))) if a.shape[-1] > 1 else bool(torch.allclose(a, b, atol=1e-4))

    return {"saved_model": str(folder),
            "merge_max_abs_diff": (before - merged).abs().max().item(),
            "reload_max_abs_diff": (merged - after).abs().max().item(),
            "reload_same_predictions": same(merged, after) and same(before, after)}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ConfigError, DataError, MethodError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""RSO with the unmodified Hugging Face ``transformers.Trainer``.

``rso.wrap`` turns the model's linear layers into ``W₀ + B·P``; the Trainer builds its usual AdamW
over the trainable parameters (the B factors, embeddings, norms, head) and runs its usual loop.
The merges (W₀ ← W₀ + B·P, new P) happen by themselves every τ *optimizer* steps, through
``torch.optim`` step hooks, also with gradient accumulation. A callback checks that after every
optimizer step ``rso.state(model)["cycle"] == global_step // tau``.

Checkpoints are the Trainer's own (``save_strategy="steps"``): each ``checkpoint-N`` folder holds the
effective weights W₀ + B·P under the usual names, so ``AutoModelForCausalLM.from_pretrained`` loads
the trained model, and ``trainer.train(resume_from_checkpoint=...)`` continues the run exactly.

    python examples/hf_trainer.py --max-steps 40 --tau 10 --grad-accum 4 --output-dir runs/hf
    python examples/hf_trainer.py --max-steps 60 --tau 10 --grad-accum 4 --output-dir runs/hf --resume runs/hf/checkpoint-40
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

import rso
from rso.train.data import build_pretraining_data, default_cache_dir
from rso.train.models import build_model, load_config


class Blocks(torch.utils.data.Dataset):
    """Fixed-length token blocks as the dicts a Trainer expects."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


class MergeCheck(TrainerCallback):
    """After each optimizer step, records (global_step, rso cycle) and asserts cycle == step // tau."""

    def __init__(self, model, tau):
        self.model, self.tau, self.seen = model, tau, []

    def on_step_end(self, args, state, control, **kwargs):
        s = rso.state(self.model)
        self.seen.append((state.global_step, s["step"], s["cycle"]))
        expected = state.global_step // self.tau
        if s["step"] != state.global_step or s["cycle"] != expected:
            raise AssertionError(f"after optimizer step {state.global_step}: rso counted {s['step']} steps and "
                                 f"{s['cycle']} merges, expected {state.global_step} and {expected}")


def run(config="tiny", max_steps=40, tau=10, rank=32, grad_accum=4, batch_size=4, seq_len=64, lr=3e-3,
        tokenizer=None, max_docs=None, output_dir=None, seed=0, save_steps=None, resume=None):
    cfg = load_config(config)
    tok, train_loader, eval_loader = build_pretraining_data(
        "embedded", tokenizer or cfg["training"].get("tokenizer", "gpt2"), seq_len, batch_size, seed,
        default_cache_dir(), max_docs=max_docs)
    torch.manual_seed(seed)
    model = build_model(cfg, vocab_size=len(tok))
    model = rso.wrap(model, rank=rank, tau=tau, projection="stiefel", seed=seed)
    print(rso.summary(model))

    check = MergeCheck(model, tau)
    output_dir = output_dir or tempfile.mkdtemp(prefix="rso-hf-trainer-")
    args = TrainingArguments(
        output_dir=output_dir, save_steps=save_steps or max(1, max_steps // 2),
        max_steps=max_steps, per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
        learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=max(1, max_steps // 10), max_grad_norm=1.0,
        logging_steps=max(1, max_steps // 8), report_to=[], seed=seed,
        use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(), disable_tqdm=False,
        dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=Blocks(train_loader.blocks),
                      eval_dataset=Blocks(eval_loader.blocks[:64]), callbacks=[check])
    trainer.train(resume_from_checkpoint=resume)
    eval_loss = trainer.evaluate()["eval_loss"]
    merges = rso.state(model)["cycle"]
    print(f"optimizer steps {trainer.state.global_step}, micro-batches per step {grad_accum}, "
          f"merges {merges} (expected {trainer.state.global_step // tau}): every tau={tau} optimizer steps")
    print(f"eval loss {eval_loss:.4f}")

    # The last checkpoint is a plain HF model folder: a plain loader gets the trained model.
    last = os.path.join(output_dir, f"checkpoint-{trainer.state.global_step}")
    plain = AutoModelForCausalLM.from_pretrained(last)
    plain_loss = Trainer(model=plain, args=args, eval_dataset=Blocks(eval_loader.blocks[:64])).evaluate()["eval_loss"]
    print(f"{last} loaded by AutoModelForCausalLM.from_pretrained: eval loss {plain_loss:.4f}")
    return {"global_step": trainer.state.global_step, "merges": merges, "seen": check.seen, "eval_loss": eval_loss,
            "plain_eval_loss": plain_loss, "checkpoint": last, "model": model}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--tau", type=int, default=10)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--max-docs", type=int, default=None)
    p.add_argument("--output-dir", default=None, help="checkpoint-N folders go here (default: a temporary folder)")
    p.add_argument("--save-steps", type=int, default=None, help="default: max-steps / 2")
    p.add_argument("--resume", default=None, help="a checkpoint-N folder to continue from")
    a = p.parse_args(argv)
    run(a.config, a.max_steps, a.tau, a.rank, a.grad_accum, a.batch_size, a.seq_len, a.lr, a.tokenizer, a.max_docs,
        a.output_dir, save_steps=a.save_steps, resume=a.resume)


if __name__ == "__main__":
    main()

"""Fine-tune an encoder with RSO on a GLUE-style task and save a plain Hugging Face model.

    python examples/finetune_glue.py                              # packaged MiniLM on Rotten Tomatoes (offline)
    python examples/finetune_glue.py --task sst2 --model <hub>    # GLUE by name (needs network)

The full pipeline (every method, metrics per GLUE task, checkpoints, resume) is ``python -m rso.train.finetune``.
"""
import argparse

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import rso
from rso.train.packages import minilm_dir
from rso.train.tasks import compute_metrics, load_task

p = argparse.ArgumentParser()
p.add_argument("--task", default="rotten_tomatoes")
p.add_argument("--model", default=None, help="default: the packaged all-MiniLM-L6-v2")
p.add_argument("--steps", type=int, default=100)
p.add_argument("--rank", type=int, default=8)
p.add_argument("--tau", type=int, default=50)
p.add_argument("--lr", type=float, default=2e-4)
p.add_argument("--batch-size", type=int, default=32)
p.add_argument("--max-eval", type=int, default=500)
a = p.parse_args()

task = load_task(a.task, max_eval=a.max_eval)
path = a.model or str(minilm_dir())
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=task.num_labels)


def batch(rows):
    enc = tok([r["text"] for r in rows], [r["text_pair"] for r in rows] if rows[0]["text_pair"] else None,
              truncation=True, max_length=128, padding=True, return_tensors="pt")
    enc["labels"] = torch.tensor([r["label"] for r in rows])
    return enc


model = rso.wrap(model, rank=a.rank, tau=a.tau)        # attention + MLP linears; classifier trains in full
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr)
g = torch.Generator().manual_seed(0)
model.train()
for step in range(1, a.steps + 1):
    idx = torch.randint(len(task.train), (a.batch_size,), generator=g).tolist()
    loss = model(**batch([task.train[i] for i in idx])).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if step % 10 == 0:
        print(f"step {step}: loss {loss.item():.4f}")

model = rso.unwrap(model).eval()                        # merged: a plain BertForSequenceClassification
with torch.no_grad():
    preds = torch.cat([model(**{k: v for k, v in batch(task.eval[i:i + 64]).items() if k != "labels"}).logits.argmax(-1)
                       for i in range(0, len(task.eval), 64)])
print(task.name, compute_metrics(task, preds, [r["label"] for r in task.eval]))
model.save_pretrained("runs/example-finetuned")
tok.save_pretrained("runs/example-finetuned")
print("saved runs/example-finetuned (loads with AutoModelForSequenceClassification.from_pretrained)")

"""Pre-train a small LLaMA with RSO in ~60 lines: copy this and change what you need.

    python examples/pretrain_llama.py                 # tiny config, embedded offline corpus, CPU-friendly
    python examples/pretrain_llama.py --config 60m --steps 10000 --dataset c4 --rank 128 --tau 200 --lr 1e-3  # the papers' 60M (GPU, online)

The full pipeline (checkpoints, resume, metrics, plots, every method) is ``python -m rso.train.pretrain``.
"""
import argparse
import math

import torch

import rso
from rso.train.data import build_pretraining_data, default_cache_dir
from rso.train.models import build_model, load_config
from rso.train.schedule import cosine_schedule

p = argparse.ArgumentParser()
p.add_argument("--config", default="tiny")
p.add_argument("--dataset", default="embedded")
p.add_argument("--steps", type=int, default=200)
p.add_argument("--rank", type=int, default=64)
p.add_argument("--tau", type=int, default=100)
p.add_argument("--lr", type=float, default=3e-3)
p.add_argument("--batch-size", type=int, default=16)
a = p.parse_args()

cfg = load_config(a.config)
seq_len = cfg["training"]["seq_len"]
tok, train, held_out = build_pretraining_data(a.dataset, cfg["training"]["tokenizer"], seq_len, a.batch_size,
                                              seed=0, cache_dir=default_cache_dir())
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
model = build_model(cfg, vocab_size=len(tok)).to(device)

model = rso.wrap(model, rank=a.rank, tau=a.tau, projection="stiefel")      # W = W0 + B P, only B trains
print(rso.summary(model))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr)
sched = cosine_schedule(opt, warmup=a.steps // 10, total=a.steps)           # linear warm-up, cosine to 10%
amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)

for step in range(1, a.steps + 1):
    x = train.next_batch().to(device)
    with amp:
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()                      # every tau steps RSO merges B into W0 and draws a new P by itself
    sched.step()
    opt.zero_grad(set_to_none=True)
    if step % 20 == 0:
        print(f"step {step}: loss {loss.item():.3f}, rso cycle {rso.state(model)['cycle']}")

model.eval()
with torch.no_grad(), amp:
    losses = [model(input_ids=b.to(device), labels=b.to(device)).loss.item() for b in held_out.eval_batches(20)]
print(f"held-out perplexity {math.exp(sum(losses) / len(losses)):.1f}")
model = rso.unwrap(model)           # a plain LlamaForCausalLM again
model.save_pretrained("runs/example-llama")
tok.save_pretrained("runs/example-llama")
print("saved runs/example-llama")

"""Quickstart: wrap a LLaMA, train it with an ordinary loop, unwrap it (runs in seconds on a CPU)."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import rso

torch.manual_seed(0)
config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=128)
model = LlamaForCausalLM(config)
model = rso.wrap(model, rank=16, tau=20)          # linear layers: W₀ + B·P, only B trains
print(rso.summary(model))

opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
data = torch.randint(0, 256, (64, 33))
for step in range(60):                             # an ordinary loop: no rso call inside it
    batch = data[torch.randint(0, 64, (8,))]
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    if step % 20 == 19:
        print(f"step {step + 1}: loss {loss.item():.3f}  {rso.state(model)}")

model = rso.unwrap(model)                          # plain nn.Linear modules, merged weights
print(type(model.model.layers[0].self_attn.q_proj).__name__)

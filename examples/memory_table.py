"""Measure one training step of a LLaMA with AdamW and with RSO: exact bytes per part of memory.

    python examples/memory_table.py --config llama-60m --rank 128 --batch 4 --seq 256
"""
import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import rso
from rso.memory import format_bytes, measure_step

PRESETS = {  # hidden, intermediate, heads, layers (the GaLore/GoLore papers' configs)
    "llama-tiny": (128, 352, 4, 2),
    "llama-60m": (512, 1376, 8, 8),
    "llama-130m": (768, 2048, 12, 12),
}


def build(name):
    d, f, h, n = PRESETS[name]
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=d, intermediate_size=f, num_attention_heads=h,
                                        num_hidden_layers=n, max_position_embeddings=2048, rms_norm_eps=1e-6))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="llama-60m", choices=sorted(PRESETS))
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    ids = torch.randint(0, 32000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    reports = {}
    for method in ("adamw", "rso"):
        model = build(args.config)
        if method == "rso":
            rso.wrap(model, rank=args.rank)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        reports[method] = measure_step(model, batch, opt)
    rows = ["parameters", "trainable_parameters", "gradients", "optimizer_state", "activations", "peak"]
    print(f"{args.config}, fp32, batch {args.batch} × seq {args.seq}, RSO rank {args.rank}\n")
    print("| part | AdamW | RSO | RSO / AdamW |\n|---|---:|---:|---:|")
    for row in rows:
        a, r = getattr(reports["adamw"], row), getattr(reports["rso"], row)
        print(f"| {row.replace('_', ' ')} | {format_bytes(a)} | {format_bytes(r)} | {r / a:.3f} |")


if __name__ == "__main__":
    main()

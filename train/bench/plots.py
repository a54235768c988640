"""Activation bytes against sequence length and batch from :func:`rso.memory.estimate` (no model built).

The estimator reproduces :func:`rso.memory.measure_step` to the byte on the configs that run here
(``tests/test_memory_estimate.py``), so its curves extend the measured sweep to sizes this machine
cannot run::

    python -m rso.train.bench.plots --model llama-60m --dtype fp32 --out docs/sweep_estimated_60m.png
    python -m rso.train.bench.plots --model llama-7b --dtype bf16 --rank 1024 --out docs/sweep_estimated_7b.png
"""
from __future__ import annotations

import argparse
import sys

from rso.memory import estimate

CURVES = (("adamw", {}, "AdamW / GaLore (same forward)"), ("frozen", {}, "frozen linear weights (floor)"),
          ("rso", {}, "RSO"), ("rso", {"chunked_ce": True}, "RSO + chunked CE head"),
          ("lora", {"lora_train_other": True}, "LoRA (peft, fp32 adapters)"))


def plot(model, dtype, rank, out, seqs=(256, 512, 1024, 2048, 4096), batches=(1, 2, 4, 8, 16), batch_seq=256):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, opts, label in CURVES:
        ys = [estimate(model, method, rank=rank, batch=1, seq=s, dtype=dtype, **opts)["activations"] / 2 ** 30
              for s in seqs]
        line, = axes[0].plot(seqs, ys, marker="o", label=label)
        yb = [estimate(model, method, rank=rank, batch=b, seq=batch_seq, dtype=dtype, **opts)["activations"] / 2 ** 30
              for b in batches]
        axes[1].plot(batches, yb, marker="o", color=line.get_color(), label=label)
    axes[0].set(xscale="log", xlabel="sequence length (batch 1)", ylabel="activations, GiB",
                title=f"{model} {dtype}: activations vs sequence length")
    axes[1].set(xscale="log", xlabel=f"batch (seq {batch_seq})", ylabel="activations, GiB",
                title=f"{model} {dtype}: activations vs batch")
    for ax, ticks in ((axes[0], seqs), (axes[1], batches)):
        ax.set_xticks(list(ticks), [str(t) for t in ticks])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"estimated by rso.memory.estimate (rank {rank}, SDPA attention)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m rso.train.bench.plots", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-60m")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    print(plot(args.model, args.dtype, args.rank, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

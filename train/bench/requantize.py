"""RSO on a quantized base: which rounding should a merge use? Tiny LLaMA pre-training on the embedded corpus.

    OMP_NUM_THREADS=1 python -m rso.train.bench.requantize --steps 300 --tau 10

Runs the same RSO training (same data, init, seed, P draws) with W₀ held in fp32 (the baseline), and quantized as
int8 / NF4 with each merge mode of :class:`rso.layers.quantized_linear.QuantizedSubspaceLinear`: "nearest",
"stochastic" and "stochastic+feedback". The outer loop is written out here as rso's does it (every ``tau`` steps:
draw P′ = sampler(seed, cycle + 1); merge — a quantized layer with ``merge_(next_projection=P′)``; set P′; reset
B's Adam state), since ``rso.wrap`` does not take ``quantize=`` yet. Everything else (embeddings, norms, head)
trains in full with AdamW. Writes ``merge_modes.json``: final held-out loss, the mean of the last 20 train losses,
the relative merge error ‖W_eff after − W_eff before‖ / ‖s·B P‖ (averaged over layers and merges), time.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import torch
from torch import nn

from rso.layers.subspace_linear import SubspaceLinear
from rso.projections import StiefelSampler, generator_for
from rso.train.data import build_pretraining_data, default_cache_dir
from rso.train.models import build_model, load_config

VARIANTS = [("fp32", None, None)] + [(f"{kind} {mode}", kind, mode) for kind in ("int8", "nf4")
                                     for mode in ("nearest", "stochastic", "stochastic+feedback")]


def wrap(model, kind, mode, rank, scale):
    """Every linear layer but the head as a SubspaceLinear (W₀ quantized as ``kind``), each with its first P."""
    layers = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not name.endswith("lm_head"):
            layer = SubspaceLinear.from_module(module, rank, scale, quantize=kind)
            if kind is not None:
                layer.merge_mode = mode
            layer.seed.fill_(len(layers))
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, layer)
            layers.append(layer)
    for layer in layers:
        layer.set_projection_(draw(layer))
    return layers


def draw(layer, cycle=0):
    return StiefelSampler().sample(layer.rank, layer.in_features, generator_for(int(layer.seed), cycle))


@torch.no_grad()
def outer_step(layers, optimizer, kind):
    """Merge and move every layer to its next subspace; returns the mean relative merge error."""
    errors = []
    for layer in layers:
        before, update = layer.effective_weight().float(), (layer.scale * layer.B @ layer.P).norm()
        P = draw(layer, int(layer.cycle) + 1)
        layer.merge_(next_projection=P) if kind is not None else layer.merge_()
        layer.set_projection_(P)
        layer.cycle += 1
        optimizer.state.pop(layer.B, None)  # state_on_merge "reset"
        if update > 0:
            errors.append(float((layer.effective_weight().float() - before).norm() / update))
    return statistics.fmean(errors) if errors else 0.0


def evaluate(model, loader, batches):
    model.eval()
    with torch.no_grad():
        losses = [float(model(input_ids=b, labels=b).loss) for b in loader.eval_batches(batches)]
    model.train()
    return statistics.fmean(losses)


def run(args, data, kind, mode) -> dict:
    tok, train, held_out = data
    torch.manual_seed(args.seed)
    cfg = load_config(args.config)
    cfg.update(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers)
    model = build_model(cfg, vocab_size=len(tok), bos_token_id=0, eos_token_id=0)
    layers = wrap(model, kind, mode, args.rank, args.scale)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    train.load_state_dict({"epoch": 0, "index": 0})
    losses, merge_errors, start = [], [], time.perf_counter()
    for step in range(1, args.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, step / args.warmup)
        batch = train.next_batch()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % args.tau == 0:
            merge_errors.append(outer_step(layers, optimizer, kind))
    w0_bytes = sum(t.numel() * t.element_size() for layer in layers
                   for t in (layer.quantized().tensors() if kind is not None else (layer.weight,)))
    return {"eval_loss": evaluate(model, held_out, args.eval_batches),
            "train_loss_last20": statistics.fmean(losses[-20:]),
            "merge_error": statistics.fmean(merge_errors) if merge_errors else None,
            "merges": len(merge_errors), "w0_bytes": w0_bytes, "seconds": time.perf_counter() - start}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=344)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--tau", type=int, default=10)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--eval-batches", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default="all", help="comma-separated names (see VARIANTS) or 'all'")
    p.add_argument("--out", default="docs/results/quantized_merge/merge_modes.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    chosen = VARIANTS if args.variants == "all" else [v for v in VARIANTS if v[0] in args.variants.split(",")]
    data = build_pretraining_data("embedded", "bpe8k", args.seq, args.batch, args.seed, default_cache_dir())
    results = {}
    for name, kind, mode in chosen:
        results[name] = run(args, data, kind, mode)
        print(f"{name:28s} " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in results[name].items()), flush=True)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

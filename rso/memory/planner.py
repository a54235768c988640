"""Does it fit? The largest batch × sequence each method trains in a memory budget, and the recipe for it.

``fit(config, "24GB")`` (``python -m rso.memory --model llama-7b --fit 24GB``) asks
:func:`rso.memory.estimate` for every method's step at each sequence length and returns, per method and
sequence length, the largest batch whose whole step (weights, gradients, optimizer states, activations)
fits in the budget less a reserve, and the recipe that gets there: the rank, and which of the memory
savers it needs —

* ``activation checkpointing`` (each decoder block recomputed in the backward pass; ~⅓ more compute),
* ``8-bit states`` (bitsandbytes ``AdamW8bit``),
* ``chunked head`` (the chunked linear + cross-entropy head: no vocab-wide logits kept).

The largest batch is the most any subset of the savers the method allows reaches (on large models, all of
them; on a small one a saver can cost more than it saves, e.g. checkpointing at batch 1); the recipe shown is
the cheapest subset that reaches it (checkpointing is dropped first, then 8-bit states, then the chunked
head). With ``batch=`` the question is instead "does batch × seq fit, and with what?": the cheapest recipe
that fits it (None if none does), with the largest batch that recipe reaches.

The methods, each as its paper runs it for pre-training:

==========================  ==================================================================
``adamw``                   full AdamW (savers: checkpointing, 8-bit states, chunked head)
``galore``                  GaLore on the block linear weights, 16-bit states (checkpointing,
                            chunked head)
``galore-8bit-per-layer``   GaLore 8-bit with per-layer weight updates (each gradient freed once
                            its own step is done), the recipe of GaLore's 24 GB LLaMA-7B run
                            (checkpointing; no chunked head, as its paper ran it)
``lora``                    LoRA on the block linear layers, embeddings/norms/head trained too
                            (checkpointing, 8-bit states, chunked head)
``rso``                     RSO: B trained, W₀ frozen (checkpointing, 8-bit states, chunked head)
``rso-int8``                RSO with W₀ stored int8 (bitsandbytes' LLM.int8 layout: a byte a weight
                            and an fp32 absmax per row), dequantized one layer at a time (same savers)
``rso-nf4``                 RSO with W₀ stored NF4 (4 bits a weight and an fp32 absmax per 64), the
                            same way (same savers)
==========================  ==================================================================

On a mixture of experts (``mixtral-8x7b``, ``qwen3-30b-a3b``) the default rows leave out ``lora`` (PEFT's
target_modules do not reach the stacked expert weights) and the quantized ``rso`` rows (they quantize 2-D
linear layers; the experts, most of the model, keep their dtype); naming one of them is a ValueError.

Budgets: ``"24GB"`` means a card that reports 24 GiB (as ``nvidia-smi`` does; ``GB``, ``GiB`` and ``G``
all mean 2³⁰ bytes here), with ``reserve`` (default 2 GiB) left for the CUDA context, cuBLAS workspaces
and allocator slack; ``"22.5GiB"``, ``"80GB"`` or a number of bytes also work.
"""
from __future__ import annotations

import itertools
import re

from .estimate import GPU_RESERVE, check_rank, default_rank, estimate, llama_dims

__all__ = ["fit", "format_fit", "parse_size", "FIT_METHODS", "fit_methods"]

#: method label -> (estimator method, fixed options, the memory savers it may use)
FIT_METHODS = {
    "adamw": ("adamw", {}, ("activation_checkpointing", "optimizer_bits", "chunked_ce")),
    "galore": ("galore", {}, ("activation_checkpointing", "chunked_ce")),
    "galore-8bit-per-layer": ("galore", {"optimizer_bits": 8, "per_layer_updates": True},
                              ("activation_checkpointing",)),
    "lora": ("lora", {"lora_train_other": True}, ("activation_checkpointing", "optimizer_bits", "chunked_ce")),
    "rso": ("rso", {}, ("activation_checkpointing", "optimizer_bits", "chunked_ce")),
    "rso-int8": ("rso", {"quantize": "int8"}, ("activation_checkpointing", "optimizer_bits", "chunked_ce")),
    "rso-nf4": ("rso", {"quantize": "nf4"}, ("activation_checkpointing", "optimizer_bits", "chunked_ce")),
}
_SAVER_ON = {"activation_checkpointing": True, "optimizer_bits": 8, "chunked_ce": True}
#: dropped first when it does not change the batch: the saver that costs the most
_COST = {"activation_checkpointing": 3, "optimizer_bits": 2, "chunked_ce": 1}

_UNITS = {"": 1, "b": 1, "k": 2 ** 10, "kb": 2 ** 10, "kib": 2 ** 10, "m": 2 ** 20, "mb": 2 ** 20, "mib": 2 ** 20,
          "g": 2 ** 30, "gb": 2 ** 30, "gib": 2 ** 30, "t": 2 ** 40, "tb": 2 ** 40, "tib": 2 ** 40}


def parse_size(size) -> int:
    """Bytes of ``"24GB"`` / ``"22.5GiB"`` / ``"80G"`` / ``"512MiB"`` / a number (GB = GiB = 2³⁰, as cards report)."""
    if isinstance(size, (int, float)) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"rso.memory.fit: the budget must be positive, got {size!r}")
        return int(size)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(size))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"rso.memory.fit: cannot read the budget {size!r}; write e.g. 24GB, 22.5GiB, 80G or 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _options(savers, on):
    return {k: (_SAVER_ON[k] if k in on else (None if k == "optimizer_bits" else False)) for k in savers}


def _recipes(savers):
    """Subsets of ``savers``, cheapest first (fewest, then least costly)."""
    subsets = [set(c) for n in range(len(savers) + 1) for c in itertools.combinations(savers, n)]
    return sorted(subsets, key=lambda s: (len(s), sum(_COST[k] for k in s)))


def _largest_batch(config, method, options, seq, usable, limit=1 << 20):
    """(largest batch that fits, its estimate); (0, the batch-1 estimate) if none does."""
    one = estimate(config, method=method, batch=1, seq=seq, **options)
    if one["total"] > usable:
        return 0, one
    per_sample = estimate(config, method=method, batch=2, seq=seq, **options)["total"] - one["total"]
    batch = limit if per_sample <= 0 else min(limit, 1 + int((usable - one["total"]) // per_sample))
    best = estimate(config, method=method, batch=batch, seq=seq, **options)
    # the estimate is affine in the batch from batch 2 on; batch 1 keeps 8 bytes more (its shifted labels), so
    # per_sample is 8 bytes short and the first guess can overshoot at large batches: walk it back
    while batch > 1 and best["total"] > usable:
        batch -= 1
        best = estimate(config, method=method, batch=batch, seq=seq, **options)
    return batch, best


def fit_methods(config) -> list[str]:
    """The labels of :data:`FIT_METHODS` ``config`` is planned for by default: all, less LoRA and the quantized
    RSO rows on a mixture of experts."""
    if not llama_dims(config).moe:
        return list(FIT_METHODS)
    return [m for m, (method, fixed, _) in FIT_METHODS.items() if method != "lora" and "quantize" not in fixed]


def fit(config, capacity="24GB", *, methods=None, seqs=(256, 2048), batch: int | None = None, rank=None,
        dtype: str = "bf16", attn: str = "sdpa", reserve: int = GPU_RESERVE) -> list[dict]:
    """Per method and sequence length, the largest batch that fits in ``capacity`` less ``reserve``, and the recipe.

    Args:
        config: a preset (``"llama-7b"``), a config.json path, a dict or an HF config (as :func:`estimate`).
        capacity: the budget: ``"24GB"``, ``"80GB"``, ``"22.5GiB"`` or bytes (see :func:`parse_size`).
        methods: labels from :data:`FIT_METHODS` (default: :func:`fit_methods`, all that ``config`` allows).
        seqs: sequence lengths to plan for.
        batch: instead of the largest batch, the cheapest recipe that fits ``batch`` × each seq.
        rank: the subspace / adapter rank, or a list of ranks (rows for each; default: the peers' rank for a
            preset, else hidden/4); one above a layer's min(in, out) is a ValueError naming the widest allowed.
        reserve: bytes left aside from ``capacity`` (default 2 GiB; 0 for a host with nothing else on it).

    Returns one dict per (method, seq): ``method``, ``seq``, ``batch`` (largest that fits with ``recipe``;
    0: not even batch 1), ``tokens``, ``recipe`` (the savers used: ``activation_checkpointing``,
    ``optimizer_bits``, ``chunked_ce``, ``per_layer_updates``) or None where nothing fits, ``rank``, ``fits``
    (``batch`` × seq fits when ``batch=`` was given, else whether batch 1 fits), ``total`` / ``model_state``
    / ``activations`` in bytes at that batch, ``usable`` and ``estimate`` (the full estimate).
    """
    cap = parse_size(capacity)
    usable = cap - int(reserve)
    if usable <= 0:
        raise ValueError(f"rso.memory.fit: the reserve {reserve} leaves nothing of the budget {capacity!r}")
    methods = None if methods is None else list(methods)
    unknown = [m for m in methods or () if m not in FIT_METHODS]
    if unknown:
        raise ValueError(f"rso.memory.fit: unknown method(s) {unknown}; choose from {', '.join(FIT_METHODS)}")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"rso.memory.fit: batch must be a positive int, got {batch!r}")
    llama_dims(config)  # a clear error for a config that is not a LLaMA-family decoder
    allowed = fit_methods(config)
    refused = [m for m in methods or () if m not in allowed]
    if refused:
        raise ValueError(f"rso.memory.fit: not planned for a mixture of experts: {', '.join(refused)} (LoRA does "
                         f"not reach the stacked expert weights, quantize= leaves them in their dtype); choose from "
                         f"{', '.join(allowed)}")
    methods = allowed if methods is None else methods
    ranks = list(rank) if isinstance(rank, (list, tuple)) else [default_rank(config) if rank is None else rank]
    try:  # every rank checked against the config, for each method that reads it, before any row is planned
        for r, method in itertools.product(ranks, {FIT_METHODS[m][0] for m in methods}):
            check_rank(config, r, method)
    except ValueError as e:
        raise ValueError(f"rso.memory.fit: {e}") from None
    rows = []
    for label, rank in ((label, r) for label in methods
                        for r in (ranks[:1] if FIT_METHODS[label][0] == "adamw" else ranks)):
        method, fixed, savers = FIT_METHODS[label]
        base = dict(rank=rank, dtype=dtype, attn=attn, **fixed)
        for seq in seqs:
            # every recipe's reach: (savers on, largest batch, its estimate), cheapest first
            reach = [(on, *_largest_batch(config, method, {**base, **_options(savers, on)}, seq, usable))
                     for on in _recipes(savers)]
            most = max(n for _, n, _ in reach)
            target = max(most, 1) if batch is None else batch
            chosen = next(((on, n, res) for on, n, res in reach if n >= target), None)
            if chosen is None:  # nothing reaches the target: the cheapest recipe with the most, or if not even
                # batch 1 fits, the recipe with the smallest batch-1 step
                fits_target = False
                on, n, res = (next(r for r in reach if r[1] == most) if most
                              else min(reach, key=lambda r: r[2]["total"]))
                on = on if n else None
            else:
                on, n, res = chosen
                fits_target = True
            recipe = None if on is None else {
                "activation_checkpointing": "activation_checkpointing" in on,
                "optimizer_bits": 8 if ("optimizer_bits" in on or fixed.get("optimizer_bits") == 8) else None,
                "chunked_ce": "chunked_ce" in on,
                "per_layer_updates": bool(fixed.get("per_layer_updates"))}
            rows.append({"method": label, "seq": seq, "batch": n, "tokens": n * seq, "recipe": recipe,
                         "rank": None if method == "adamw" else rank, "fits": fits_target, "target_batch": batch,
                         "total": res["total"], "model_state": res["weights"] + res["gradients"] + res["optimizer"],
                         "activations": res["activations"], "usable": usable, "capacity": cap, "estimate": res})
    return rows


def _recipe_text(row) -> str:
    r = row["recipe"]
    if r is None:
        return "—"
    parts = [name for key, name in (("activation_checkpointing", "checkpointing"), ("optimizer_bits", "8-bit states"),
                                     ("per_layer_updates", "per-layer updates"), ("chunked_ce", "chunked head"))
             if r[key]]
    return ", ".join(parts) or "nothing extra"


def format_fit(rows: list[dict], title: str | None = None) -> str:
    """A Markdown table of :func:`fit`'s rows."""
    if not rows:
        return ""
    usable, cap = rows[0]["usable"], rows[0]["capacity"]
    target = rows[0]["target_batch"]
    title = title or f"fits in {cap / 2 ** 30:g} GiB ({usable / 2 ** 30:g} GiB usable)"
    recipe = f"cheapest recipe that fits batch {target}" if target else "recipe"
    lines = [title, "",
             f"| method | rank | largest batch × seq | tokens | {recipe} | model state | activations | total |",
             "|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        rank = "—" if r["rank"] is None else str(r["rank"])
        if r["batch"] == 0:
            lines.append(f"| {r['method']} | {rank} | does not fit at seq {r['seq']} | 0 | — "
                         f"| {r['model_state'] / 2 ** 30:.1f} GiB | — | {r['total'] / 2 ** 30:.1f} GiB at batch 1 |")
            continue
        how = _recipe_text(r) if (not target or r["fits"]) else f"batch {target} does not fit; {_recipe_text(r)}"
        lines.append(f"| {r['method']} | {rank} | {r['batch']} × {r['seq']} | {r['tokens']:,} | {how} "
                     f"| {r['model_state'] / 2 ** 30:.1f} GiB | {r['activations'] / 2 ** 30:.1f} GiB "
                     f"| {r['total'] / 2 ** 30:.1f} GiB |")
    return "\n".join(lines)

"""Analytic memory estimate of one training step of a LLaMA-family decoder, without building the model.

``estimate(config, method=..., rank=..., batch=..., seq=..., dtype=...)`` returns bytes for

* ``weights``     every parameter (frozen ones included), RSO's projection buffers P, LoRA's adapters,
                  and fp32 master weights when asked for,
* ``gradients``   one gradient per trainable parameter (GaLore keeps the full weight gradient),
* ``optimizer``   AdamW moments (and GaLore's projection matrices, and torch's per-tensor ``step``),
* ``activations`` tensors autograd saves for backward, each storage once (what
                  :func:`rso.memory.measure_step` counts),
* ``total``       their sum,

plus a few detail keys (``parameters``, ``trainable_parameters``, ``buffers``, ``master_weights``).

The activation model follows what Hugging Face's ``LlamaForCausalLM`` saves op by op (transformers 5;
verified to the byte on CPU by ``tests/test_memory_estimate.py``). Per decoder layer and token, with
``d`` the activation dtype's size, ``h`` hidden, ``i`` intermediate, ``a``/``g`` query/key-value heads
of width ``e``:

================================  ==========================================================
RMSNorm (×2)                      fp32: the input ``x`` and ``x·rsqrt`` (8h + 4); bf16: the fp32
                                  upcast of ``x``, ``rsqrt`` and the normalized bf16 (4h + 4 + dh)
attention, SDPA                   q, k, v after RoPE, the output, the fp32 log-sum-exp
                                  (d(2ae + 2ge) + 4a); the output doubles as o_proj's input
attention, eager                  q, k, v (k, v repeated to ``a`` heads), the fp32 softmax
                                  (and its bf16 copy) of size a·seq (3dae + 4a·s [+ da·s])
MLP elementwise                   gate, SiLU(gate), up (3di)
linear inputs (trained weights)   q/k/v's input dh, gate/up's input dh, down's input di, and
                                  o_proj's input dae with eager attention
RSO instead of those              one ``z`` of width r per projection group (q/k/v, o, gate/up, down)
LoRA on top of the floor          the linear inputs plus ``A x`` (width r) for every adapter
================================  ==========================================================

and for the model: the token ids (8 bytes per token), RoPE's cos and sin (2·s·e·d, batch-independent),
the final norm, the head's input dh (when the head trains), the fp32 log-softmax 4V per token (or, with
``chunked_ce``, only a fp32 log-sum-exp per token), the int64 targets (at batch 1 one more: the shifted
labels are a view of their padded storage) and a 4-byte scalar.

``dtype="bf16"`` means weights, gradients and optimizer states in bf16, as in the textbook table
(LLaMA-7B, Adam, batch 1: weights 14 GB, gradients 14 GB, states 28 GB); ``master_weights=True`` adds an
fp32 copy of the trainable parameters and ``fp32_states=True`` keeps the moments in fp32.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

__all__ = ["estimate", "check_rank", "default_rank", "PRESETS", "METHODS", "RANK_METHODS", "UNCAPPED_RANK_METHODS",
           "llama_dims", "LlamaDims", "fits", "format_estimate", "GPU_SIZES"]

METHODS = ("adamw", "galore", "rso", "lora", "frozen")
#: The methods whose step depends on the rank.
RANK_METHODS = ("galore", "rso", "lora")
#: Those whose rank may not exceed a layer's smaller dimension (``rso.wrap`` refuses it; a LoRA adapter gains
#: nothing from it); the GaLore optimizers cap it per layer instead (``rso.optim``, galore-torch).
UNCAPPED_RANK_METHODS = ("rso", "lora")

#: The LLaMA shapes the GaLore / GoLore / RSO papers pre-train (vocab 32000, untied head), plus a tiny one.
PRESETS = {
    "llama-tiny": dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_hidden_layers=4,
                       vocab_size=8192),
    "llama-60m": dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_hidden_layers=8),
    "llama-130m": dict(hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_hidden_layers=12),
    "llama-350m": dict(hidden_size=1024, intermediate_size=2736, num_attention_heads=16, num_hidden_layers=24),
    "llama-1b": dict(hidden_size=2048, intermediate_size=5461, num_attention_heads=32, num_hidden_layers=24),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=32),
}
#: rank the peers use for each preset (GaLore paper).
PEER_RANKS = {"llama-tiny": 64, "llama-60m": 128, "llama-130m": 256, "llama-350m": 256, "llama-1b": 512,
              "llama-7b": 1024}

#: Usable GPU memory sizes checked by the CLI (GiB as the cards report them).
GPU_SIZES = {"24 GB GPU": 24 * 2 ** 30, "80 GB GPU": 80 * 2 ** 30}
#: Left aside on a GPU for the CUDA context, cuBLAS workspaces and allocator slack.
GPU_RESERVE = 2 * 2 ** 30

_DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


@dataclass(frozen=True)
class LlamaDims:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    tied: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False

    @property
    def linears(self):
        """(name, out_features, in_features, projection group) of one decoder layer's linear layers."""
        h, i, qd, kvd = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [("q_proj", qd, h, "qkv"), ("k_proj", kvd, h, "qkv"), ("v_proj", kvd, h, "qkv"),
                ("o_proj", h, qd, "o"), ("gate_proj", i, h, "gate_up"), ("up_proj", i, h, "gate_up"),
                ("down_proj", h, i, "down")]

    def bias(self, name):
        if name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            return self.attention_bias
        return self.mlp_bias


def _get(cfg, key, default=None):
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    value = getattr(cfg, key, default)
    return default if value is None else value


def _load_config(config):
    """A preset name, a path to a config.json / directory, a dict or an HF config object."""
    if isinstance(config, str):
        key = config.lower()
        key = key if key.startswith("llama-") else f"llama-{key}"
        if key in PRESETS:
            return dict(PRESETS[key]), key
        path = config
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f), None
        try:  # an HF hub name that is cached locally
            from transformers import AutoConfig
            return AutoConfig.from_pretrained(config), None
        except Exception as exc:  # noqa: BLE001 - turned into a clear message
            raise ValueError(f"rso.memory.estimate: unknown config {config!r}: not a preset "
                             f"({', '.join(PRESETS)}), a config.json or a loadable HF config ({exc})") from None
    return config, None


def llama_dims(config) -> LlamaDims:
    """The shapes ``estimate`` needs, from a preset name, a dict or an HF config of a LLaMA-family model."""
    cfg, _ = _load_config(config)
    missing = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers")
               if _get(cfg, k) is None]
    if missing:
        raise ValueError(f"rso.memory.estimate handles LLaMA-family decoders (hidden_size, intermediate_size, "
                         f"num_attention_heads, num_hidden_layers); this config lacks {missing}")
    h, heads = int(_get(cfg, "hidden_size")), int(_get(cfg, "num_attention_heads"))
    return LlamaDims(hidden=h, intermediate=int(_get(cfg, "intermediate_size")), heads=heads,
                     kv_heads=int(_get(cfg, "num_key_value_heads", heads) or heads),
                     head_dim=int(_get(cfg, "head_dim", h // heads) or h // heads),
                     layers=int(_get(cfg, "num_hidden_layers")), vocab=int(_get(cfg, "vocab_size", 32000)),
                     tied=bool(_get(cfg, "tie_word_embeddings", False)),
                     attention_bias=bool(_get(cfg, "attention_bias", False)),
                     mlp_bias=bool(_get(cfg, "mlp_bias", False)))


def _bytes_of(dtype) -> int:
    key = str(dtype).replace("torch.", "").lower()
    if key not in _DTYPE_BYTES:
        raise ValueError(f"rso.memory.estimate: dtype must be one of fp32, bf16, fp16; got {dtype!r}")
    return _DTYPE_BYTES[key]


def _layer_rank(rank, in_f):
    """A layer's rank as ``rso.wrap`` gives it: an int as it is, a fraction f as max(1, round(f · in_f))."""
    return rank if isinstance(rank, int) else max(1, round(rank * in_f))


def _rank_for(rank, out_f, in_f):
    """:func:`_layer_rank` capped at min(out_f, in_f), as the GaLore optimizers cap it (for rso and lora
    :func:`check_rank` refuses more)."""
    return min(_layer_rank(rank, in_f), out_f, in_f)


def default_rank(config) -> int:
    """The peers' rank for a preset (:data:`PEER_RANKS`), else hidden/4, at most the narrowest layer's width."""
    _, preset = _load_config(config)
    dims = llama_dims(config)
    return PEER_RANKS.get(preset, max(1, min(dims.hidden // 4, *(min(o, n) for _, o, n, _ in dims.linears))))


def check_rank(config, rank, method: str = "rso") -> None:
    """ValueError unless ``rank`` is an int ≥ 1 or a fraction f in (0, 1) of each layer's in_features and, for
    :data:`UNCAPPED_RANK_METHODS`, gives every linear layer of ``config`` a rank r ≤ min(in, out), as ``rso.wrap``
    requires (nothing is clamped). The message starts ``rank`` and names the widest rank allowed."""
    if isinstance(rank, bool) or not isinstance(rank, (int, float)) or rank <= 0 \
            or (isinstance(rank, float) and rank >= 1):
        raise ValueError(f"rank must be an int ≥ 1 or a float in (0, 1), got {rank!r}")
    if method not in UNCAPPED_RANK_METHODS:
        return
    lin = llama_dims(config).linears
    for name, o, n, _ in lin:
        r = _layer_rank(rank, n)
        if r > min(o, n):
            widest = min(min(o, n) for _, o, n, _ in lin)
            fraction = math.floor(1e4 * min(min(o, n) / n for _, o, n, _ in lin)) / 1e4  # rounded down: safe
            raise ValueError(f"rank {rank!r} gives {name} ({n} → {o}) rank {r}, more than its smaller dimension "
                             f"{min(o, n)}; the widest rank this config allows is {widest}"
                             + (f", or a fraction of in_features up to {fraction:g}" if fraction < 1 else ""))


def estimate(config, method: str = "adamw", rank=None, batch: int = 1, seq: int = 2048, dtype="bf16", *,
             attn: str = "sdpa", master_weights: bool = False, fp32_states: bool = False,
             share_projections: bool = True, chunked_ce: bool = False, lora_train_other: bool = False,
             lora_dtype: str | None = "fp32", galore_projector: str = "peer",
             step_tensors: bool | None = None, activation_checkpointing: bool = False,
             optimizer_bits: int | None = None, per_layer_updates: bool = False) -> dict:
    """Bytes of weights, gradients, optimizer state and activations of one training step.

    Args:
        config: preset ``"llama-60m"`` … ``"llama-7b"`` (or ``"60m"``), a dict / HF config / config.json path.
        method: ``"adamw"`` (full), ``"galore"`` (attention and MLP weights projected, the peer's recipe),
            ``"rso"`` (every decoder linear layer wrapped), ``"lora"`` (adapters on every decoder linear
            layer, everything else frozen) or ``"frozen"`` (linear weights frozen: the floor).
        rank: int, or a float fraction of each layer's in_features; default: the peers' rank for a preset,
            else hidden/4 (at most the narrowest layer's width). For rso and lora a rank above a layer's
            min(in, out) is a ValueError naming the widest allowed (:func:`check_rank`; ``rso.wrap`` refuses
            it); GaLore's is capped at each layer's min(in, out), as its optimizers cap it.
        dtype: ``"fp32"`` or ``"bf16"``: weights, gradients, states and activations.
        attn: ``"sdpa"`` (flash / efficient kernels: no seq² matrix) or ``"eager"``.
        master_weights: add an fp32 copy of every trainable parameter (mixed precision).
        fp32_states: optimizer moments in fp32 whatever ``dtype``.
        share_projections: RSO's q/k/v and gate/up share one stored projection (as ``rso.wrap``).
        chunked_ce: the output head's loss computed by :mod:`rso.layers.chunked_ce` (no vocab-wide logits kept):
            True / ``"recompute"`` (saves h, an fp32 log-sum-exp and the target per token) or ``"fused"``
            (saves the head's input gradient per token and its weight gradient).
        lora_train_other: LoRA also trains embeddings, norms and head (as the GaLore paper's baseline).
        lora_dtype: the adapters' dtype: ``"fp32"`` (peft's default ``autocast_adapter_dtype=True``: each
            adapter then also saves an fp32 copy of its input in a bf16 model) or None (the model's dtype).
        galore_projector: ``"peer"``: as galore-torch, whose fp32 projector is a slice of the whole SVD
            factor (min(m, n)² kept alive); ``"rank"``: only the r columns (a compact implementation).
        step_tensors: count torch.optim.AdamW's 4-byte ``step`` tensor per parameter (default: for
            adamw/rso/lora/frozen, not for galore-torch which keeps an int).
        activation_checkpointing: each decoder block runs under non-reentrant ``torch.utils.checkpoint``
            (``model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})``):
            ``activations`` is then what the step keeps (each block's input, and what runs outside the
            blocks: ``activations_kept``) plus the most one block's recomputation saves in the backward
            pass (``activations_recompute``; RSO layers still store their r-wide projections there).
        optimizer_bits: 8 for bitsandbytes' ``AdamW8bit`` (``--optimizer adamw8bit``): each tensor of at least
            4096 elements keeps two uint8 moments plus one fp32 scale per 256-element block of each, smaller
            ones fp32 moments; the two 256-entry fp32 quantization maps once; no step tensors. None (or 16 /
            32): the moments in ``dtype`` (``fp32_states`` for fp32).
        per_layer_updates: each parameter is updated by its own optimizer as soon as its gradient is
            accumulated, and the gradient freed (GaLore's "per-layer weight updates"): ``gradients`` is
            the largest single gradient.
    """
    if method not in METHODS:
        raise ValueError(f"rso.memory.estimate: method must be one of {METHODS}, got {method!r}")
    if attn not in ("sdpa", "eager"):
        raise ValueError(f"rso.memory.estimate: attn must be 'sdpa' or 'eager', got {attn!r}")
    if galore_projector not in ("peer", "rank"):
        raise ValueError(f"rso.memory.estimate: galore_projector must be 'peer' or 'rank', got {galore_projector!r}")
    for name, value in (("batch", batch), ("seq", seq)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"rso.memory.estimate: {name} must be a positive int, got {value!r}")
    dims = llama_dims(config)
    rank = default_rank(config) if rank is None else rank
    try:
        check_rank(config, rank, method)
    except ValueError as e:
        raise ValueError(f"rso.memory.estimate: {e}") from None
    if optimizer_bits not in (None, 8, 16, 32):
        raise ValueError(f"rso.memory.estimate: optimizer_bits must be 8, 16, 32 or None, got {optimizer_bits!r}")
    wb = _bytes_of(dtype)           # weights, gradients, activations
    sb = 4 if (fp32_states or optimizer_bits == 32) else wb   # optimizer moments
    eight_bit = optimizer_bits == 8
    d = dims
    L, h, i, V = d.layers, d.hidden, d.intermediate, d.vocab
    T = batch * seq
    if step_tensors is None:
        step_tensors = method != "galore" and not eight_bit  # bitsandbytes keeps an int step

    # ---------------------------------------------------------------- parameters
    lin = d.linears
    lin_weights = sum(o * n for _, o, n, _ in lin)
    lin_biases = sum(o for name, o, _, _ in lin if d.bias(name))
    layer_norms = 2 * h
    embed = V * h
    head = 0 if d.tied else V * h
    n_params = embed + head + h + L * (lin_weights + lin_biases + layer_norms)
    # tensors: per layer 7 weights + biases + 2 norms; embed, final norm, head
    n_tensors_other = 2 + (0 if d.tied else 1) + L * (2 + sum(1 for name, *_ in lin if d.bias(name)))
    buffers = 2 * (d.head_dim // 2) * wb  # RoPE inv_freq and original_inv_freq, cast with the model by .to(dtype)

    ranks = {name: _rank_for(rank, o, n) for name, o, n, _ in lin}
    # RSO's projection groups: (rank, in_features) of each; q/k/v share one P and one stored z, gate/up one
    projection_groups = {(grp, ranks[name]) if share_projections else name: (ranks[name], n)
                         for name, _, n, grp in lin}
    extra_weights = 0
    if method in ("adamw", "galore"):
        trainable, n_trainable_tensors = n_params, n_tensors_other + L * len(lin)
    elif method == "frozen":
        trainable, n_trainable_tensors = n_params - L * lin_weights, n_tensors_other
    elif method == "rso":
        B = sum(o * ranks[name] for name, o, _, _ in lin)
        P = sum(r * n for r, n in projection_groups.values())
        extra_weights = L * B
        buffers += L * (P * wb + len(lin) * 3 * 8)  # one P per group, int64 step/cycle/seed per layer
        trainable = n_params - L * lin_weights + L * B
        n_trainable_tensors = n_tensors_other + L * len(lin)
    else:  # lora
        AB = sum(ranks[name] * (o + n) for name, o, n, _ in lin)
        extra_weights = L * AB
        trainable = L * AB + (n_params - L * lin_weights if lora_train_other else 0)
        n_trainable_tensors = 2 * L * len(lin) + (n_tensors_other if lora_train_other else 0)
    ab = _bytes_of(lora_dtype) if (method == "lora" and lora_dtype) else wb  # adapter bytes
    adapter_extra = (ab - wb) * extra_weights if method == "lora" else 0

    weights = (n_params + extra_weights) * wb + buffers + adapter_extra
    master = trainable * 4 if (master_weights and wb != 4) else 0
    gradients = trainable * wb + adapter_extra
    # the tensors an optimizer keeps moments for: (elements, whether it is a subspace tensor), per layer and once
    other_tensors = [V * h] + ([] if d.tied else [V * h]) + [h]
    layer_other = [h, h] + [o for name, o, _, _ in lin if d.bias(name)]
    if method in ("adamw", "galore"):
        layer_sub = [o * n for _, o, n, _ in lin]
    elif method == "rso":
        layer_sub = [o * ranks[name] for name, o, _, _ in lin]
    elif method == "lora":
        layer_sub = [x for name, o, n, _ in lin for x in (ranks[name] * n, o * ranks[name])]
    else:
        layer_sub = []
    if method == "lora" and not lora_train_other:
        other_tensors, layer_other = [], []
    if method == "galore":  # projected weights keep r·max(m, n) moments and an r·min(m, n) projector
        moment_sub = [ranks[name] * max(o, n) for name, o, n, _ in lin]
        projector = sum(ranks[name] * min(o, n) for name, o, n, _ in lin)
        if galore_projector == "peer" and wb == 4:  # U[:, :r] / Vh[:r] keep the whole factor alive
            projector = sum(min(o, n) ** 2 for _, o, n, _ in lin)
    else:
        moment_sub, projector = layer_sub, 0
    if eight_bit:
        def states(numel):  # bitsandbytes AdamW8bit: uint8 moments + fp32 absmax per 256 (≥ 4096 elements)
            return 2 * numel + 2 * 4 * -(-numel // 256) if numel >= 4096 else 8 * numel
        moments = [*other_tensors, *(layer_other + moment_sub) * L]
        subspace_states = L * sum(states(x) for x in moment_sub)
        optimizer = subspace_states + sum(states(x) for x in other_tensors) + L * sum(states(x) for x in layer_other)
        optimizer += 2 * 256 * 4 if any(x >= 4096 for x in moments) else 0  # the two quantization maps
    else:
        msb = max(sb, ab) if method == "lora" else sb
        subspace_states = 2 * msb * L * sum(moment_sub)
        optimizer = subspace_states + 2 * sb * (sum(other_tensors) + L * sum(layer_other))
    optimizer += wb * L * projector
    if step_tensors:
        optimizer += 4 * n_trainable_tensors
    if per_layer_updates:  # a gradient lives only until its own optimizer step
        gradients = max([*other_tensors, *layer_other, *layer_sub]) * (ab if method == "lora" else wb)

    # ---------------------------------------------------------------- activations (per token)
    e, a, g = d.head_dim, d.heads, d.kv_heads
    norm = 4 * h + 4 + wb * h  # RMSNorm: its input in fp32 (4h), rstd (4), the normalized output (wb·h)
    if attn == "sdpa":
        attention = wb * (2 * a * e + 2 * g * e) + 4 * a
        o_input = 0  # the SDPA output, saved by SDPA itself
    else:
        attention = wb * 3 * a * e + 4 * a * seq + (wb * a * seq if wb != 4 else 0)
        o_input = wb * a * e
    mlp = 3 * wb * i
    inputs = {"qkv": wb * h, "o": o_input, "gate_up": wb * h, "down": wb * i}
    floor = 2 * norm + attention + mlp
    if method in ("adamw", "galore"):
        layer = floor + sum(inputs.values())
    elif method == "frozen":
        layer = floor
    elif method == "rso":
        layer = floor + wb * sum(r for r, _ in projection_groups.values())
    else:  # lora: adapters save their input x (an fp32 copy each if adapters are fp32) and A x
        if ab == wb:
            adapter_inputs = sum(inputs.values())
        else:
            adapter_inputs = ab * sum(n for _, _, n, _ in lin)
        adapter = adapter_inputs + ab * sum(ranks.values())
        if lora_train_other:
            layer = floor + adapter
        else:  # frozen norms save only x (its fp32 copy) and rsqrt; layer 0's input norm sees no grad
            frozen_norm = 4 * h + 4
            layer = floor - 2 * norm + 2 * frozen_norm + adapter
    others_train = method != "lora" or lora_train_other
    final_norm = norm if others_train else 4 * h + 4
    if chunked_ce not in (False, None, True, "recompute", "fused"):
        raise ValueError(f"rso.memory.estimate: chunked_ce must be False, True, 'recompute' or 'fused', "
                         f"got {chunked_ce!r}")
    ids = 8 if others_train else 0
    first_norm = 0 if others_train else -(4 * h + 4)
    if chunked_ce == "fused":  # d loss/d h per token, and the head's weight gradient (if it trains)
        head_loss, fixed = wb * h, (V * h * wb if others_train else 0)
    elif chunked_ce:  # h, fp32 log-sum-exp, int64 target
        head_loss, fixed = wb * h + 4 + 8, 0
    else:  # the head's input (if it trains), fp32 log-softmax, int64 target, a scalar
        head_loss, fixed = (wb * h if others_train else 0) + 4 * V + 8, 4
    if chunked_ce != "fused" and batch == 1:
        # Hugging Face shifts the labels by padding one ignore_index and slicing [..., 1:]: at batch 1 the slice
        # is contiguous, so the saved targets keep the padded storage, one int64 more than the tokens.
        fixed += 8
    rope = 2 * seq * e * wb  # cos and sin, saved by every layer's rotary embedding (one storage each)
    if not activation_checkpointing:
        per_token = ids + L * layer + first_norm + final_norm + head_loss
        kept, recompute = T * per_token + rope + fixed, 0
    else:
        # kept: each block's input (checkpoint saves it), and what runs outside the blocks (the embedding's
        # output requires grad under checkpointing, so no block is special). recomputed: one block's own
        # saved tensors, less what is kept already (an fp32 RMSNorm saves its input itself), and cos / sin
        kept = T * (ids + L * wb * h + final_norm + head_loss) + fixed
        recompute = T * (layer - (4 * h if wb == 4 else 0)) + rope
    activations = kept + recompute

    total = weights + master + gradients + optimizer + activations
    return {"weights": weights + master, "gradients": gradients, "optimizer": optimizer,
            "activations": activations, "total": total,
            "parameters": (n_params + extra_weights) * wb, "trainable_parameters": trainable * wb,
            "buffers": buffers, "master_weights": master,
            "activations_kept": kept, "activations_recompute": recompute,
            "optimizer_subspace": subspace_states,
            "n_parameters": n_params + extra_weights, "n_trainable": trainable,
            "method": method, "rank": rank, "batch": batch, "seq": seq, "dtype": str(dtype), "attn": attn,
            "activation_checkpointing": bool(activation_checkpointing), "chunked_ce": chunked_ce,
            "optimizer_bits": optimizer_bits, "per_layer_updates": bool(per_layer_updates)}


def fits(result: dict, capacity: int, reserve: int = GPU_RESERVE) -> bool:
    """Whether ``result['total']`` fits in ``capacity`` bytes less a reserve for CUDA's own use."""
    return result["total"] <= capacity - reserve


def gigabytes(n, width: int = 0) -> str:
    """Decimal gigabytes (10⁹ bytes), as the textbook tables count them: ``1.01 GB``."""
    return f"{n / 1e9:{width}.2f} GB"


def _gb(n):
    return f"{gigabytes(n, 9)}  ({n / 2 ** 30:8.2f} GiB)"


def format_estimate(result: dict, title: str | None = None) -> str:
    rows = [("weights", result["weights"]), ("gradients", result["gradients"]),
            ("optimizer states", result["optimizer"]), ("activations", result["activations"]),
            ("total", result["total"])]
    title = title or (f"{result['method']}: rank {result['rank']}, batch {result['batch']} × seq {result['seq']}, "
                      f"{result['dtype']}, {result['attn']} attention")
    lines = [title, "-" * len(title)]
    lines += [f"{name:<18}{_gb(v)}" for name, v in rows]
    if result.get("master_weights"):
        lines.append(f"  (weights include {gigabytes(result['master_weights'])} of fp32 master weights)")
    for gpu, cap in GPU_SIZES.items():
        ok = fits(result, cap)
        lines.append(f"{'fits on ' + gpu if ok else 'does NOT fit on ' + gpu} "
                     f"({result['total'] / 2 ** 30:.1f} GiB needed, {(cap - GPU_RESERVE) / 2 ** 30:.0f} GiB usable)")
    return "\n".join(lines)

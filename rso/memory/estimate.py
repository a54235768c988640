"""Analytic memory estimate of one training step of a LLaMA-family decoder (or a Mixtral / Qwen-MoE mixture of
experts), without building the model.

``estimate(config, method=..., rank=..., batch=..., seq=..., dtype=...)`` returns bytes for

* ``weights``     every parameter (frozen ones included), RSO's projection buffers P, LoRA's adapters,
                  and fp32 master weights when asked for (RSO's W₀ as stored with ``quantize``),
* ``gradients``   one gradient per trainable parameter (GaLore keeps the full weight gradient),
* ``optimizer``   AdamW moments (and GaLore's projection matrices, and torch's per-tensor ``step``),
* ``activations`` tensors autograd saves for backward, each storage once (what
                  :func:`rso.memory.measure_step` counts),
* ``total``       their sum (plus, with ``quantize``, one layer's W₀ dequantized: ``dequantize_transient``),

plus a few detail keys (``parameters``, ``trainable_parameters``, ``buffers``, ``master_weights``,
``quantized_weights``).

The activation model follows what Hugging Face's ``LlamaForCausalLM`` (and ``MixtralForCausalLM``,
``Qwen2MoeForCausalLM``, ``Qwen3MoeForCausalLM`` with ``experts_implementation="eager"``) saves op by op
(transformers 5; verified to the byte on CPU by ``tests/test_memory_estimate.py`` and
``tests/test_memory_moe.py``). Per decoder layer and token, with ``d`` the activation dtype's size, ``h``
hidden, ``i`` intermediate, ``a``/``g`` query/key-value heads of width ``e``:

================================  ==========================================================
RMSNorm (×2)                      fp32: the input ``x`` and ``x·rsqrt`` (8h + 4); bf16: the fp32
                                  upcast of ``x``, ``rsqrt`` and the normalized bf16 (4h + 4 + dh)
q/k norms (Qwen3)                 the same RMSNorm of width e per query and key-value head:
                                  (a + g)(4e + 4 + de)
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

A mixture of experts (E experts of width ``Ie``, top-k routing, a shared expert of width ``Is`` or none)
saves in place of the MLP's rows, per token (the eager experts loop of ``MixtralExperts.forward``):

================================  ==========================================================
router (trains in full)           its input dh (the shared expert and its gate read the same
                                  tensor), the fp32 softmax 4E, the top-k indices 8k and, when
                                  the top k are renormalized, their values and sum (4k + 4)
shared expert (Qwen2-MoE)         3d·Is elementwise, down's input d·Is (RSO: z), the sigmoid
                                  gate d and the shared output dh
per routed (token, expert) pair   16 (token and slot indices), gate_up's output 2d·Ie, SiLU(gate)
(k of them per token)             d·Ie, down's output dh, the routing weight (4: Mixtral keeps it
                                  fp32; else d), the weighted output index_add keeps dh, and the
                                  expert inputs dh + d·Ie (RSO: one z of width r for each map)
================================  ==========================================================

and for the model: the token ids (8 bytes per token), RoPE's cos and sin (2·s·e·d, batch-independent),
the final norm, the head's input dh (when the head trains), the fp32 log-softmax 4V per token (or, with
``chunked_ce``, only a fp32 log-sum-exp per token), the int64 targets (at batch 1 one more: the shifted
labels are a view of their padded storage) and a 4-byte scalar.

Per method on a mixture of experts: ``adamw`` trains everything; ``galore`` projects the 2-D linear weights
only, as galore-torch projects 2-D gradients only: the 3-D expert weights (E × out × in) and the router keep
full AdamW moments; ``rso`` wraps the 2-D linear layers and each stacked expert weight as
:class:`rso.layers.SubspaceExperts` does (B of E × out × r, one P of r × in shared by the layer's experts, and
int64 step / cycle / seed), the router (E × h) and the shared expert's one-output gate (unless the rank is 1)
train in full; ``frozen`` freezes the linear and expert weights; ``lora`` is refused (PEFT's target_modules do
not reach the stacked expert weights).

``quantize="int8" | "nf4"`` (method ``rso``, dense configs): each wrapped layer's W₀ as bitsandbytes stores it
(:func:`quantized_bytes`: int8 codes plus an fp32 absmax per output row; NF4 two codes a byte plus an fp32
absmax per block of 64), everything else unchanged. The layers dequantize one W₀ at a time in forward and
backward: ``total`` adds the largest layer's out × in in ``dtype`` (``dequantize_transient``; int8 in a 16-bit
dtype (4 + d)·out·in: bitsandbytes dequantizes int8 to fp32 first, then casts). Like the
unquantized estimate it leaves out other per-op transients (the merged evaluation's W₀ + s·B·P, the gradient
of a single expert's slice of a stacked weight).

``dtype="bf16"`` means weights, gradients and optimizer states in bf16, as in the textbook table
(LLaMA-7B, Adam, batch 1: weights 14 GB, gradients 14 GB, states 28 GB); ``master_weights=True`` adds an
fp32 copy of the trainable parameters and ``fp32_states=True`` keeps the moments in fp32.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["estimate", "check_rank", "default_rank", "PRESETS", "METHODS", "RANK_METHODS", "UNCAPPED_RANK_METHODS",
           "llama_dims", "LlamaDims", "fits", "format_estimate", "GPU_SIZES", "MOE_FAMILIES", "QUANTIZE",
           "quantized_bytes"]

#: The LLaMA shapes the GaLore / GoLore / RSO papers pre-train (vocab 32000, untied head), plus a tiny one.
PRESETS = {
    "llama-tiny": dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_hidden_layers=4,
                       vocab_size=8192),
    "llama-60m": dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_hidden_layers=8),
    "llama-130m": dict(hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_hidden_layers=12),
    "llama-350m": dict(hidden_size=1024, intermediate_size=2736, num_attention_heads=16, num_hidden_layers=24),
    "llama-1b": dict(hidden_size=2048, intermediate_size=5461, num_attention_heads=32, num_hidden_layers=24),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=32),
    # mixture-of-experts shapes (transformers' MixtralConfig / Qwen3MoeConfig; Qwen3-30B-A3B's config.json sets
    # head_dim 128, 48 layers and norm_topk_prob, where Qwen3MoeConfig's defaults are 64, 24 and False)
    "mixtral-8x7b": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                         num_key_value_heads=8, num_hidden_layers=32, num_local_experts=8, num_experts_per_tok=2,
                         vocab_size=32000),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
                          moe_intermediate_size=768, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          num_hidden_layers=48, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                          vocab_size=151936),
    "moe-tiny": dict(model_type="qwen3_moe", hidden_size=256, intermediate_size=688, moe_intermediate_size=128,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_hidden_layers=4, num_experts=8,
                     num_experts_per_tok=2, norm_topk_prob=True, vocab_size=8192),
}
#: The mixture-of-experts families modelled (transformers 5's eager experts loop), and the defaults of their config
#: classes for the fields a dict may leave out.
MOE_FAMILIES = {
    "mixtral": {"num_local_experts": 8, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
                  "shared_expert_intermediate_size": 5632, "qkv_bias": True},
    "qwen3_moe": {"num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768},
}
#: Families whose attention normalizes each head of q and k (an RMSNorm over head_dim) before RoPE.
_QK_NORM_FAMILIES = ("qwen3", "qwen3_moe")
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
    """The shapes of a LLaMA-family decoder. With ``experts`` > 0 each layer's MLP is a mixture of experts
    (transformers' Mixtral / Qwen2-MoE / Qwen3-MoE): a router (``experts`` × hidden, trained in full by every
    method), the experts' fused 3-D weights ``gate_up_proj`` (E × 2·``expert_intermediate`` × hidden) and
    ``down_proj`` (E × hidden × ``expert_intermediate``), each token routed to ``experts_per_tok`` of them, and with
    ``shared_intermediate`` > 0 a shared expert MLP and its one-output sigmoid gate (Qwen2-MoE)."""
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
    qkv_bias: bool = False           # q/k/v biases without o_proj's (Qwen2-MoE)
    qk_norm: bool = False            # an RMSNorm over each head of q and k (Qwen3)
    experts: int = 0
    experts_per_tok: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0
    norm_topk: bool = False          # the top-k routing weights renormalized to sum 1
    fp32_routing: bool = False       # routing weights kept in fp32 (Mixtral), else cast to the model's dtype
    wrapped_gate: bool = False       # the shared expert's 1-output gate is a linear layer a method wraps (rank 1)

    @property
    def moe(self) -> bool:
        return self.experts > 0

    @property
    def linears(self):
        """(name, out_features, in_features, projection group) of one decoder layer's 2-D linear layers: attention,
        then the dense MLP, or a mixture of experts' shared expert MLP (none without one)."""
        h, qd, kvd = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = [("q_proj", qd, h, "qkv"), ("k_proj", kvd, h, "qkv"), ("v_proj", kvd, h, "qkv"),
                     ("o_proj", h, qd, "o")]
        i, prefix = (self.shared_intermediate, "shared_expert.") if self.moe else (self.intermediate, "")
        if not i:
            return attention
        gate = [("shared_expert_gate", 1, h, "shared_gate")] if self.wrapped_gate else []
        return attention + [(prefix + "gate_proj", i, h, "gate_up"), (prefix + "up_proj", i, h, "gate_up"),
                            (prefix + "down_proj", h, i, "down")] + gate

    @property
    def expert_weights(self):
        """(name, out_features, in_features) of one expert's two maps; each is stored for all ``experts`` in one
        E × out × in parameter. Empty for a dense MLP."""
        if not self.moe:
            return []
        return [("experts.gate_up_proj", 2 * self.expert_intermediate, self.hidden),
                ("experts.down_proj", self.hidden, self.expert_intermediate)]

    @property
    def layer_others(self) -> list:
        """Element counts of one layer's parameters besides its linear and expert weights: the two norms, q/k's
        norms, the router, the shared expert's gate (1 × hidden, unless wrapped) and the biases."""
        others = [self.hidden, self.hidden] + ([self.head_dim] * 2 if self.qk_norm else [])
        if self.moe:
            gate = self.shared_intermediate and not self.wrapped_gate
            others += [self.experts * self.hidden] + ([self.hidden] if gate else [])
        return others + [o for name, o, _, _ in self.linears if self.bias(name)]

    def bias(self, name):
        if name in ("q_proj", "k_proj", "v_proj"):
            return self.attention_bias or self.qkv_bias
        if name == "o_proj":
            return self.attention_bias
        return self.mlp_bias


@dataclass(frozen=True)
class _Step:
    """What one estimate is about: the shapes, byte sizes and options every term reads."""
    dims: LlamaDims
    wb: int                 # bytes of a weight, gradient or activation element
    sb: int                 # bytes of an optimizer moment element
    ab: int                 # bytes of a trained per-layer element (a LoRA adapter's; else wb)
    ranks: dict             # linear layer name -> its rank, capped at min(out, in)
    expert_ranks: dict      # expert weight name -> its rank, capped at min(out, in)
    groups: dict            # RSO projection group -> (rank, in_features): one stored P and one saved z each
    trains_others: bool     # embeddings, norms, biases and head train
    attn: str
    seq: int
    galore_projector: str

    @property
    def inputs(self) -> dict:
        """Per token bytes of each projection group's input that a trained linear weight saves: q/k/v's and
        gate/up's (wb·h, shared), down's (wb·i) and o_proj's (wb·a·e, only with eager attention: SDPA saves it).
        In a mixture of experts the router saves gate/up's input already (0 here) and down's is the shared
        expert's (wb·Is; 0 without one)."""
        d, wb = self.dims, self.wb
        o_input = 0 if self.attn == "sdpa" else wb * d.heads * d.head_dim
        if d.moe:
            return {"qkv": wb * d.hidden, "o": o_input, "gate_up": 0, "down": wb * d.shared_intermediate}
        return {"qkv": wb * d.hidden, "o": o_input, "gate_up": wb * d.hidden, "down": wb * d.intermediate}


@dataclass(frozen=True)
class _Method:
    """What a training method changes in a step; :data:`_METHODS` holds one per method.

    ``tensors(s)``: element counts of the tensors trained in place of one decoder layer's linear weights (and
    expert weights, one tensor per E × out × in parameter);
    ``saved(s)``: per token bytes one layer's linear layers save for backward beyond the floor;
    ``pair_saved(s)``: per routed (token, expert) pair bytes the two expert maps save beyond the floor;
    ``trains_weight``: those tensors are the weights W themselves (else new tensors beside a frozen W);
    ``rank``: None, ``"capped"`` (capped per layer at min(in, out)) or ``"uncapped"`` (refused above it);
    ``step_tensor``: its optimizer keeps torch.optim.AdamW's 4-byte ``step`` tensor per parameter;
    ``moments(s)``: (elements with subspace moments per layer, projector elements per layer), default
    (``tensors(s)``, 0); ``buffers(s)``: bytes of its per-layer buffers; ``trains_others(lora_train_other)``;
    ``adapter_dtype(lora_dtype)``: the dtype of its trained per-layer tensors (None: the model's)."""
    tensors: Callable[[_Step], list]
    saved: Callable[[_Step], int]
    pair_saved: Callable[[_Step], int] = lambda s: 0
    trains_weight: bool = False
    rank: str | None = None
    step_tensor: bool = True
    moments: Callable[[_Step], tuple] | None = None
    buffers: Callable[[_Step], int] = lambda s: 0
    trains_others: Callable[[bool], bool] = lambda lora_train_other: True
    adapter_dtype: Callable[[object], object] = lambda lora_dtype: None


def _weights(s: _Step) -> list:
    """W of every linear layer: out·in elements, and of each expert weight: E·out·in."""
    return [o * n for _, o, n, _ in s.dims.linears] + [s.dims.experts * o * n for _, o, n in s.dims.expert_weights]


def _rso_tensors(s: _Step) -> list:
    """RSO's B of each layer: out·r, and of each expert weight: E·out·r (one B per expert)."""
    return ([o * s.ranks[name] for name, o, _, _ in s.dims.linears]
            + [s.dims.experts * o * s.expert_ranks[name] for name, o, _ in s.dims.expert_weights])


def _lora_tensors(s: _Step) -> list:
    """LoRA's A (r·in) and B (out·r) of each layer."""
    return [x for name, o, n, _ in s.dims.linears for x in (s.ranks[name] * n, o * s.ranks[name])]


def _galore_moments(s: _Step) -> tuple:
    """Projected moments r·max(m, n) per 2-D weight and an r·min(m, n) projector; with ``galore_projector="peer"``
    in fp32 the projector is a slice of the whole SVD factor (U[:, :r] / Vh[:r]): min(m, n)² kept alive. GaLore
    projects 2-D gradients only: a 3-D expert weight keeps full moments (E·out·in)."""
    lin = s.dims.linears
    moments = [s.ranks[name] * max(o, n) for name, o, n, _ in lin] + _weights(s)[len(lin):]
    if s.galore_projector == "peer" and s.wb == 4:
        return moments, sum(min(o, n) ** 2 for _, o, n, _ in lin)
    return moments, sum(s.ranks[name] * min(o, n) for name, o, n, _ in lin)


def _rso_buffers(s: _Step) -> int:
    """One P (r·in) per projection group and per expert weight (shared by the layer's experts), and an int64 step,
    cycle and seed per wrapped layer or expert weight."""
    experts = s.dims.expert_weights
    p = sum(r * n for r, n in s.groups.values()) + sum(s.expert_ranks[name] * n for name, _, n in experts)
    return p * s.wb + (len(s.dims.linears) + len(experts)) * 3 * 8


def _expert_inputs(s: _Step) -> int:
    """Per routed pair, the inputs a trained expert weight saves: the gathered token (wb·h) and SiLU(gate)·up
    (wb·Ie)."""
    return s.wb * sum(n for _, _, n in s.dims.expert_weights)


def _lora_saved(s: _Step) -> int:
    """Each adapter saves its input x (the layer inputs a trained W saves, :attr:`_Step.inputs`; with fp32 adapters
    in a lower-precision model an fp32 copy per adapter, ab·in) and A x (ab·r)."""
    inputs = sum(s.inputs.values()) if s.ab == s.wb else s.ab * sum(n for _, _, n, _ in s.dims.linears)
    return inputs + s.ab * sum(s.ranks.values())


#: method -> what it changes; adding a method is one entry (and its name in the docs of ``estimate``).
_METHODS = {
    "adamw": _Method(tensors=_weights, saved=lambda s: sum(s.inputs.values()), pair_saved=_expert_inputs,
                     trains_weight=True),
    "galore": _Method(tensors=_weights, saved=lambda s: sum(s.inputs.values()), pair_saved=_expert_inputs,
                      trains_weight=True, rank="capped", step_tensor=False, moments=_galore_moments),
    "rso": _Method(tensors=_rso_tensors, saved=lambda s: s.wb * sum(r for r, _ in s.groups.values()),
                   pair_saved=lambda s: s.wb * sum(s.expert_ranks.values()), rank="uncapped", buffers=_rso_buffers),
    "lora": _Method(tensors=_lora_tensors, saved=_lora_saved, rank="uncapped",
                    trains_others=lambda lora_train_other: lora_train_other,
                    adapter_dtype=lambda lora_dtype: lora_dtype),
    "frozen": _Method(tensors=lambda s: [], saved=lambda s: 0),
}
METHODS = tuple(_METHODS)
#: The storages of RSO's frozen W₀ (``estimate(..., quantize=...)``): the dtype's, or bitsandbytes' int8 / NF4.
QUANTIZE = (None, "int8", "nf4")
#: The methods whose step depends on the rank.
RANK_METHODS = tuple(m for m, rule in _METHODS.items() if rule.rank)
#: Those whose rank may not exceed a layer's smaller dimension (``rso.wrap`` refuses it; a LoRA adapter gains
#: nothing from it); the GaLore optimizers cap it per layer instead (``rso.optim``, galore-torch).
UNCAPPED_RANK_METHODS = tuple(m for m, rule in _METHODS.items() if rule.rank == "uncapped")


def _get(cfg, key, default=None):
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    value = getattr(cfg, key, default)
    return default if value is None else value


def _load_config(config):
    """A preset name, a path to a config.json / directory, a dict or an HF config object."""
    if isinstance(config, str):
        key = config.lower()
        key = key if key in PRESETS else f"llama-{key}"
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
    """The shapes ``estimate`` needs, from a preset name, a dict or an HF config of a LLaMA-family model (or of a
    mixture of experts of :data:`MOE_FAMILIES`)."""
    cfg, _ = _load_config(config)
    dense = "moe_intermediate_size" not in MOE_FAMILIES.get(_get(cfg, "model_type"), {})  # Qwen-MoE: no dense MLP
    required = ("hidden_size",) + (("intermediate_size",) if dense else ()) + ("num_attention_heads",
                                                                               "num_hidden_layers")
    missing = [k for k in required if _get(cfg, k) is None]
    if missing:
        raise ValueError(f"rso.memory.estimate handles LLaMA-family decoders (hidden_size, intermediate_size, "
                         f"num_attention_heads, num_hidden_layers); this config lacks {missing}")
    moe = _moe_fields(cfg)
    h, heads = int(_get(cfg, "hidden_size")), int(_get(cfg, "num_attention_heads"))
    return LlamaDims(hidden=h, intermediate=int(_get(cfg, "intermediate_size", 0)), heads=heads,
                     kv_heads=int(_get(cfg, "num_key_value_heads", heads) or heads),
                     head_dim=int(_get(cfg, "head_dim", h // heads) or h // heads),
                     layers=int(_get(cfg, "num_hidden_layers")), vocab=int(_get(cfg, "vocab_size", 32000)),
                     tied=bool(_get(cfg, "tie_word_embeddings", False)),
                     attention_bias=bool(_get(cfg, "attention_bias", False)),
                     mlp_bias=bool(_get(cfg, "mlp_bias", False)), **moe)


def _moe_fields(cfg) -> dict:
    """The :class:`LlamaDims` fields a config's family sets: q/k norms (Qwen3), and for a mixture of experts of
    :data:`MOE_FAMILIES` its experts (a family's config-class default for a field a dict leaves out). A ValueError
    for another mixture-of-experts family, or a setting the estimate does not model."""
    model_type = _get(cfg, "model_type")
    if model_type is None and _get(cfg, "num_local_experts") is not None:
        model_type = "mixtral"
    defaults = MOE_FAMILIES.get(model_type)
    if defaults is None:
        if _get(cfg, "num_local_experts") or _get(cfg, "num_experts"):
            raise ValueError(f"rso.memory.estimate: mixture-of-experts configs of model_type "
                             f"{', '.join(MOE_FAMILIES)} are modelled, this one has model_type {model_type!r} "
                             f"(a dict must name its model_type)")
        return {"qk_norm": model_type in _QK_NORM_FAMILIES}

    def get(key):
        value = _get(cfg, key)
        return defaults.get(key) if value is None else value

    for key, ok in (("output_router_logits", lambda v: not v), ("router_jitter_noise", lambda v: not v),
                    ("mlp_only_layers", lambda v: not v), ("decoder_sparse_step", lambda v: v in (None, 1))):
        if not ok(_get(cfg, key)):
            raise ValueError(f"rso.memory.estimate: {key}={_get(cfg, key)!r} is not modelled (every layer a "
                             f"mixture of experts, no load-balancing loss, no router jitter); leave it at its default")
    mixtral = model_type == "mixtral"
    return dict(qk_norm=model_type in _QK_NORM_FAMILIES, qkv_bias=bool(get("qkv_bias")),
                experts=int(get("num_local_experts" if mixtral else "num_experts")),
                experts_per_tok=int(get("num_experts_per_tok")),
                expert_intermediate=int(get("intermediate_size" if mixtral else "moe_intermediate_size")),
                shared_intermediate=int(get("shared_expert_intermediate_size") or 0),
                norm_topk=mixtral or bool(_get(cfg, "norm_topk_prob", False)), fp32_routing=mixtral)


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
    widths = [min(o, n) for _, o, n in _wrapped(llama_dims(config))]
    return PEER_RANKS.get(preset, max(1, min(llama_dims(config).hidden // 4, *widths)))


def _wrapped(dims: LlamaDims) -> list:
    """(name, out_features, in_features) of every weight a rank applies to: the 2-D linear layers, then the experts'."""
    return [(name, o, n) for name, o, n, _ in dims.linears] + dims.expert_weights


def check_rank(config, rank, method: str = "rso") -> None:
    """ValueError unless ``rank`` is an int ≥ 1 or a fraction f in (0, 1) of each layer's in_features and, for
    :data:`UNCAPPED_RANK_METHODS`, gives every linear layer and expert weight of ``config`` a rank r ≤ min(in, out)
    and a fraction at least half a channel (f·in ≥ 0.5), as ``rso.wrap`` requires (nothing is clamped). The
    message starts ``rank`` and names the widest (or narrowest) rank allowed."""
    if isinstance(rank, bool) or not isinstance(rank, (int, float)) or rank <= 0 \
            or (isinstance(rank, float) and rank >= 1):
        raise ValueError(f"rank must be an int ≥ 1 or a float in (0, 1), got {rank!r}")
    if method not in UNCAPPED_RANK_METHODS:
        return
    lin = _wrapped(llama_dims(config))
    narrowest = min(n for _, _, n in lin)
    if isinstance(rank, float) and rank * narrowest < 0.5:
        raise ValueError(f"rank {rank!r} rounds to 0 channels of a layer with in_features={narrowest} (rso.wrap "
                         f"refuses it); allowed: a fraction ≥ {0.5 / narrowest:.3g} here, or an int rank")
    for name, o, n in lin:
        r = _layer_rank(rank, n)
        if r > min(o, n):
            widest = min(min(o, n) for _, o, n in lin)
            fraction = math.floor(1e4 * min(min(o, n) / n for _, o, n in lin)) / 1e4  # rounded down: safe
            raise ValueError(f"rank {rank!r} gives {name} ({n} → {o}) rank {r}, more than its smaller dimension "
                             f"{min(o, n)}; the widest rank this config allows is {widest}"
                             + (f", or a fraction of in_features up to {fraction:g}" if fraction < 1 else ""))


def estimate(config, method: str = "adamw", rank=None, batch: int = 1, seq: int = 2048, dtype="bf16", *,
             attn: str = "sdpa", master_weights: bool = False, fp32_states: bool = False,
             share_projections: bool = True, chunked_ce: bool = False, lora_train_other: bool = False,
             lora_dtype: str | None = "fp32", galore_projector: str = "peer",
             step_tensors: bool | None = None, activation_checkpointing: bool = False,
             optimizer_bits: int | None = None, per_layer_updates: bool = False, quantize: str | None = None) -> dict:
    """Bytes of weights, gradients, optimizer state and activations of one training step.

    Args:
        config: preset ``"llama-60m"`` … ``"llama-7b"`` (or ``"60m"``), ``"mixtral-8x7b"``, ``"qwen3-30b-a3b"``,
            ``"moe-tiny"``, a dict / HF config / config.json path (a mixture of experts of :data:`MOE_FAMILIES`).
        method: ``"adamw"`` (full), ``"galore"`` (attention and MLP weights projected, the peer's recipe),
            ``"rso"`` (every decoder linear layer and stacked expert weight wrapped), ``"lora"`` (adapters on
            every decoder linear layer, everything else frozen; dense configs only) or ``"frozen"`` (linear and
            expert weights frozen: the floor). See the module docstring for a mixture of experts.
        rank: int, or a float fraction of each layer's in_features; default: the peers' rank for a preset,
            else hidden/4 (at most the narrowest layer's width). For rso and lora a rank above a layer's (or an
            expert weight's) min(in, out), or a fraction under half a channel, is a ValueError naming the
            allowed (:func:`check_rank`; ``rso.wrap`` refuses it); GaLore's is capped at each layer's
            min(in, out), as its optimizers cap it.
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
        quantize: None, ``"int8"`` or ``"nf4"`` (method ``"rso"`` on a dense config, else a ValueError): each
            wrapped layer's W₀ stored as bitsandbytes stores it (:func:`quantized_bytes`), and ``total`` adds
            one layer's W₀ dequantized in ``dtype`` (the largest, with int8's fp32 step in a 16-bit dtype;
            ``dequantize_transient``).
    """
    _check_options(method, attn, galore_projector, batch, seq)
    _check_method_for(config, method, quantize)
    rank = _checked_rank(config, rank, method)
    _check_savers(optimizer_bits, chunked_ce)
    rule = _METHODS[method]
    s = _step(config, rule, rank, seq, dtype, attn=attn, share_projections=share_projections,
              sb32=fp32_states or optimizer_bits == 32, lora_train_other=lora_train_other, lora_dtype=lora_dtype,
              galore_projector=galore_projector)
    p = _parameters(s, rule)
    step_tensors = (rule.step_tensor and optimizer_bits != 8) if step_tensors is None else step_tensors
    optimizer, subspace, gradients = _optimizer(s, rule, p, optimizer_bits == 8, step_tensors, per_layer_updates)
    kept, recompute = _activations(s, rule, batch, chunked_ce, activation_checkpointing)
    codes, scales, dense_w0, transient = _quantized(s, quantize)
    parameters, buffers = p["n_all"] * s.wb - dense_w0 + codes, p["buffers"] + scales
    weights = parameters + buffers + p["adapter_extra"]
    master = p["trainable"] * 4 if (master_weights and s.wb != 4) else 0
    total = weights + master + gradients + optimizer + kept + recompute + transient
    return {"weights": weights + master, "gradients": gradients, "optimizer": optimizer,
            "activations": kept + recompute, "total": total,
            "parameters": parameters, "trainable_parameters": p["trainable"] * s.wb,
            "buffers": buffers, "master_weights": master,
            "quantize": quantize, "quantized_weights": codes + scales, "dequantize_transient": transient,
            "activations_kept": kept, "activations_recompute": recompute,
            "optimizer_subspace": subspace,
            "n_parameters": p["n_all"], "n_trainable": p["trainable"],
            "method": method, "rank": rank, "batch": batch, "seq": seq, "dtype": str(dtype), "attn": attn,
            "activation_checkpointing": bool(activation_checkpointing), "chunked_ce": chunked_ce,
            "optimizer_bits": optimizer_bits, "per_layer_updates": bool(per_layer_updates)}


def _check_savers(optimizer_bits, chunked_ce) -> None:
    if optimizer_bits not in (None, 8, 16, 32):
        raise ValueError(f"rso.memory.estimate: optimizer_bits must be 8, 16, 32 or None, got {optimizer_bits!r}")
    if chunked_ce not in (False, None, True, "recompute", "fused"):
        raise ValueError(f"rso.memory.estimate: chunked_ce must be False, True, 'recompute' or 'fused', "
                         f"got {chunked_ce!r}")


def _check_method_for(config, method, quantize) -> None:
    """ValueError for a ``quantize`` :func:`estimate` does not know or a method other than rso with it, and for
    LoRA or ``quantize`` on a mixture of experts."""
    if quantize not in QUANTIZE:
        raise ValueError(f"rso.memory.estimate: quantize must be one of {QUANTIZE}, got {quantize!r}")
    if quantize is not None and method != "rso":
        raise ValueError(f"rso.memory.estimate: quantize={quantize!r} stores RSO's frozen W₀ quantized, it goes with "
                         f"method='rso', got method={method!r}; leave quantize=None for {method}")
    if not llama_dims(config).moe:
        return
    if method == "lora":
        raise ValueError("rso.memory.estimate: method='lora' is not modelled on a mixture of experts (PEFT's "
                         "target_modules do not reach the stacked expert weights); allowed: "
                         f"{', '.join(m for m in METHODS if m != 'lora')}")
    if quantize is not None:
        raise ValueError(f"rso.memory.estimate: quantize={quantize!r} quantizes 2-D linear layers, and a mixture of "
                         f"experts keeps its stacked expert weights (most of it) in their dtype; leave quantize=None")


def _check_options(method, attn, galore_projector, batch, seq) -> None:
    """ValueError for a method, attention, projector, batch or seq :func:`estimate` does not know."""
    if method not in METHODS:
        raise ValueError(f"rso.memory.estimate: method must be one of {METHODS}, got {method!r}")
    if attn not in ("sdpa", "eager"):
        raise ValueError(f"rso.memory.estimate: attn must be 'sdpa' or 'eager', got {attn!r}")
    if galore_projector not in ("peer", "rank"):
        raise ValueError(f"rso.memory.estimate: galore_projector must be 'peer' or 'rank', got {galore_projector!r}")
    for name, value in (("batch", batch), ("seq", seq)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"rso.memory.estimate: {name} must be a positive int, got {value!r}")


def _checked_rank(config, rank, method):
    """``rank``, or the default one (:func:`default_rank`), after :func:`check_rank` (and the config's shapes)."""
    llama_dims(config)  # the config's own error comes before the rank's
    rank = default_rank(config) if rank is None else rank
    try:
        check_rank(config, rank, method)
    except ValueError as e:
        raise ValueError(f"rso.memory.estimate: {e}") from None
    return rank


def _step(config, rule, rank, seq, dtype, *, attn, share_projections, sb32, lora_train_other, lora_dtype,
          galore_projector) -> _Step:
    """The shapes and byte sizes of one estimate. Moments are 4 bytes with ``sb32``, else ``dtype``'s; a trained
    per-layer tensor has its method's adapter dtype (None: ``dtype``). RSO's q/k/v share one projection group,
    and gate/up one, when ``share_projections`` (each layer its own otherwise)."""
    d = llama_dims(config)
    if rule.rank == "uncapped" and d.shared_intermediate and _layer_rank(rank, d.hidden) == 1:
        d = dataclasses.replace(d, wrapped_gate=True)  # rank 1 fits the 1-output gate: rso.wrap wraps it too
    wb = _bytes_of(dtype)
    adapter_dtype = rule.adapter_dtype(lora_dtype)
    ranks = {name: _rank_for(rank, o, n) for name, o, n, _ in d.linears}
    groups = {(grp, ranks[name]) if share_projections else name: (ranks[name], n) for name, _, n, grp in d.linears}
    return _Step(dims=d, wb=wb, sb=4 if sb32 else wb, ab=_bytes_of(adapter_dtype) if adapter_dtype else wb,
                 ranks=ranks, expert_ranks={name: _rank_for(rank, o, n) for name, o, n in d.expert_weights},
                 groups=groups, trains_others=rule.trains_others(lora_train_other), attn=attn, seq=seq,
                 galore_projector=galore_projector)


def _parameters(s: _Step, rule: _Method) -> dict:
    """Element counts: ``n_params`` (the model: embeddings, head unless tied, final norm, per layer the linear
    and expert weights and :attr:`LlamaDims.layer_others`), ``n_all`` (plus new per-layer tensors: L·Σ tensors
    unless the method trains W itself), ``trainable`` (L·Σ tensors, plus everything but the linear weights when the rest trains) and
    ``n_tensors`` (trainable tensors); ``buffers`` in bytes (RoPE's two inv_freq, in the model's dtype, and the
    method's); ``adapter_extra``: bytes the new tensors take beyond ``wb`` each, (ab − wb)·their elements."""
    d, L = s.dims, s.dims.layers
    lin_weights = sum(_weights(s))
    n_params = d.vocab * d.hidden * (1 if d.tied else 2) + d.hidden + L * (lin_weights + sum(d.layer_others))
    n_tensors_other = 2 + (0 if d.tied else 1) + L * len(d.layer_others)
    tensors = rule.tensors(s)
    extra = 0 if rule.trains_weight else L * sum(tensors)
    others = s.trains_others
    return {"n_params": n_params, "n_all": n_params + extra,
            "trainable": L * sum(tensors) + (n_params - L * lin_weights if others else 0),
            "n_tensors": L * len(tensors) + (n_tensors_other if others else 0),
            "buffers": 2 * (d.head_dim // 2) * s.wb + L * rule.buffers(s),
            "adapter_extra": (s.ab - s.wb) * extra}


def _optimizer(s: _Step, rule: _Method, p: dict, eight_bit: bool, step_tensors: bool, per_layer_updates: bool):
    """(optimizer bytes, the subspace tensors' moment bytes, gradient bytes). Moments are kept for the
    embeddings, head and final norm, each layer's other parameters (norms, router, biases: when they train) and
    the method's tensors
    (or its projected moments, plus wb bytes per projector element); 4 bytes per trainable tensor with
    ``step_tensors``. Gradients: every trainable element (ab bytes for the method's new tensors), or with
    ``per_layer_updates`` only the largest single gradient."""
    d, L = s.dims, s.dims.layers
    other = ([d.vocab * d.hidden] * (1 if d.tied else 2) + [d.hidden]) if s.trains_others else []
    layer_other = d.layer_others if s.trains_others else []
    tensors = rule.tensors(s)
    moment_sub, projector = rule.moments(s) if rule.moments else (tensors, 0)
    if eight_bit:
        subspace = L * sum(_states_8bit(x) for x in moment_sub)
        optimizer = subspace + sum(_states_8bit(x) for x in other) + L * sum(_states_8bit(x) for x in layer_other)
        optimizer += 2 * 256 * 4 if any(x >= 4096 for x in [*other, *(layer_other + moment_sub) * L]) else 0
    else:
        subspace = 2 * max(s.sb, s.ab) * L * sum(moment_sub)
        optimizer = subspace + 2 * s.sb * (sum(other) + L * sum(layer_other))
    optimizer += s.wb * L * projector + (4 * p["n_tensors"] if step_tensors else 0)
    if per_layer_updates:  # a gradient lives only until its own optimizer step
        return optimizer, subspace, max([*other, *layer_other, *tensors]) * s.ab
    return optimizer, subspace, p["trainable"] * s.wb + p["adapter_extra"]


def _states_8bit(numel: int) -> int:
    """bitsandbytes AdamW8bit's state bytes of one tensor: two uint8 moments plus an fp32 absmax per 256 elements
    of each when it has ≥ 4096 elements, else two fp32 moments (the quantization maps are counted once)."""
    return 2 * numel + 2 * 4 * -(-numel // 256) if numel >= 4096 else 8 * numel


def _layer_activations(s: _Step, rule: _Method) -> int:
    """Per token bytes one decoder layer saves: two RMSNorms (trained: 4h + 4 + wb·h; frozen: 4h + 4), the
    attention (SDPA: q, k, v, output, fp32 log-sum-exp; eager: q, k, v, the fp32 softmax of size a·seq and its
    low-precision copy), with q/k norms one RMSNorm of width e per query and key-value head, the MLP's gate,
    SiLU(gate) and up (3·wb·i) or a mixture of experts' (:func:`_moe_activations`), and what the method's linear
    layers save."""
    d, wb = s.dims, s.wb
    e, a, g = d.head_dim, d.heads, d.kv_heads

    def norm(width):
        return 4 * width + 4 + (wb * width if s.trains_others else 0)

    if s.attn == "sdpa":
        attention = wb * (2 * a * e + 2 * g * e) + 4 * a
    else:
        attention = wb * 3 * a * e + 4 * a * s.seq + (wb * a * s.seq if wb != 4 else 0)
    qk_norm = (a + g) * norm(e) if d.qk_norm else 0
    mlp = _moe_activations(s, rule) if d.moe else 3 * wb * d.intermediate
    return 2 * norm(d.hidden) + attention + qk_norm + mlp + rule.saved(s)


def _moe_activations(s: _Step, rule: _Method) -> int:
    """Per token bytes a mixture of experts saves (transformers' eager experts loop): the router's input (wb·h;
    the shared expert's and its gate's too), fp32 softmax (4E), top-k indices (8k) and, renormalized, the top-k
    values and their sum (4k + 4); a shared expert's gate, SiLU(gate) and up (3·wb·Is), its sigmoid gate (wb)
    and output (wb·h); and per routed (token, expert) pair, k per token: the pair's token and slot indices (16),
    gate_up's output (2·wb·Ie), SiLU(gate) (wb·Ie), down's output (wb·h), the routing weight (4 if kept fp32,
    else wb), the weighted output index_add keeps (wb·h) and what the method's expert maps save."""
    d, wb = s.dims, s.wb
    k, ie, h = d.experts_per_tok, d.expert_intermediate, d.hidden
    router = wb * h + 4 * d.experts + 8 * k + (4 * k + 4 if d.norm_topk else 0)
    shared = 3 * wb * d.shared_intermediate + wb + wb * h if d.shared_intermediate else 0
    pair = 16 + 3 * wb * ie + 2 * wb * h + (4 if d.fp32_routing else wb) + rule.pair_saved(s)
    return router + shared + k * pair


def _head_activations(s: _Step, batch: int, chunked_ce) -> tuple:
    """(per token bytes, fixed bytes) of the loss head: ``"fused"``: d loss/d h per token and the head's weight
    gradient (if it trains); chunked: h, an fp32 log-sum-exp and the int64 target; else the head's input (if it
    trains), the fp32 log-softmax (4V), the target and a 4-byte scalar. At batch 1 (not fused) the shifted labels
    keep their padded storage: 8 bytes more (Hugging Face pads one ignore_index and slices [..., 1:])."""
    d, wb, others = s.dims, s.wb, s.trains_others
    if chunked_ce == "fused":
        per_token, fixed = wb * d.hidden, (d.vocab * d.hidden * wb if others else 0)
    elif chunked_ce:
        per_token, fixed = wb * d.hidden + 4 + 8, 0
    else:
        per_token, fixed = (wb * d.hidden if others else 0) + 4 * d.vocab + 8, 4
    return per_token, fixed + (8 if chunked_ce != "fused" and batch == 1 else 0)


def _activations(s: _Step, rule: _Method, batch: int, chunked_ce, checkpointing: bool) -> tuple:
    """(kept, recompute) activation bytes over T = batch·seq tokens. Besides L layers: the token ids (8 per token)
    and the final norm (4h + 4 + wb·h, or 4h + 4 frozen), the head, RoPE's cos and sin (2·seq·e·wb); with frozen
    norms layer 0's input norm sees no grad (4h + 4 less). With checkpointing kept is each block's input (wb·h per
    layer) and what runs outside the blocks, recompute one block's own saved tensors less what is kept already
    (an fp32 RMSNorm saves its input itself: 4h) plus cos and sin."""
    d, wb, T = s.dims, s.wb, batch * s.seq
    layer = _layer_activations(s, rule)
    frozen_norm = 4 * d.hidden + 4
    final_norm = frozen_norm + (wb * d.hidden if s.trains_others else 0)
    ids, first_norm = (8, 0) if s.trains_others else (0, -frozen_norm)
    head, fixed = _head_activations(s, batch, chunked_ce)
    rope = 2 * s.seq * d.head_dim * wb
    if not checkpointing:
        return T * (ids + d.layers * layer + first_norm + final_norm + head) + rope + fixed, 0
    kept = T * (ids + d.layers * wb * d.hidden + final_norm + head) + fixed
    return kept, T * (layer - (4 * d.hidden if wb == 4 else 0)) + rope


def quantized_bytes(out_features: int, in_features: int, quantize: str) -> int:
    """Bytes of one out×in W₀ stored as bitsandbytes stores it: :func:`_quantized_parts` summed."""
    return sum(_quantized_parts(out_features, in_features, quantize))


def _quantized_parts(out_features: int, in_features: int, quantize: str) -> tuple:
    """(code bytes, scale bytes) of one out×in W₀ (n = out·in): ``"nf4"`` two 4-bit codes a byte (⌈n/2⌉) and one
    fp32 absmax per block of 64 (4·⌈n/64⌉, no double quantization); ``"int8"`` one int8 code a weight (n) and one
    fp32 absmax per output row (4·out)."""
    n = out_features * in_features
    if quantize == "nf4":
        return -(-n // 2), 4 * -(-n // 64)
    if quantize == "int8":
        return n, 4 * out_features
    raise ValueError(f"rso.memory.quantized_bytes: quantize must be 'int8' or 'nf4', got {quantize!r}")


def _quantized(s: _Step, quantize) -> tuple:
    """(code bytes of the wrapped layers' quantized W₀, held as parameters; their scale bytes, held as buffers;
    the bytes W₀ would take in ``dtype``; the transient of dequantizing one layer's W₀ to ``dtype``: the largest
    layer's wb·out·in, and for int8 in a 16-bit dtype (4 + wb)·out·in, as bitsandbytes' int8 dequantization
    goes through an fp32 matrix), all zeros without ``quantize``."""
    if quantize is None:
        return 0, 0, 0, 0
    lin, L = s.dims.linears, s.dims.layers
    codes, scales = (L * sum(x) for x in zip(*(_quantized_parts(o, n, quantize) for _, o, n, _ in lin)))
    per_element = s.wb + (4 if quantize == "int8" and s.wb != 4 else 0)
    return codes, scales, L * s.wb * sum(o * n for _, o, n, _ in lin), per_element * max(o * n for _, o, n, _ in lin)


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
    if result.get("quantize"):
        lines.append(f"  (weights include {gigabytes(result['quantized_weights'])} of W₀ stored {result['quantize']}; "
                     f"total includes {gigabytes(result['dequantize_transient'])} for one layer's W₀ dequantized)")
    for gpu, cap in GPU_SIZES.items():
        ok = fits(result, cap)
        lines.append(f"{'fits on ' + gpu if ok else 'does NOT fit on ' + gpu} "
                     f"({result['total'] / 2 ** 30:.1f} GiB needed, {(cap - GPU_RESERVE) / 2 ** 30:.0f} GiB usable)")
    return "\n".join(lines)

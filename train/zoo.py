"""An architecture zoo generated from transformers' auto mappings: every (task, model_type) pair of
``MODEL_FOR_<TASK>_MAPPING_NAMES`` is built tiny (random weights, float32, seeded) and run through RSO's
whole lifecycle; the table says which pass, which ``rso`` refuses, which fail (at which step) and which
could not be built.

    python -m rso.train.zoo [--tasks causal-lm,...] [--only llama,gpt2] [--moe] [--out docs/results/zoo] [--timeout 180]

Lifecycle (in order; the first failure is the record's step; a step whose prerequisite raised is skipped, the
others still run):

    build       the config class with small sizes (:func:`shrink`), the mapping's class ``_from_config``, float32,
                seed 0 (NOT_BUILT when it fails)
    plain       the unwrapped model runs the task's batch forward and backward with a gradient in some linear layer
                (NOT_BUILT when not: no input recipe, or a dead tiny network)
    wrap        ``rso.wrap(model, rank=4, tau=2)`` with the default targets: linear layers and the stacked expert
                weights of transformers' experts modules (``SubspaceExperts``); those narrower than 4 are left
                out and listed (rank = the widest one's min(in, out) when none takes 4) (REFUSED: its one-line
                error)
    wraps       wrapping does something: no wrapped weight's W₀ is read outside its forward (there B would be
                silently ignored); each wrapped weight (layer or stacked expert weight, every member of
                ``rso.wrapping.subspace_members``) that B's gradient says is used, and all B at once, move the logits
    train       3 AdamW steps (a merge after the 2nd, so B ≠ 0 at the end), finite loss, state step 3 / cycle 1,
                B ≠ 0 in every used member
    save        ``save_pretrained`` (merges B into W₀ in place): logits unchanged
    plain_load  ``AutoModelFor<Task>.from_pretrained``: same logits
    rso_load    ``rso.from_pretrained(<class>, dir)``: same logits, ``rso.state``, B, P/seed/counter buffers and P
                groups; 2 more steps on both (a merge and resample at step 4): the same again
    unwrap      ``rso.unwrap`` of a deep copy: same logits, no SubspaceLinear / SubspaceExperts left, requires_grad
                as before wrap
    modes       training mode under no_grad, eval, eval under no_grad and under inference_mode: the logits of
                the training-mode forward (dropout is off, batch norm frozen)
    checkpointing  ``gradient_checkpointing_enable()`` (where supported) gives the same B gradients

A load that fails or differs is repeated with the unwrapped model (:func:`_unwrapped_round_trip_differs`): when
that differs too, the reason says so (transformers' doing, not rso's).

Mixture-of-experts models run float32 like the others: their unwrapped experts use the config's experts
implementation (transformers' ``grouped_mm`` on CPU, which takes float32), a wrapped experts module its own loop;
:func:`eager_experts` switches a model to transformers' "eager" loop where a comparison needs it (float64, which
``grouped_mm`` refuses).

Tolerance: logits and gradients (float32) agree when ``max|a − b| ≤ TOL · max|b|``, TOL = 1e-4. The two sides
differ by the evaluation order only (``x(W₀+sBP)ᵀ`` against ``xW₀ᵀ + s(xPᵀ)Bᵀ``, the merge's rounding, a
recomputation): a linear layer adds at most ``in_features·ε ≈ 128 · 1.2e-7 ≈ 1.5e-5`` relative error (worst
case; √in·ε typically) over at most four blocks, so 1e-4 bounds it, while a lost B or P moves the logits by the
training signal (``signal``: the relative change 3 steps make, ≥ 0.1 in every passing record). Measured over a
whole run: at most 1e-6 in every passing record but one whose unwrapped round trip moves its logits as well.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import pathlib
import sys
import tempfile
import time
import traceback
import warnings

__all__ = ["TASKS", "TOL", "entries", "shrink", "build", "eager_experts", "make_batch", "members", "run_one", "run_all",
           "write_results", "main"]

#: task name -> (the auto mapping's name in ``transformers.models.auto.modeling_auto``, the Auto class)
TASKS = {
    "causal-lm": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
    "sequence-classification": ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
                                "AutoModelForSequenceClassification"),
    "masked-lm": ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM"),
    "seq2seq-lm": ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM"),
    "image-classification": ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForImageClassification"),
}
TOL = 1e-4
NOISE = 1e-5  # a B gradient this small relative to the largest is rounding, not use (see _step_wraps)
RANK, TAU, LR, SEED = 4, 2, 1e-2, 0
BATCH, SEQ, DECODER_SEQ, VOCAB, IMAGE = 2, 8, 6, 128, 32
#: the suffix of a load's mismatch that the unwrapped model shows too (transformers' doing, not rso's)
ALSO_UNWRAPPED = "(the unwrapped model's save/load round trip differs too: transformers)"
STEPS = ("build", "plain", "wrap", "wraps", "train", "save", "plain_load", "rso_load", "unwrap", "modes",
         "checkpointing")


# ----------------------------------------------------------------------------- the entries
def entries(tasks=None, only=None, moe=False) -> list[tuple[str, str, str]]:
    """(task, model_type, model class name) for every pair of the auto mappings, in mapping order; ``moe``: only
    the classes whose modeling file uses transformers' experts interface (:func:`uses_experts_interface`)."""
    from transformers.models.auto import modeling_auto
    out = []
    for task in tasks or TASKS:
        for model_type, names in getattr(modeling_auto, TASKS[task][0]).items():
            name = names if isinstance(names, str) else names[0]
            if (only is None or model_type in only) and (not moe or uses_experts_interface(name)):
                out.append((task, model_type, name))
    return out


def uses_experts_interface(class_name: str) -> bool:
    """Does the modeling file that defines transformers' ``class_name`` decorate an experts class with
    ``@use_experts_implementation`` (the experts modules ``rso.layers.subspace_experts.is_experts_module``
    recognizes)? Read from the file, which is not imported (its tiny model may still have none: a config whose
    default turns the experts off)."""
    import importlib.util
    import inspect
    import transformers
    module = getattr(transformers, "_class_to_module", {}).get(class_name)
    try:
        spec = importlib.util.find_spec(f"transformers.{module}") if module else None
        path = spec.origin if spec is not None else inspect.getsourcefile(getattr(transformers, class_name))
    except (AttributeError, ImportError, TypeError):  # not a transformers class, or not importable here
        return False
    return "@use_experts_implementation" in pathlib.Path(path).read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- small configs
def _names(value, *names):
    return dict.fromkeys(names, value)


#: attribute name -> small value, set wherever a config (or a sub-config) has the attribute, not None.
SIZES = {
    **_names(64, "hidden_size", "d_model", "n_embd", "dim", "embed_dim", "n_embed", "emb_dim",
             "word_embed_proj_dim", "embedding_size", "d_latents", "lru_width", "attention_hidden_size",
             "true_hidden_size", "input_embedding_size", "output_embedding_size", "projection_dim",
             "pooler_hidden_size", "pooler_output_size", "backbone_hidden_size", "decoder_hidden_size",
             "intra_bottleneck_size", "embedding_dim", "adapter_in_dim", "adapter_input_size", "adapter_out_dim"),
    **_names(4, "num_attention_heads", "n_head", "encoder_attention_heads", "decoder_attention_heads", "num_heads",
             "n_heads", "attention_heads", "num_self_attention_heads", "num_cross_attention_heads",
             "num_encoder_attention_heads", "num_decoder_attention_heads", "mamba_n_heads", "mamba_num_heads",
             "n_mamba_heads", "linear_num_value_heads", "linear_num_heads", "swa_num_attention_heads",
             "index_n_heads"),
    **_names(2, "num_key_value_heads", "num_kv_heads", "num_query_groups", "multi_query_group_num",
             "linear_num_key_heads", "swa_num_key_value_heads", "index_num_heads"),
    **_names(16, "head_dim", "d_kv", "attention_head_size", "d_head", "kv_channels", "v_head_dim", "mamba_d_head",
             "mamba_head_dim", "mamba_headdim", "linear_key_head_dim", "linear_value_head_dim", "linear_head_dim",
             "swa_head_dim", "index_head_dim", "kv_lora_rank", "state_size", "mamba_d_state", "ssm_state_size",
             "attention_head_dim", "dim_head"),
    **_names(8, "qk_rope_head_dim", "qk_nope_head_dim", "time_step_rank", "mamba_dt_rank", "conv_L_cache",
             "rotary_dim"),
    **_names(32, "q_lora_rank"),
    **_names(128, "intermediate_size", "ffn_dim", "d_ff", "encoder_ffn_dim", "decoder_ffn_dim", "n_inner", "d_inner",
             "feed_forward_size", "ffn_hidden_size", "dim_ff", "dff", "intermediate_size_mlp",
             "dense_intermediate_size", "first_dense_intermediate_size"),
    **_names(32, "moe_intermediate_size", "shared_expert_intermediate_size", "shared_intermediate_size",
             "moe_shared_expert_intermediate_size", "expert_ffn_hidden_size", "shared_experts_intermediate_size"),
    **_names(4, "num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"),
    **_names(2, "num_experts_per_tok", "moe_topk", "moe_k", "num_experts_per_token", "index_topk"),
    **_names(1, "n_shared_experts", "num_shared_experts", "moe_num_shared_experts", "n_group", "topk_group",
             "num_expert_group", "first_k_dense_replace", "num_dense_layers", "mamba_expand", "expand",
             "mamba_n_groups", "mamba_ngroups", "n_groups", "decoder_sparse_step", "interleave_moe_layer_step"),
    **_names(VOCAB, "vocab_size", "decoder_vocab_size", "src_vocab_size", "tgt_vocab_size", "unpadded_vocab_size",
             "vocab_size_per_layer_input"),
    **_names(64, "max_position_embeddings", "n_positions", "n_ctx", "max_source_positions", "max_target_positions",
             "max_seq_len", "context_length"),
    **_names(IMAGE, "image_size"),
    **_names(8, "patch_size"),
}
#: attribute names that count layers; the zoo keeps 2 of each (more where a per-layer kind list needs them).
LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "encoder_layers", "decoder_layers", "n_layers",
          "num_decoder_layers", "num_encoder_layers", "num_self_attends_per_block")
#: substrings of float attributes that are dropout-like (set to 0: the comparisons need a deterministic forward)
STOCHASTIC = ("dropout", "pdrop", "drop_path", "layerdrop", "drop_rate", "drop_prob", "jitter", "drop_connect")
#: attributes whose default None breaks the model (filled from :data:`SIZES`; pad_token_id = 0 lets decoders
#: classify a batch of two)
NONE_FILLED = ("head_dim", "num_key_value_heads", "num_experts_per_tok", "n_routed_experts", "n_shared_experts",
               "pad_token_id")
_SPECIAL_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "unk_token_id",
                "sep_token_id", "cls_token_id", "mask_token_id")


def _per_layer(value, old: int) -> bool:
    return isinstance(value, list) and old > 2 and len(value) == old


def _layer_lists(defaults: dict, old: int):
    """Lists with one entry per layer (``old`` layers): kinds (strings, bools) keep each distinct kind once, in
    order, so a hybrid keeps every block type; sorted int lists are layer indices (kept below the new count)."""
    kinds = {k: list(dict.fromkeys(v)) for k, v in defaults.items()
             if _per_layer(v, old) and isinstance(v[0], (str, bool))}
    layers = min(4, max([2] + [len(v) for v in kinds.values()]))
    out = {k: (v * layers)[:layers] for k, v in kinds.items()}
    for k, v in defaults.items():
        if k not in out and _per_layer(v, old) and all(isinstance(i, int) for i in v):
            out[k] = [i for i in v if i < layers] if v == sorted(set(v)) else v[:layers]
    return layers, out


def _shrink_list(key, value):
    """Per-stage lists of vision backbones: one block per stage, narrow stages, ≤ 2 heads."""
    if key in ("depths", "num_block_repeats", "block_repeats", "stage_num_blocks", "stage_numb_of_layers"):
        return [1] * len(value)
    if key in ("hidden_sizes", "embed_dims", "embed_dim", "neck_hidden_sizes"):
        return [min(v, 16 * 2 ** min(i, 2)) for i, v in enumerate(value)]
    if key in ("num_heads", "num_attention_heads"):
        return [min(v, 2) for v in value]
    return None


def shrink(defaults: dict) -> dict:
    """Small-size overrides for a config whose default ``to_dict()`` is ``defaults`` (recursively for
    sub-config dicts): every attribute of :data:`SIZES` it has, 2 layers (more when per-layer kinds need
    them), no dropout, special token ids inside the small vocabulary."""
    staged = "depths" in defaults  # a vision backbone: its layer counts are per stage (``depths``)
    old = 0 if staged else next((defaults[k] for k in LAYERS if isinstance(defaults.get(k), int)), 2)
    layers, out = _layer_lists(defaults, old)
    for key, value in defaults.items():
        if value is None and key in NONE_FILLED:
            out[key] = SIZES.get(key, 0)
        if isinstance(value, bool) or value is None or key in out:
            continue
        if key in LAYERS and isinstance(value, int) and not staged:
            out[key] = min(value, layers)
        elif key in SIZES and isinstance(value, int):
            out[key] = min(value, SIZES[key])
        elif key == "image_size" and isinstance(value, list):
            out[key] = [IMAGE] * len(value)
        elif isinstance(value, float) and any(s in key for s in STOCHASTIC):
            out[key] = 0.0
        elif isinstance(value, list) and any(s in key for s in STOCHASTIC):
            out[key] = [0.0] * len(value)
        elif isinstance(value, list) and (small := _shrink_list(key, value)) is not None:
            out[key] = small
        elif key.endswith("_layers") and isinstance(value, list) and value[:layers] == list(range(layers)):
            out[key] = value[:layers - 1]  # layer indices naming every kept layer: the last one keeps the other kind
        elif key.endswith("_period") and isinstance(value, int) and value > 2:
            out[key], out[key[:-len("period")] + "offset"] = 2, 1
        elif isinstance(value, dict) and "model_type" in value:
            out[key] = {"model_type": value["model_type"], **shrink(value)}
        elif isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            out[key] = {k: {**v, **shrink(v)} for k, v in value.items()  # per-layer overrides of kept layers
                        if not str(k).isdigit() or int(k) < layers}
    if isinstance(defaults.get("num_key_value_heads"), int) and \
            defaults["num_key_value_heads"] == defaults.get("num_attention_heads"):
        out["num_key_value_heads"] = out.get("num_attention_heads", defaults["num_attention_heads"])  # stays MHA
    if "qk_rope_head_dim" in defaults and defaults.get("head_dim") == defaults["qk_rope_head_dim"]:
        out["head_dim"] = out["qk_rope_head_dim"]  # multi-head latent attention: the rotary part's width
    vocab = out.get("vocab_size", defaults.get("vocab_size"))
    for i, key in enumerate(_SPECIAL_IDS):
        if isinstance(defaults.get(key), int) and isinstance(vocab, int) and defaults[key] >= vocab:
            out[key] = i
    for key, value in defaults.items():  # other token ids (image, audio...): at the top of the vocabulary
        if key not in _SPECIAL_IDS and key.endswith(("_token_id", "_token_index")) and isinstance(value, int) \
                and isinstance(vocab, int) and value >= vocab:
            out[key] = vocab - 1 - len([k for k in out if k.endswith(("_token_id", "_token_index"))])
    return out


def _quiet(model):
    """Dropout modules the config does not reach (fixed ``nn.Dropout(p)``, DropPath) get p = 0."""
    import torch
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for attr in ("drop_prob", "drop_path_rate"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
    return model


def build(model_type: str, class_name: str):
    """The task's model class (``class_name``) built from the config class with :func:`shrink`'s sizes: random
    weights (seed 0; linear layers initialized to zero get N(0, 0.02²) too), float32, 2 labels, no dropout."""
    import torch
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    config_class = CONFIG_MAPPING[model_type]
    config = config_class(**shrink(config_class().to_dict()), num_labels=2)
    if getattr(config, "is_encoder_decoder", False) and getattr(config, "decoder_start_token_id", None) is None:
        config.decoder_start_token_id = getattr(config, "pad_token_id", None) or 0
    model_class = getattr(transformers, class_name)
    wanted = getattr(model_class, "config_class", None)
    if wanted is not None and not isinstance(config, wanted) and isinstance(config.get_text_config(), wanted):
        config = config.get_text_config()  # a text-only class of a composite (multimodal) config
    torch.manual_seed(SEED)
    model = _quiet(model_class._from_config(config, dtype=torch.float32).float())
    with torch.no_grad():  # a zero-initialized head (MobileViT's) would hide every gradient behind it
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and not module.weight.any():
                module.weight.normal_(0.0, 0.02)
    return model


def eager_experts(model):
    """``model`` with its experts modules on transformers' "eager" expert loop (``set_experts_implementation``;
    a model without experts modules unchanged): ``grouped_mm``, the default, refuses float64."""
    from rso.layers.subspace_experts import is_experts_module
    if any(is_experts_module(m) for m in model.modules()):
        model.set_experts_implementation("eager")
    return model


def _image_size(config) -> tuple[int, int, int]:
    vision = getattr(config, "vision_config", None) or config
    size = getattr(vision, "image_size", IMAGE)
    size = size if isinstance(size, (list, tuple)) else (size, size)
    return getattr(vision, "num_channels", 3), int(size[-2]), int(size[-1])


def make_batch(task: str, config) -> dict:
    """Inputs and labels for one step of ``task`` (batch 2; 8 tokens, 6 decoder tokens, or one image each).
    Token ids avoid the lowest 4 (pad/bos/eos/unk) and the top 16 (other special tokens) of the vocabulary."""
    import torch
    g = torch.Generator().manual_seed(SEED + 1)
    labels = torch.tensor([0, 1])
    if task == "image-classification":
        return {"pixel_values": torch.randn(BATCH, *_image_size(config), generator=g), "labels": labels}
    vocab = config.get_text_config().vocab_size
    ids = torch.randint(4, max(5, vocab - 16), (BATCH, SEQ), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task == "sequence-classification" and isinstance(getattr(config, "eos_token_id", None), int):
        ids[:, -1] = config.eos_token_id  # BART-style heads read the last <eos>
    if task == "seq2seq-lm" and getattr(config, "is_encoder_decoder", False):
        decoder = torch.randint(4, max(5, vocab - 16), (BATCH, DECODER_SEQ), generator=g)
        return {**batch, "decoder_input_ids": decoder, "labels": decoder.roll(-1, dims=1)}
    return {**batch, "labels": labels if task == "sequence-classification" else ids.clone()}


# ----------------------------------------------------------------------------- forwards and comparisons
class Mismatch(AssertionError):
    """A lifecycle check that ran to the end and found another result than the reference."""


def _train_mode(model):
    """Training mode with batch-norm statistics frozen (dropout is already off): the same function as eval."""
    import torch
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    return model


def _forward(model, batch, train=False):
    """(output, logits) of one forward in training mode (``train``) or eval mode."""
    import torch
    (_train_mode(model) if train else model.eval())
    out = model(**batch)
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)):
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the model's output has no logits tensor ({type(out).__name__})")
    return out, logits


def _eval_logits(model, batch):
    import torch
    with torch.no_grad():
        return _forward(model, batch)[1]


def _loss(out, logits):
    """The model's own loss (labels are in the batch), else the mean square of the logits."""
    import torch
    loss = getattr(out, "loss", None)
    return loss if isinstance(loss, torch.Tensor) and loss.dim() == 0 else logits.float().square().mean()


def _relative_diff(a, b) -> float:
    """max|a − b| / max|b| (NaN or a shape change: infinite)."""
    a, b = a.detach().float(), b.detach().float()
    if a.shape != b.shape:
        raise Mismatch(f"shapes differ: {tuple(a.shape)} against {tuple(b.shape)}")
    if not a.numel():
        return 0.0
    d = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)
    return math.inf if math.isnan(d) else d


def _expect_close(record, what, a, b) -> float:
    """Raise :class:`Mismatch` unless a and b agree to :data:`TOL` relative to max|b|; keep the worst difference."""
    d = _relative_diff(a, b)
    record["max_rel_diff"] = max(record.get("max_rel_diff", 0.0), d)
    if not d <= TOL:
        raise Mismatch(f"{what}: max |Δ| / max |ref| = {d:.3g} > {TOL:g}")
    return d


def _train(model, batch, optimizer, steps: int):
    """``steps`` optimizer steps on one batch in training mode; the losses (each must be finite)."""
    import torch
    losses = []
    for _ in range(steps):
        out, logits = _forward(model, batch, train=True)
        loss = _loss(out, logits)
        if not torch.isfinite(loss):
            raise Mismatch(f"the loss is {loss.item()}")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _optimizer(model):
    import torch
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)


def _rso_buffers(model, suffix):
    return {n: b for n, b in model.named_buffers(remove_duplicate=False) if n.endswith(suffix)}


def _expect_same_rso_state(record, loaded, model):
    """Same ``rso.state``, the same wrapped weights (:func:`members`) with the same B (to :data:`TOL`), the same
    P / seed / counter buffers bit for bit, and P shared by the same groups."""
    import torch
    import rso
    if rso.state(loaded) != rso.state(model):
        raise Mismatch(f"rso.state {rso.state(loaded)} against {rso.state(model)}")
    mine, theirs = members(loaded), members(model)
    if set(mine) != set(theirs):
        raise Mismatch(f"the wrapped weights differ: {sorted(set(mine) ^ set(theirs))[:3]}")
    flat = lambda layers: torch.cat([layers[n].B.detach().flatten() for n in sorted(layers)])  # noqa: E731
    _expect_close(record, "B of the wrapped weights", flat(mine), flat(theirs))
    for suffix in (".P", ".seed", ".step", ".cycle"):
        mine, theirs = _rso_buffers(loaded, suffix), _rso_buffers(model, suffix)
        bad = sorted(set(mine) ^ set(theirs)) or [n for n in mine if not torch.equal(mine[n], theirs[n])]
        if bad:
            raise Mismatch(f"{len(bad)} of {len(theirs)} {suffix[1:]} buffers differ (e.g. {bad[0]})")
    if _p_groups(loaded) != _p_groups(model):
        raise Mismatch("the projection groups (layers sharing one P tensor) differ")


def _p_groups(model) -> list[list[str]]:
    """The names of the P buffers grouped by the tensor they are (a projection group shares one)."""
    groups = {}
    for name, buffer in _rso_buffers(model, ".P").items():
        groups.setdefault(buffer.data_ptr(), []).append(name)
    return sorted(sorted(g) for g in groups.values())


# ----------------------------------------------------------------------------- the lifecycle steps
class _Run:
    """What the steps of one architecture share."""

    def __init__(self, task, model_type, class_name, record):
        self.task, self.model_type, self.class_name, self.record = task, model_type, class_name, record
        self.model = self.batch = self.folder = self.flags = self.initial = self.ref = None
        self.unused = set()


def _step_build(run):
    from rso.layers.subspace_experts import is_experts_module
    run.model = build(run.model_type, run.class_name)
    run.batch = make_batch(run.task, run.model.config)
    run.record["parameters"] = sum(p.numel() for p in {id(p): p for p in run.model.parameters()}.values())
    run.record["experts_modules"] = sum(map(is_experts_module, run.model.modules()))


def _step_plain(run):
    """The unwrapped model runs the batch forward and backward, with a gradient below the head (else the zoo has
    no input recipe, or no live tiny network, for it)."""
    out, logits = _forward(run.model, run.batch, train=True)
    _loss(out, logits).backward()
    weights = [m.weight.grad for m in _linears(run.model)]
    if weights and not any(g is not None and g.any() for g in weights):
        raise RuntimeError("the loss has no gradient in any linear layer below the head (a dead tiny network)")
    run.model.zero_grad(set_to_none=True)
    run.flags = {n: p.requires_grad for n, p in run.model.named_parameters()}
    run.initial = _eval_logits(run.model, run.batch)


def members(model) -> dict:
    """{name: member} of every wrapped weight that has a B (``rso.wrapping.subspace_members``): each
    ``SubspaceLinear`` and each stacked expert weight's ``ExpertSubspace`` (``<experts>.rso.<weight>``)."""
    from rso.wrapping import subspace_members
    return subspace_members(model)


def _wrapped_parameters(model) -> set[str]:
    """The names of the wrapped weights' parameters: W₀, bias and B of each layer, W₀ and B of each stacked
    expert weight (its W₀ stays in the experts module under the weight's own name)."""
    import rso
    names = {f"{n}.{p}" for n, m in members(model).items() for p, _ in m.named_parameters()}
    return names | {f"{n}.{sub.name}" for n, layer in rso.expert_layers(model) for sub in layer.subspaces}


def _linears(model) -> list:
    """The Linear / Conv1D modules outside the output heads (what ``rso.wrap`` targets by default, at most)."""
    from torch import nn
    from rso.layers.subspace_linear import is_conv1d
    from rso.wrapping import DEFAULT_EXCLUDED
    return [m for n, m in model.named_modules()
            if (isinstance(m, nn.Linear) or is_conv1d(m)) and not set(n.split(".")) & set(DEFAULT_EXCLUDED)]


def _rank(model) -> int:
    """:data:`RANK`, or less when no (non-empty) linear layer outside the output heads and no stacked expert weight
    takes it (rank ≤ min(in, out)): the widest one's min(in, out). The narrower ones are left out by default."""
    from rso.layers.subspace_experts import expert_weight_names, is_experts_module
    widths = [min(m.weight.shape) for m in _linears(model) if m.weight.numel()]
    widths += [min(W.shape[1:]) for m in model.modules() if is_experts_module(m)
               for W in map(m._parameters.get, expert_weight_names(m)) if W is not None and W.dim() == 3]
    return min([RANK, max(widths)]) if widths else RANK


def _step_wrap(run):
    import rso
    from torch import nn
    run.record["rank"] = rank = _rank(run.model)
    rso.wrap(run.model, rank=rank, tau=TAU)
    params = {id(p): p for p in run.model.parameters()}.values()
    left_out = [line.partition("left as they are: ")[2] for line in rso.summary(run.model).splitlines()
                if "left as they are: " in line]
    run.record.update(
        wrapped=len(members(run.model)), experts=sum(len(m.subspaces) for _, m in rso.expert_layers(run.model)),
        left_out=left_out,
        linear_unwrapped=sum(isinstance(m, nn.Linear) or rso.layers.subspace_linear.is_conv1d(m)
                             for m in run.model.modules()),
        trainable_share=sum(p.numel() for p in params if p.requires_grad) / max(1, sum(p.numel() for p in params)))


def _moves(run, base, tensor, value) -> bool:
    """Do the eval logits differ at all from ``base`` while ``tensor`` holds ``value``? (restored after)"""
    import torch
    saved = tensor.detach().clone()
    with torch.no_grad():
        tensor.copy_(value)
    try:
        return not torch.equal(_eval_logits(run.model, run.batch), base)
    finally:
        with torch.no_grad():
            tensor.copy_(saved)


def _noise(tensor, like, g):
    """Gaussian values in ``tensor``'s shape with the Frobenius norm of ``like`` (1 if that is 0)."""
    import torch
    noise = torch.randn(tensor.shape, generator=g, dtype=tensor.dtype)
    return noise * ((like.detach().norm().item() or 1.0) / noise.norm().item())


def _probe(run, g) -> dict[str, tuple[float, float]]:
    """Per wrapped weight (:func:`members`): (max|∂probe/∂B|, max|∂probe/∂W₀|) for probe = Σ logits · R (R
    Gaussian), with W₀ made to require grad for this one backward. The wrapped forward never forms W₀'s gradient,
    so a non-zero one means the model reads W₀ outside that forward, where B is ignored."""
    import torch
    layers = list(members(run.model).items())
    frozen = [layer.weight.requires_grad for _, layer in layers]
    try:
        for _, layer in layers:
            layer.weight.requires_grad_(True)
        run.model.zero_grad(set_to_none=True)
        logits = _forward(run.model, run.batch, train=True)[1]
        (logits.float() * torch.randn(logits.shape, generator=g)).sum().backward()
        size = lambda grad: 0.0 if grad is None else grad.abs().max().item()  # noqa: E731
        return {name: (size(layer.B.grad), size(layer.weight.grad)) for name, layer in layers}
    finally:
        for (_, layer), flag in zip(layers, frozen):
            layer.weight.requires_grad_(flag)
            layer.weight.grad = None
        run.model.zero_grad(set_to_none=True)


def _step_wraps(run):
    """Wrapping must do something. Gradients of a random probe of the logits sort the wrapped layers: W₀ read
    outside the layer's forward (B silently ignored there: a failure), B used, or the layer unused by this
    forward (no W₀ gradient and a B gradient at most :data:`NOISE` times the largest one: rounding, as through a
    softmax over one key; recorded). Then setting each used layer's B, and all B at once, to random values must
    change the logits."""
    import torch
    g = torch.Generator().manual_seed(SEED + 2)
    grads = _probe(run, g)
    read_around = [n for n, (_, w) in grads.items() if w]
    floor = NOISE * max([b for b, _ in grads.values()] + [0.0])
    run.unused = {n for n, (b, w) in grads.items() if b <= floor and not w}
    run.record["unused_layers"] = sorted(run.unused)
    if read_around:
        raise Mismatch(f"W₀ of {len(read_around)} of {len(grads)} wrapped layers is read outside their forward, "
                       f"which ignores B: {', '.join(read_around[:3])}")
    base, layers = _eval_logits(run.model, run.batch), list(members(run.model).items())
    still = [n for n, layer in layers if n not in run.unused
             and not _moves(run, base, layer.B, _noise(layer.B, layer.weight / layer.scale, g))]
    if still:
        raise Mismatch(f"setting B to random values leaves the logits unchanged in {len(still)} layers whose B "
                       f"has a gradient: {', '.join(still[:3])}")
    if len(run.unused) == len(layers):
        raise Mismatch("no wrapped layer is used by the forward: the logits do not depend on any B")
    saved = [layer.B.detach().clone() for _, layer in layers]
    with torch.no_grad():
        for _, layer in layers:
            layer.B.copy_(_noise(layer.B, layer.weight / layer.scale, g))
    moved = not torch.equal(_eval_logits(run.model, run.batch), base)
    with torch.no_grad():
        for (_, layer), B in zip(layers, saved):
            layer.B.copy_(B)
    if not moved:
        raise Mismatch("setting every B to random values leaves the logits unchanged")


def _step_train(run):
    """3 AdamW steps with tau = 2: a merge after the 2nd, so B ≠ 0 at the end of the 3rd."""
    import rso
    _train(run.model, run.batch, _optimizer(run.model), 3)
    state = rso.state(run.model)
    if (state["step"], state["cycle"]) != (3, 1):
        raise Mismatch(f"after 3 steps with tau=2: step {state['step']}, cycle {state['cycle']} (expected 3, 1)")
    frozen = [n for n, layer in members(run.model).items() if n not in run.unused and not layer.B.any()]
    run.record["signal"] = _relative_diff(_eval_logits(run.model, run.batch), run.initial)
    if frozen:
        raise Mismatch(f"B is still 0 after 3 steps in {len(frozen)} layers that move the logits: {frozen[0]}")


def _step_save(run):
    """``save_pretrained`` merges B into W₀ in place: the logits must not move."""
    before = _eval_logits(run.model, run.batch)
    run.folder = tempfile.mkdtemp(prefix="rso-zoo-")
    run.model.save_pretrained(run.folder)
    run.ref = _eval_logits(run.model, run.batch)
    _expect_close(run.record, "logits after save_pretrained's in-place merge", run.ref, before)


def _unwrapped_round_trip_differs(run) -> bool:
    """The control of a load that failed or gave other logits: the same model unwrapped, trained alike, saved and
    loaded by its class. True if its load fails or its logits move too (transformers' doing, not rso's)."""
    import shutil
    model = build(run.model_type, run.class_name)
    _train(model, run.batch, _optimizer(model), 3)
    folder = tempfile.mkdtemp(prefix="rso-zoo-control-")
    try:
        model.save_pretrained(folder)
        loaded = _quiet(type(model).from_pretrained(folder))
        return _relative_diff(_eval_logits(loaded, run.batch), _eval_logits(model, run.batch)) > TOL
    except Exception:  # noqa: BLE001 (the unwrapped model cannot be loaded either)
        return True
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _expect_loaded_close(run, what, loaded):
    """:func:`_expect_close` of a loaded model's logits against the saved one's; a mismatch says whether the
    unwrapped model's round trip differs too (see :func:`_unwrapped_round_trip_differs`)."""
    try:
        _expect_close(run.record, what, _eval_logits(loaded, run.batch), run.ref)
    except Mismatch as e:
        if _unwrapped_round_trip_differs(run):
            raise Mismatch(f"{e} {ALSO_UNWRAPPED}") from None
        raise


def _load(run, load):
    """``load(folder)``, quieted; an exception that the unwrapped model's round trip shows too is marked so."""
    try:
        return _quiet(load(run.folder))
    except Exception as e:
        if _unwrapped_round_trip_differs(run):
            raise Mismatch(f"{type(e).__name__}: {_first_line(e)} {ALSO_UNWRAPPED}") from e
        raise


def _step_plain_load(run):
    import transformers
    auto = getattr(transformers, TASKS[run.task][1])
    known = type(run.model.config) in auto._model_mapping  # else a text-only class of a composite config
    plain = _load(run, (auto if known else type(run.model)).from_pretrained)
    _expect_loaded_close(run, f"plain {type(plain).__name__}.from_pretrained logits", plain)


def _align_requires_grad(run, loaded):
    """The wrapped layers' parameters must be trainable alike (B yes, W₀ no). Elsewhere a reload may differ from
    the built model by transformers' own doing (Marian's and Pegasus' sinusoidal position tables are frozen when
    built, trainable when loaded, by the plain class too): those flags are copied from the built model, and noted."""
    own = dict(run.model.named_parameters())
    wrapped = _wrapped_parameters(run.model)
    differ = [n for n, p in loaded.named_parameters() if n in own and p.requires_grad != own[n].requires_grad]
    if set(differ) & wrapped:
        raise Mismatch(f"requires_grad of wrapped layers' parameters differs after the load: "
                       f"{sorted(set(differ) & wrapped)[:3]}")
    for name in differ:
        loaded.get_parameter(name).requires_grad_(own[name].requires_grad)
    if differ:
        run.record["notes"] = f"requires_grad differs after a plain reload too, aligned: {', '.join(differ[:3])}"


def _step_rso_load(run):
    """Same logits, state and P; then 2 more steps on both (a merge and resample at step 4) agree too."""
    import rso
    loaded = _load(run, lambda folder: rso.from_pretrained(type(run.model), folder))
    _expect_loaded_close(run, "rso.from_pretrained logits", loaded)
    _expect_same_rso_state(run.record, loaded, run.model)
    _align_requires_grad(run, loaded)
    for model in (run.model, loaded):
        _train(model, run.batch, _optimizer(model), 2)
    _expect_close(run.record, "logits after 2 more steps on both", _eval_logits(loaded, run.batch),
                  _eval_logits(run.model, run.batch))
    _expect_same_rso_state(run.record, loaded, run.model)


def _step_unwrap(run):
    import rso
    plain = rso.unwrap(copy.deepcopy(run.model))
    left = [n for n, m in plain.named_modules() if isinstance(m, (rso.SubspaceLinear, rso.SubspaceExperts))]
    if left or members(plain) or not rso.is_wrapped(run.model):
        raise Mismatch(f"after unwrap of a copy: {len(left)} SubspaceLinear / SubspaceExperts left (e.g. "
                       f"{(left or [None])[0]}), original wrapped: {rso.is_wrapped(run.model)}")
    flags = {n: p.requires_grad for n, p in plain.named_parameters()}
    if flags != run.flags:
        diff = sorted(set(flags.items()) ^ set(run.flags.items()))
        raise Mismatch(f"parameters or requires_grad differ from before wrap: {diff[:2]}")
    _expect_close(run.record, "unwrapped logits", _eval_logits(plain, run.batch), _eval_logits(run.model, run.batch))


def _step_modes(run):
    """no_grad, inference_mode and eval forwards equal the training-mode forward (B ≠ 0 here)."""
    import torch
    ref = _forward(run.model, run.batch, train=True)[1].detach()
    modes = {"training mode under no_grad": (True, torch.no_grad), "eval mode": (False, contextlib.nullcontext),
             "eval mode under no_grad": (False, torch.no_grad),
             "eval mode under inference_mode": (False, torch.inference_mode)}
    for what, (train, context) in modes.items():
        try:
            with context():
                logits = _forward(run.model, run.batch, train)[1]
        except Exception as e:
            raise type(e)(f"{what}: {_first_line(e)}") from e
        _expect_close(run.record, what, logits.clone(), ref)


def _b_grads(run):
    run.model.zero_grad(set_to_none=True)
    out, logits = _forward(run.model, run.batch, train=True)
    _loss(out, logits).backward()
    return {n: None if layer.B.grad is None else layer.B.grad.clone() for n, layer in members(run.model).items()}


def _step_checkpointing(run):
    """``gradient_checkpointing_enable()`` (where the model supports it) gives the same B gradients."""
    import torch
    if not getattr(run.model, "supports_gradient_checkpointing", False):
        run.record["checkpointing"] = "not supported by the model"
        return
    plain = _b_grads(run)
    run.model.gradient_checkpointing_enable()
    try:
        checkpointed = _b_grads(run)
    finally:
        run.model.gradient_checkpointing_disable()
        run.model.zero_grad(set_to_none=True)
    lost = [n for n in plain if (plain[n] is None) != (checkpointed[n] is None)]
    if lost:
        raise Mismatch(f"B.grad is None in {len(lost)} layers on one side only: {lost[0]}")
    names = [n for n in plain if plain[n] is not None]
    if names:
        flat = lambda grads: torch.cat([grads[n].flatten() for n in names])  # noqa: E731
        _expect_close(run.record, "B gradients with gradient checkpointing", flat(checkpointed), flat(plain))


#: (step, function, the steps it needs to have run without an exception)
_STEPS = (("build", _step_build, ()), ("plain", _step_plain, ("build",)), ("wrap", _step_wrap, ("plain",)),
          ("wraps", _step_wraps, ("wrap",)), ("train", _step_train, ("wrap",)), ("save", _step_save, ("train",)),
          ("plain_load", _step_plain_load, ("save",)), ("rso_load", _step_rso_load, ("save",)),
          ("unwrap", _step_unwrap, ("train",)), ("modes", _step_modes, ("train",)),
          ("checkpointing", _step_checkpointing, ("train",)))
assert tuple(s for s, _, _ in _STEPS) == STEPS


# ----------------------------------------------------------------------------- one architecture
def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else "")[:300]


def _where(error: BaseException) -> str:
    """The innermost frame of the traceback, as ``package/file.py:line``."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return ""
    frame = frames[-1]
    path = frame.filename.replace(os.sep, "/")
    for root in ("site-packages/", "/work/main/", "/rso/"):
        path = path.split(root)[-1]
    return f"{path}:{frame.lineno}"


def _refusal(step: str, error: BaseException) -> bool:
    """A clear refusal: ``rso.wrap`` raising its one-line ValueError/TypeError (``rso.…: …``)."""
    return step == "wrap" and isinstance(error, (ValueError, TypeError)) and str(error).startswith("rso.")


def _status(failures: list[dict]) -> str:
    if not failures:
        return "PASS"
    first = failures[0]
    if first["step"] in ("build", "plain"):
        return "NOT_BUILT"
    return "REFUSED" if first.get("refused") else "FAIL"


def _check_steps(steps):
    """ValueError unless ``steps`` are lifecycle steps, each with the steps it needs."""
    unknown = [s for s in steps if s not in STEPS]
    missing = [f"{s} needs {n}" for s, _, needs in _STEPS if s in steps for n in needs if n not in steps]
    if unknown or missing:
        raise ValueError(f"rso.train.zoo.run_one: steps {', '.join(unknown + missing)}; allowed: a subset of "
                         f"{', '.join(STEPS)} with each step's prerequisites")


def run_one(task: str, model_type: str, class_name: str, progress=None, steps=STEPS) -> dict:
    """The lifecycle ``steps`` (default: all) for one architecture; a record with the status, the failures and the
    timings."""
    import shutil
    _check_steps(steps)
    _quiet_libraries()
    record = {"task": task, "model_type": model_type, "class": class_name, "failures": [], "timings": {}}
    run, broken = _Run(task, model_type, class_name, record), set()
    start = time.perf_counter()
    try:
        for step, function, needs in _STEPS:
            if step not in steps:
                continue
            if broken & set(needs):
                broken.add(step)
                continue
            if progress is not None:
                progress(step)
            t0 = time.perf_counter()
            try:
                function(run)
            except Mismatch as e:
                record["failures"].append({"step": step, "reason": str(e)})
            except Exception as e:  # the code under test raised: record it, skip the steps that need this one
                broken.add(step)
                record["failures"].append({"step": step, "reason": f"{type(e).__name__}: {_first_line(e)}",
                                           "where": _where(e), "refused": _refusal(step, e)})
            record["timings"][step] = round(time.perf_counter() - t0, 3)
            if step in ("build", "plain", "wrap") and record["failures"]:
                break
    finally:
        if run.folder is not None:
            shutil.rmtree(run.folder, ignore_errors=True)
    record["status"] = _status(record["failures"])
    first = record["failures"][0] if record["failures"] else {}
    record.update(step=first.get("step"), reason=first.get("reason"), seconds=round(time.perf_counter() - start, 2))
    return record


# ----------------------------------------------------------------------------- isolation: worker processes
def _quiet_libraries():
    """Offline, one thread, no warnings or progress bars from transformers (their text is not the result).
    Called by each job, so a worker process starts without importing torch."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    warnings.simplefilter("ignore")
    import torch
    import transformers
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _worker(conn, job_function):
    """Run jobs from ``conn`` until None: sends ("ready",), ("step", name) while a job runs, ("done", record)."""
    conn.send(("ready", None))
    while (job := conn.recv()) is not None:
        conn.send(("done", job_function(*job, progress=lambda step: conn.send(("step", step)))))


def _lost(job, step, why) -> dict:
    """The record of a job whose worker died or hung in ``step``."""
    task, model_type, class_name = job
    failure = {"step": step or "build", "reason": why}
    return {"task": task, "model_type": model_type, "class": class_name, "failures": [failure], "timings": {},
            "status": _status([failure]), "step": failure["step"], "reason": why}


class _Slot:
    """One worker process and the job it runs (``job`` None: idle, or starting until it sends "ready")."""

    def __init__(self, context, job_function):
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child, job_function), daemon=True)
        self.process.start()
        child.close()
        self.job = self.step = self.started = None
        self.ready = False

    def send(self, job):
        self.job, self.step, self.started = job, None, time.monotonic()
        self.conn.send(job)

    def stop(self, kill=False):
        if kill:
            self.process.kill()
        else:
            with contextlib.suppress(OSError):
                self.conn.send(None)
        self.process.join(5)


def run_all(jobs, *, timeout: float = 180.0, workers: int = 1, job_function=None, on_record=None) -> list[dict]:
    """Run ``job_function(*job)`` (default :func:`run_one`) for every job in worker processes, each job under
    ``timeout`` seconds: a job that hangs or kills its worker gets a record of its own (the step it was in) and
    a fresh worker takes the next one. Records come back in the order of ``jobs``. Workers are forked from a
    fresh server process that has imported this module (``forkserver``): no thread pool of the caller is
    forked, and a new worker starts in a fraction of a second."""
    import multiprocessing
    from multiprocessing.connection import wait
    context, pending, results = multiprocessing.get_context("forkserver"), list(enumerate(jobs)), {}
    context.set_forkserver_preload(["rso.train.zoo"])
    job_function = job_function or run_one
    slots = [_Slot(context, job_function) for _ in range(max(1, min(workers, len(pending))))]
    index_of = {}

    def finish(slot, record):
        results[index_of.pop(id(slot))] = record
        slot.job = None
        if on_record is not None:
            on_record(record)

    try:
        while pending or any(s.job is not None for s in slots):
            for slot in slots:
                if slot.ready and slot.job is None and pending:
                    index_of[id(slot)], job = pending.pop(0)
                    slot.send(job)
            for conn in wait([s.conn for s in slots], timeout=1.0):
                slot = next(s for s in slots if s.conn is conn)
                try:
                    kind, value = conn.recv()
                except (EOFError, OSError):
                    slot.process.join(5)
                    if not slot.ready:
                        raise RuntimeError(f"rso.train.zoo: a worker process died while starting "
                                           f"(exit code {slot.process.exitcode})") from None
                    if slot.job is not None:
                        finish(slot, _lost(slot.job, slot.step, f"the worker died (exit code {slot.process.exitcode})"))
                    slots[slots.index(slot)] = _Slot(context, job_function)
                    continue
                if kind == "ready":
                    slot.ready = True
                elif kind == "step":
                    slot.step = value
                else:
                    finish(slot, value)
            for i, slot in enumerate(slots):
                if slot.job is not None and time.monotonic() - slot.started > timeout:
                    slot.stop(kill=True)
                    finish(slot, _lost(slot.job, slot.step, f"timed out after {timeout:g} s"))
                    slots[i] = _Slot(context, job_function)
    finally:
        for slot in slots:
            slot.stop(kill=slot.job is not None)
    return [results[i] for i in sorted(results)]


# ----------------------------------------------------------------------------- results
def summary(records: list[dict]) -> list[dict]:
    """Per task (and in total): entries, built (PASS + REFUSED + FAIL), each status, the FAIL records whose every
    failure the unwrapped model shows too (transformers' doing), and PASS / built."""
    rows = []
    for task in [t for t in TASKS if any(r["task"] == t for r in records)] + ["all"]:
        mine = [r for r in records if task in ("all", r["task"])]
        counts = {s: sum(r["status"] == s for r in mine) for s in ("PASS", "REFUSED", "FAIL", "NOT_BUILT")}
        built = len(mine) - counts["NOT_BUILT"]
        unwrapped_too = sum(r["status"] == "FAIL" and all(ALSO_UNWRAPPED in f["reason"] for f in r["failures"])
                            for r in mine)
        rows.append({"task": task, "entries": len(mine), "built": built, **counts, "FAIL_unwrapped_too": unwrapped_too,
                     "pass_rate": round(counts["PASS"] / built, 4) if built else None})
    return rows


def _cause(failure: dict) -> str:
    """A failure's reason with numbers and layer names blanked, so equal causes group together."""
    import re
    reason = re.sub(r"/tmp/\S+", "<folder>", failure["reason"])
    reason = re.sub(r"\[[^\]]*(\]|$)", "[…]", reason)  # lists of names, closed or cut off
    reason = re.sub(r"\b[A-Z]\w*For[A-Z]\w*", "<Model>", reason)
    reason = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "N", reason)
    reason = re.sub(r"'[^']*'|\"[^\"]*\"|(?<=: )[\w.]+\.\w+(, [\w.]+)*( \.\.\.)?$", "…", reason)
    return f"{failure['step']}: {reason[:120]}" + (f" ({failure['where']})" if failure.get("where") else "")


def causes(records: list[dict], statuses=("FAIL",), first_only=False) -> list[tuple[str, list[str]]]:
    """(cause, ["task/model_type", ...]) over the failures of records with ``statuses``, most frequent first."""
    groups = {}
    for r in records:
        if r["status"] in statuses:
            for failure in r["failures"][:1] if first_only else r["failures"]:
                groups.setdefault(_cause(failure), []).append(f"{r['task']}/{r['model_type']}")
    return sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))


def _cell(text, width=140) -> str:
    text = "" if text is None else str(text).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= width else text[:width - 1] + "…"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def readme(meta: dict, records: list[dict]) -> str:
    """The README of a zoo run: settings, the summary per task, failures by cause, the full table."""
    head = ["task", "entries", "built", "PASS", "REFUSED", "FAIL", "of which unwrapped too", "NOT_BUILT",
            "PASS / built"]
    rows = [[r["task"], r["entries"], r["built"], r["PASS"], r["REFUSED"], r["FAIL"], r["FAIL_unwrapped_too"],
             r["NOT_BUILT"],
             "—" if r["pass_rate"] is None else f"{100 * r['pass_rate']:.1f}%"] for r in summary(records)]
    out = ["# Architecture zoo: RSO's lifecycle on every architecture of transformers' auto mappings", "",
           f"`{meta['command']}` ({meta['date']}, code {meta.get('code', '?')}; transformers {meta['transformers']}, "
           f"torch {meta['torch']}, "
           f"{meta['seconds'] / 60:.1f} min). Every (task, model_type) pair of the auto mappings "
           f"{', '.join(m for m, _ in TASKS.values())}, built tiny from its config class (random weights, "
           f"float32): wrap (rank {RANK}, tau {TAU}; the default targets: linear layers and the stacked expert weights "
           f"of mixture-of-experts layers), the check that each wrapped weight's B moves the logits, {3} AdamW "
           f"steps across a merge, save_pretrained, plain and rso loads, unwrap, grad modes, gradient "
           f"checkpointing; the steps and the tolerance ({TOL:g} relative) are in the docstring of `train/zoo.py` "
           "(`rso.train.zoo`). Built = PASS + REFUSED + FAIL; NOT_BUILT (the config or model cannot be built tiny "
           "here, the zoo has no input recipe for it, or the tiny network is dead) is not counted. \"Of which "
           "unwrapped too\": FAIL records whose every failure the unwrapped model's save/load round trip shows as "
           "well (transformers). In the full table, \"linear left\" counts the Linear/Conv1D modules rso.wrap "
           "left as they are (output heads, ...), \"experts\" the stacked expert weights wrapped (of the \"wrapped\" "
           "count), \"unused\" the wrapped weights this forward does not use.", "",
           *_table(head, rows), ""]
    for title, statuses in (("Failures by cause (every failing check of every FAIL record)", ("FAIL",)),
                            ("Refusals", ("REFUSED",)), ("Not built, by reason", ("NOT_BUILT",))):
        groups = causes(records, statuses)
        if groups:
            out += [f"## {title}", "", *_table(["cause", "n", "architectures"], [
                [cause, len(names), ", ".join(names)] for cause, names in groups]), ""]
    full = [[r["task"], r["model_type"], r["class"], r["status"], r.get("step") or "", r.get("reason") or "",
             r.get("wrapped", ""), r.get("experts") or "", r.get("linear_unwrapped", ""),
             "" if r.get("trainable_share") is None else f"{100 * r['trainable_share']:.0f}%",
             len(r.get("unused_layers") or []) or "", r.get("seconds", "")] for r in records]
    out += ["## All architectures", "", *_table(["task", "model_type", "class", "status", "step", "reason", "wrapped",
                                                 "experts", "linear left", "trainable", "unused", "s"], full), ""]
    return "\n".join(out)


def write_results(out: pathlib.Path, meta: dict, records: list[dict]) -> None:
    """``zoo.json`` (settings, summary, one record per task × model_type) and ``README.md``, each written whole
    (through a temporary file)."""
    out.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "summary": summary(records), "records": records}
    for name, text in (("zoo.json", json.dumps(data, indent=1) + "\n"), ("README.md", readme(meta, records))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)


# ----------------------------------------------------------------------------- command line
def _names_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m rso.train.zoo", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=_names_list, default=list(TASKS), help=f"comma list of {', '.join(TASKS)}")
    p.add_argument("--only", type=_names_list, default=None, help="comma list of model_types (default: all)")
    p.add_argument("--moe", action="store_true", help="only the mixture-of-experts families (modeling files that "
                                                       "use transformers' experts interface)")
    p.add_argument("--out", default="docs/results/zoo", help="folder for zoo.json and README.md")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds per architecture (default 180)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    args = p.parse_args(argv)
    bad = [t for t in args.tasks if t not in TASKS]
    if bad:
        p.error(f"--tasks: unknown {', '.join(bad)}; allowed: {', '.join(TASKS)}")
    if args.timeout <= 0 or args.jobs < 1:
        p.error("--timeout must be > 0 and --jobs ≥ 1")
    return args


def _code_version() -> str:
    """The repository's commit, with "+ uncommitted changes" when rso's files differ from it."""
    import subprocess
    root = pathlib.Path(__file__).resolve().parent.parent
    git = lambda *a: subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True).stdout.strip()  # noqa
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" + uncommitted changes" if git("status", "--porcelain", "rso", "layers", "train") else "")


def main(argv=None) -> int:
    from tqdm.auto import tqdm
    args = parse_args(argv)
    _quiet_libraries()
    import torch
    import transformers
    jobs = entries(args.tasks, set(args.only) if args.only else None, moe=args.moe)
    if not jobs:
        raise SystemExit(f"rso.train.zoo: no entry of {args.tasks} has a model_type in --only {args.only}"
                         + (" and uses transformers' experts interface (--moe)" if args.moe else ""))
    bar = tqdm(total=len(jobs), desc="zoo", unit="arch")
    start = time.time()

    def on_record(record):
        bar.set_postfix_str(f"{record['task']}/{record['model_type']}: {record['status']}")
        bar.update()

    records = run_all(jobs, timeout=args.timeout, workers=args.jobs, on_record=on_record)
    bar.close()
    meta = {"command": "python -m rso.train.zoo " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": time.strftime("%Y-%m-%d"), "code": _code_version(), "transformers": transformers.__version__,
            "torch": torch.__version__,
            "rank": RANK, "tau": TAU, "lr": LR, "tol": TOL, "seconds": round(time.time() - start, 1)}
    write_results(pathlib.Path(args.out), meta, records)
    for row in summary(records):
        print({k: v for k, v in row.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training methods: how a model and its optimizer are set up for a ``--method``.

Every method is a function ``setup(model, opts) -> (model, optimizer)`` in :data:`METHODS`; add one
with :func:`register`. ``opts`` is a :class:`MethodOptions`.

=============  ============================================================================
``adamw``      full-parameter training with the ``--optimizer`` (AdamW by default)
``galore``     ``rso.optim.GaLoreAdamW``: Adam in the top-r SVD subspace of each weight's gradient
``golore``     ``rso.optim.GoLoreAdamW``: the same with random (Stiefel) projections
``golore@X``   GaLore for the first (100−X)% of the steps, GoLore for the last X% (``golore@20``)
``rso``        ``rso.wrap``: W = W₀ + s·B P, only B trains (any ``--optimizer``), merged every τ steps
``lora``       ``peft`` LoRA adapters (a baseline); ``--scale`` sets alpha = scale·rank; with ``--quantize``:
               QLoRA, the adapters on a bitsandbytes NF4 / int8 base (``models.load_quantized``)
=============  ============================================================================

``--optimizer`` names any ``torch.optim`` / ``torch_optimizer`` class, or ``adamw8bit`` / ``adam8bit``
(bitsandbytes: 8-bit blockwise states) for adamw, rso and lora. ``--activation-checkpointing``
(:func:`enable_activation_checkpointing`) recomputes each decoder block in the backward pass.

The subspace methods act on the linear layers of the transformer blocks (attention and MLP); the
embeddings, norms and output head train in full, as in the papers. Which of the command lines' options each
method reads is :data:`METHOD_OPTIONS`; a flag given for a method that does not read it is refused.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["MethodError", "MethodOptions", "METHODS", "register", "parse_method", "setup_method",
           "resolve_optimizer", "check_optimizer", "check_subspace_state", "METHOD_OPTIONS", "OPTION_PURPOSE",
           "methods_with", "option_applies", "matrix_parameters", "method_names",
           "BITSANDBYTES_OPTIMIZERS", "is_bitsandbytes", "enable_activation_checkpointing", "supports_activation_checkpointing"]

#: Leaf names of the block linear layers (LLaMA, BERT, GPT-2 style) the subspace methods act on.
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                 "query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense",
                 "c_attn", "c_proj", "c_fc")
HEADS = ("lm_head", "classifier", "score", "pooler")
#: The options (argparse destinations of the training commands) that only some methods use, by method (a
#: :func:`parse_method` name): a method reads the options in its row and no other of them. An option in no row
#: (``--lr``, ``--optimizer``, ``--weight-decay``, ...) is every method's. Checked once after parsing
#: (``loop.check_method_options``): a flag given for a method whose row lacks it is refused.
_SUBSPACE_OPTIONS = ("rank", "tau", "scale", "subspace_state", "freeze_embeddings")
METHOD_OPTIONS = {
    "adamw": ("freeze_embeddings",),
    "galore": _SUBSPACE_OPTIONS,
    "golore": _SUBSPACE_OPTIONS,
    "golore@": _SUBSPACE_OPTIONS,
    "rso": _SUBSPACE_OPTIONS + ("projection", "share_projections", "quantize", "requantize"),
    "lora": ("rank", "scale", "quantize"),  # lora keeps every base weight, the embeddings too, frozen in fine-tuning
}
#: What each option of :data:`METHOD_OPTIONS` sets, as a refusal says it.
OPTION_PURPOSE = {"rank": "the rank of a subspace or adapter", "tau": "steps between subspace changes",
                  "scale": "the update scale; LoRA's alpha = scale·rank",
                  "subspace_state": "the optimizer state at a subspace change",
                  "freeze_embeddings": "whether the token embeddings train; LoRA's stay frozen",
                  "projection": "how RSO draws its projections P", "share_projections": "its layers' projections P",
                  "quantize": "how RSO stores the frozen W₀ (LoRA: QLoRA's bitsandbytes base)",
                  "requantize": "how RSO's merge rounds a quantized W₀"}
#: Methods whose weights change subspace, so ``--subspace-state`` means something for them.
SUBSPACE_METHODS = tuple(m for m, options in METHOD_OPTIONS.items() if "subspace_state" in options)


def methods_with(option: str) -> list[str]:
    """The methods (as ``--method`` spells them: ``golore@X``) whose row of :data:`METHOD_OPTIONS` has ``option``."""
    return [m.replace("golore@", "golore@X") for m, options in METHOD_OPTIONS.items() if option in options]


def option_applies(option: str, method: str) -> bool:
    """Whether ``method`` (a spec: ``golore@20``) reads ``option``: one in its row, or one in no row."""
    name = parse_method(method)[0]
    return option in METHOD_OPTIONS[name] or not any(option in row for row in METHOD_OPTIONS.values())


class MethodError(ValueError):
    """An unknown method or optimizer, or options a method cannot use."""


@dataclass
class MethodOptions:
    rank: int | float = 128  # a float in (0, 1): that fraction of each layer's input width (rso only)
    tau: int = 200
    scale: float = 1.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    optimizer_args: dict = field(default_factory=dict)
    projection: str = "stiefel"     # rso only
    random_fraction: float = 0.2    # golore@X / hybrid
    total_steps: int | None = None
    seed: int = 0
    task: str = "causal_lm"         # lora: "causal_lm" | "seq_cls"
    train_embeddings: bool = True   # lora: also train embeddings, norms and heads (pre-training)
    subspace_state: str | None = None  # reset | keep | project at a new subspace (None: the method's default)
    share_projections: bool = True  # rso: q/k/v and gate/up share one P (rso.wrap's share_projections)
    quantize: str | None = None     # rso: W₀ stored as "int8" | "nf4" (rso.wrap's quantize); lora: QLoRA's base
    requantize: str | None = None   # rso with quantize: rso.wrap's requantize (None: its default)


METHODS: dict[str, callable] = {}


def register(name: str):
    def deco(fn):
        METHODS[name] = fn
        return fn
    return deco


def method_names() -> list[str]:
    return sorted(m for m in METHODS if not m.endswith("@")) + ["golore@X"]


def parse_method(spec: str) -> tuple[str, dict]:
    """``"golore@20"`` -> ``("golore@", {"random_fraction": 0.2})``; other names map to themselves."""
    spec = spec.strip().lower()
    m = re.fullmatch(r"golore@(\d+(?:\.\d+)?)(%?)", spec)
    if m:
        x = float(m.group(1))
        frac = x / 100 if (m.group(2) or x > 1) else x
        if not 0.0 <= frac <= 1.0:
            raise MethodError(f"golore@X needs X in [0, 100] (percent of steps with random projections), got {spec!r}")
        return "golore@", {"random_fraction": frac}
    if spec not in METHODS:
        raise MethodError(f"unknown method {spec!r}; choose one of: {', '.join(method_names())}")
    return spec, {}


def check_subspace_state(name: str, state: str | None, spec: str) -> None:
    """MethodError if a subspace-state policy is given to a method (``name`` from :func:`parse_method`)
    whose weights never change subspace."""
    if state is not None and name not in SUBSPACE_METHODS:
        raise MethodError(f"--subspace-state {state} applies to the subspace methods "
                          f"({', '.join(methods_with('subspace_state'))}), not to {spec}")


def setup_method(spec: str, model: nn.Module, opts: MethodOptions):
    """(model, optimizer) for a method spec; the model may be wrapped (rso) or replaced (lora)."""
    name, extra = parse_method(spec)
    check_optimizer(name, opts.optimizer)
    check_subspace_state(name, opts.subspace_state, spec)
    for key, value in extra.items():
        setattr(opts, key, value)
    try:
        return METHODS[name](model, opts)
    except MethodError:
        raise
    except (ValueError, TypeError) as e:  # e.g. a rank larger than a layer: one clear line, not a traceback
        raise MethodError(f"{spec}: {e}") from e


# ----------------------------------------------------------------------------- optimizers by name
#: 8-bit optimizers by name: bitsandbytes' blockwise-quantized states (uint8 moments, an fp32 scale per 256)
BITSANDBYTES_OPTIMIZERS = {"adamw8bit": "AdamW8bit", "adam8bit": "Adam8bit"}


def is_bitsandbytes(name: str) -> bool:
    """Whether ``--optimizer name`` is one of bitsandbytes' 8-bit optimizers (:data:`BITSANDBYTES_OPTIMIZERS`)."""
    return name.lower().replace("-", "").replace("_", "") in BITSANDBYTES_OPTIMIZERS


def resolve_optimizer(name: str):
    """An optimizer class by (case-insensitive) name: bitsandbytes' ``adamw8bit`` / ``adam8bit``, else from
    ``torch.optim`` or ``torch_optimizer``."""
    lowered = name.lower()
    if is_bitsandbytes(name):
        _check_bitsandbytes(name)
        import bitsandbytes as bnb
        return getattr(bnb.optim, BITSANDBYTES_OPTIMIZERS[lowered.replace("-", "").replace("_", "")])
    for attr in dir(torch.optim):
        obj = getattr(torch.optim, attr)
        if attr.lower() == lowered and isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer):
            return obj
    try:
        import torch_optimizer
    except ImportError:
        torch_optimizer = None
    if torch_optimizer is not None:
        try:
            return torch_optimizer.get(lowered)
        except ValueError:
            pass
    known = sorted(a for a in dir(torch.optim) if isinstance(getattr(torch.optim, a), type)
                   and issubclass(getattr(torch.optim, a), torch.optim.Optimizer) and a != "Optimizer")
    raise MethodError(f"unknown optimizer {name!r}: not in torch.optim ({', '.join(known)}), torch_optimizer "
                      f"(e.g. lamb, radam, adabelief, yogi, adafactor) nor bitsandbytes "
                      f"({', '.join(BITSANDBYTES_OPTIMIZERS)})")


def _check_bitsandbytes(name: str) -> None:
    import importlib.util
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MethodError(f"optimizer {name!r} needs bitsandbytes (pip install bitsandbytes), which is not installed")


def check_optimizer(method: str, optimizer: str) -> None:
    """MethodError unless method ``method`` (a :func:`parse_method` name) can train with optimizer ``optimizer``:
    a known class, and AdamW for the GaLore family (they run their own projected AdamW)."""
    if method in ("galore", "golore", "golore@") and optimizer.lower() not in ("adamw", "adam"):
        raise MethodError(f"the galore/golore methods run their own projected AdamW; --optimizer "
                          f"{optimizer!r} is only for adamw, rso and lora")
    if is_bitsandbytes(optimizer):  # checked without importing it (seconds)
        _check_bitsandbytes(optimizer)
        return
    resolve_optimizer(optimizer)


def _make_optimizer(params, opts: MethodOptions):
    cls = resolve_optimizer(opts.optimizer)
    kwargs = {"lr": opts.lr, **opts.optimizer_args}
    if opts.weight_decay:
        kwargs["weight_decay"] = opts.weight_decay
    try:
        return cls(params, **kwargs)
    except TypeError as e:
        raise MethodError(f"optimizer {opts.optimizer} rejects {kwargs}: {e}") from e


def _is_block_linear(name: str, module: nn.Module) -> bool:
    if not isinstance(module, nn.Linear) or any(part in HEADS for part in name.split(".")):
        return False
    return any(name == leaf or name.endswith("." + leaf) for leaf in BLOCK_LINEARS)


def matrix_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weights of the block linear layers, every other trainable parameter)."""
    matrices = [m.weight for n, m in model.named_modules() if _is_block_linear(n, m) and m.weight.requires_grad]
    ids = {id(p) for p in matrices}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return matrices, others


def _block_linear_names(model: nn.Module) -> list[str]:
    """Full module names of the block linear layers (exact names: no head or pooler slips in)."""
    return [n for n, m in model.named_modules() if _is_block_linear(n, m)]


# ----------------------------------------------------------------------------- the methods
@register("adamw")
def _full(model, opts):
    params = [p for p in model.parameters() if p.requires_grad]
    return model, _make_optimizer(params, opts)


def _projected(model, opts, cls_name: str, projection: str):
    import rso.optim as ropt

    matrices, others = matrix_parameters(model)
    if not matrices:
        raise MethodError(f"{type(model).__name__} has no block linear layers to project")
    group = {"params": matrices, "rank": opts.rank, "update_proj_gap": opts.tau, "scale": opts.scale,
             "projection": projection, "seed": opts.seed}
    if opts.subspace_state is not None:
        group["state_on_switch"] = opts.subspace_state
    if projection == "hybrid":
        if not opts.total_steps:
            raise MethodError("golore@X needs the total number of steps (--max-steps)")
        group.update(random_fraction=opts.random_fraction, total_steps=opts.total_steps)
    cls = getattr(ropt, cls_name)
    # One AdamW formula for every method a pipeline compares (torch.optim.AdamW's, as --method adamw uses);
    # rso.optim.GaLoreAdamW alone defaults to galore-torch's. --optimizer-args '{"compat": "galore-torch"}' switches.
    kwargs = {"lr": opts.lr, "weight_decay": opts.weight_decay, "compat": "torch", **opts.optimizer_args}
    return model, cls([group, {"params": others}], **kwargs)


@register("galore")
def _galore(model, opts):
    return _projected(model, opts, "GaLoreAdamW", "svd")


@register("golore")
def _golore(model, opts):
    return _projected(model, opts, "GoLoreAdamW", "stiefel")


@register("golore@")
def _golore_hybrid(model, opts):
    return _projected(model, opts, "SubspaceAdamW", "hybrid")


@register("rso")
def _rso(model, opts):
    import rso

    targets = _block_linear_names(model)
    hybrid = ({"total_steps": opts.total_steps, "random_fraction": opts.random_fraction}
              if opts.projection == "hybrid" else {})  # the switch's place: what only hybrid reads
    model = rso.wrap(model, rank=opts.rank, tau=opts.tau, projection=opts.projection,
                     target_modules=targets or None, scale=opts.scale, seed=opts.seed, **hybrid,
                     state_on_merge=opts.subspace_state or "reset", share_projections=opts.share_projections,
                     quantize=opts.quantize, **({"requantize": opts.requantize} if opts.requantize else {}))
    params = [p for p in model.parameters() if p.requires_grad]
    return model, _make_optimizer(params, opts)


@register("lora")
def _lora(model, opts):
    from peft import LoraConfig, get_peft_model

    targets = _block_linear_names(model)
    if not targets:
        raise MethodError(f"{type(model).__name__} has no block linear layers for LoRA")
    if opts.quantize:  # QLoRA: the adapters sit on a bitsandbytes base, read as transformers' loader reads it
        from .models import ConfigError, load_quantized
        try:
            model = load_quantized(model, opts.quantize, targets)
        except ConfigError as e:
            raise MethodError(str(e)) from None
    task = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}[opts.task]
    config = LoraConfig(r=opts.rank, lora_alpha=opts.scale * opts.rank, target_modules=targets,
                        lora_dropout=0.0, task_type=task)
    model = get_peft_model(model, config)
    if opts.train_embeddings:
        # Pre-training from scratch: everything outside the adapted linears trains in full
        # (embeddings, norms, output head), as in GaLore's and RSO's LoRA baselines.
        for n, p in model.named_parameters():
            if "lora_" not in n and ".base_layer." not in n:
                p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, _make_optimizer(params, opts)


def supports_activation_checkpointing(model_type: str | None) -> bool | None:
    """Whether ``transformers``' model class for ``model_type`` (causal LM, else sequence classification)
    supports gradient checkpointing; None if the type is unknown here."""
    if not model_type:
        return None
    import transformers
    from transformers.models.auto import modeling_auto as auto
    for mapping in (auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES):
        name = mapping.get(model_type)
        if name:
            cls = getattr(transformers, name, None)
            return None if cls is None else bool(getattr(cls, "supports_gradient_checkpointing", False))
    return None


def enable_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Checkpoint every decoder block (non-reentrant ``torch.utils.checkpoint``, as
    ``gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})``): the step keeps
    each block's input and recomputes the block in the backward pass. Works on a wrapped (rso) or peft model;
    the gradients are those of the plain step. MethodError if the model does not support it."""
    import warnings

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise MethodError(f"{type(base).__name__} does not support activation checkpointing")
    kwargs = {"use_reentrant": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames it activation_checkpointing_enable
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def unwrap_for_saving(model: nn.Module) -> nn.Module:
    """A plain ``transformers`` model: rso layers merged, LoRA merged and unloaded."""
    import rso

    if hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
        model = model.merge_and_unload()
    if rso.is_wrapped(model):
        model = rso.unwrap(model)
    return model


def describe(model: nn.Module, optimizer) -> str:
    import rso

    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    line = f"params: {total / 1e6:.2f}M total, {trainable / 1e6:.2f}M trainable; optimizer {type(optimizer).__name__}"
    if rso.is_wrapped(model):
        s = rso.state(model)
        line += f"; rso: {s['layers']} layers, projection {s['projection']}, tau {s['tau']}"
    return line


def options_json(opts: MethodOptions) -> str:
    return json.dumps(opts.__dict__, sort_keys=True, default=str)

"""Saving and loading wrapped models: what a checkpoint holds, and checks that it fits the model.

**What is saved.** ``state_dict()`` of a wrapped model first merges every layer (``W₀ ← W₀ + s·B P``,
``B ← 0``, P unchanged; see ``SubspaceLinear._save_to_state_dict``), so the ``weight`` on disk is the
effective weight: ``save_pretrained``, ``transformers.Trainer`` / TRL checkpoints, ``accelerate`` and
``torch.save(model.state_dict())`` all write the model that was trained, and a plain
``AutoModelFor….from_pretrained`` of such a folder loads it (it only warns that the rso keys ``B``, ``P``,
``step``, ``cycle``, ``seed`` are unused). A wrapped HF ``Conv1D`` (GPT-2 family) writes its weight in
Conv1D's in×out layout, marked ``"layout": "conv1d"`` in its ``_extra_state``; an unmarked rso checkpoint
(older rso) holds it out×in and still loads. The merge keeps the subspace, so the optimizer state of B stays
valid and a resumed run continues exactly as the saving run did. One ``P`` per projection group is
stored (the group's other members hold it as a non-persistent buffer, re-tied on load), so
safetensors sees no shared tensors. A wrapped model's ``save_pretrained`` writes its :class:`rso.RSOConfig`
as ``rso_config.json`` beside the weights, for :func:`rso.from_pretrained` (:mod:`rso.pretrained`).

**What is checked on load.** A state dict with rso keys loaded into a wrapped model must come from a
model wrapped alike: another rank, other wrapped layers, other projection sharing, or other settings
that decide how training goes on (``IDENTITY``: each layer's ``_extra_state`` holds them) raise a
``ValueError`` naming them and the fix, before anything is loaded. A plain state dict (no rso keys)
loads into a wrapped model as its weights: W₀ ← weight, B ← 0 (P, the counters and the optimizer's state
of B stay; see ``SubspaceLinear``).
"""
from __future__ import annotations

import torch
from torch import nn

from rso.layers.subspace_experts import ExpertSubspace, SubspaceExperts
from rso.layers.subspace_linear import SubspaceLinear, _settings, _settings_tensor, is_conv1d

__all__ = ["IDENTITY", "identity_tensor", "check_checkpoint", "key_renamer"]

#: The wrap arguments that decide how training continues from a saved state (compared on load).
IDENTITY = ("projection", "tau", "scale", "state_on_merge", "proximal")


def identity_tensor(settings: dict) -> torch.Tensor:
    """The continuation settings (``IDENTITY``, plus the GoLore switch for "hybrid") as JSON bytes in a uint8 tensor."""
    keys = IDENTITY + (("total_steps", "random_fraction") if settings["projection"] == "hybrid" else ())
    return _settings_tensor({k: settings[k] for k in keys})


def key_renamer(model):
    """file key → the model's key: transformers' load-time renamings (its save_pretrained writes some models' keys
    under older names, e.g. ViT's ``encoder.layer.0.attention.attention.key`` for ``layers.0.attention.k_proj``)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
        renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    except (ImportError, AttributeError, TypeError):  # older transformers, or not an HF model: keys as saved
        return lambda key: key
    prefix = getattr(model, "base_model_prefix", None)
    return lambda key: rename_source_key(key, renamings, [], prefix)[0] if renamings else key


def _identity(tensor) -> dict:
    return _settings(tensor) if tensor is not None else {}


def _plain_linear(module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _check_expert_format(model: nn.Module, state_dict, prefix: str) -> None:
    """ValueError if ``state_dict`` holds a wrapped experts module's weights in transformers' original checkpoint
    format (one key per expert: ``…experts.0.w1.weight``), which ``load_state_dict`` cannot fuse back: the experts
    would silently keep their weights (HF Trainer's resume loads checkpoints that way: transformers#48805)."""
    experts = [n for n, m in model.named_modules() if isinstance(m, SubspaceExperts)]
    if not experts:
        return
    rename = key_renamer(model)
    for key in state_dict:
        name = rename(key[len(prefix):]) if key.startswith(prefix) else None
        owner = next((e for e in experts if name and name.startswith(e + ".")
                      and name[len(e) + 1:].partition(".")[0].isdigit()), None)
        if owner is not None:
            raise ValueError(f"rso: this state dict holds '{owner}' in transformers' original checkpoint format "
                             f"('{key}', one key per expert), which load_state_dict cannot fuse back, so the experts "
                             f"would keep their present weights (HF Trainer's resume does this: transformers#48805); "
                             f"load the folder with rso.from_pretrained(ModelClass, folder), or save with "
                             f"save_pretrained(..., save_original_format=False)")


def check_checkpoint(model: nn.Module, state_dict, prefix: str, layers: dict) -> None:
    """Raise ``ValueError`` if ``state_dict`` holds rso state of a model wrapped otherwise than ``model``, or a
    wrapped experts module's weights in a format it cannot load."""
    _check_expert_format(model, state_dict, prefix)
    modules = dict(model.named_modules())
    saved = {k[len(prefix):-2] for k in state_dict if k.startswith(prefix) and k.endswith(".B")}
    saved = {n for n in saved
             if isinstance(modules.get(n), (SubspaceLinear, ExpertSubspace)) or _plain_linear(modules.get(n))}
    if not saved:
        return  # a plain state dict: its weights become W₀
    problems, differing = [], {}
    for name, layer in layers.items():
        key = prefix + name + "."
        saved_identity, own = _identity(state_dict.get(key + "_extra_state")), _identity(layer.identity)
        for k in sorted(set(saved_identity) & set(own)):
            if saved_identity[k] != own[k]:
                differing.setdefault(k, f"{k}={own[k]!r} here, {saved_identity[k]!r} in the checkpoint ({k})")
        if name not in saved:
            if key + "weight" in state_dict:
                problems.append(f"'{name}' is wrapped here but was a plain layer in the checkpoint (target_modules)")
            continue
        B = state_dict[key + "B"]
        if tuple(B.shape) != tuple(layer.B.shape):
            problems.append(f"'{name}' has rank {B.shape[-1]} in the checkpoint, {layer.rank} here (rank)")
            continue
        group = layer._group
        follower = group is not None and layer is not group.members[0]
        lead_key = None
        if follower:
            lead = group.members[0]
            lead_key = next((prefix + n + ".P" for n, m in layers.items() if m is lead), None)
        if follower and key + "P" in state_dict and lead_key in state_dict \
                and not torch.equal(state_dict[key + "P"], state_dict[lead_key]):
            problems.append(f"'{name}' has its own P in the checkpoint but shares one here (share_projections)")
        elif not follower and key + "P" not in state_dict and key + "step" in state_dict:
            problems.append(f"'{name}' shared a P in the checkpoint but has its own here (share_projections)")
    problems += [f"'{n}' was wrapped in the checkpoint but is a plain layer here (target_modules)"
                 for n in sorted(saved - set(layers)) if _plain_linear(modules.get(n))]
    problems = list(differing.values()) + problems
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise ValueError(f"rso: this checkpoint was saved from a model wrapped with other arguments: {shown}. "
                         f"Wrap with the checkpoint's arguments (rso.from_pretrained(model, path) reads them "
                         f"from its rso_config.json).")

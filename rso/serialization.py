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
safetensors sees no shared tensors. The wrap arguments go to ``config.rso`` (written to
``config.json``) for :func:`from_pretrained`.

**What is checked on load.** A state dict with rso keys loaded into a wrapped model must come from a
model wrapped alike: another rank, other wrapped layers, other projection sharing, or other settings
that decide how training goes on (``IDENTITY``: each layer's ``_extra_state`` holds them) raise a
``ValueError`` naming them and the fix, before anything is loaded. A plain state dict (no rso keys)
loads into a wrapped model as its weights: W₀ ← weight, B ← 0 (P, the counters and the optimizer's state
of B stay; see ``SubspaceLinear``).
"""
from __future__ import annotations

import json
import os
import pathlib

import torch
from torch import nn

from rso.layers.subspace_linear import SubspaceLinear, _settings, _settings_tensor, is_conv1d
from .projections import SAMPLERS

__all__ = ["SETTINGS_KEY", "IDENTITY", "wrap_settings", "identity_tensor", "check_checkpoint", "from_pretrained",
           "read_settings"]

#: The attribute of an HF model's config (so the key in ``config.json``) that holds the wrap arguments.
SETTINGS_KEY = "rso"
_STATE = ("B", "P", "step", "cycle", "seed")


def wrap_settings(rank, tau, sampler, target_modules, scale, seed, share_projections, total_steps,
                  random_fraction, state_on_merge, proximal, chunked_head) -> dict:
    """The arguments of ``rso.wrap`` as JSON data (a custom sampler is recorded by its class name)."""
    custom = type(sampler).__name__ if sampler.name not in SAMPLERS or type(sampler) is not SAMPLERS[sampler.name] \
        else None
    if isinstance(target_modules, (list, tuple, set)):  # JSON has lists only (a set in a fixed order)
        target_modules = sorted(target_modules) if isinstance(target_modules, set) else list(target_modules)
    return {"rank": rank, "tau": tau, "projection": custom or sampler.name, "custom_projection": custom is not None,
            "target_modules": target_modules, "scale": float(scale), "seed": seed,
            "share_projections": share_projections if isinstance(share_projections, bool)
            else [list(g) for g in share_projections],
            "total_steps": total_steps, "random_fraction": random_fraction, "state_on_merge": state_on_merge,
            "proximal": proximal, "chunked_head": chunked_head}


#: The wrap arguments that decide how training continues from a saved state (compared on load).
IDENTITY = ("projection", "tau", "scale", "state_on_merge", "proximal")


def identity_tensor(settings: dict) -> torch.Tensor:
    """The continuation settings (``IDENTITY``, plus the GoLore switch for "hybrid") as JSON bytes in a uint8 tensor."""
    keys = IDENTITY + (("total_steps", "random_fraction") if settings["projection"] == "hybrid" else ())
    return _settings_tensor({k: settings[k] for k in keys})


def _identity(tensor) -> dict:
    return _settings(tensor) if tensor is not None else {}


def _plain_linear(module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def check_checkpoint(model: nn.Module, state_dict, prefix: str, layers: dict[str, SubspaceLinear]) -> None:
    """Raise ``ValueError`` if ``state_dict`` holds rso state of a model wrapped otherwise than ``model``."""
    modules = dict(model.named_modules())
    saved = {k[len(prefix):-2] for k in state_dict if k.startswith(prefix) and k.endswith(".B")}
    saved = {n for n in saved if isinstance(modules.get(n), SubspaceLinear) or _plain_linear(modules.get(n))}
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
                         f"from its config.json).")


# ----------------------------------------------------------------------------- from_pretrained
def read_settings(path) -> dict:
    """The wrap arguments saved in ``<path>/config.json`` by a wrapped model's ``save_pretrained``."""
    config = pathlib.Path(path) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"rso.from_pretrained: no config.json in {path}")
    settings = json.loads(config.read_text()).get(SETTINGS_KEY)
    if not isinstance(settings, dict):
        raise ValueError(f"rso.from_pretrained: {config} has no '{SETTINGS_KEY}' entry: the folder was not saved "
                         f"from a model wrapped by rso.wrap (load it with the model class's from_pretrained)")
    return settings


def _weight_files(path: pathlib.Path) -> list[pathlib.Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            return [path / f for f in sorted(set(json.loads((path / index).read_text())["weight_map"].values()))]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return [path / single]
    raise FileNotFoundError(f"rso.from_pretrained: no model.safetensors or pytorch_model.bin (or index) in {path}")


def _read(file: pathlib.Path, wanted) -> dict:
    if file.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if wanted(k)}
    import pickle
    try:  # a weights file holds tensors only: nothing else in it is unpickled (that could run code)
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = " ".join(str(e).split()).partition("WeightsUnpickler error:")[2].partition(". ")[0].strip()
        raise ValueError(f"rso.from_pretrained: {file} refused: torch.load(weights_only=True) cannot read it "
                         f"({reason or type(e).__name__}); a weights file holds tensors only, and unpickling "
                         f"anything else can run code: re-save the model as model.safetensors from a copy you "
                         f"trust") from None
    return {k: v for k, v in state.items() if wanted(k)}


def from_pretrained(model, path: str | os.PathLike, *, projection=None, **load_kwargs) -> nn.Module:
    """Rebuild a wrapped model from a folder written by ``save_pretrained`` or a Trainer checkpoint.

    ``model`` is either an HF model class (``AutoModelForCausalLM``, ``LlamaForCausalLM``...), whose
    ``from_pretrained(path, **load_kwargs)`` loads the weights, or a model instance of the same
    architecture, not yet wrapped (its weights are replaced by the folder's) or already wrapped (its
    arguments must then equal the saved ones). The model is wrapped with the arguments saved in
    ``config.json`` and gets the saved B, P, seeds and counters, so training resumes where it was.
    ``projection``: the sampler instance for a model saved with a custom ``ProjectionSampler``.
    """
    from .wrapping import is_wrapped, subspace_layers, wrap, _loop
    path = pathlib.Path(path)
    settings = read_settings(path)
    files = _weight_files(path)
    loaded_by_class = isinstance(model, type)
    if loaded_by_class:
        if not hasattr(model, "from_pretrained"):
            raise TypeError(f"rso.from_pretrained: model must be a model instance or a class with from_pretrained, "
                            f"got {model.__name__}")
        model = model.from_pretrained(str(path), **load_kwargs)
    elif not isinstance(model, nn.Module):
        raise TypeError(f"rso.from_pretrained: model must be an nn.Module or an HF model class, got {type(model).__name__}")
    kwargs = {k: v for k, v in settings.items() if k != "custom_projection"}
    if settings.get("custom_projection"):
        if projection is None:
            raise ValueError(f"rso.from_pretrained: {path} was saved with a custom sampler "
                             f"({settings['projection']}); pass projection=<an instance of it>")
    if projection is not None:
        kwargs["projection"] = projection
    if is_wrapped(model):
        current = getattr(_loop(model, "from_pretrained"), "settings", {})
        differ = [f"{k}={current.get(k)!r} here, {v!r} saved" for k, v in settings.items()
                  if k not in ("custom_projection",) and current.get(k) != v and not (k == "projection" and projection)]
        if differ:
            raise ValueError(f"rso.from_pretrained: the model is wrapped with other arguments than {path}: "
                             f"{'; '.join(differ)} (pass an unwrapped model to wrap it as saved)")
    else:
        wrap(model, **kwargs)
    names = {n for n, _ in subspace_layers(model)}
    if loaded_by_class:  # the weights are in place already: only the rso state is missing
        wanted = lambda k: k.rpartition(".")[0] in names and k.rpartition(".")[2] in _STATE  # noqa: E731
    else:
        wanted = lambda k: True  # noqa: E731
    missing = None
    for file in files:
        result = model.load_state_dict(_read(file, wanted), strict=False)
        missing = set(result.missing_keys) if missing is None else missing & set(result.missing_keys)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    needed = {k for k in missing if k not in tied} if not loaded_by_class else \
        {k for k in missing if k.rpartition(".")[0] in names and k.rpartition(".")[2] in _STATE}
    if needed:
        shown = ", ".join(sorted(needed)[:5]) + (" ..." if len(needed) > 5 else "")
        raise ValueError(f"rso.from_pretrained: {path} lacks {len(needed)} entries this model needs: {shown}")
    return model

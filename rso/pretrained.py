"""``rso.from_pretrained``: rebuild a wrapped model from a folder written by ``save_pretrained`` or a Trainer.

The folder holds the weights (the effective weight under ``weight``; B, P, seeds and counters beside it) and
``rso_config.json`` (:class:`rso.RSOConfig`); folders written before that file existed keep the config under
the ``"rso"`` key of ``config.json`` and still load.
"""
from __future__ import annotations

import json
import os
import pathlib
import pickle

import torch
from torch import nn

from .config import RSOConfig
from .serialization import key_renamer
from .trust import weights_only_refusal
from rso.layers.subspace_experts import EXPERTS_CHILD, is_experts_module
from .targets import _default_targets, _expert_targets
from .wrapping import get_config, is_wrapped, subspace_members, wrap

__all__ = ["from_pretrained"]

#: The keys of a wrapped layer's state that are rso's own (a plain loader leaves them unused).
_STATE = ("B", "P", "step", "cycle", "seed")


def _weight_files(path: pathlib.Path) -> list[pathlib.Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            return [path / f for f in sorted(set(json.loads((path / index).read_text())["weight_map"].values()))]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return [path / single]
    raise FileNotFoundError(f"rso.from_pretrained: no model.safetensors or pytorch_model.bin (or index) in {path}")


def _read(file: pathlib.Path, wanted, rename=lambda key: key) -> dict:
    """The tensors of ``file`` whose renamed key is ``wanted``, under that key."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(file), framework="pt") as f:
            keys = {k: rename(k) for k in f.keys()}
            return {new: f.get_tensor(k) for k, new in keys.items() if wanted(new)}
    try:  # a weights file holds tensors only: nothing else in it is unpickled (that could run code)
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"rso.from_pretrained: {file} refused: torch.load(weights_only=True) cannot read it "
                         f"({weights_only_refusal(file, e)}); a weights file holds tensors only, and unpickling "
                         f"anything else can run code: re-save the model as model.safetensors from a copy you "
                         f"trust") from None
    return {rename(k): v for k, v in state.items() if wanted(rename(k))}


def _keys(file: pathlib.Path) -> list[str]:
    """The keys of a weights file (safetensors: read from its header, no tensor loaded)."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    return list(_read(file, lambda k: True))


def _saved_layers(files, rename) -> list[str]:
    """The names of the layers the checkpoint holds a B for (the layers that were wrapped)."""
    return sorted(name[:-2] for file in files for name in map(rename, _keys(file)) if name.endswith(".B"))


def _split_saved(model, saved) -> tuple[list[str], list[str]]:
    """The saved B owners as (linear layer names, stacked expert weight names ``<experts>.<weight>``)."""
    linear, experts = [], []
    for name in saved:
        owner, child, weight = name.rsplit(".", 2) if name.count(".") >= 2 else ("", "", name)
        module = model.get_submodule(owner) if child == EXPERTS_CHILD and owner else None
        if module is not None and is_experts_module(module):
            experts.append(f"{owner}.{weight}")
        else:
            linear.append(name)
    return linear, experts


def _config_for(model, config: RSOConfig, files, rename) -> RSOConfig:
    """``config``, with the saved layers (and stacked expert weights) named when the defaults would now pick others
    (layers frozen when the model was wrapped are trainable again in a freshly loaded model)."""
    linear, experts = _split_saved(model, _saved_layers(files, rename))
    changes = {}
    if config.target_modules is None and linear != sorted(name for name, _ in _default_targets(model, config.rank)[0]):
        changes["target_modules"] = linear
    if config.target_parameters is None and experts != sorted(
            f"{name}.{w}" for name, ranks in _expert_targets(model, config)[0].items() for w in ranks):
        changes["target_parameters"] = experts
    return RSOConfig.from_dict({**config.to_dict(), **changes}, config.projection if config.custom_projection else None) \
        if changes else config


def _check_same_config(model, config: RSOConfig, path):
    current, saved = get_config(model).to_dict(), config.to_dict()
    differ = [f"{k}={current.get(k)!r} here, {v!r} saved" for k, v in saved.items() if current.get(k) != v]
    if differ:
        raise ValueError(f"rso.from_pretrained: the model is wrapped with other arguments than {path}: "
                         f"{'; '.join(differ)} (pass an unwrapped model to wrap it as saved)")


def from_pretrained(model, path: str | os.PathLike, *, projection=None, **load_kwargs) -> nn.Module:
    """Rebuild a wrapped model from a folder written by ``save_pretrained`` or a Trainer checkpoint.

    ``model`` is either an HF model class (``AutoModelForCausalLM``, ``LlamaForCausalLM``...), whose
    ``from_pretrained(path, **load_kwargs)`` loads the weights, or a model instance of the same
    architecture, not yet wrapped (its weights are replaced by the folder's) or already wrapped (its
    config must then equal the saved one). The model is wrapped with the saved :class:`RSOConfig` and gets
    the saved B, P, seeds and counters, so training resumes where it was.
    ``projection``: the sampler instance for a model saved with a custom ``ProjectionSampler``.
    """
    path = pathlib.Path(path)
    config = RSOConfig.from_pretrained(path, projection)
    files = _weight_files(path)
    loaded_by_class = isinstance(model, type)
    if loaded_by_class:
        if not hasattr(model, "from_pretrained"):
            raise TypeError(f"rso.from_pretrained: model must be a model instance or a class with from_pretrained, "
                            f"got {model.__name__}")
        model = model.from_pretrained(str(path), **load_kwargs)
    elif not isinstance(model, nn.Module):
        raise TypeError(f"rso.from_pretrained: model must be an nn.Module or an HF model class, got {type(model).__name__}")
    rename = key_renamer(model)
    if is_wrapped(model):
        _check_same_config(model, config, path)
    else:
        wrap(model, _config_for(model, config, files, rename))
    names = set(subspace_members(model))
    ours = lambda k: k.rpartition(".")[0] in names and k.rpartition(".")[2] in _STATE  # noqa: E731
    wanted = ours if loaded_by_class else (lambda k: True)  # by class, the weights are in place already
    missing = None
    for file in files:
        result = model.load_state_dict(_read(file, wanted, rename), strict=False)
        missing = set(result.missing_keys) if missing is None else missing & set(result.missing_keys)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    needed = {k for k in missing if ours(k)} if loaded_by_class else {k for k in missing if k not in tied}
    if needed:
        shown = ", ".join(sorted(needed)[:5]) + (" ..." if len(needed) > 5 else "")
        raise ValueError(f"rso.from_pretrained: {path} lacks {len(needed)} entries this model needs: {shown}")
    return model

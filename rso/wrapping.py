"""``rso.wrap`` / ``rso.unwrap``: turn a model's linear layers into ``SubspaceLinear`` (and its MoE experts into
``SubspaceExperts``) and back; which weights are chosen is :mod:`rso.targets`.

Wrapping edits the model in place (like PEFT) and keeps it an ordinary ``nn.Module``. Every argument
is checked, every target found and every new layer built before the first module is replaced, so a
failing call leaves the model untouched.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
import types
import weakref
from itertools import chain

import torch

from torch import nn
from torch.nn.parameter import is_lazy

from rso.layers.subspace_experts import EXPERTS_CHILD, ExpertSubspace, SubspaceExperts
from rso.layers.quantized import bitsandbytes_config, state_entries
from rso.layers.subspace_linear import ProjectionGroup, SubspaceLinear, is_quantized_linear
from . import heads
from .config import LEGACY_CONFIG_KEY, RSOConfig
from .outer_loop import OuterLoop, refuse_stale_optimizers
from .projections import CoordinateSampler, mix_seed
from .serialization import check_checkpoint, identity_tensor
from .targets import DEFAULT_EXCLUDED, _expert_targets, _find_targets, _in_out, _is_linear, _layer_rank, _listed, \
    rank_for_layer

__all__ = ["wrap", "unwrap", "merge_and_unload", "outer_step", "summary", "print_trainable_parameters",
           "state", "get_config", "effective_state_dict", "is_wrapped", "subspace_layers", "expert_layers",
           "subspace_members", "rank_for_layer", "DEFAULT_EXCLUDED",
           "DEFAULT_SHARED_INPUTS"]

#: Sibling layers that read the same input tensor and may share one projection.
DEFAULT_SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"),
                         ("query", "key", "value"), ("wq", "wk", "wv"), ("w1", "w3"))

_LOOP_ATTR = "_rso_outer_loop"
_HOOK_ATTR = "_rso_load_hooks"
_NOTES_ATTR = "_rso_wrap_notes"  # what wrap left out (for summary) and changed besides the layers (for unwrap)


def _check_model(model: nn.Module):
    """Refuse what wrapping would get wrong: a bare linear layer, PEFT adapters, tensors not materialized yet."""
    name = type(model).__name__
    if _is_linear(model):
        raise TypeError(f"rso.wrap: the model is itself a {name} (rso.wrap replaces child modules in place); "
                        f"wrap a module that holds it, e.g. nn.Sequential(layer)")
    peft = next(((n, m) for n, m in model.named_modules() if type(m).__module__.startswith("peft.")), None)
    if peft is not None:
        where = f"'{peft[0]}' is a {type(peft[1]).__name__}" if peft[0] else f"it is a {name}"
        raise ValueError(f"rso.wrap: {name} carries PEFT adapter layers ({where}); merge them first, model = "
                         f"peft_model.merge_and_unload().requires_grad_(True) (PEFT froze the base), "
                         f"then rso.wrap(model)")
    for tensor_name, t in chain(model.named_parameters(), model.named_buffers()):
        if is_lazy(t):
            raise ValueError(f"rso.wrap: '{tensor_name}' of {name} is an uninitialized lazy tensor (nn.LazyLinear...); "
                             f"run one forward pass first, then rso.wrap")
        if t.is_meta:
            raise ValueError(f"rso.wrap: '{tensor_name}' of {name} is on the meta device; wrap after the weights are "
                             f"materialized (from_pretrained, load_state_dict(..., assign=True), or to_empty() + "
                             f"load), or each P would be drawn on meta and be garbage after to_empty()")


def _check_shared_names(share_projections, names):
    """Each set of ``share_projections`` names two or more layers, every one of them a wrapped layer's name."""
    if isinstance(share_projections, bool):
        return
    for group in share_projections:
        if len(set(group)) < 2:
            raise ValueError(f"rso.wrap: share_projections set {tuple(group)!r} names fewer than two layers, so it "
                             f"shares nothing; name siblings that read one input, e.g. ('q_proj', 'k_proj', 'v_proj')")
    leaves = sorted({n.rpartition(".")[2] for n in names})
    unknown = sorted({n for group in share_projections for n in group} - set(leaves))
    if unknown:
        raise ValueError(f"rso.wrap: share_projections names {unknown}, which match no wrapped layer (wrapped: "
                         f"{_listed(leaves, 8)}); fix or drop them")


def _group_layers(names, layers, share_projections):
    """Partition layers into projection groups: siblings named in one shared set, same shape and rank."""
    if share_projections is False:
        return [[layer] for layer in layers]
    sets = DEFAULT_SHARED_INPUTS if share_projections is True else share_projections
    buckets, groups = {}, []
    for name, layer in zip(names, layers):
        parent, _, leaf = name.rpartition(".")
        key = next((i for i, s in enumerate(sets) if leaf in s), None)
        if key is None:
            groups.append([layer])
            continue
        bkey = (parent, key, layer.in_features, layer.rank, layer.P.dtype, layer.P.device)
        if bkey not in buckets:
            buckets[bkey] = []
            groups.append(buckets[bkey])
        buckets[bkey].append(layer)
    return groups


def wrap(model: nn.Module, config: RSOConfig | None = None, **kwargs) -> nn.Module:
    """Reparameterize the model's linear layers as ``W₀ + scale·B P`` in place and return the model.

    ``rso.wrap(model, RSOConfig(rank=64))``, ``rso.wrap(model, rank=64, ...)`` or both (the keywords replace
    the config's fields): :class:`rso.RSOConfig` defines, validates and documents every argument.

    Left as they are by default (listed by ``rso.summary``), refused when ``target_modules`` names them:
    frozen layers (``weight.requires_grad`` False: nothing of them trains, their bias keeps its flag) and
    layers whose parent reads ``.weight`` instead of calling them (``nn.MultiheadAttention.out_proj``,
    the Mamba mixers' projections...; ``_READ_DIRECTLY``), where B would be ignored. ``nn.TransformerEncoderLayer``'s
    linear1/linear2 are wrapped, its fused eval fast path (and ``nn.TransformerEncoder``'s nested-tensor path) kept
    off while wrapped. Refused: models with PEFT adapter layers (``merge_and_unload()`` first) and models with
    tensors on the meta device or lazy ones (wrap once the weights are materialized). Every check runs before the
    model changes.
    """
    config = _config_of(model, config, kwargs)
    if is_wrapped(model):
        raise ValueError(f"rso.wrap: {type(model).__name__} is already wrapped (call rso.unwrap first)")
    _check_model(model)
    sampler = config.sampler()
    if config.chunked_head is not None:
        heads._causal_lm(model)  # raises TypeError for a model without a causal-LM head
    targets, left_out = _find_targets(model, config.target_modules, config.rank)
    ranks = [_layer_rank(name, *_in_out(module), module.weight.dtype, config.rank, config.scale)
             for name, module in targets]
    names = [name for name, _ in targets]
    _check_shared_names(config.share_projections, names)

    expert_ranks, experts_left_out = _expert_targets(model, config)

    _check_requantize(config, [module for _, module in targets])
    # Build everything first; nothing in the model changes until all of it succeeded (a quantize= wrap installs
    # its layers one by one after every check, see _build_layers).
    experts = {name: SubspaceExperts(model.get_submodule(name), r, config.scale) for name, r in expert_ranks.items()}
    replaced = [weakref.ref(model.get_submodule(name)._parameters[w]) for name, r in expert_ranks.items() for w in r]
    layers = _build_layers(model, targets, ranks, config, replaced)
    groups = _group_layers(names, layers, config.share_projections) + [
        [sub] for layer in experts.values() for sub in layer.subspaces]
    member_names = {**dict(zip(layers, names)), **{sub: f"{name}.{sub.name}" for name, layer in experts.items()
                                                   for sub in layer.subspaces}}
    loop = _build_loop(model, groups, member_names, [r() for r in replaced if r() is not None], config, sampler)

    for name, layer in chain(zip(names, layers), experts.items()):
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, layer)
    for layer in experts.values():
        layer.adopt_()
    for reason, entries in experts_left_out.items():
        left_out.setdefault(reason, []).extend(entries)
    object.__setattr__(model, _LOOP_ATTR, loop.attach())
    object.__setattr__(model, _HOOK_ATTR, (model.register_load_state_dict_pre_hook(_check_before_load),
                                           model.register_load_state_dict_post_hook(_rearm_after_load)))
    object.__setattr__(model, _NOTES_ATTR, {"left_out": left_out, "nested": _turn_off_nested_tensors(model)})
    if _has_hf_config(model) and hasattr(model.config, LEGACY_CONFIG_KEY):  # an older checkpoint's entry
        delattr(model.config, LEGACY_CONFIG_KEY)
    if hasattr(model, "save_pretrained"):  # rso_config.json beside the weights (PEFT's adapter_config.json)
        object.__setattr__(model, "save_pretrained", types.MethodType(_save_pretrained_with_config, model))
    if config.chunked_head is not None:
        heads.use_chunked_head(model, chunk_size=config.chunked_head)
    return model


def _subspace_linear(module, rank, config: RSOConfig, model) -> SubspaceLinear:
    """The layer standing for ``module``: W₀ quantized as ``config.quantize`` (a bitsandbytes layer keeps its own
    format; its B and P take the model's floating dtype), merges rounded as ``config.requantize``."""
    if not is_quantized_linear(module):
        layer = SubspaceLinear.from_module(module, rank, config.scale, quantize=config.quantize)
    else:
        layer = SubspaceLinear.from_module(module, rank, config.scale, dtype=_float_dtype(model))
    if hasattr(layer, "merge_mode"):
        layer.merge_mode = config.requantize
    return layer


def _build_layers(model, targets, ranks, config: RSOConfig, replaced: list) -> list[SubspaceLinear]:
    """The new layers of ``targets`` (a list emptied as it goes); ``replaced`` gets a weak reference to each old
    weight. With ``quantize=`` each float layer is quantized and installed at once, so its float W₀ is freed before
    the next is read (a whole second copy of the model would not fit where quantize= is needed): every check has run
    by then (the weights are checked finite first), so only running out of memory can stop it part way."""
    progressive = config.quantize is not None
    if progressive:
        _check_finite(targets)
    layers = []
    while targets:
        name, module = targets.pop(0)
        layer = _subspace_linear(module, ranks[len(layers)], config, model)
        parent = model.get_submodule(name.rpartition(".")[0])
        if isinstance(parent, nn.TransformerEncoderLayer):
            layer.register_forward_pre_hook(_keep_off_fast_path)
        replaced.append(weakref.ref(module.weight))
        if progressive and not is_quantized_linear(module):
            setattr(parent, name.rpartition(".")[2], layer)
        layers.append(layer)
        del module
    return layers


def _float_dtype(model) -> torch.dtype | None:
    """The dtype of the model's first floating parameter (its compute dtype beside quantized weights)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def _check_finite(targets):
    """FloatingPointError naming the first layer whose weight holds inf/nan (it cannot be quantized)."""
    for name, module in targets:
        if not is_quantized_linear(module) and not bool(torch.isfinite(module.weight).all()):
            raise FloatingPointError(f"rso.wrap: layer '{name}' holds inf/nan, which quantize= cannot store; fix "
                                     f"the weights (or leave the layer out: target_modules) before wrapping")


def _check_requantize(config: RSOConfig, modules):
    """``requantize`` other than its default with no quantized W₀ would do nothing: refused."""
    if config.requantize != RSOConfig.requantize and config.quantize is None \
            and not any(is_quantized_linear(m) for m in modules):
        raise ValueError(f"rso.wrap: requantize={config.requantize!r} applies to a quantized W₀ only (quantize='int8' "
                         f"| 'nf4', or bitsandbytes layers); none is quantized here: drop it, or pass quantize=")


def _config_of(model, config, kwargs) -> RSOConfig:
    """The RSOConfig of ``wrap(model, config, **kwargs)`` (keywords replace the config's fields)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"rso.wrap: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(config, (int, float)) and not isinstance(config, bool) and "rank" not in kwargs:
        config, kwargs = None, {**kwargs, "rank": config}  # rso.wrap(model, 64): the rank
    if config is not None and not isinstance(config, RSOConfig):
        raise TypeError(f"rso.wrap: config must be an rso.RSOConfig (or pass its fields as keywords), "
                        f"got {type(config).__name__}")
    fields = {f.name for f in dataclasses.fields(RSOConfig)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise TypeError(f"rso.wrap: unknown argument(s) {unknown}; allowed: {sorted(fields)}")
    return dataclasses.replace(config, **kwargs) if config is not None else RSOConfig(**kwargs)


def _save_pretrained_with_config(model, save_directory, *args, **kwargs):
    """The model class's ``save_pretrained``, then ``rso_config.json`` beside the weights (main process only)."""
    with _quantization_config_for_save(model):
        result = type(model).save_pretrained(model, save_directory, *args, **kwargs)
    if kwargs.get("is_main_process", True):
        get_config(model).save_pretrained(save_directory)
    return result


@contextlib.contextmanager
def _quantization_config_for_save(model):
    """A model wrapped with ``quantize=`` (not loaded quantized) saves its W₀ in bitsandbytes' format, so its
    ``config.json`` carries the ``quantization_config`` a plain ``from_pretrained`` needs to read it back (the
    linear layers rso left in float named as not converted); the model's config is restored afterwards."""
    kind = get_config(model).quantize
    if kind is None or getattr(model, "hf_quantizer", None) is not None or not _has_hf_config(model):
        yield
        return
    skip = [re.escape(n) for n, m in model.named_modules() if _is_linear(m) and not isinstance(m, SubspaceLinear)]
    config, missing = model.config, object()
    before = config.__dict__.get("quantization_config", missing)
    config.quantization_config = bitsandbytes_config(kind, _float_dtype(model), skip)
    try:
        yield
    finally:
        if before is missing:
            del config.__dict__["quantization_config"]
        else:
            config.quantization_config = before


def _build_loop(model, groups, names, replaced, config: RSOConfig, sampler) -> OuterLoop:
    """The outer loop over projection groups (lists of new layers / expert subspaces): each member gets its
    settings, its group's seed and its first P. ``names``: {member: its name}; ``replaced``: the old weights."""
    groups = [ProjectionGroup(members) for members in groups]
    loop = OuterLoop(groups, sampler, config.tau, config.state_on_merge, config.proximal, names=names,
                     model_params=model.parameters(), replaced=replaced)
    loop.config = config
    loop.settings = config.to_dict()
    identity = identity_tensor(loop.settings)
    coordinate = isinstance(sampler, CoordinateSampler)
    for index, group in enumerate(groups):
        for m in group.members:
            m.identity = identity
            m.seed.fill_(mix_seed(config.seed, index))
    for group, P in zip(groups, loop.draw(groups, [0] * len(groups))):
        group.set_projection_(P, coordinate=coordinate)
    return loop


def _keep_off_fast_path(module, args):
    """A no-op forward pre-hook: ``nn.TransformerEncoderLayer`` takes its fused fast path (eval, no grad), which
    reads linear1/linear2 ``.weight`` (W₀ without B), only while no submodule has forward hooks."""
    return None


def _turn_off_nested_tensors(model) -> list:
    """Keep each ``nn.TransformerEncoder`` holding wrapped layers from packing a padded batch into a nested tensor
    (which only the fast path reads); returns (encoder, its use_nested_tensor) for unwrap."""
    changed = [(m, m.use_nested_tensor) for m in model.modules() if isinstance(m, nn.TransformerEncoder)
               and getattr(m, "use_nested_tensor", False) and any(isinstance(x, SubspaceLinear) for x in m.modules())]
    for encoder, _ in changed:
        encoder.use_nested_tensor = False
    return changed


def _has_hf_config(model) -> bool:
    return hasattr(getattr(model, "config", None), "to_json_string")


def _check_before_load(model, state_dict, prefix, *args):
    """Before a load changes anything: the checkpoint's rso state must fit how this model is wrapped."""
    check_checkpoint(model, state_dict, prefix, subspace_members(model))


def _rearm_after_load(model, incompatible_keys):
    """After a load: share each group's P again (``assign=True`` replaces buffers) and, since the loaded
    step counters may put the model on a cycle's last step, re-decide gradient captures."""
    loop = getattr(model, _LOOP_ATTR, None)
    if loop is not None:
        for group in loop.groups:
            group.tie_()
        loop.rearm()


def _loop(model, caller):
    loop = getattr(model, _LOOP_ATTR, None) if isinstance(model, nn.Module) else None
    if loop is None:
        raise ValueError(f"rso.{caller}: {type(model).__name__} is not wrapped by rso.wrap")
    return loop


def is_wrapped(model: nn.Module) -> bool:
    return getattr(model, _LOOP_ATTR, None) is not None or any(
        isinstance(m, (SubspaceLinear, SubspaceExperts)) for m in model.modules())


def subspace_layers(model: nn.Module):
    """(name, SubspaceLinear) pairs of a wrapped model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SubspaceLinear)]


def expert_layers(model: nn.Module):
    """(name, SubspaceExperts) pairs of a wrapped model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SubspaceExperts)]


def subspace_members(model: nn.Module) -> dict:
    """{name: member} of every B the outer loop trains: each SubspaceLinear, and each wrapped stacked expert weight's
    ExpertSubspace (named ``<experts>.rso.<weight>``, as in state dicts)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (SubspaceLinear, ExpertSubspace))}


def unwrap(model: nn.Module) -> nn.Module:
    """Merge every ``SubspaceLinear`` and put plain ``nn.Linear`` / ``Conv1D`` modules back (in place)."""
    loop = _loop(model, "unwrap")
    pairs = subspace_layers(model) + expert_layers(model)
    removed = [m.B for m in subspace_members(model).values()]
    replacements = [(name, layer.to_module()) for name, layer in pairs]
    loop.detach()
    for name, module in replacements:
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, module)
    for encoder, use_nested in getattr(model, _NOTES_ATTR, {}).get("nested", ()):
        encoder.use_nested_tensor = use_nested
    if hasattr(model, _NOTES_ATTR):
        object.__delattr__(model, _NOTES_ATTR)
    object.__delattr__(model, _LOOP_ATTR)
    for handle in getattr(model, _HOOK_ATTR):
        handle.remove()
    object.__delattr__(model, _HOOK_ATTR)
    if "save_pretrained" in model.__dict__:
        object.__delattr__(model, "save_pretrained")
    if heads.uses_chunked_head(model):
        heads.restore_head(model)
    refuse_stale_optimizers(removed)
    return model


merge_and_unload = unwrap


def effective_state_dict(model: nn.Module) -> dict:
    """The unwrapped model's state dict (each wrapped layer's ``weight`` = W₀ + s·B P, in its module's layout; no rso
    entries), computed without merging: unlike ``model.state_dict()`` (which merges B into W₀, so weight decay on B
    restarts from there) it leaves the model and its training untouched. For EMAs, logging, exports."""
    state, skip = {}, ()
    for name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{name}." if name else ""
        if skip and prefix.startswith(skip):
            continue  # an experts module's B, P and counters
        if isinstance(module, SubspaceExperts):
            skip = (*skip, f"{prefix}{EXPERTS_CHILD}.")
            state.update({prefix + k: v for k, v in module.effective_state().items()})
        if getattr(module, "bnb_settings", None) is not None:  # from a bitsandbytes layer: its unwrapped format
            state.update({prefix + k: v for k, v in state_entries(module._requantized()[0]).items()})
            if module.bias is not None:
                state[prefix + "bias"] = module.bias.detach()
            continue
        if isinstance(module, SubspaceLinear):
            weight = module.effective_weight()
            state[prefix + "weight"] = weight.T if module.layout == "conv1d" else weight
            if module.bias is not None:
                state[prefix + "bias"] = module.bias.detach()
            continue
        state.update({prefix + k: v.detach() for k, v in module._parameters.items()
                      if v is not None and prefix + k not in state})
        state.update({prefix + k: v for k, v in module._buffers.items()
                      if v is not None and k not in module._non_persistent_buffers_set})
    return state


def outer_step(model: nn.Module, optimizer=None):
    """Merge B into W₀, resample P and update ``optimizer``'s state for B now, for every layer."""
    _loop(model, "outer_step").outer_step(optimizer)


def get_config(model: nn.Module) -> RSOConfig:
    """The :class:`RSOConfig` the model was wrapped with."""
    return _loop(model, "get_config").config


def state(model: nn.Module) -> dict:
    """The outer loop's position: optimizer steps, cycle, steps left until the next merge."""
    loop = _loop(model, "state")
    lead = loop.groups[0].members[0]
    step, cycle = int(lead.step), int(lead.cycle)
    return {"step": step, "cycle": cycle, "tau": loop.tau,
            "steps_to_merge": None if loop.tau is None else loop.tau - step % loop.tau,
            "projection": loop.sampler.name, "layers": sum(len(g) for g in loop.groups),
            "projection_groups": len(loop.groups), "state_on_merge": loop.state_policy}


def summary(model: nn.Module) -> str:
    """PEFT-style one-liner plus the RSO settings: trainable / all parameters, layers, rank, cycle."""
    params = list(model.parameters())  # each shared (tied) parameter once
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    line = f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"
    if getattr(model, _LOOP_ATTR, None) is None:
        return line
    s = state(model)
    ranks = sorted({m.rank for m in subspace_members(model).values()})
    rank_txt = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"
    left_out = getattr(model, _NOTES_ATTR, {}).get("left_out", {})
    experts = sum(len(layer.subspaces) for _, layer in expert_layers(model))
    layers = f"{s['layers'] - experts} subspace layers" + (f" and {experts} stacked expert weights" if experts else "")
    kinds = [getattr(m, "quantize", None) for _, m in subspace_layers(model)]
    quantized = "".join(f"\nrso: W₀ stored as {kind} in {kinds.count(kind)} layers" for kind in sorted(set(kinds) - {None}))
    quantized += "; the stacked expert weights keep theirs in their dtype" if quantized and experts else ""
    return (f"{line}\nrso: {layers} in {s['projection_groups']} projection groups, "
            f"rank {rank_txt}, projection {s['projection']}, tau {s['tau']}, step {s['step']}, cycle {s['cycle']}"
            + quantized
            + "".join(f"\nrso: left as they are: {len(names)} {reason}: {_listed(names)}"
                      for reason, names in left_out.items()))


def print_trainable_parameters(model: nn.Module) -> None:
    print(summary(model))

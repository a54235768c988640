"""``rso.wrap`` / ``rso.unwrap``: turn a model's linear layers into ``SubspaceLinear`` and back.

Wrapping edits the model in place (like PEFT) and keeps it an ordinary ``nn.Module``. Every argument
is checked, every target found and every new layer built before the first module is replaced, so a
failing call leaves the model untouched.
"""
from __future__ import annotations

import math
import numbers
import re

from torch import nn

from rso.layers.subspace_linear import ProjectionGroup, SubspaceLinear, is_conv1d
from . import heads
from .outer_loop import STATE_POLICIES, OuterLoop
from .projections import CoordinateSampler, make_sampler, mix_seed
from .serialization import SETTINGS_KEY, check_checkpoint, identity_tensor, wrap_settings

__all__ = ["wrap", "unwrap", "merge_and_unload", "outer_step", "summary", "print_trainable_parameters",
           "state", "is_wrapped", "subspace_layers", "rank_for_layer", "DEFAULT_EXCLUDED", "DEFAULT_SHARED_INPUTS"]

#: Output heads left as they are by default (with everything inside them).
DEFAULT_EXCLUDED = ("lm_head", "score", "classifier")
#: Sibling layers that read the same input tensor and may share one projection.
DEFAULT_SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"),
                         ("query", "key", "value"), ("wq", "wk", "wv"), ("w1", "w3"))

_LOOP_ATTR = "_rso_outer_loop"
_HOOK_ATTR = "_rso_load_hooks"


def _is_linear(module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _name_matches(name: str, patterns) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _find_targets(model: nn.Module, target_modules):
    """(name, module) of the layers to wrap; raises if an explicit selection is empty or not linear."""
    if target_modules is None:
        tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        targets = []
        for name, module in model.named_modules():
            parts = name.split(".")
            if any(p in DEFAULT_EXCLUDED for p in parts) or not _is_linear(module):
                continue
            if id(module.weight) in tied:  # an output layer sharing the embedding matrix
                continue
            targets.append((name, module))
        if not targets:
            raise ValueError(f"rso.wrap: {type(model).__name__} has no nn.Linear / Conv1D layers to wrap "
                             f"(output heads {DEFAULT_EXCLUDED} are left out by default)")
        return targets
    if not isinstance(target_modules, (str, list, tuple, set)) or not all(
            isinstance(t, str) for t in ([target_modules] if isinstance(target_modules, str) else target_modules)):
        raise TypeError(f"rso.wrap: target_modules must be a regex string or a list of names/suffixes, "
                        f"got {target_modules!r}")
    targets = [(n, m) for n, m in model.named_modules() if n and _name_matches(n, target_modules)]
    if not targets:
        raise ValueError(f"rso.wrap: target_modules={target_modules!r} matches no module of "
                         f"{type(model).__name__}")
    bad = [f"{n} ({type(m).__name__})" for n, m in targets if not _is_linear(m)]
    if bad:
        raise TypeError(f"rso.wrap: target_modules selects modules that are not nn.Linear / Conv1D: "
                        f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    return targets


def rank_for_layer(rank: int | float, in_features: int) -> int:
    """The rank a layer with ``in_features`` inputs gets from ``wrap(rank=...)``: an int as it is, a fraction f
    in (0, 1) as max(1, round(f · in_features))."""
    return rank if isinstance(rank, int) else max(1, round(rank * in_features))


def _layer_rank(name, module, rank) -> int:
    in_f, out_f = (module.weight.shape[1], module.weight.shape[0]) if isinstance(module, nn.Linear) \
        else tuple(module.weight.shape)
    r = rank_for_layer(rank, in_f)
    if not 1 <= r <= min(in_f, out_f):
        raise ValueError(f"rso.wrap: rank={rank!r} gives rank {r} for layer '{name}' "
                         f"(in_features={in_f}, out_features={out_f}); allowed: 1 ≤ rank ≤ {min(in_f, out_f)}")
    return r


def _check_args(model, rank, tau, scale, seed, state_on_merge, proximal, share_projections):
    if not isinstance(model, nn.Module):
        raise TypeError(f"rso.wrap: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise TypeError(f"rso.wrap: rank must be an int ≥ 1 or a float in (0, 1), got {rank!r}")
    if isinstance(rank, float) and not 0.0 < rank < 1.0:
        raise ValueError(f"rso.wrap: a float rank is a fraction of in_features and must be in (0, 1), got {rank}")
    if isinstance(rank, int) and rank < 1:
        raise ValueError(f"rso.wrap: rank must be ≥ 1, got {rank}")
    if tau is not None and (isinstance(tau, bool) or not isinstance(tau, int) or tau < 1):
        raise ValueError(f"rso.wrap: tau (optimizer steps per cycle) must be an int ≥ 1 or None "
                         f"(merge only on explicit rso.outer_step), got {tau!r}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale == 0:
        raise ValueError(f"rso.wrap: scale must be a finite non-zero number, got {scale!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"rso.wrap: seed must be an int, got {seed!r}")
    if state_on_merge not in STATE_POLICIES:
        raise ValueError(f"rso.wrap: state_on_merge must be one of {STATE_POLICIES}, got {state_on_merge!r}")
    if proximal is not None and (isinstance(proximal, bool) or not isinstance(proximal, numbers.Real)
                                 or not proximal > 0):
        raise ValueError(f"rso.wrap: proximal (η of the ‖B‖²/(2η) term) must be a positive number or None, "
                         f"got {proximal!r}")
    if not (isinstance(share_projections, bool) or (isinstance(share_projections, (list, tuple)) and all(
            isinstance(g, (list, tuple)) and all(isinstance(n, str) for n in g) for g in share_projections))):
        raise TypeError("rso.wrap: share_projections must be a bool or a list of tuples of sibling layer names, "
                        f"e.g. [('q_proj', 'k_proj', 'v_proj')]; got {share_projections!r}")


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
        bkey = (parent, key, layer.in_features, layer.rank, layer.weight.dtype, layer.weight.device)
        if bkey not in buckets:
            buckets[bkey] = []
            groups.append(buckets[bkey])
        buckets[bkey].append(layer)
    return groups


def wrap(model: nn.Module, rank=128, tau: int | None = 200, projection="stiefel", target_modules=None,
         scale: float = 1.0, seed: int = 0, *, share_projections=True, total_steps: int | None = None,
         random_fraction: float = 0.2, state_on_merge: str = "reset", proximal: float | None = None,
         chunked_head: int | None = None):
    """Reparameterize the model's linear layers as ``W₀ + scale·B P`` in place and return the model.

    Args:
        rank: int (absolute) or float in (0, 1) (fraction of each layer's in_features).
        tau: optimizer steps per cycle (merge + resample after each); None: only on ``rso.outer_step``.
        projection: "stiefel" | "gaussian" | "coordinate" | "svd" | "hybrid", or a ``ProjectionSampler``.
        target_modules: None (every Linear/Conv1D but embeddings and output heads), a regex (full match)
            or a list of names / name suffixes.
        scale: s in ``W₀ + s·B P``.
        seed: every P is a function of (seed, group, cycle): reproducible and identical across ranks.
        share_projections: layers reading the same input (q/k/v, gate/up) share one P and one stored
            projection; or a list of sibling-name tuples.
        total_steps, random_fraction: for "hybrid" (GoLore@x%: SVD, then Stiefel for the last x).
        state_on_merge: optimizer state of B at a new cycle: "reset" (delete), "keep", "project".
        proximal: η of the optional proximal term ‖B‖²/(2η).
        chunked_head: for a causal LM, compute the output head + cross-entropy in chunks of this many
            tokens, so the vocab-wide logits are never held for the whole batch (``rso.heads``).
    """
    _check_args(model, rank, tau, scale, seed, state_on_merge, proximal, share_projections)
    if is_wrapped(model):
        raise ValueError(f"rso.wrap: {type(model).__name__} is already wrapped (call rso.unwrap first)")
    sampler = make_sampler(projection, total_steps=total_steps, random_fraction=random_fraction)
    if chunked_head is not None:
        if isinstance(chunked_head, bool) or not isinstance(chunked_head, int) or chunked_head < 1:
            raise ValueError(f"rso.wrap: chunked_head must be None or a positive int (tokens per chunk), "
                             f"got {chunked_head!r}")
        heads._causal_lm(model)  # raises TypeError for a model without a causal-LM head
    targets = _find_targets(model, target_modules)
    ranks = [_layer_rank(name, module, rank) for name, module in targets]

    # Build everything first; nothing in the model changes until all of it succeeded.
    names = [name for name, _ in targets]
    layers = [SubspaceLinear.from_module(module, r, scale) for (_, module), r in zip(targets, ranks)]
    groups = [ProjectionGroup(members) for members in _group_layers(names, layers, share_projections)]
    loop = OuterLoop(groups, sampler, tau, state_on_merge, proximal)
    loop.settings = wrap_settings(rank, tau, sampler, target_modules, scale, seed, share_projections, total_steps,
                                  random_fraction, state_on_merge, proximal, chunked_head)
    identity = identity_tensor(loop.settings)
    for layer in layers:
        layer.identity = identity
    coordinate = isinstance(sampler, CoordinateSampler)
    for index, group in enumerate(groups):
        for m in group.members:
            m.seed.fill_(mix_seed(seed, index))
    for group, P in zip(groups, loop.draw(groups, [0] * len(groups))):
        group.set_projection_(P, coordinate=coordinate)

    for name, layer in zip(names, layers):
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, layer)
    object.__setattr__(model, _LOOP_ATTR, loop.attach())
    object.__setattr__(model, _HOOK_ATTR, (model.register_load_state_dict_pre_hook(_check_before_load),
                                           model.register_load_state_dict_post_hook(_rearm_after_load)))
    if _has_hf_config(model):  # config.json then carries the wrap arguments (rso.from_pretrained reads them)
        setattr(model.config, SETTINGS_KEY, loop.settings)
    if chunked_head is not None:
        heads.use_chunked_head(model, chunk_size=chunked_head)
    return model


def _has_hf_config(model) -> bool:
    return hasattr(getattr(model, "config", None), "to_json_string")


def _check_before_load(model, state_dict, prefix, *args):
    """Before a load changes anything: the checkpoint's rso state must fit how this model is wrapped."""
    check_checkpoint(model, state_dict, prefix, dict(subspace_layers(model)))


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
        isinstance(m, SubspaceLinear) for m in model.modules())


def subspace_layers(model: nn.Module):
    """(name, SubspaceLinear) pairs of a wrapped model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SubspaceLinear)]


def unwrap(model: nn.Module) -> nn.Module:
    """Merge every ``SubspaceLinear`` and put plain ``nn.Linear`` / ``Conv1D`` modules back (in place)."""
    loop = _loop(model, "unwrap")
    pairs = subspace_layers(model)
    replacements = [(name, layer.to_module()) for name, layer in pairs]
    loop.detach()
    for name, module in replacements:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, module)
    object.__delattr__(model, _LOOP_ATTR)
    for handle in getattr(model, _HOOK_ATTR):
        handle.remove()
    object.__delattr__(model, _HOOK_ATTR)
    if _has_hf_config(model) and hasattr(model.config, SETTINGS_KEY):
        delattr(model.config, SETTINGS_KEY)
    if heads.uses_chunked_head(model):
        heads.restore_head(model)
    return model


merge_and_unload = unwrap


def outer_step(model: nn.Module, optimizer=None):
    """Merge B into W₀, resample P and update ``optimizer``'s state for B now, for every layer."""
    _loop(model, "outer_step").outer_step(optimizer)


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
    ranks = sorted({m.rank for _, m in subspace_layers(model)})
    rank_txt = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"
    return (f"{line}\nrso: {s['layers']} subspace layers in {s['projection_groups']} projection groups, "
            f"rank {rank_txt}, projection {s['projection']}, tau {s['tau']}, step {s['step']}, cycle {s['cycle']}")


def print_trainable_parameters(model: nn.Module) -> None:
    print(summary(model))

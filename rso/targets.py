"""Which weights ``rso.wrap`` wraps: the linear layers (``target_modules``) and the stacked expert weights
(``target_parameters``), with every layer the defaults leave out and why (``rso.summary`` lists them), and the
rank each gets. Nothing here changes a model.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from rso.layers.subspace_experts import expert_weight_names, is_experts_module
from rso.layers.subspace_linear import is_conv1d, is_quantized_linear
from .config import RSOConfig

__all__ = ["DEFAULT_EXCLUDED", "rank_for_layer"]

#: Output heads left as they are by default (with everything inside them), besides the model's output embeddings.
DEFAULT_EXCLUDED = ("lm_head", "score", "classifier", "classification_head", "sequence_summary", "logits_proj",
                    "qa_outputs")

def _bloom_slices(attention_or_mlp) -> bool:
    return attention_or_mlp.pretraining_tp > 1 and attention_or_mlp.slow_but_exact


#: Modules whose forward reads these linear children's ``.weight`` instead of calling them, so a wrapped child's
#: B would be ignored: class name (the module's or a base class's, defined in torch or transformers) →
#: (children, condition on the module, None: always). torch.nn's, and what a scan of transformers' modeling files
#: for ``self.<linear>.weight`` reads found (CUDA-kernel paths included). nn.TransformerEncoderLayer's fast path
#: is kept off instead (see ``_keep_off_fast_path``).
_READ_DIRECTLY = {
    "MultiheadAttention": (("out_proj",), None),  # F.multi_head_attention_forward(..., out_proj.weight, ...)
    "BloomAttention": (("dense",), _bloom_slices),
    "BloomMLP": (("dense_4h_to_h",), _bloom_slices),
    "DetrMHAttentionMap": (("k_proj",), None),
    "ConditionalDetrMHAttentionMap": (("k_proj",), None),
    "MaskFormerDetrMHAttentionMap": (("k_proj",), None),
    "DabDetrMHAttentionMap": (("k_linear",), None),
    "TDNNLayer": (("kernel",), None),
    "WavLMAttention": (("q_proj", "k_proj", "v_proj", "out_proj"), None),
    "MambaMixer": (("x_proj", "dt_proj", "out_proj"), None),
    "FalconMambaMixer": (("dt_proj",), None),
    "JambaMambaMixer": (("dt_proj",), None),
    **{mixer: (("out_proj",), None) for mixer in ("Mamba2Mixer", "BambaMixer", "FalconH1Mixer", "NemotronHMamba2Mixer",
                                                  "GraniteMoeHybridMambaLayer", "Zamba2MambaMixer")},
    "Gemma3nTextAltUp": (("correction_coefs",), None),
    "Gemma4AssistantForCausalLM": (("lm_head",), None),
    "Gemma4UnifiedAssistantForCausalLM": (("lm_head",), None),
    "LayoutLMv2Encoder": (("rel_pos_bias", "rel_pos_x_bias", "rel_pos_y_bias"), None),
    "LongcatFlashTopkRouter": (("classifier",), None),
    "MobileBertLMPredictionHead": (("decoder", "dense"), None),
    "NeoMMEForMaskedLM": (("unembedding_projection",), None),
    "LSHSelfAttention": (("query_key", "value"), None),
}
_FROZEN = "frozen layers (weight.requires_grad=False)"
_READ = "layers whose weight their parent reads directly, where B would be ignored"
_OWN_FORWARD = "nn.Linear subclasses with a forward of their own, which B would not reach"
_TIED = "layers whose weight another module holds too (tied), which would go on reading W₀ alone"
_NARROW = "layers narrower than the rank (kept trainable in full)"
_FUSED = "layers transformers' save_pretrained fuses with others (its weight converters would mix their B and P)"
_OWN_LOOP = "expert weights of experts modules with a loop of their own (not transformers' experts interface)"
_PACKED = "packed projections the module reads as a raw parameter (nn.MultiheadAttention.in_proj_weight)"


def _is_linear(module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


#: nn.Linear subclasses whose own forward is x Wᵀ + b all the same (read in transformers' modeling files).
_SAME_AS_LINEAR = ("FalconLinear",)


def _own_forward(module) -> bool:
    """An nn.Linear subclass that computes something else than x Wᵀ + b in its own forward (a router, a grouped
    linear...): wrapped, that forward would be replaced."""
    return isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward \
        and type(module).__name__ not in _SAME_AS_LINEAR and not is_quantized_linear(module)


def _frozen(module) -> bool:
    """A layer whose weight does not train (a bitsandbytes layer's storage never requires grad: it trains wrapped)."""
    return not module.weight.requires_grad and not is_quantized_linear(module)


def _tied_weights(model: nn.Module) -> set[int]:
    """ids of parameters held by more than one module (tied embeddings and heads, shared projections)."""
    owners = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    return {pid for pid, n in owners.items() if n > 1}


def _fused_on_save(model: nn.Module):
    """A predicate on module names: True for layers whose rso keys transformers' save / load conversions would not
    carry with the layer: a weight converter fuses the layer on save (q/k/v into one qkv, up/gate...) and would
    fuse its B and P too, or a load-time renaming moves the layer's keys (its model-side keys are not fixed)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
        transforms = get_model_conversion_mapping(model)
        patterns = [re.compile(p) for t in transforms if isinstance(t, WeightConverter) for p in t.target_patterns]
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    except (ImportError, AttributeError, TypeError, re.error):  # older transformers, not an HF model
        return lambda name: False
    prefix = getattr(model, "base_model_prefix", None)
    moved = lambda key: bool(renamings) and rename_source_key(key, renamings, [], prefix)[0] != key  # noqa: E731
    return lambda name: any(p.search(name) for p in patterns) or moved(f"{name}.B")


def _head_names(model: nn.Module) -> set[str]:
    """The output embeddings (an HF model's ``get_output_embeddings()``) and everything under ``DEFAULT_EXCLUDED``."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (AttributeError, NotImplementedError, TypeError):
        head = None
    return {n for n, m in model.named_modules() if m is head and head is not None}


def _listed(items, most=5) -> str:
    items = list(items)
    return ", ".join(items[:most]) + (" ..." if len(items) > most else "")


def _name_matches(name: str, patterns) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(_matches_entry(name, p) for p in patterns)


def _matches_entry(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def _direct_reader(model: nn.Module, name: str) -> str | None:
    """The class that reads layer ``name``'s ``.weight`` directly (see ``_READ_DIRECTLY``), or None."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    for cls in type(parent).__mro__:
        children, when = _READ_DIRECTLY.get(cls.__name__, ((), None))
        if leaf in children and cls.__module__.partition(".")[0] in ("torch", "transformers") \
                and (when is None or when(parent)):
            return cls.__name__
    return None


def _default_targets(model: nn.Module, rank=None):
    """Every Linear / Conv1D but output heads and the layers listed in ``_why_left_out``; returns
    (targets, {reason: names left as they are})."""
    heads, tied, fused = _head_names(model), _tied_weights(model), _fused_on_save(model)
    targets, left_out = [], {}
    for name, module in model.named_modules():
        if any(p in DEFAULT_EXCLUDED for p in name.split(".")) or name in heads or not _is_linear(module):
            continue
        reason = (_FUSED, name) if fused(name) else _why_left_out(model, name, module, tied, rank)
        if reason is None:
            targets.append((name, module))
        elif reason[0] is not None:
            left_out.setdefault(reason[0], []).append(reason[1])
    if not targets:
        also = "".join(f"; left as they are: {len(n)} {reason}: {_listed(n)}" for reason, n in left_out.items())
        unfreeze = "; unfreeze those to train (module.requires_grad_(True))" if _FROZEN in left_out else ""
        raise ValueError(f"rso.wrap: {type(model).__name__} has no nn.Linear / Conv1D layers to wrap "
                         f"(output heads {DEFAULT_EXCLUDED} are left out by default{also}){unfreeze}")
    return targets, left_out


def _why_left_out(model, name, module, tied, rank):
    """None to wrap the layer, else (reason listed by ``rso.summary`` or None to leave it out silently, entry)."""
    if id(module.weight) in tied:
        embedding = any(isinstance(m, nn.Embedding) and m.weight is module.weight for m in model.modules())
        return (None if embedding else _TIED), name  # an output layer sharing the embedding matrix: a head
    reader = _direct_reader(model, name)
    if _frozen(module):
        return _FROZEN, name
    if reader is not None:
        return _READ, f"{name} ({reader})"
    if _own_forward(module):
        return _OWN_FORWARD, f"{name} ({type(module).__name__})"
    if rank is not None and rank_for_layer(rank, _in_out(module)[0]) > min(_in_out(module)):
        return _NARROW, f"{name} ({'×'.join(map(str, _in_out(module)))})"
    return None


def _in_out(module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear (bitsandbytes' packed ones too) or a Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]


def _explicit_targets(model: nn.Module, target_modules):
    """The modules ``target_modules`` selects; raises unless each entry matches and every match is a trainable
    linear layer that its parent calls."""
    if not isinstance(target_modules, (str, list, tuple, set)) or not all(
            isinstance(t, str) for t in ([target_modules] if isinstance(target_modules, str) else target_modules)):
        raise TypeError(f"rso.wrap: target_modules must be a regex string or a list of names/suffixes, "
                        f"got {target_modules!r}")
    targets = [(n, m) for n, m in model.named_modules() if n and _name_matches(n, target_modules)]
    if not targets:
        how = " (a string is a regex the whole module name must match; a list takes names or suffixes)" \
            if isinstance(target_modules, str) else ""
        raise ValueError(f"rso.wrap: target_modules={target_modules!r} matches no module of "
                         f"{type(model).__name__}{how}")
    if not isinstance(target_modules, str):
        unmatched = [e for e in target_modules if not any(_matches_entry(n, e) for n, _ in targets)]
        if unmatched:
            raise ValueError(f"rso.wrap: target_modules entries {unmatched} match no module of "
                             f"{type(model).__name__}; fix or drop them")
    bad = [f"{n} ({type(m).__name__})" for n, m in targets if not _is_linear(m)]
    if bad:
        raise TypeError(f"rso.wrap: target_modules selects modules that are not nn.Linear / Conv1D: {_listed(bad)}")
    frozen = [n for n, m in targets if _frozen(m)]
    if frozen:
        raise ValueError(f"rso.wrap: target_modules selects frozen layers (weight.requires_grad=False), which would "
                         f"not train: {_listed(frozen)}; unfreeze them (layer.requires_grad_(True)) or leave them out")
    read = [f"{n} ({reader} reads its .weight)" for n, _ in targets
            if (reader := _direct_reader(model, n)) is not None]
    if read:
        raise ValueError(f"rso.wrap: target_modules selects layers whose weight their parent reads directly instead "
                         f"of calling them, so B would be ignored: {_listed(read)}; leave them out (the default does)")
    tied, fused = _tied_weights(model), _fused_on_save(model)
    why = lambda n, m: ("its own forward" if _own_forward(m) else "a tied weight" if id(m.weight) in tied  # noqa: E731
                        else "fused with others on save" if fused(n) else None)
    other = [f"{n} ({type(m).__name__}: {why(n, m)})" for n, m in targets if why(n, m)]
    if other:
        raise ValueError(f"rso.wrap: target_modules selects layers that B would not reach: {_listed(other)}; "
                         f"leave them out (the default does)")
    return targets


def _expert_weights(model: nn.Module):
    """(experts module name, module, weight name, W) of every stacked expert weight of transformers' experts modules
    (outside the output heads)."""
    heads = _head_names(model)
    return [(name, m, w, m._parameters[w]) for name, m in model.named_modules()
            if is_experts_module(m) and name not in heads and not any(p in DEFAULT_EXCLUDED for p in name.split("."))
            for w in expert_weight_names(m) if m._parameters.get(w) is not None and m._parameters[w].dim() == 3]


def _expert_in_out(module, W) -> tuple[int, int]:
    return (W.shape[1], W.shape[2]) if module.is_transposed else (W.shape[2], W.shape[1])


def _expert_targets(model: nn.Module, config: RSOConfig):
    """({experts module name: {weight name: rank}}, {reason: names left as they are}) for ``target_parameters``:
    None, every trainable stacked expert weight the rank fits; a list, exactly those it names (refused otherwise)."""
    chosen, left_out = {}, {}
    selected = _explicit_parameters(model, config.target_parameters)
    for name, module, w, W in _expert_weights(model):
        full = f"{name}.{w}"
        if selected is not None and full not in selected:
            continue
        in_f, out_f = _expert_in_out(module, W)
        reason = _FROZEN if not W.requires_grad else _NARROW \
            if rank_for_layer(config.rank, in_f) > min(in_f, out_f) else None
        if reason is not None and selected is not None:
            raise ValueError(f"rso.wrap: target_parameters selects '{full}' (E×{out_f}×{in_f}), one of the "
                             f"{reason}; leave it out")
        if reason is not None:
            left_out.setdefault(reason, []).append(f"{full} ({'×'.join(map(str, W.shape))})")
        else:
            chosen.setdefault(name, {})[w] = _layer_rank(full, in_f, out_f, W.dtype, config.rank, config.scale)
    if selected is None:
        left_out.update(_trained_in_full(model))
    return chosen, left_out


def _explicit_parameters(model: nn.Module, entries):
    """The full names ``target_parameters`` selects (None for the default); raises unless every entry names a
    stacked expert weight of transformers' experts modules."""
    if entries is None:
        return None
    experts = {f"{n}.{w}" for n, _, w, _ in _expert_weights(model)}
    selected = set()
    for entry in entries:
        matched = [n for n, _ in model.named_parameters() if _matches_entry(n, entry)]
        wrong = [n for n in matched if n not in experts]
        if not matched or wrong:
            what = f"'{wrong[0]}'" if wrong else "no parameter"
            raise ValueError(f"rso.wrap: target_parameters entry {entry!r} names {what} of {type(model).__name__}; "
                             f"allowed: the stacked expert weights of transformers' experts modules "
                             f"({_listed(sorted(experts)) or 'this model has none'}); leave it out (linear layers go "
                             f"in target_modules)")
        selected.update(matched)
    return selected


def _trained_in_full(model: nn.Module) -> dict:
    """{reason: names} of weights the default leaves to train in full: stacked expert weights of experts modules with
    their own loop, and packed projections (nn.MultiheadAttention's in_proj_weight)."""
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention) and getattr(m, "in_proj_weight", None) is not None \
                and m.in_proj_weight.requires_grad:
            found.setdefault(_PACKED, []).append(f"{name}.in_proj_weight" if name else "in_proj_weight")
        elif not is_experts_module(m) and "Experts" in type(m).__name__:
            own = [f"{name}.{w}" for w, p in m._parameters.items() if p is not None and p.dim() >= 3 and p.requires_grad]
            if own:
                found.setdefault(_OWN_LOOP, []).extend(f"{n} ({type(m).__name__})" for n in own)
    return found


def _find_targets(model: nn.Module, target_modules, rank):
    """(targets, left_out): the (name, module) pairs to wrap and {reason: names} of linear layers left as they are."""
    if target_modules is None:
        return _default_targets(model, rank)
    return _explicit_targets(model, target_modules), {}


def rank_for_layer(rank: int | float, in_features: int) -> int:
    """The rank a layer with ``in_features`` inputs gets from ``wrap(rank=...)``: an int as it is, a fraction f
    in (0, 1) as max(1, round(f · in_features))."""
    return rank if isinstance(rank, int) else max(1, round(rank * in_features))


def _layer_rank(name, in_f, out_f, dtype, rank, scale) -> int:
    """The layer's rank; raises if it does not fit the layer or ``scale`` is outside its dtype's normal range
    (s·B P would flush to zero or overflow)."""
    r = rank_for_layer(rank, in_f)
    if isinstance(rank, float) and rank * in_f < 0.5:  # below half a channel: nothing to round up
        raise ValueError(f"rso.wrap: rank={rank!r} rounds to 0 channels of layer '{name}' (in_features={in_f}); "
                         f"allowed: a fraction ≥ {0.5 / in_f:.3g} here, or an int rank, or leave the layer out "
                         f"(target_modules)")
    if not 1 <= r <= min(in_f, out_f):
        raise ValueError(f"rso.wrap: rank={rank!r} gives rank {r} for layer '{name}' "
                         f"(in_features={in_f}, out_features={out_f}); allowed: 1 ≤ rank ≤ {min(in_f, out_f)}")
    info = torch.finfo(dtype) if dtype.is_floating_point else None
    if info is not None and not info.tiny <= abs(scale) <= info.max:
        raise ValueError(f"rso.wrap: scale={scale!r} is outside the range of layer '{name}' ({dtype}: "
                         f"{info.tiny:.3g} ≤ |scale| ≤ {info.max:.3g}), where s·B P would be 0 or inf")
    return r

"""The methods the benchmark and the memory-comparison tests set up, each as the peer's own recipe.

``setup(method, model, rank=…) -> Setup(model, optimizer, info)``. The subspace methods act on the
decoder's linear layers (attention and MLP); embeddings, norms and the output head train in full,
as in the GaLore, GoLore and RSO papers.

==================  ===========================================================================
``adamw``           ``torch.optim.AdamW`` on every parameter
``frozen``          the block linear weights frozen, AdamW on the rest: the floor of any method
                    that trains linear layers in a subspace (memory of activations and time)
``galore-torch``    galore-torch's ``GaLoreAdamW`` (rank, gap 200, scale 0.25, proj_type std)
``galore``          our ``rso.optim.GaLoreAdamW`` with the same groups
``golore``          our ``rso.optim.GoLoreAdamW`` (random Stiefel projections)
``apollo``          apollo-torch ``APOLLOAdamW`` (random projection, channel-wise scaling, rank r)
``apollo-mini``     the same with rank 1 and tensor-wise scaling (scale 128)
``lora``            peft LoRA (alpha = rank) on every block linear layer; embeddings, norms and
                    head train too (the papers' pre-training baseline)
``rso-<sampler>``   ``rso.wrap(projection=<sampler>)`` (stiefel, gaussian, coordinate, svd) + AdamW
``<method>+ce``     any of them with the chunked linear + cross-entropy head (rso.heads)
==================  ===========================================================================
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["METHODS", "Setup", "setup", "available", "block_linear_weights",
           "import_peer", "MissingPeer"]

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RSO_SAMPLERS = ("stiefel", "gaussian", "coordinate", "svd")
METHODS = (("adamw", "frozen", "galore-torch", "galore", "golore", "apollo", "apollo-mini", "lora")
           + tuple(f"rso-{s}" for s in RSO_SAMPLERS))


class MissingPeer(RuntimeError):
    """A peer package (or our optimizer) that this method needs cannot be imported."""


@dataclass
class Setup:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    info: dict = field(default_factory=dict)


def import_peer(package: str, module: str, attr: str):
    """``package.module.attr`` without running the package's ``__init__`` unless it is already imported.

    galore-torch's and apollo-torch's ``__init__`` import bitsandbytes (8 s here; absent from some GPU
    images) for their 8-bit optimizers, which the benchmark does not use. The submodule is loaded under
    a temporary stand-in package that is removed again, so a later ``import galore_torch`` still runs
    the real ``__init__`` (and reuses the loaded submodule).
    """
    name = f"{package}.{module}"
    if package in sys.modules or name in sys.modules:
        try:
            return getattr(importlib.import_module(name), attr)
        except ImportError as exc:
            raise MissingPeer(f"{name} cannot be imported ({exc})") from None
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPeer(f"{package} is not installed")
    stub = types.ModuleType(package)
    stub.__path__ = list(spec.submodule_search_locations)
    sys.modules[package] = stub
    try:
        return getattr(importlib.import_module(name), attr)
    except ImportError as exc:
        raise MissingPeer(f"{name} cannot be imported ({exc})") from None
    finally:
        if sys.modules.get(package) is stub:
            del sys.modules[package]


def block_linear_weights(model: nn.Module):
    """(weights of the decoder's attention / MLP linear layers, every other trainable parameter)."""
    mats = [m.weight for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in BLOCK_LINEARS and m.weight.requires_grad]
    ids = {id(p) for p in mats}
    return mats, [p for p in model.parameters() if p.requires_grad and id(p) not in ids]


def available(method: str) -> str | None:
    """None if ``method`` can run here, else the reason it cannot."""
    base = method.removesuffix("+ce")
    try:
        if base == "galore-torch":
            import_peer("galore_torch", "adamw", "AdamW")
        elif base in ("apollo", "apollo-mini"):
            import_peer("apollo_torch", "apollo", "AdamW")
        elif base in ("galore", "golore"):
            import rso.optim as ropt
            getattr(ropt, "GaLoreAdamW" if base == "galore" else "GoLoreAdamW")
        elif base == "lora":
            import peft  # noqa: F401
        elif base not in METHODS:
            return f"unknown method {method!r} (known: {', '.join(METHODS)}, each optionally +ce)"
    except (ImportError, AttributeError, MissingPeer) as exc:
        return f"{base}: {exc}"
    return None


def setup(method: str, model: nn.Module, rank: int = 128, *, lr: float = 1e-3, gap: int = 200, tau: int = 200,
          galore_scale: float = 0.25, seed: int = 0, chunk_size: int = 1024, ce_mode: str = "recompute") -> Setup:
    """Set ``model`` up for ``method`` (in place; LoRA returns the peft wrapper) and build its optimizer."""
    chunked = method.endswith("+ce")
    base = method.removesuffix("+ce")
    reason = available(method)
    if reason:
        raise MissingPeer(reason)
    info = {"method": method, "rank": rank}
    if base == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
    elif base == "frozen":
        mats, _ = block_linear_weights(model)
        for p in mats:
            p.requires_grad_(False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    elif base in ("galore-torch", "galore", "golore"):
        mats, others = block_linear_weights(model)
        group = {"params": mats, "rank": rank, "update_proj_gap": gap, "scale": galore_scale}
        if base == "galore-torch":
            cls = import_peer("galore_torch", "adamw", "AdamW")
            group["proj_type"] = "std"
            opt = cls([{"params": others}, group], lr=lr, no_deprecation_warning=True)
        else:
            import rso.optim as ropt
            cls = ropt.GaLoreAdamW if base == "galore" else ropt.GoLoreAdamW
            group["seed"] = seed
            opt = cls([{"params": others}, group], lr=lr)
        info.update(update_proj_gap=gap, scale=galore_scale)
    elif base in ("apollo", "apollo-mini"):
        cls = import_peer("apollo_torch", "apollo", "AdamW")
        mats, others = block_linear_weights(model)
        mini = base == "apollo-mini"
        group = {"params": mats, "rank": 1 if mini else rank, "proj": "random",
                 "scale_type": "tensor" if mini else "channel", "scale": 128 if mini else 1,
                 "update_proj_gap": gap, "proj_type": "std"}
        opt = cls([{"params": others}, group], lr=lr)
        info.update(rank=group["rank"], update_proj_gap=gap)
    elif base == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0,
                                                 target_modules=list(BLOCK_LINEARS)))
        for n, p in model.named_parameters():  # pre-training baseline: all but the frozen bases train
            if "lora_" not in n and ".base_layer." not in n:
                p.requires_grad_(True)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    else:  # rso-<sampler>
        import rso
        sampler = base.split("-", 1)[1]
        rso.wrap(model, rank=rank, tau=tau, projection=sampler, target_modules=list(BLOCK_LINEARS), seed=seed)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        info.update(tau=tau, projection=sampler)
    if chunked:
        import rso.heads
        rso.heads.use_chunked_head(model, chunk_size=chunk_size, mode=ce_mode)
        info.update(chunked_ce=ce_mode, chunk_size=chunk_size)
    return Setup(model, opt, info)



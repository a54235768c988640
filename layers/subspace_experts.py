"""``SubspaceExperts``: a mixture-of-experts layer whose stacked expert weights train in random subspaces.

transformers 5 keeps a MoE layer's experts as 3-D parameters that the experts module reads in its own loop
(``gate_up_proj`` E×2I×H and ``down_proj`` E×H×I; E×in×out where the family stores them transposed). Each
wrapped one becomes

    W[e] = W₀[e] + s·B[e] P        W₀ frozen, B (E×out×r) trained, P (r×in) one buffer shared by the E experts

and expert e's tokens x_e go through :class:`~rso.layers.functional.SubspaceLinearFunction`, which saves only
z_e = x_e Pᵀ (r wide per routed token) for backward. One P per weight rather than one per expert: the E
experts' blocks are separate coordinates of the problem, so each block still sees a Haar-uniform subspace
(E[PᵀP] = (r/in)·I per expert, all the RSO analysis asks); the layer's input is projected once for every
token before routing, a resample is one draw, and P costs r·in instead of E·r·in (measured in
docs/results/moe/).

The routing stays the model's (its router picks ``top_k_index`` / ``top_k_weights``); the expert loop is
transformers' eager one, described by the experts class's own attributes (``has_gate``, ``has_bias``,
``is_transposed``, ``has_post_expert_norm``) and run with the original module's ``_apply_gate`` /
``act_fn``, so the family's gate (GPT-OSS's clamped SwiGLU, interleaved gate/up...) is its own.

State dicts keep the model's keys: the stacked weight under its own name holds the effective weight
(B merged first), each wrapped weight's B, P and counters sit under ``rso.<weight name>`` beside it, and
a plain state dict loaded here makes the layer exactly those weights (B ← 0).
"""
from __future__ import annotations

import inspect

import einops
import torch
from torch import nn

from .functional import GradientCapture, SubspaceLinearFunction, autocast_dtype, project, use_merged
from .subspace_linear import SubspaceLinear

__all__ = ["SubspaceExperts", "ExpertSubspace", "is_experts_module", "expert_weight_names", "EXPERTS_CHILD"]

#: The child of a ``SubspaceExperts`` that holds one :class:`ExpertSubspace` per wrapped weight.
EXPERTS_CHILD = "rso"


def is_experts_module(module) -> bool:
    """A transformers experts module built with ``use_experts_implementation`` whose forward is that decorator's
    dispatch to the generic expert loop (fused 3-D expert weights); a subclass with a forward of its own (Ergo's
    per-route norm) is not one."""
    return hasattr(module, "has_gate") and hasattr(module, "is_transposed") and callable(
        getattr(module, "_apply_gate", None)) and not isinstance(module, SubspaceExperts) \
        and getattr(type(module).forward, "__wrapped__", None) is not None


def expert_weight_names(module) -> tuple[str, ...]:
    """The stacked weights the expert loop reads: ('gate_up_proj' or 'up_proj', 'down_proj')."""
    return ("gate_up_proj" if module.has_gate else "up_proj", "down_proj")


class _ExpertsCapture:
    """The full gradient Σ gᵀx of each expert (out×in, fp32) over a step's micro-batches, for the SVD sampler, in
    one E×out×in tensor; ``grad`` is its (E·out)×in view (experts no token reached: zeros), reduced in place by
    ``rso.distributed``."""

    def __init__(self, num_experts):
        self._sum = None
        self.experts = [_ExpertCapture(self, e) for e in range(num_experts)]

    @property
    def grad(self):
        return None if self._sum is None else self._sum.view(-1, self._sum.shape[-1])


class _ExpertCapture:
    """Expert e's part of an :class:`_ExpertsCapture` (what ``SubspaceLinearFunction`` adds to)."""

    def __init__(self, owner: _ExpertsCapture, e: int):
        self.owner, self.e = owner, e

    def add(self, g, x):
        update = GradientCapture()
        update.add(g, x)
        if self.owner._sum is None:
            self.owner._sum = update.grad.new_zeros(len(self.owner.experts), *update.grad.shape)
        self.owner._sum[self.e].add_(update.grad)


class ExpertSubspace(nn.Module):
    """B (E×out×r), P (r×in) and the outer loop's counters of one stacked expert weight; its W₀ stays in the
    experts module under the weight's own name."""

    def __init__(self, owner: "SubspaceExperts", name: str, rank: int, scale: float):
        super().__init__()
        weight = owner._parameters[name]
        E, a, b = weight.shape
        self.num_experts, self.rank, self.scale, self.name = E, rank, float(scale), name
        self.transposed = bool(owner._experts.is_transposed)
        self.out_features, self.in_features = (b, a) if self.transposed else (a, b)
        kw = {"dtype": weight.dtype, "device": weight.device}
        self.B = nn.Parameter(torch.zeros(E, self.out_features, rank, **kw))
        self.register_buffer("P", torch.zeros(rank, self.in_features, **kw))
        for counter in ("step", "cycle", "seed"):
            self.register_buffer(counter, torch.zeros((), dtype=torch.long, device=weight.device))
        self.coordinate, self._index, self._group, self._capture = False, None, None, None
        self.identity = torch.zeros(0, dtype=torch.uint8)
        object.__setattr__(self, "_owner", owner)  # not a child: the owner holds this module

    @property
    def weight(self) -> nn.Parameter:
        """W₀ (E×out×in, or E×in×out for a transposed family), held by the experts module."""
        return self._owner._parameters[self.name]

    def delta(self) -> torch.Tensor:
        """``s·B P`` per expert in W₀'s layout, in fp32 (float64 for float64 weights)."""
        acc = torch.promote_types(self.weight.dtype, torch.float32)
        with torch.no_grad():
            d = einops.einsum(self.B.to(acc), self.P.to(acc), "e o r, r i -> e o i") * self.scale
        return einops.rearrange(d, "e o i -> e i o") if self.transposed else d

    def effective_weight(self) -> torch.Tensor:
        """``W₀ + s·B P`` for every expert, accumulated in fp32, cast to W₀'s dtype, in W₀'s layout."""
        acc = torch.promote_types(self.weight.dtype, torch.float32)
        return (self.weight.detach().to(acc) + self.delta()).to(self.weight.dtype)

    def _describe(self) -> str:
        """The stacked weight as messages name it."""
        return (f"experts weight '{self.name}' (experts={self.num_experts}, in_features={self.in_features}, "
                f"out_features={self.out_features}, rank={self.rank})")

    def expert_weight(self, W0: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e's W₀ as out×in (a view)."""
        return W0[e].T if self.transposed else W0[e]

    def linear(self, x, z, W0, B, P, e, bias):
        """Expert e's ``x W[e]ᵀ + b`` from its routed tokens ``x`` and their ``z = x Pᵀ``; saves only z."""
        merged = use_merged(x.shape[0], self.out_features, self.in_features, self.rank)
        capture = self._capture.experts[e] if self._capture is not None else None
        return SubspaceLinearFunction.apply(x, z, self.expert_weight(W0, e), B, P, self._coordinate_index(), bias,
                                            self.scale, merged, capture)

    def arm_capture(self):
        self._capture = _ExpertsCapture(self.num_experts)

    def take_captured_gradient(self):
        grad = self._capture.grad if self._capture is not None else None
        self._capture = None
        return grad

    # Shared with SubspaceLinear: the merge, projection setting, coordinate indices, the copy guard.
    merge_ = SubspaceLinear.merge_
    _refuse_non_finite = SubspaceLinear._refuse_non_finite
    set_projection_ = SubspaceLinear.set_projection_
    _coordinate_index = SubspaceLinear._coordinate_index
    _copy_guard = None
    note_update_ = SubspaceLinear.note_update_
    check_copy_guard = SubspaceLinear.check_copy_guard
    _refuse_outside_change = SubspaceLinear._refuse_outside_change

    def __setstate__(self, state):
        """A copy guards its B from here on (see ``SubspaceLinear.forward``)."""
        super().__setstate__(state)
        self._copy_guard = self.B._version

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.note_update_()  # a conversion may give B a new tensor
        return self

    def get_extra_state(self):
        return self.identity.clone()

    def set_extra_state(self, state):
        pass  # compared before the load began (rso.serialization.check_checkpoint)

    def extra_repr(self):
        return (f"experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, scale={self.scale}")


class SubspaceExperts(nn.Module):
    """A transformers experts module whose stacked weights (all or some) train as ``W₀[e] + s·B[e] P``."""

    def __init__(self, experts: nn.Module, ranks: dict[str, int], scale: float = 1.0):
        """``experts``: an experts module (:func:`is_experts_module`); ``ranks``: {weight name: rank} of the
        weights to wrap (the others stay plain trainable parameters)."""
        super().__init__()
        if not is_experts_module(experts):
            raise TypeError(f"SubspaceExperts wraps a transformers experts module (use_experts_implementation), "
                            f"got {type(experts).__name__}")
        object.__setattr__(self, "_experts", experts)  # the family's gate and activation; not a child
        self._arguments = list(inspect.signature(type(experts).forward).parameters)[1:4]
        self.num_experts = experts._parameters[expert_weight_names(experts)[1]].shape[0]
        self.weight_requires_grad = {n: experts._parameters[n].requires_grad for n in ranks}
        for name, p in experts._parameters.items():
            self.register_parameter(name, nn.Parameter(p.detach(), requires_grad=False) if name in ranks else p)
        for name, b in experts._buffers.items():
            self.register_buffer(name, b, persistent=name not in experts._non_persistent_buffers_set)
        for name, m in experts._modules.items():
            self.add_module(name, m)
        self.add_module(EXPERTS_CHILD, nn.ModuleDict({n: ExpertSubspace(self, n, r, scale) for n, r in ranks.items()}))

    def adopt_(self):
        """Point the original module's wrapped weights at W₀ (done once this module is in the model): copies of
        the model then hold each W₀ once."""
        for sub in self.subspaces:
            self._experts._parameters[sub.name] = self._parameters[sub.name]

    @property
    def subspaces(self) -> list[ExpertSubspace]:
        return list(self._modules[EXPERTS_CHILD].values())

    def _call_arguments(self, args, kwargs):
        """(hidden_states, top_k_index, top_k_weights), passed by position or by the family's own names."""
        values = list(args) + [kwargs.pop(n) for n in self._arguments[len(args):] if n in kwargs]
        if len(values) != 3 or kwargs:
            raise TypeError(f"{type(self._experts).__name__} (wrapped by rso) takes hidden_states, the routed "
                            f"expert indices and their weights ({', '.join(self._arguments)}), got "
                            f"{len(args)} positional and {sorted(kwargs)}")
        return values

    def forward(self, *args, **kwargs):
        hidden, top_k_index, top_k_weights = self._call_arguments(args, kwargs)
        experts = self._experts
        if getattr(experts, "_is_expert_parallel", False):
            raise NotImplementedError("rso: expert-parallel sharded experts are not supported by SubspaceExperts")
        up_name, down_name = expert_weight_names(experts)
        up, down = (self._prepared(n, hidden) for n in (up_name, down_name))
        z_up = project(up["x"](hidden), up["P"], up["index"]) if up["sub"] is not None else None
        out = torch.zeros_like(hidden)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
        for e in (e for e in hit if e < self.num_experts):
            position, token = torch.where(mask[e])
            h = self._expert_linear(up, e, hidden[token], z_up[token] if z_up is not None else None)
            h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
            h = self._expert_linear(down, e, h, None)
            if getattr(experts, "has_post_expert_norm", False):
                h = experts.post_expert_norm(h)
            h = h * top_k_weights[token, position, None]
            out.index_add_(0, token, h.to(out.dtype))
        return out

    def _prepared(self, name: str, hidden) -> dict:
        """One stacked weight's tensors for this call, in the compute dtype (autocast's when it is on)."""
        sub = self._modules[EXPERTS_CHILD]._modules.get(name)
        if sub is not None:
            sub.check_copy_guard()
        autocast = autocast_dtype(hidden)
        dtype = autocast or hidden.dtype
        cast = (lambda t: t.to(dtype)) if autocast else (lambda t: t)  # noqa: E731
        bias = self._parameters.get(f"{name}_bias") if getattr(self._experts, "has_bias", False) else None
        return {"sub": sub, "x": cast, "W0": cast(self._parameters[name]), "bias": None if bias is None else cast(bias),
                "B": cast(sub.B).unbind(0) if sub is not None else None,
                "P": sub.P.to(dtype) if sub is not None else None,
                "index": sub._coordinate_index() if sub is not None else None, "transposed": self._experts.is_transposed}

    @staticmethod
    def _expert_linear(w: dict, e: int, x, z):
        """Expert e's map of one stacked weight: subspace (z computed here when not given) or plain."""
        x = w["x"](x)
        bias = w["bias"][e] if w["bias"] is not None else None
        sub = w["sub"]
        if sub is None:
            weight = w["W0"][e].T if w["transposed"] else w["W0"][e]
            return nn.functional.linear(x, weight, bias)
        z = project(x, w["P"], w["index"]) if z is None else z
        return sub.linear(x, z, w["W0"], w["B"][e], w["P"], e, bias)

    # ------------------------------------------------------------- state dicts
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Merge first: each stacked weight's entry is the effective weight (B = 0 beside it)."""
        for sub in self.subspaces:
            sub.merge_()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """A stacked weight loaded without its B (a plain model's state dict) is the whole weight now: B ← 0."""
        plain = [s for s in self.subspaces if prefix + s.name in state_dict
                 and f"{prefix}{EXPERTS_CHILD}.{s.name}.B" not in state_dict]
        errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if len(error_msgs) == errors:
            with torch.no_grad():
                for sub in plain:
                    sub.B.zero_()

    def effective_state(self) -> dict:
        """{weight name: W₀ + s·B P} of the wrapped weights, without merging."""
        return {s.name: s.effective_weight() for s in self.subspaces}

    def to_module(self) -> nn.Module:
        """The experts module this stands for, with each wrapped weight ``W₀ + s·B P`` (requires_grad restored)."""
        experts, effective = self._experts, self.effective_state()
        for name, p in self._parameters.items():
            experts._parameters[name] = nn.Parameter(effective[name], requires_grad=self.weight_requires_grad[name]) \
                if name in effective else p
        for name, b in self._buffers.items():
            experts._buffers[name] = b
        for name, m in self._modules.items():
            if name != EXPERTS_CHILD:
                experts._modules[name] = m
        return experts

    def extra_repr(self):
        return f"{type(self._experts).__name__}, experts={self.num_experts}"

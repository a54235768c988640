"""``SubspaceLinear``: a linear layer trained in a random r-dimensional subspace of its input side.

Effective weight ``W = W₀ + s·B P`` (torch layout, out×in): ``W₀`` frozen, ``P`` (rank×in) a buffer,
only ``B`` (out×rank) and the bias train. Forward ``y = x W₀ᵀ + s·(x Pᵀ) Bᵀ + b`` stores only the
r-wide ``z = x Pᵀ`` for backward (see :mod:`rso.layers.functional`, which also picks the cheaper of two
evaluation orders per call).

Layers that read the same input tensor (q/k/v, gate/up) can form a :class:`ProjectionGroup`: they hold
one ``P`` (a single tensor, registered as a buffer in each member) and, within one forward pass, reuse
one ``z``, so that input costs ``rank`` once.

A quantized W₀ (``from_module(..., quantize=...)``, bitsandbytes layers): :mod:`rso.layers.quantized_linear`.
"""
from __future__ import annotations

import json
import weakref

import torch
from torch import nn

from .functional import GradientCapture, SubspaceLinearFunction, autocast_dtype, project, use_merged
from .quantized import KINDS, is_quantized_linear

__all__ = ["SubspaceLinear", "ProjectionGroup", "is_conv1d", "is_quantized_linear"]


def is_conv1d(module) -> bool:
    """HF GPT-2 style ``Conv1D`` (a linear layer whose weight is stored in×out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _check_rank(rank, out_f, in_f):
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(in_f, out_f):
        raise ValueError(f"SubspaceLinear: rank must be an int in [1, {min(in_f, out_f)}], got {rank!r}")


def _float_weight(module) -> tuple[torch.Tensor, str]:
    """(W₀ out×in, sharing the module's storage where it can, layout) of an ``nn.Linear`` or a ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.weight.detach(), "linear"
    if is_conv1d(module):
        return module.weight.detach().T.contiguous(), "conv1d"
    raise TypeError(f"SubspaceLinear wraps nn.Linear, transformers Conv1D or bitsandbytes Linear4bit / "
                    f"Linear8bitLt, got {type(module).__name__}")


def _settings(tensor) -> dict:
    """A layer's extra state (UTF-8 JSON bytes in a uint8 tensor) as a dict; {} when empty."""
    return json.loads(bytes(tensor.tolist()).decode()) if tensor.numel() else {}


def _settings_tensor(settings: dict) -> torch.Tensor:
    """``settings`` as UTF-8 JSON bytes (sorted keys) in a uint8 tensor of its own."""
    return torch.frombuffer(bytearray(json.dumps(settings, sort_keys=True).encode()), dtype=torch.uint8).clone()


class ProjectionGroup:
    """Layers sharing one projection P and, per forward pass, one stored ``z = x Pᵀ``.

    Every member's ``P`` buffer is the leader's tensor (one storage; ``tie_`` restores that after a
    ``.to()`` or an assigning ``load_state_dict`` gave members copies). The cached ``z`` is reused only
    for the very same input tensor and projection (same objects, same versions, same dtype and grad
    mode) and is dropped as soon as every member has read it. An inference tensor keeps no version, so
    under ``torch.inference_mode`` each member projects its input itself. Under ``torch.compile`` the
    cache is bypassed: the members' identical ``x Pᵀ`` on one ``P`` tensor are merged by the
    compiler's common-subexpression elimination instead.
    """

    def __init__(self, members):
        self.members = list(members)
        for m in self.members:
            m._group = self
        for m in self.members[1:]:  # on disk the group's P is stored once, under the leader's name
            m._non_persistent_buffers_set.add("P")
        self._key = None
        self._z = None
        self._consumed = set()
        self.tie_()

    def __len__(self):
        return len(self.members)

    def tie_(self):
        """Point each member's ``P`` at the leader's tensor where device, dtype and shape agree."""
        lead = self.members[0]._buffers["P"]
        for m in self.members[1:]:
            mine = m._buffers["P"]
            if mine is not lead and (mine.device, mine.dtype, mine.shape) == (lead.device, lead.dtype, lead.shape):
                m._buffers["P"] = lead

    @torch.no_grad()
    def set_projection_(self, P: torch.Tensor, coordinate: bool = False):
        """Copy ``P`` into the group's projection (once per distinct tensor) and set the members' mode."""
        done = set()
        for m in self.members:
            if id(m.P) not in done:
                done.add(id(m.P))
                m.P.copy_(P)
            m.coordinate, m._index = coordinate, None

    @staticmethod
    def _state_of(layer, x, dtype):
        """What a cached ``z`` depends on besides the objects; None for inference tensors (no version counter)."""
        if x.is_inference() or layer.P.is_inference():
            return None
        return x._version, layer.P._version, dtype, torch.is_grad_enabled()

    def lookup(self, layer, x, dtype):
        """The cached ``z`` for ``x`` if a group mate computed it in this pass, else None."""
        if self._key is None or id(layer) in self._consumed:
            return None
        x_ref, P_ref, state = self._key
        if x_ref() is not x or P_ref() is not layer.P or self._state_of(layer, x, dtype) != state:
            return None
        return self._z

    def store(self, layer, x, dtype, z):
        state = self._state_of(layer, x, dtype)
        if state is not None:
            self._key, self._z, self._consumed = (weakref.ref(x), weakref.ref(layer.P), state), z, {id(layer)}
            self._maybe_clear()

    def consume(self, layer):
        self._consumed.add(id(layer))
        self._maybe_clear()

    def _maybe_clear(self):
        if len(self._consumed) >= len(self.members):
            self._key, self._z, self._consumed = None, None, set()

    def __getstate__(self):  # deep copies and pickles never carry a live activation
        state = dict(self.__dict__)
        state.update(_key=None, _z=None, _consumed=set())
        return state


class SubspaceLinear(nn.Module):
    """``y = x W₀ᵀ + scale·(x Pᵀ) Bᵀ + bias`` with W₀ frozen, P a buffer and B trainable.

    Buffers ``step``, ``cycle`` and ``seed`` (int64 scalars) hold the outer loop's counters so a
    ``state_dict`` carries everything needed to resume.

    State dicts: ``weight`` is the effective weight (B merged first), in the wrapped module's layout
    (a Conv1D's in×out for layout "conv1d"), so the plain model class loads it. Loading a state dict that
    has this layer's ``weight`` but no ``B`` (a plain model's, or another folder's) makes the layer
    exactly that weight: W₀ ← weight and B ← 0, P and the counters unchanged. The optimizer is out of
    the layer's reach, so B's optimizer state (Adam's moments) stays, as a plain model's does after a
    ``load_state_dict``; they are coordinates in the unchanged P, so the next steps stay in the subspace.
    Load the optimizer's state as well (or build a new optimizer) when it should not carry over.
    """

    def __init__(self, in_features, out_features, rank, bias=True, scale=1.0, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        weight = torch.empty(out_features, in_features, **kw)
        nn.init.kaiming_uniform_(weight, a=5 ** 0.5)
        self._build(weight, nn.Parameter(torch.zeros(out_features, **kw)) if bias else None, rank, scale)

    def _build(self, weight, bias, rank, scale, layout="linear", weight_requires_grad=True):
        _check_rank(rank, *weight.shape)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self._build_subspace(weight.shape, bias, rank, scale, weight.dtype, weight.device, layout,
                             weight_requires_grad)

    def _build_subspace(self, shape, bias, rank, scale, dtype, device, layout, weight_requires_grad):
        """Everything but ``weight``: bias, B and P (``dtype``), the counters, the settings."""
        out_f, in_f = shape
        self.in_features, self.out_features, self.rank = in_f, out_f, rank
        self.scale = float(scale)
        self.bias = bias
        self.B = nn.Parameter(torch.zeros(out_f, rank, dtype=dtype, device=device))
        self.register_buffer("P", torch.zeros(rank, in_f, dtype=dtype, device=device))
        for name in ("step", "cycle", "seed"):
            self.register_buffer(name, torch.zeros((), dtype=torch.long, device=device))
        self.layout = layout  # "linear", or "conv1d" (HF GPT-2 Conv1D: weight stored in×out)
        self.weight_requires_grad = weight_requires_grad  # restored by unwrap
        self.coordinate = False  # P is r rows of the identity: project by indexing
        self.evaluation = "auto"  # "merged" | "split" | "auto" (fewer FLOPs; see rso.layers.functional)
        self._group = None
        self._capture = None
        self._index = None
        self.identity = torch.zeros(0, dtype=torch.uint8)  # how training goes on (set by rso.wrap; see get_extra_state)

    @classmethod
    def from_module(cls, module, rank, scale=1.0, quantize=None, dtype=None):
        """Wrap an ``nn.Linear`` (weight storage and bias Parameter reused) or an HF ``Conv1D``; with
        ``quantize`` "int8" | "nf4", or for a bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, a
        :class:`~rso.layers.quantized_linear.QuantizedSubspaceLinear` (``dtype``: its compute dtype, see there)."""
        if quantize not in (None, *KINDS):
            raise ValueError(f"SubspaceLinear.from_module: quantize must be None, 'int8' or 'nf4', got {quantize!r}")
        if quantize is not None or is_quantized_linear(module):
            from .quantized_linear import QuantizedSubspaceLinear  # it subclasses this class: imported here
            return QuantizedSubspaceLinear.from_module(module, rank, scale, quantize, dtype)
        if dtype is not None:
            raise ValueError(f"SubspaceLinear.from_module: dtype={dtype} sets a quantized layer's compute dtype; a "
                             f"float layer computes in its weight's dtype (convert the module first)")
        weight, layout = _float_weight(module)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new._build(weight, module.bias, rank, scale, layout, module.weight.requires_grad)
        return new

    def to_module(self) -> nn.Module:
        """The plain module this layer stands for, with weight ``W₀ + scale·B P`` (requires_grad restored)."""
        return self._plain_module(self.effective_weight())

    def _plain_module(self, merged) -> nn.Module:
        """An ``nn.Linear`` (or ``Conv1D`` for layout "conv1d") holding ``merged`` and this layer's bias."""
        if self.layout == "conv1d":
            from transformers.pytorch_utils import Conv1D
            module = Conv1D(self.out_features, self.in_features)
            module.weight = nn.Parameter(merged.T.contiguous(), requires_grad=self.weight_requires_grad)
            module.bias = self.bias
        else:
            module = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
            module.weight = nn.Parameter(merged, requires_grad=self.weight_requires_grad)
            module.bias = self.bias
        return module

    # ----------------------------------------------------------------- math
    def effective_weight(self) -> torch.Tensor:
        """``W₀ + scale·B P`` accumulated in fp32 (float64 for float64 weights), cast to W₀'s dtype."""
        acc = torch.promote_types(self.weight.dtype, torch.float32)
        with torch.no_grad():
            return (self.weight.to(acc) + self.scale * (self.B.to(acc) @ self.P.to(acc))).to(self.weight.dtype)

    @torch.no_grad()
    def merge_(self, next_projection: torch.Tensor | None = None):
        """W₀ ← W₀ + scale·B P (in fp32, then cast back); B ← 0 in place (same Parameter). ``next_projection``
        (the next cycle's P) is for layers that carry something into it (:class:`QuantizedSubspaceLinear`).

        ``FloatingPointError``, W₀ and B unchanged, if the merge would put inf/nan into W₀ (a non-finite B,
        or a sum that overflows W₀'s dtype)."""
        merged = self.effective_weight()
        if merged.device.type != "meta" and not bool(torch.isfinite(merged).all()):
            self._refuse_non_finite(merged)
        self.weight.copy_(merged)
        self.B.zero_()

    def _refuse_non_finite(self, merged):
        if not bool(torch.isfinite(self.B).all()):
            why = "B holds inf/nan"
        elif bool((torch.isfinite(self.weight) & ~torch.isfinite(merged)).any()):
            why = f"W₀ + s·B P overflows {self.weight.dtype}"
        else:
            return  # W₀ held inf/nan already; the merge adds none
        raise FloatingPointError(f"rso: {self._describe()} cannot merge: {why}, W₀ left unchanged; lower the learning "
                                 f"rate, enable gradient clipping, or load the last checkpoint")

    def _describe(self) -> str:
        """The layer as messages name it."""
        return f"SubspaceLinear(in_features={self.in_features}, out_features={self.out_features}, rank={self.rank})"

    @torch.no_grad()
    def set_projection_(self, P: torch.Tensor, coordinate: bool = False):
        """Set this layer's projection (for a layer in a group, use the group's ``set_projection_``)."""
        self.P.copy_(P)
        self.coordinate = coordinate
        self._index = None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Merge first, so a state dict holds the effective weight under ``weight`` (and B = 0), in the
        wrapped module's layout (Conv1D: in×out, a transposed view with ``keep_vars``, else a copy).

        The subspace P is kept: the optimizer state of B stays valid and training goes on as before,
        but B's weight decay and the proximal term restart from the merged point (as at a cycle end)."""
        self.merge_()
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout == "conv1d":
            weight = destination[prefix + "weight"].T
            destination[prefix + "weight"] = weight if keep_vars else weight.contiguous()

    def get_extra_state(self):
        """The settings that decide how training continues from this state (projection, τ, scale...),
        as UTF-8 JSON bytes in a uint8 tensor; ``rso`` compares them with the model's before a load.
        A Conv1D's adds ``"layout": "conv1d"`` (its ``weight`` is stored in×out; older rso saved out×in)."""
        if self.layout != "conv1d":
            return self.identity.clone()  # a tensor of its own per layer: safetensors refuses shared storage
        return _settings_tensor({**_settings(self.identity), "layout": "conv1d"})

    def set_extra_state(self, state):
        pass  # compared before the load began (rso.serialization.check_checkpoint)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if "P" in self._non_persistent_buffers_set:  # a group mate's P in an older checkpoint: it is the leader's
            state_dict.pop(prefix + "P", None)
        weight = state_dict.get(prefix + "weight")
        if weight is not None and weight.is_floating_point() and self.layout == "conv1d" \
                and self._saved_in_conv1d_layout(state_dict, prefix):
            state_dict[prefix + "weight"] = weight.T
        try:
            incoming = self._incoming_weight(state_dict, prefix)
        except ValueError as e:
            error_msgs.append(str(e))
            return
        state_dict.setdefault(prefix + "_extra_state", self.identity)  # older checkpoints have none
        errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if incoming is not None and len(error_msgs) == errors:
            self._store_loaded_(incoming)
            if prefix + "B" not in state_dict:
                with torch.no_grad():  # a plain weight is the whole layer now (see the class docstring)
                    self.B.zero_()

    def _incoming_weight(self, state_dict, prefix):
        """What ``state_dict`` holds of W₀ (None: nothing), put in the form the load copies into ``weight``;
        ValueError for a weight this layer cannot hold."""
        return state_dict.get(prefix + "weight")

    def _store_loaded_(self, incoming):
        """After the load copied ``weight``: what else the incoming W₀ sets (nothing for a float W₀)."""

    @staticmethod
    def _saved_in_conv1d_layout(state_dict, prefix) -> bool:
        """A plain state dict (no rso keys) and a marked rso one hold a Conv1D's weight in×out; older rso
        state dicts held it out×in."""
        extra = state_dict.get(prefix + "_extra_state")
        if extra is None:
            return prefix + "B" not in state_dict
        return _settings(extra).get("layout") == "conv1d"

    # ------------------------------------------------------------ copies
    #: In a copy of a wrapped model (deepcopy, pickle): B's version when it last changed in a known way, else None.
    _copy_guard = None

    def __setstate__(self, state):
        """A copy (``copy.deepcopy``, ``AveragedModel``, a pickled model) guards its B from here on: see ``forward``."""
        super().__setstate__(state)
        self._copy_guard = self.B._version

    def note_update_(self):
        """B changed in a known way: an optimizer step or a load (the outer loop calls it), or by hand where a copy
        is set to another wrapped model's W₀, B and P all three (call it then)."""
        if self._copy_guard is not None:
            self._copy_guard = self.B._version

    def _refuse_outside_change(self):
        """A copy's B changed in place, not by an optimizer step: an average of (W₀, B) pairs across subspaces
        (``torch.optim.swa_utils.AveragedModel``, a parameter-wise EMA) is not the average of W₀ + s·B P."""
        if self.B.device.type != "meta" and torch.count_nonzero(self.B.detach()) == 0:
            self._copy_guard = self.B._version  # B = 0 (a merged source): the average is exact
            return
        raise RuntimeError(
            f"rso: B of SubspaceLinear(in_features={self.in_features}, out_features={self.out_features}) in a copy of "
            f"a wrapped model changed outside an optimizer step (AveragedModel / a parameter-wise EMA?): averaging W₀ "
            f"and B across subspaces is not the average model; average the effective weights instead "
            f"(rso.effective_state_dict(model) into rso.unwrap(copy.deepcopy(model)), see docs/compatibility.md)")

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.note_update_()  # a conversion may give B a new tensor
        if self._group is not None:  # a conversion gives each member its own copy of P: share again
            self._group.tie_()
        return self

    def _coordinate_index(self):
        if not self.coordinate:
            return None
        if torch.compiler.is_compiling():
            return self.P.argmax(dim=1)
        if self._index is None or self._index[0] != self.P._version or self._index[1].device != self.P.device:
            self._index = (self.P._version, self.P.argmax(dim=1))
        return self._index[1]

    def check_copy_guard(self):
        """In a copy whose B changed outside an optimizer step: refuse (see ``_refuse_outside_change``)."""
        if self._copy_guard is not None and self.B._version != self._copy_guard:
            self._refuse_outside_change()

    def forward(self, x):
        self.check_copy_guard()
        dtype = autocast_dtype(x)
        if dtype is not None:  # cast once here; inside the function every op then already sees the autocast dtype
            xc, weight, B = x.to(dtype), self._weight_operand(dtype), self.B.to(dtype)
            bias = self.bias.to(dtype) if self.bias is not None else None
        else:
            dtype, xc, weight, B, bias = x.dtype, x, self._weight_operand(None), self.B, self.bias
        # P follows the compute dtype (autocast, or inputs cast by e.g. an FSDP2 mixed-precision policy).
        P, index = self.P.to(dtype), self._coordinate_index()
        group = self._group if self._group is not None and len(self._group.members) > 1 \
            and not torch.compiler.is_compiling() else None
        z = group.lookup(self, x, dtype) if group is not None else None
        if z is None:
            z = project(xc, P, index)
            if group is not None:
                group.store(self, x, dtype, z)
        else:
            group.consume(self)
        merged = self.evaluation == "merged" or self.evaluation == "auto" and use_merged(
            x.numel() // self.in_features, self.out_features, self.in_features, self.rank)
        # Flat (tokens × features) through the function, shaped outside it: an output viewed inside a custom
        # function could not be modified in place by the model (``y /= 2``).
        y = SubspaceLinearFunction.apply(xc.reshape(-1, self.in_features), z.reshape(-1, z.shape[-1]), weight, B, P,
                                         index, bias, self.scale, merged, self._capture)
        return y.view(*x.shape[:-1], self.out_features)

    def _weight_operand(self, dtype):
        """W₀ as the autograd function takes it (cast to ``dtype`` under autocast)."""
        return self.weight if dtype is None else self.weight.to(dtype)

    def arm_capture(self):
        """Keep x on the coming step and accumulate the full weight gradient gᵀx (for SVD)."""
        self._capture = GradientCapture()

    def take_captured_gradient(self):
        grad = self._capture.grad if self._capture is not None else None
        self._capture = None
        return grad

    def extra_repr(self):
        shared = f", shared_with={len(self._group) - 1}" if self._group is not None and len(self._group) > 1 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"scale={self.scale}, bias={self.bias is not None}{shared}")

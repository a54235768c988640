"""``QuantizedSubspaceLinear``: a :class:`~rso.layers.subspace_linear.SubspaceLinear` with W₀ quantized.

Effective weight ``W = deq(W₀) + s·B P``: W₀ held quantized (int8 / NF4 as bitsandbytes stores it; what
``SubspaceLinear.from_module(..., quantize=...)`` and bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` layers give),
only B and the bias train, and each merge requantizes W₀ (see the class). The codec: :mod:`rso.layers.quantized`.
"""
from __future__ import annotations

import torch
from torch import nn

from . import quantized as qz
from .quantized import KINDS, is_quantized_linear
from .subspace_linear import SubspaceLinear, _check_rank, _float_weight

__all__ = ["QuantizedSubspaceLinear"]


#: A quantized W₀'s scales, as non-persistent buffers: fp32 held bit-cast as int32 (``model.to(dtype)`` and
#: ``.half()`` convert floating buffers only), the uint8 absmax of double quantization as it is.
_SCALE_BUFFERS = ("weight_absmax", "weight_nested_absmax", "weight_offset")
_ROUNDING_SALT = 0x5EED_0F_2E  # keeps the rounding draws apart from the projection draws of the same seed


def _held(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _read(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.float32) if t.dtype == torch.int32 else t


class QuantizedSubspaceLinear(SubspaceLinear):
    """A :class:`SubspaceLinear` whose frozen W₀ is stored quantized (:mod:`rso.layers.quantized`: "nf4" / "fp4"
    bitsandbytes 4-bit, "int8" LLM.int8); B and P in the compute dtype.

    Held: ``weight``, the codes (a frozen Parameter, bitsandbytes' layout), and ``weight_absmax`` (with double
    quantization also ``weight_nested_absmax``, ``weight_offset``), non-persistent buffers (see
    ``_SCALE_BUFFERS``); no float copy of W₀. Forward and backward dequantize W₀ inside the autograd function,
    which saves the codes and scales, never the dequantized matrix.

    Merge (:meth:`merge_`): W₀ ← Q(deq(W₀) + s·B P) in fp32, rounded by ``merge_mode`` ("nearest" |
    "stochastic" | "stochastic+feedback"); stochastic draws come from a generator seeded by (seed, cycle, step,
    place in the projection group), so a run and its resumed copy round alike. With feedback and the next
    cycle's P′ passed, B ← R P′ᵀ(P′P′ᵀ)⁺ / s: the part of the residual R = deq(W₀) + s·B P − deq(W₀′) that
    the new subspace holds (its least-squares coordinates).

    State dicts merge first (the residual is dropped: B = 0) and hold what bitsandbytes' module of the same kind
    holds (:func:`rso.layers.quantized.state_entries`), plus B, P, the counters and the extra state. Loading a
    float ``weight`` (a plain model's) quantizes it (nearest) and sets B ← 0, as a plain weight does.
    """

    @classmethod
    def from_module(cls, module, rank, scale=1.0, quantize=None, dtype=None):
        """A bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (its storage kept; ``quantize`` None or its own kind),
        or an ``nn.Linear`` / ``Conv1D`` quantized as ``quantize``. ``dtype``: the compute dtype of B and P
        (default: the float layer's dtype; a Linear4bit's quant_state.dtype; a Linear8bitLt's bias dtype, else
        torch.get_default_dtype())."""
        if is_quantized_linear(module):
            q, settings = qz.from_bnb(module)
            if quantize not in (None, q.kind):
                raise ValueError(f"SubspaceLinear.from_module: this {type(module).__name__} is stored as {q.kind} by "
                                 f"bitsandbytes; pass quantize=None (keeps {q.kind}) or quantize={q.kind!r}")
            _check_rank(rank, *q.shape)
            bias, layout, requires_grad = module.bias, "linear", False
            dtype = dtype or (q.dtype if q.kind != "int8" else
                              module.bias.dtype if module.bias is not None else torch.get_default_dtype())
        else:
            if quantize not in KINDS:
                raise ValueError(f"QuantizedSubspaceLinear.from_module: quantize must be one of {KINDS} for a "
                                 f"float layer, got {quantize!r}")
            weight, layout = _float_weight(module)
            _check_rank(rank, *weight.shape)  # before the quantization's work
            q, settings, bias = qz.quantize(weight, quantize), None, module.bias
            dtype, requires_grad = dtype or weight.dtype, module.weight.requires_grad
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.weight = nn.Parameter(q.data, requires_grad=False)
        new._build_subspace(q.shape, bias, rank, scale, dtype, q.data.device, layout, requires_grad)
        new.quantize, new.blocksize, new.bnb_settings = q.kind, q.blocksize, settings
        new.merge_mode = qz.DEFAULT_MERGE_MODE
        for name, t in zip(_SCALE_BUFFERS, q.tensors()[1:]):
            new.register_buffer(name, _held(t), persistent=False)
        return new

    def quantized(self) -> qz.QuantizedWeight:
        """W₀ as held (views of the layer's tensors), recorded with B's dtype."""
        scales = [_read(self._buffers[n]) for n in _SCALE_BUFFERS if n in self._buffers]
        return qz.QuantizedWeight(self.quantize, (self.out_features, self.in_features), self.weight, scales[0],
                                  qz.storage_dtype(self.B.dtype), self.blocksize, *scales[1:])

    @torch.no_grad()
    def _store_(self, q: qz.QuantizedWeight):
        self.weight.copy_(q.data)
        for name, t in zip(_SCALE_BUFFERS, q.tensors()[1:]):
            self._buffers[name].copy_(_held(t))

    def _weight_operand(self, dtype):
        return self.quantized()  # dequantized to B's (autocast-cast) dtype inside the autograd function

    def effective_weight(self) -> torch.Tensor:
        """``deq(W₀) + scale·B P`` accumulated in fp32 (float64 for float64 B), in B's dtype."""
        acc = torch.promote_types(self.B.dtype, torch.float32)
        with torch.no_grad():
            return (qz.dequantize(self.quantized(), acc) + self.scale * (self.B.to(acc) @ self.P.to(acc))
                    ).to(self.B.dtype)

    @torch.no_grad()
    def merge_(self, next_projection: torch.Tensor | None = None):
        """W₀ ← Q(deq(W₀) + s·B P), B ← 0 (in place); with merge_mode "stochastic+feedback" and the next cycle's
        ``next_projection`` P′ (call before setting it), B ← R P′ᵀ(P′P′ᵀ)⁺ / s. Nothing to do while B = 0.

        ``FloatingPointError``, nothing changed, if B is not finite or W₀ + s·B P leaves the dtype's range."""
        if self.B.device.type == "meta" or not bool(self.B.any()):
            return
        q, residual = self._requantized(feedback=next_projection is not None)
        self._store_(q)
        self.B.zero_()
        if residual is not None:
            self.B.copy_(qz.residual_coordinates(residual, next_projection).div_(self.scale))

    def _requantized(self, feedback=False):
        """(Q(deq(W₀) + s·B P), the residual if ``feedback`` and merge_mode carries it, else None); W₀ unchanged."""
        if self.merge_mode not in qz.MERGE_MODES:
            raise ValueError(f"rso: {self._describe()}.merge_mode must be one of {qz.MERGE_MODES}, "
                             f"got {self.merge_mode!r}")
        if not bool(torch.isfinite(self.B).all()):
            raise FloatingPointError(f"rso: {self._describe()} cannot merge: B holds inf/nan, W₀ left unchanged; "
                                     f"lower the learning rate, enable gradient clipping, or load the last checkpoint")
        acc = torch.promote_types(self.B.dtype, torch.float32)
        delta = (self.B.to(acc) @ self.P.to(acc)).mul_(self.scale)
        mode = self.merge_mode if feedback else self.merge_mode.removesuffix("+feedback")
        try:
            return qz.requantize(self.quantized(), delta, mode, self._rounding_generator() if mode != "nearest"
                                 else None)
        except FloatingPointError as e:
            raise FloatingPointError(f"rso: {self._describe()} cannot merge: {e}") from None

    def _rounding_generator(self) -> torch.Generator:
        from rso.projections import generator_for
        member = self._group.members.index(self) if self._group is not None else 0
        return generator_for(int(self.seed), int(self.cycle), int(self.step), member, _ROUNDING_SALT,
                             device=self.weight.device)

    def _describe(self) -> str:
        return f"{super()._describe()[:-1]}, quantize={self.quantize!r})"

    def to_module(self) -> nn.Module:
        """The module the user had: a bitsandbytes Linear4bit / Linear8bitLt holding Q(deq(W₀) + s·B P) when it
        came from one, else an nn.Linear / Conv1D holding deq(W₀) + s·B P (in B's dtype, not requantized).
        The layer itself is left as it is."""
        if self.bnb_settings is None:
            return self._plain_module(self.effective_weight())
        q = self._requantized()[0] if bool(self.B.any()) else self.quantized()
        return qz.to_bnb(q.with_tensors([t.detach() for t in q.tensors()]), self.bias, self.bnb_settings)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Merge first (residual dropped), then bitsandbytes' entries of W₀ beside this layer's own."""
        self.merge_()
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)
        for key, value in qz.state_entries(self.quantized()).items():
            if key != "weight":
                destination[prefix + key] = value

    def _incoming_weight(self, state_dict, prefix):
        """The W₀ codes and scales of bitsandbytes' entries (or of a float weight, quantized nearest); the codes go
        to ``weight``, the scales are stored after the load (:meth:`_store_loaded_`)."""
        q = qz.read_state_entries(state_dict, prefix, self.quantized())
        if q is not None:
            state_dict[prefix + "weight"] = q.data
        return q

    def _store_loaded_(self, incoming):
        self._store_(incoming)

    def extra_repr(self):
        return f"{super().extra_repr()}, quantize={self.quantize!r}"

"""A frozen base weight W₀ stored quantized, in bitsandbytes' own formats, and the merge that requantizes it.

Kinds (the storage of an ``out × in`` weight, ``n = out·in`` values in row-major order):

* ``"nf4"`` / ``"fp4"``: bitsandbytes 4-bit, as ``bnb.nn.Linear4bit`` / ``Params4bit`` hold it: two codes per byte
  in a packed uint8 ``(⌈n/2⌉, 1)`` tensor, one fp32 ``absmax`` per block of ``blocksize`` (64) values;
  value = ``code[q]·absmax``. With double quantization (``compress_statistics``) the absmax are themselves
  8-bit: uint8 codes over blocks of 256, an fp32 ``nested_absmax`` per such block and an fp32 ``offset``.
  ``quantize="nf4"`` stores blocksize 64 without double quantization; ``"fp4"`` comes only from a Linear4bit.
* ``"int8"``: LLM.int8 as ``bnb.nn.Linear8bitLt`` holds it: int8 codes ``(out, in)``, one fp32 absmax per
  output row (``SCB``); value = ``q·SCB/127``.

Rounding ("nearest" is bitsandbytes' own quantizer). "stochastic", unbiased (E[deq] = W): in the block's
absmax-normalized domain u = w/absmax ∈ [−1, 1] a value goes to one of its two neighbouring code points
lo ≤ u ≤ hi with P(hi) = (u − lo)/(hi − lo); ±1 are code points, so each block keeps its absmax, and the
rounded values (exact code points) are then packed by ``bitsandbytes.functional.quantize_4bit``. For int8,
q = ⌊127·u + U[0, 1)⌋. (With double quantization bitsandbytes rounds each block's absmax to 8 bits, nearest.)

:func:`requantize` is the merge: W₀′ = Q(deq(W₀) + Δ) computed in fp32; with "stochastic+feedback" it also
returns R = deq(W₀) + Δ − deq(W₀′), whose least-squares coordinates in the next subspace
(:func:`residual_coordinates`) the layer carries into its new B.
"""
from __future__ import annotations

import dataclasses
import functools
import sys

import torch

__all__ = ["KINDS", "STORED_KINDS", "ROUNDINGS", "MERGE_MODES", "DEFAULT_MERGE_MODE", "QuantizedWeight", "quantize",
           "dequantize", "requantize", "residual_coordinates", "storage_dtype", "is_quantized_linear", "from_bnb",
           "to_bnb", "state_entries", "read_state_entries", "bitsandbytes_config"]

KINDS = ("int8", "nf4")  # the values of quantize=
STORED_KINDS = ("int8", "nf4", "fp4")  # fp4: kept from a bitsandbytes Linear4bit
ROUNDINGS = ("nearest", "stochastic")
MERGE_MODES = ("nearest", "stochastic", "stochastic+feedback")
#: Chosen by measurement (docs/results/quantized_merge: tiny LLaMA, 300 steps, τ = 10): nearest gave the lowest
#: held-out loss for int8 and NF4 (within one seed's noise of the others), and is the cheapest merge.
DEFAULT_MERGE_MODE = "nearest"
NF4_BLOCKSIZE = 64
_NESTED_BLOCKSIZE = 256  # bitsandbytes' quantize_4bit quantizes the absmax in blocks of 256
_STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what bitsandbytes records as a weight's dtype


@functools.cache
def _bnb():
    import bitsandbytes.functional as F
    return F


@functools.cache
def _code(kind: str, device: torch.device) -> torch.Tensor:
    """bitsandbytes' code table of ``kind`` ("dynamic": the 8-bit map of double quantization), one per device."""
    F = _bnb()
    return F.create_dynamic_map().to(device) if kind == "dynamic" else F.get_4bit_type(kind, device=device)


def storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype recorded with a quantized weight (bitsandbytes takes fp32/bf16/fp16; float64 is recorded fp32)."""
    return dtype if dtype in _STORAGE_DTYPES else torch.float32


@dataclasses.dataclass
class QuantizedWeight:
    """One quantized ``out × in`` weight (see the module docstring for the layout of each kind)."""

    kind: str  # "nf4" | "fp4" | "int8"
    shape: tuple  # (out_features, in_features)
    data: torch.Tensor  # 4-bit: packed uint8 (⌈n/2⌉, 1); int8: int8 (out, in)
    absmax: torch.Tensor  # fp32 per block (int8: per row, bitsandbytes' SCB); uint8 with double quantization
    dtype: torch.dtype = torch.float32  # the weight's own dtype, as bitsandbytes records it (quant_state.dtype)
    blocksize: int = NF4_BLOCKSIZE  # 4-bit values per absmax (int8: in_features, one block per row)
    nested_absmax: torch.Tensor | None = None  # double quantization: fp32, one per 256 blocks
    offset: torch.Tensor | None = None  # double quantization: fp32 0-d, the mean block absmax

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    def tensors(self) -> tuple:
        """The tensors, in the order :meth:`with_tensors` takes them."""
        return tuple(getattr(self, f) for f in self._fields())

    def with_tensors(self, tensors) -> QuantizedWeight:
        return dataclasses.replace(self, **dict(zip(self._fields(), tensors)))

    def _fields(self):
        return ("data", "absmax", "nested_absmax", "offset") if self.nested else ("data", "absmax")

    def nbytes(self) -> int:
        """Bytes held: codes plus scales (the 16- or 256-entry code tables are constants, held by none)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def quant_state(self, dtype: torch.dtype | None = None, own_tables: bool = False, shape=None):
        """bitsandbytes' ``QuantState`` of a 4-bit weight (dequantizing to ``dtype``, default ``self.dtype``, in
        ``shape``, default ``self.shape``); ``own_tables``: code tables of its own (safetensors refuses tensors
        shared across layers)."""
        F, device = _bnb(), self.data.device
        table = (lambda kind: _code(kind, device).clone()) if own_tables else (lambda kind: _code(kind, device))
        state2 = None
        if self.nested:
            state2 = F.QuantState(absmax=self.nested_absmax, blocksize=_NESTED_BLOCKSIZE, dtype=torch.float32,
                                  code=table("dynamic"))
        return F.QuantState(absmax=self.absmax, shape=torch.Size(shape or self.shape), blocksize=self.blocksize,
                            code=table(self.kind), quant_type=self.kind, dtype=dtype or self.dtype,
                            offset=self.offset, state2=state2)


def _from_quant_state(data: torch.Tensor, qs) -> QuantizedWeight:
    nested = qs.state2 is not None
    return QuantizedWeight(qs.quant_type, tuple(qs.shape), data, qs.absmax, qs.dtype, qs.blocksize,
                           qs.state2.absmax if nested else None, qs.offset if nested else None)


def _check_kind(kind, allowed=STORED_KINDS, what="kind"):
    if kind not in allowed:
        raise ValueError(f"rso.layers.quantized: {what} must be one of {allowed}, got {kind!r}")


def _check_finite(W: torch.Tensor, what: str):
    if W.device.type != "meta" and not bool(torch.isfinite(W).all()):
        raise FloatingPointError(f"rso.layers.quantized: {what} holds inf/nan, nothing was quantized; "
                                 f"lower the learning rate, clip gradients or load the last checkpoint")


def _check_range(W: torch.Tensor, kind: str, dtype: torch.dtype):
    """|w| must fit ``dtype``, and for int8 bitsandbytes' dequantization q·SCB (before the /127) must fit fp32."""
    limit = torch.finfo(dtype).max
    if kind == "int8":
        limit = min(limit, torch.finfo(torch.float32).max / 127)
    if W.numel() and W.device.type != "meta" and float(W.abs().max()) > limit:
        raise FloatingPointError(f"rso.layers.quantized: a weight exceeds what {kind} in {dtype} holds (|w| ≤ "
                                 f"{limit:.4g}), nothing was quantized; lower the learning rate or clip gradients")


def quantize(W: torch.Tensor, kind: str, rounding: str = "nearest", generator: torch.Generator | None = None, *,
             blocksize: int = NF4_BLOCKSIZE, nested: bool = False, dtype: torch.dtype | None = None) -> QuantizedWeight:
    """``W`` (out × in, floating, finite, within the range of ``dtype``: ``FloatingPointError`` otherwise) stored as
    ``kind``; ``rounding`` "nearest" | "stochastic" (unbiased); ``dtype``: the dtype recorded as the weight's
    (default W's, float64 recorded as fp32)."""
    _check_kind(kind)
    _check_kind(rounding, ROUNDINGS, "rounding")
    if W.dim() != 2 or not W.is_floating_point():
        raise ValueError(f"rso.layers.quantized: W must be a 2-D floating tensor (out × in), got "
                         f"{W.dtype} {tuple(W.shape)}")
    _check_finite(W, "W")
    dtype = storage_dtype(dtype or W.dtype)
    _check_range(W, kind, dtype)
    W32 = W.detach().float().contiguous()
    if kind == "int8":
        codes, scb = _int8_codes(W32, rounding, generator)
        return QuantizedWeight("int8", tuple(W.shape), codes, scb, dtype, W.shape[1])
    values = W32 if rounding == "nearest" else _round_to_codebook(W32, kind, blocksize, generator)
    data, qs = _bnb().quantize_4bit(values, blocksize=blocksize, compress_statistics=nested, quant_type=kind)
    return dataclasses.replace(_from_quant_state(data, qs), dtype=dtype)


def _int8_codes(W32, rounding, generator):
    """Row absmax s and q = round(127·w/s) (bitsandbytes' int8_vectorwise_quant) or ⌊127·w/s + U⌋; a row
    with s = 0 (or s so small that 127/s overflows) gets q = 0."""
    scb = W32.abs().amax(dim=1)
    inv = 127.0 / scb
    inv = torch.where(torch.isfinite(inv), inv, torch.zeros_like(inv))
    x = W32 * inv.unsqueeze(1)
    if rounding == "nearest":
        codes = torch.round(x)
    else:
        codes = torch.floor(x.add_(torch.rand(x.shape, generator=generator, device=x.device)))
    return codes.clamp_(-127, 127).to(torch.int8), scb


def _round_to_codebook(W32, kind, blocksize, generator):
    """W with each value, per block of ``blocksize``, rounded stochastically to a code point times the block's
    absmax: u = w/absmax goes to hi with probability (u − lo)/(hi − lo), to lo otherwise (E = w)."""
    code = torch.sort(_code(kind, W32.device)).values
    n = W32.numel()
    blocks = torch.nn.functional.pad(W32.reshape(-1), (0, (-n) % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    u = torch.where(absmax > 0, blocks / absmax, torch.zeros_like(blocks)).clamp_(-1, 1)
    upper = torch.searchsorted(code, u, out_int32=True).clamp_(1, code.numel() - 1)
    lo, hi = code[upper - 1], code[upper]
    gap = hi - lo
    p_hi = torch.where(gap > 0, (u - lo) / gap, torch.zeros_like(u))
    rounded = torch.where(torch.rand(u.shape, generator=generator, device=u.device) < p_hi, hi, lo)
    return rounded.mul_(absmax).view(-1)[:n].view_as(W32)


@torch.compiler.disable  # bitsandbytes' ops have no shape rule for the flat 4-bit read: run eagerly under compile
def dequantize(q: QuantizedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight ``q`` stores, out × in, in ``dtype`` (default ``q.dtype``); computed in fp32 by bitsandbytes."""
    dtype = dtype or q.dtype
    F = _bnb()
    if q.kind == "int8":
        W = F.int8_vectorwise_dequant(q.data, q.absmax)
    else:
        # Flat: bitsandbytes' CPU kernel reads a 2-D shape as blocks within rows, wrong when in % blocksize ≠ 0.
        flat = (q.shape[0] * q.shape[1],)
        W = F.dequantize_4bit(q.data, q.quant_state(storage_dtype(dtype), shape=flat)).view(q.shape)
    return W.to(dtype)


def requantize(q: QuantizedWeight, delta: torch.Tensor, mode: str = "nearest",
               generator: torch.Generator | None = None) -> tuple[QuantizedWeight, torch.Tensor | None]:
    """The merge W₀′ = Q(deq(W₀) + delta) in fp32, in q's format; returns (W₀′, R) with the residual
    R = deq(W₀) + delta − deq(W₀′) for mode "stochastic+feedback", else (W₀′, None).

    ``FloatingPointError`` (nothing changed; q is never modified) if deq(W₀) + delta is not finite or does not
    fit q's dtype (see :func:`quantize`), so no requantization ever yields a non-finite weight."""
    _check_kind(mode, MERGE_MODES, "mode")
    if tuple(delta.shape) != tuple(q.shape):
        raise ValueError(f"rso.layers.quantized: delta has shape {tuple(delta.shape)}, the weight {tuple(q.shape)}")
    target = dequantize(q, torch.float32).add_(delta.detach().to(device=q.data.device, dtype=torch.float32))
    _check_finite(target, "deq(W₀) + delta")
    new = quantize(target, q.kind, "nearest" if mode == "nearest" else "stochastic", generator,
                   blocksize=q.blocksize, nested=q.nested, dtype=q.dtype)
    return new, (target.sub_(dequantize(new, torch.float32)) if mode == "stochastic+feedback" else None)


def residual_coordinates(residual: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """argmin_C ‖C P − R‖_F = R Pᵀ (P Pᵀ)⁺ (out × rank): R's least-squares coordinates in the row space of P
    (R Pᵀ for orthonormal rows). R Pᵀ in fp32 (float64 for float64 P), the rank × rank part in float64."""
    acc = torch.promote_types(P.dtype, torch.float32)
    P = P.to(device=residual.device, dtype=acc)
    RPt = residual.to(acc) @ P.T
    gram = (P.double() @ P.double().T)
    return (RPt.double() @ torch.linalg.pinv(gram, hermitian=True)).to(acc)


# ------------------------------------------------------------------ bitsandbytes modules
def _bnb_linear_classes() -> tuple:
    if "bitsandbytes" not in sys.modules:  # a bitsandbytes module exists only once the package was imported
        return ()
    import bitsandbytes as bnb
    return bnb.nn.Linear4bit, bnb.nn.Linear8bitLt


def is_quantized_linear(module) -> bool:
    """A bitsandbytes ``Linear4bit`` (nf4/fp4, QLoRA's base layers) or ``Linear8bitLt`` (LLM.int8)."""
    classes = _bnb_linear_classes()
    return bool(classes) and isinstance(module, classes)


def from_bnb(module) -> tuple[QuantizedWeight, dict]:
    """(the module's weight as a QuantizedWeight, {settings :func:`to_bnb` restores}); refuses (one line) a
    layer whose storage cannot be requantized here."""
    import bitsandbytes as bnb
    name = f"rso: {type(module).__name__}(in_features={module.in_features}, out_features={module.out_features})"
    if isinstance(module, bnb.nn.Linear4bit):
        return _from_linear4bit(module, name)
    state = module.state
    if state.has_fp16_weights:
        raise ValueError(f"{name} has has_fp16_weights=True (float weights, int8 only inside its matmul); load it "
                         f"with has_fp16_weights=False (BitsAndBytesConfig(load_in_8bit=True) does) or wrap a plain "
                         f"nn.Linear with quantize='int8'")
    codes = module.weight.data
    scb = module.weight.SCB if getattr(module.weight, "SCB", None) is not None else state.SCB
    if codes.dtype != torch.int8 or scb is None:
        raise ValueError(f"{name} is not quantized yet (its weight is {codes.dtype}); move it to its device first "
                         f"(bitsandbytes quantizes on .to(device)) or load with BitsAndBytesConfig(load_in_8bit=True)")
    q = QuantizedWeight("int8", (module.out_features, module.in_features), codes, scb, torch.float16,
                        module.in_features)
    return q, {"threshold": state.threshold}


def _from_linear4bit(module, name):
    w = module.weight
    storage = getattr(w, "quant_storage", torch.uint8)
    if storage != torch.uint8:
        raise ValueError(f"{name} stores its 4-bit codes as {storage} (bnb_4bit_quant_storage); rso requantizes "
                         f"uint8 storage only: load with bnb_4bit_quant_storage=torch.uint8 (the default)")
    settings = {"compute_dtype": module.compute_dtype}
    if not getattr(w, "bnb_quantized", False) or w.dtype != torch.uint8:  # still the float weight
        return quantize(w.data.view(module.out_features, module.in_features), w.quant_type, blocksize=w.blocksize,
                        nested=w.compress_statistics), settings
    data, qs = w.data, w.quant_state
    if getattr(qs, "packing_format_for_cpu", False):  # repacked for a CPU kernel by an eval forward: undo
        data, qs = _bnb()._convert_weight_packed_for_cpu_inverse(data, qs)
    return _from_quant_state(data, qs), settings


def to_bnb(q: QuantizedWeight, bias, settings: dict):
    """A bitsandbytes Linear4bit / Linear8bitLt holding ``q`` (and ``bias``, the same Parameter), frozen."""
    import bitsandbytes as bnb
    out_f, in_f = q.shape
    if q.kind == "int8":
        module = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False,
                                     threshold=settings.get("threshold", 0.0), device="meta")
        module.weight = bnb.nn.Int8Params(q.data, requires_grad=False, has_fp16_weights=False, CB=q.data,
                                          SCB=q.absmax)
    else:
        module = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=settings.get("compute_dtype"),
                                   compress_statistics=q.nested, quant_type=q.kind, device="meta")
        qs = q.quant_state(own_tables=True)
        module.weight = bnb.nn.Params4bit(q.data, requires_grad=False, quant_state=qs, blocksize=q.blocksize,
                                          compress_statistics=q.nested, quant_type=q.kind, module=module,
                                          bnb_quantized=True)
        module.quant_state = qs
    module.bias = bias
    return module


# ------------------------------------------------------------------ state dicts
def bitsandbytes_config(kind: str, compute_dtype: torch.dtype, skip: list[str]):
    """transformers' ``BitsAndBytesConfig`` whose loader stores each linear layer as :func:`quantize` does
    (``"nf4"``: blocks of 64, fp32 absmax, no double quantization; ``"int8"``: LLM.int8 rows), leaving the
    modules matched by the regular expressions ``skip`` in float."""
    from transformers import BitsAndBytesConfig

    _check_kind(kind, KINDS, "quantize")
    settings = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": compute_dtype} \
        if kind == "nf4" else {"load_in_8bit": True}
    return BitsAndBytesConfig(**settings, llm_int8_skip_modules=list(skip))


def state_entries(q: QuantizedWeight) -> dict:
    """What bitsandbytes' own modules put in a state dict, by key under the layer's prefix: 4-bit ``weight``,
    ``weight.absmax``, ``weight.quant_map`` (+ ``weight.nested_absmax``, ``weight.nested_quant_map``),
    ``weight.quant_state.bitsandbytes__<kind>``; int8 ``weight``, ``SCB``, ``weight_format`` (0: row-major)."""
    if q.kind == "int8":
        return {"weight": q.data, "SCB": q.absmax, "weight_format": torch.tensor(0, dtype=torch.uint8)}
    packed = q.quant_state(own_tables=True).as_dict(packed=True)
    return {"weight": q.data, **{"weight." + k: v for k, v in packed.items()}}


def read_state_entries(state_dict: dict, prefix: str, like: QuantizedWeight) -> QuantizedWeight | None:
    """Pop the quantized weight under ``prefix`` (bitsandbytes' keys, as :func:`state_entries` writes them) from
    ``state_dict``; a float ``weight`` (a plain model's) is quantized (nearest) into ``like``'s format. None when
    there is no ``weight``; ValueError (one line) when it is not ``like``'s kind, shape and block layout."""
    keys4 = [k for k in state_dict if k.startswith(prefix + "weight.")]
    scb, fmt = state_dict.pop(prefix + "SCB", None), state_dict.pop(prefix + "weight_format", None)
    entries = {k[len(prefix) + len("weight."):]: state_dict.pop(k) for k in keys4}
    weight = state_dict.pop(prefix + "weight", None)
    where = f"rso: the state dict's '{prefix}weight'"
    if weight is None:
        return None
    if weight.is_floating_point() and not entries and scb is None:
        if tuple(weight.shape) != tuple(like.shape):
            raise ValueError(f"{where} has shape {tuple(weight.shape)}, the layer {tuple(like.shape)}")
        return quantize(weight, like.kind, blocksize=like.blocksize, nested=like.nested, dtype=like.dtype)
    if scb is not None:
        if fmt is not None and int(fmt) != 0:
            raise ValueError(f"{where} has weight_format {int(fmt)}; only 0 (row-major) is read")
        q = QuantizedWeight("int8", tuple(weight.shape), weight, scb, like.dtype, weight.shape[-1])
    elif entries:
        q = _from_quant_state(weight, _bnb().QuantState.from_dict(dict(entries), device=weight.device))
        _check_code_table(q, entries, where)
    else:
        raise ValueError(f"{where} is {weight.dtype} codes without their scales (weight.absmax... or SCB); "
                         f"save it with the module that quantized it")
    mine, theirs = _layout(like), _layout(q)
    if mine != theirs:
        raise ValueError(f"{where} holds {theirs}, the layer {mine}; load a checkpoint saved with the same "
                         f"quantization (or a float one, which is quantized on load)")
    return q


def _layout(q: QuantizedWeight) -> str:
    four = "" if q.kind == "int8" else f", blocksize {q.blocksize}{', double-quantized' if q.nested else ''}"
    return f"{q.kind} {tuple(q.shape)}{four}"


def _check_code_table(q: QuantizedWeight, entries: dict, where: str):
    """A 4-bit checkpoint's quant_map must be bitsandbytes' table for its kind (the one requantizing uses)."""
    table = _code(q.kind, torch.device("cpu"))
    saved = entries.get("quant_map")
    if saved is not None and not torch.equal(saved.float().cpu(), table):
        raise ValueError(f"{where} uses a custom {q.kind} quant_map; rso requantizes with bitsandbytes' own table")

"""The autograd function of the subspace layer.

``y = x (W₀ + s·B P)ᵀ + b`` with ``z = x Pᵀ`` computed outside autograd (P and W₀ never need a
gradient). The function saves the r-wide ``z``, never the in-wide ``x``. Backward:

    ∂B = s·gᵀz        ∂x = g (W₀ + s·B P) = g W₀ + s·(g B) P        ∂b = Σ g

Two evaluation orders give the same result; the cheaper one is chosen per call from the shapes
(``t`` tokens, ``m`` = out, ``n`` = in, ``r`` = rank):

* ``merged``: form ``W = W₀ + s·B P`` once in forward and once in backward (2mnr each, a transient
  out×in matrix that is never saved) and use one GEMM with it: 4tmn + 2trn + 2tmr + 4mnr in all.
* ``split``: ``x W₀ᵀ + s·z Bᵀ`` and ``g W₀ + s·(g B) P``: 4tmn + 4trn + 6tmr. Cheaper for few tokens.

For a coordinate projection (``index``: the kept input coordinates) ``z = x[..., index]`` and
``B P`` is a scatter of B's columns, so no projection matmul is done at all.

On the CPU, bf16/fp16 GEMMs whose two operands are both row-major run 20–100× slower than with one
of them column-major (oneDNN without AVX-512 BF16: ``g W₀`` at 128 × 4096 × 4096 took 19 s row-major,
0.28 s with ``g`` column-major). W₀, B and P are row-major, so backward hands them ``g`` (and ``g B``)
column-major there, and ``B P`` is formed from a column-major B: transient copies of ``g`` and B,
no change in the result's math.

When a :class:`GradientCapture` is passed, ``x`` is kept for this step and the full weight gradient
``gᵀx`` is accumulated into it (the SVD sampler needs it once per cycle).

``W₀`` may be a :class:`~rso.layers.quantized.QuantizedWeight`: it is dequantized (in B's dtype) in forward
and again in backward; the function saves its codes and scales, never the dequantized matrix.
"""
from __future__ import annotations

import torch

__all__ = ["GradientCapture", "SubspaceLinearFunction", "autocast_dtype", "gemm_lhs", "project", "use_merged"]


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def project(x: torch.Tensor, P: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """``z = x Pᵀ`` (``x[..., index]`` for a coordinate projection), outside autograd."""
    x = x.detach()
    return x.index_select(-1, index) if index is not None else torch.matmul(x, P.T)


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes in on ``x``'s device, or None when autocast is off there."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def gemm_lhs(t: torch.Tensor) -> torch.Tensor:
    """``t`` flattened to 2-D, column-major when it is a bf16/fp16 CPU tensor (the fast layout against a
    row-major right operand; see the module docstring)."""
    t = _flat(t)
    if t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16):
        return t.T.contiguous().T
    return t


def use_merged(tokens: int, out_features: int, in_features: int, rank: int) -> bool:
    """True when forming ``W₀ + s·B P`` beats the split evaluation in FLOPs (see module docstring)."""
    return 4 * out_features * in_features * rank < tokens * (2 * in_features + 4 * out_features) * rank


def _effective(weight, B, P, index, scale, inplace=False):
    """``W₀ + scale·B P`` (into ``weight`` itself when ``inplace``: a transient dequantized W₀)."""
    if index is not None:
        return weight.index_add_(1, index, B, alpha=scale) if inplace else weight.index_add(1, index, B, alpha=scale)
    if inplace:
        return weight.addmm_(gemm_lhs(B), P, alpha=scale)
    return torch.addmm(weight, gemm_lhs(B), P, alpha=scale)


def _dense(weight, dtype):
    """(W₀ as a matrix, whether it is a transient of this call): a quantized W₀ is dequantized to ``dtype``."""
    if isinstance(weight, torch.Tensor):
        return weight, False
    from .quantized import dequantize
    return dequantize(weight, dtype), True


class GradientCapture:
    """Accumulates the full weight gradient ``Σ gᵀx`` (fp32, or float64 for float64 inputs; out×in) over
    the micro-batches of a step."""

    def __init__(self):
        self.grad = None

    def add(self, g: torch.Tensor, x: torch.Tensor):
        acc = torch.promote_types(g.dtype, torch.float32)
        update = _flat(g).to(acc).T @ _flat(x).to(acc)
        self.grad = update if self.grad is None else self.grad.add_(update)


class SubspaceLinearFunction(torch.autograd.Function):
    """``y = x (W₀ + scale·B P)ᵀ + bias`` given ``z = x Pᵀ``; saves ``z`` (and ``x`` only when capturing), and W₀
    as it is held (a tensor, or a quantized W₀'s codes and scales)."""

    @staticmethod
    def forward(ctx, x, z, weight, B, P, index, bias, scale, merged, capture):
        W, transient = _dense(weight, B.dtype)
        if merged:
            y = torch.nn.functional.linear(x, _effective(W, B, P, index, scale, inplace=transient), bias)
        else:
            y = torch.nn.functional.linear(x, W, bias).add_(torch.matmul(z, B.T), alpha=scale)
        del W
        ctx.scale, ctx.merged, ctx.capture, ctx.index = scale, merged, capture, index
        ctx.has_bias = bias is not None
        ctx.quantized = None if isinstance(weight, torch.Tensor) else weight  # its layout; tensors saved below
        stored = (weight,) if ctx.quantized is None else weight.tensors()
        ctx.n_weight = len(stored)
        ctx.save_for_backward(z, B, P, *stored, *((x,) if capture is not None else ()))
        return y

    @staticmethod
    def backward(ctx, g):
        z, B, P, *rest = ctx.saved_tensors  # unpacked once: checkpoint's recompute allows no second read
        stored, kept = rest[:ctx.n_weight], rest[ctx.n_weight:]
        weight = stored[0] if ctx.quantized is None else ctx.quantized.with_tensors(stored)
        s, index = ctx.scale, ctx.index
        need_x, _, _, need_B = ctx.needs_input_grad[:4]
        grad_x = grad_B = grad_bias = None
        if need_x:
            g_lhs = gemm_lhs(g)
            weight, transient = _dense(weight, B.dtype)
            if ctx.merged:
                grad_x = g_lhs @ _effective(weight, B, P, index, s, inplace=transient)
            else:
                grad_x = g_lhs @ weight
                gB = g_lhs @ B
                if index is not None:
                    grad_x.index_add_(-1, index, gB, alpha=s)
                else:
                    grad_x.add_(gemm_lhs(gB) @ P, alpha=s)
            grad_x = grad_x.view(*g.shape[:-1], weight.shape[1])
        if need_B:
            grad_B = _flat(g).T @ _flat(z)
            grad_B = grad_B if s == 1 else grad_B.mul_(s)
        if ctx.has_bias and ctx.needs_input_grad[6]:
            grad_bias = _flat(g).sum(0)
        if ctx.capture is not None:
            ctx.capture.add(g, kept[0])
        return grad_x, None, None, grad_B, None, None, grad_bias, None, None, None

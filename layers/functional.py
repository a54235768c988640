"""Autograd functions of the subspace layer.

The layer computes ``y = x W₀ᵀ + s·z Bᵀ + b`` with ``z = x Pᵀ`` in two functions:

* :class:`Project` — ``z = x Pᵀ`` (or ``x[..., idx]`` for a coordinate projection). It saves no
  activation: its backward ``∂x = ∂z P`` needs only the buffer P (held on ``ctx``, so a ``z`` shared
  by several layers can be back-propagated through more than once).
* :class:`SubspaceLinearFunction` — ``y = x W₀ᵀ + s·z Bᵀ + b``. It saves the r-wide ``z``, never the
  in-wide ``x``. Backward: ``∂x = g W₀``, ``∂z = s·g B``, ``∂B = s·gᵀz``, ``∂b = Σ g``; no gradient of
  W₀ or P is ever formed.

Autograd adds the two contributions to ``∂x``, giving ``g W₀ + s·(g B) P``. Layers that read the same
``x`` (q/k/v) may share one ``z``: autograd then sums their ``∂z`` before the single ``∂z P``.

When a :class:`GradientCapture` is passed, the function also keeps ``x`` for this step and
accumulates the full weight gradient ``gᵀx`` into it (used by the SVD sampler once per cycle).
"""
from __future__ import annotations

import torch


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class GradientCapture:
    """Accumulates the full weight gradient ``Σ gᵀx`` (fp32, out×in) over the micro-batches of a step."""

    def __init__(self):
        self.grad = None

    def add(self, g: torch.Tensor, x: torch.Tensor):
        update = _flat(g).float().T @ _flat(x).float()
        self.grad = update if self.grad is None else self.grad.add_(update)


class Project(torch.autograd.Function):
    """``z = x Pᵀ`` (``index`` given: ``z = x[..., index]``); backward ``∂x = ∂z P``."""

    @staticmethod
    def forward(ctx, x, P, index):
        ctx.P = P  # a buffer, not an activation; kept off the saved-tensor list on purpose
        ctx.index = index
        if index is not None:
            return x.index_select(-1, index)
        return torch.matmul(x, P.T)

    @staticmethod
    def backward(ctx, grad_z):
        P = ctx.P
        if not ctx.needs_input_grad[0]:
            return None, None, None
        if ctx.index is not None:
            grad_x = grad_z.new_zeros(*grad_z.shape[:-1], P.shape[1])
            grad_x.index_copy_(-1, ctx.index, grad_z)
        else:
            grad_x = torch.matmul(grad_z, P)
        return grad_x, None, None


class SubspaceLinearFunction(torch.autograd.Function):
    """``y = x W₀ᵀ + scale·z Bᵀ + bias``, saving ``z`` (and ``x`` only when capturing)."""

    @staticmethod
    def forward(ctx, x, z, weight, B, bias, scale, capture):
        y = torch.nn.functional.linear(x, weight, bias)
        y = y.add_(torch.matmul(z, B.T), alpha=scale) if scale != 0 else y
        ctx.scale = scale
        ctx.capture = capture
        ctx.has_bias = bias is not None
        if capture is not None:
            ctx.save_for_backward(z, weight, B, x)
        else:
            ctx.save_for_backward(z, weight, B)
        return y

    @staticmethod
    def backward(ctx, g):
        z, weight, B = ctx.saved_tensors[:3]
        s = ctx.scale
        need_x, need_z, _, need_B, need_bias = ctx.needs_input_grad[:5]
        grad_x = torch.matmul(g, weight) if need_x else None
        grad_z = torch.matmul(g, B).mul_(s) if need_z else None
        grad_B = (_flat(g).T @ _flat(z)).mul_(s) if need_B else None
        grad_bias = _flat(g).sum(0) if (need_bias and ctx.has_bias) else None
        if ctx.capture is not None:
            ctx.capture.add(g, ctx.saved_tensors[3])
        return grad_x, grad_z, None, grad_B, grad_bias, None, None

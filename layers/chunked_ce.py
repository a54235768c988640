"""Linear + cross-entropy over token chunks: the vocab-wide logits are never held for the whole batch.

A language-model head computes ``loss = CE(h Wᵀ + b, y)``. Autograd would keep the fp32
log-softmax of all ``N × V`` logits for backward (32k-vocab LLaMA: 128 KB per token, more than a whole
60M-parameter decoder layer). :func:`chunked_linear_cross_entropy` walks the N tokens ``chunk`` at a
time, so only a ``chunk × V`` block of logits exists at any moment:

* ``mode="recompute"`` saves ``h``, the int64 targets and one fp32 log-sum-exp per token; backward
  recomputes each chunk's logits (one extra ``chunk × V × hidden`` matmul per chunk).
* ``mode="fused"`` computes the gradients of ``h``, ``W`` and ``b`` during the forward pass (for a
  unit upstream gradient) and saves only those; backward scales them. No extra matmul, but a weight-
  sized gradient buffer lives from forward to backward (it is the head's gradient anyway).

The loss matches ``torch.nn.functional.cross_entropy`` (``ignore_index``, ``reduction`` "mean" over the
non-ignored targets, "sum", or a given divisor as Hugging Face's ``num_items_in_batch``). Logits are
formed in the input dtype and reduced in fp32, as Hugging Face's loss upcasts them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .functional import gemm_lhs

__all__ = ["chunked_linear_cross_entropy", "ChunkedLinearCrossEntropy", "MODES"]

MODES = ("recompute", "fused")


def _logit_grad_(logits, lse, targets, ignore_index):
    """In place on fp32 ``logits``: d(sum of token losses)/d(logits) = softmax − one-hot, 0 on ignored rows."""
    probs = logits.sub_(lse.unsqueeze(1)).exp_()
    valid = targets != ignore_index
    rows = torch.arange(targets.shape[0], device=targets.device)
    probs[rows[valid], targets[valid]] -= 1.0
    probs[~valid] = 0.0
    return probs


def _chunk_grad(h, weight, bias, targets, lse, ignore_index):
    """:func:`_logit_grad_` of one chunk's recomputed logits."""
    return _logit_grad_(F.linear(h, weight, bias).float(), lse, targets, ignore_index)


def _accumulate(probs, h, weight, grad_h, grad_w, grad_b):
    """Add one chunk's contribution to the gradients of h (its rows, written; ``g`` column-major for a
    bf16/fp16 CPU GEMM, see :func:`gemm_lhs`), W (fp32 sum) and b."""
    g = probs.to(h.dtype)
    if grad_h is not None:
        torch.matmul(gemm_lhs(g), weight, out=grad_h)
    if grad_w is not None:
        if g.dtype == torch.float32:
            grad_w.addmm_(g.T, h)
        else:
            grad_w += (g.T @ h).float()
    if grad_b is not None:
        grad_b += probs.sum(0)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, ignore_index, reduction, divisor, mode):
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        want_h, want_w = hidden.requires_grad, weight.requires_grad
        want_b = bias is not None and bias.requires_grad
        fused = mode == "fused"
        grad_h = torch.empty_like(hidden) if fused and want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if fused and want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if fused and want_b else None
        for start in range(0, n, chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            logits = F.linear(h, weight, bias).float()
            c_lse = torch.logsumexp(logits, dim=1)
            lse[start:start + chunk] = c_lse
            valid = t != ignore_index
            picked = logits.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)
            total += torch.where(valid, c_lse - picked, 0.0).sum()
            if fused and (want_h or want_w or want_b):
                probs = _logit_grad_(logits, c_lse, t, ignore_index)
                _accumulate(probs, h, weight, grad_h[start:start + chunk] if grad_h is not None else None,
                            grad_w, grad_b)
            del logits
        if reduction == "mean":
            div = float(divisor) if divisor is not None else float((targets != ignore_index).sum().clamp(min=1))
        else:
            div = float(divisor) if divisor is not None else 1.0
        ctx.div, ctx.chunk, ctx.ignore_index, ctx.fused = div, chunk, ignore_index, fused
        if fused:
            ctx.save_for_backward(*(t for t in (grad_h, grad_w.to(weight.dtype) if grad_w is not None else None,
                                                grad_b.to(bias.dtype) if grad_b is not None else None)))
        else:
            ctx.save_for_backward(hidden, weight, bias, targets, lse)
        return total / div

    @staticmethod
    def backward(ctx, grad_out):
        scale = grad_out / ctx.div
        if ctx.fused:
            # saved_tensors keeps the None of a gradient not wanted in its place
            gh, gw, gb = (t * scale if t is not None else None for t in ctx.saved_tensors)
            return gh, gw, gb, None, None, None, None, None, None
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        # Several chunks accumulate the weight gradient in fp32; a single chunk writes it in the weight's dtype.
        single = hidden.shape[0] <= ctx.chunk
        grad_w = None if (not need_w or single) else torch.zeros(weight.shape, dtype=torch.float32,
                                                                   device=weight.device)
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if (need_b and bias is not None) \
            else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            h, t = hidden[start:start + ctx.chunk], targets[start:start + ctx.chunk]
            probs = _chunk_grad(h, weight, bias, t, lse[start:start + ctx.chunk], ctx.ignore_index)
            probs.mul_(scale)
            _accumulate(probs, h, weight, grad_h[start:start + ctx.chunk] if grad_h is not None else None,
                        grad_w, grad_b)
            if need_w and single:
                grad_w = probs.to(h.dtype).T @ h
        return (grad_h, grad_w.to(weight.dtype) if grad_w is not None else None,
                grad_b.to(bias.dtype) if grad_b is not None else None, None, None, None, None, None, None)


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 bias: torch.Tensor | None = None, *, chunk_size: int = 1024,
                                 ignore_index: int = -100, reduction: str = "mean", divisor=None,
                                 mode: str = "recompute") -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias), targets)`` without all logits in memory at once.

    Args:
        hidden: ``(..., hidden)`` inputs of the head (flattened to tokens).
        weight: ``(vocab, hidden)`` head weight; bias: optional ``(vocab,)``.
        targets: int64 class per token (shape ``hidden.shape[:-1]``); ``ignore_index`` rows add nothing.
        chunk_size: tokens per chunk (memory per chunk: ``chunk_size × vocab`` fp32, twice).
        reduction: ``"mean"`` (over non-ignored targets) or ``"sum"``; ``divisor`` overrides the divisor.
        mode: ``"recompute"`` (save h, lse, targets; recompute logits in backward) or ``"fused"``
            (gradients formed in forward; no extra matmul).
    """
    if mode not in MODES:
        raise ValueError(f"chunked_linear_cross_entropy: mode must be one of {MODES}, got {mode!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"chunked_linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunked_linear_cross_entropy: chunk_size must be a positive int, got {chunk_size!r}")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    if t.shape[0] != h.shape[0]:
        raise ValueError(f"chunked_linear_cross_entropy: {h.shape[0]} tokens of hidden but {t.shape[0]} targets")
    if weight.shape[1] != h.shape[1]:
        raise ValueError(f"chunked_linear_cross_entropy: weight {tuple(weight.shape)} does not take hidden size "
                         f"{h.shape[1]}")
    if divisor is not None and torch.is_tensor(divisor):
        divisor = divisor.item()
    return ChunkedLinearCrossEntropy.apply(h, weight, bias, t, chunk_size, ignore_index, reduction, divisor, mode)

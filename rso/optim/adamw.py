"""AdamW whose projected groups run Adam on the low-rank gradient (GaLore / GoLore with ρ = Adam)."""
from __future__ import annotations

import math

import torch

from .base import SubspaceOptimizer

__all__ = ["SubspaceAdamW", "GaLoreAdamW", "GoLoreAdamW"]


class SubspaceAdamW(SubspaceOptimizer):
    """AdamW with optional gradient projection per param group.

    Groups without ``rank`` behave as ``torch.optim.AdamW`` (same formulas, ``amsgrad=False``).
    A group with ``rank`` keeps Adam's moments in the low-rank space (``r × n`` or ``m × r``) and
    steps ``X ← X(1 − lr·wd) − lr · scale · Pᵀ m̂/(√v̂ + eps)`` (left side; the right side is the
    transposed analogue). Weight decay is decoupled and acts on the full weight.

    Group keys (all optional): ``rank``, ``update_proj_gap`` (τ, default 200), ``scale`` (1.0),
    ``projection`` (``svd`` | ``stiefel`` | ``gaussian`` | ``coordinate`` | ``hybrid`` or a
    :class:`~rso.projections.ProjectionSampler`), ``random_fraction`` and ``total_steps`` (hybrid),
    ``proj_side`` (``auto`` | ``left`` | ``right`` | ``reverse``), galore-torch's ``proj_type``
    (``std`` | ``reverse_std`` | ``left`` | ``right``), ``state_on_switch`` (``keep`` | ``reset`` |
    ``project``), ``seed``. The constructor's keyword arguments of the same names set the defaults.

    On ``state_on_switch="project"`` the first moment moves to the new coordinates exactly
    (``m ← Q m`` with ``Q = P_new P_oldᵀ``) and the second as the variance of independent
    coordinates would (``v ← (Q∘Q) v``). ``reset`` zeroes both and restarts bias correction.
    """

    default_projection = "svd"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 projection=None, proj_side="auto", **projection_defaults):
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults, projection=projection, proj_side=proj_side,
                         **projection_defaults)

    def _validate_inner_options(self, group):
        lr, betas, eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if isinstance(lr, torch.Tensor):
            lr = lr.item()
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {group['lr']!r}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        if not wd >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {wd!r}")

    def _apply_weight_decay(self, group, p):
        if group["weight_decay"] != 0:
            p.mul_(1 - group["lr"] * group["weight_decay"])

    def _inner_step(self, group, state, grad):
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
            state["moment_step"] = 0
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        state["moment_step"] += 1
        t = state["moment_step"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** t
        bias_correction2_sqrt = math.sqrt(1 - beta2 ** t)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
        return (exp_avg / bias_correction1) / denom

    def _reset_state(self, state):
        for key in ("exp_avg", "exp_avg_sq", "moment_step"):
            state.pop(key, None)

    def _transfer_state(self, state, q, side):
        if "exp_avg" not in state:
            return
        q2 = q * q
        if side == "left":
            state["exp_avg"] = q @ state["exp_avg"]
            state["exp_avg_sq"] = q2 @ state["exp_avg_sq"]
        else:
            state["exp_avg"] = state["exp_avg"] @ q.T
            state["exp_avg_sq"] = state["exp_avg_sq"] @ q2.T


class GaLoreAdamW(SubspaceAdamW):
    """:class:`SubspaceAdamW` whose projected groups default to ``projection="svd"`` (GaLore)."""

    default_projection = "svd"


class GoLoreAdamW(SubspaceAdamW):
    """:class:`SubspaceAdamW` whose projected groups default to ``projection="stiefel"`` (GoLore)."""

    default_projection = "stiefel"

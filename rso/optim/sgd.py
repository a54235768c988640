"""SGD / momentum SGD whose projected groups run on the low-rank gradient (ρ = MSGD)."""
from __future__ import annotations

import torch

from ..state_policy import FIRST, register_moments
from .base import SubspaceOptimizer

__all__ = ["SubspaceSGD", "GaLoreSGD", "GoLoreSGD"]


class SubspaceSGD(SubspaceOptimizer):
    """SGD (momentum SGD when ``momentum > 0``) with optional gradient projection per param group.

    Groups without ``rank`` behave as ``torch.optim.SGD`` (momentum, dampening, nesterov and L2
    ``weight_decay`` with the same formulas). In a group with ``rank`` the weight decay term is
    added to the gradient before projection, the momentum buffer lives in the low-rank space, and
    the step is ``X ← X − lr · scale · Pᵀ M`` (left side; the right side is the transposed analogue).

    ``momentum=β, dampening=β`` gives the exponential-average form ``M ← β M + (1 − β) R`` that the
    GoLore analysis uses. ``state_on_switch="project"`` moves the momentum to the new subspace,
    ``M ← P_new P_oldᵀ M`` (GoLore's momentum projection); ``reset`` drops it; ``keep`` reuses it.
    The projection keys are those of :class:`~rso.optim.SubspaceAdamW`. ``compat`` takes only
    ``"torch"``: galore-torch 1.0 ships no SGD (only AdamW, AdamW8bit and Adafactor) to match.
    """

    default_projection = "svd"

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, projection=None, proj_side="auto", **projection_defaults):
        defaults = {"lr": lr, "momentum": momentum, "dampening": dampening,
                    "weight_decay": weight_decay, "nesterov": nesterov}
        super().__init__(params, defaults, projection=projection, proj_side=proj_side,
                         **projection_defaults)

    def _validate_inner_options(self, group):
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            lr = lr.item()
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {group['lr']!r}")
        if not 0.0 <= group["momentum"] < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {group['momentum']!r}")
        if not group["weight_decay"] >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']!r}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("nesterov=True needs momentum > 0 and dampening = 0")

    def _preprocess_grad(self, group, p, grad):
        if group["weight_decay"] != 0:
            grad = grad.add(p, alpha=group["weight_decay"])
        return grad

    def _inner_step(self, group, state, grad):
        momentum = group["momentum"]
        if momentum == 0:
            return grad, group["lr"]
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = grad.clone()
        else:
            buf.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
        return (grad.add(buf, alpha=momentum) if group["nesterov"] else buf), group["lr"]

    def _reset_state(self, state):
        state.pop("momentum_buffer", None)


register_moments(SubspaceSGD, {"momentum_buffer": FIRST})


class GaLoreSGD(SubspaceSGD):
    """:class:`SubspaceSGD` whose projected groups default to ``projection="svd"`` (GaLore).

    galore-torch has no SGD counterpart; this follows ``torch.optim.SGD`` (see :class:`SubspaceSGD`).
    """

    default_projection = "svd"


class GoLoreSGD(SubspaceSGD):
    """:class:`SubspaceSGD` whose projected groups default to ``projection="stiefel"`` (GoLore)."""

    default_projection = "stiefel"

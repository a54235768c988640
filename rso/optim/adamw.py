"""AdamW whose projected groups run Adam on the low-rank gradient (GaLore / GoLore with ρ = Adam)."""
from __future__ import annotations

import math

import torch

from ..state_policy import FIRST, SECOND, register_moments
from .base import COMPAT_MODES, SubspaceOptimizer

__all__ = ["SubspaceAdamW", "GaLoreAdamW", "GoLoreAdamW"]


class SubspaceAdamW(SubspaceOptimizer):
    """AdamW with optional gradient projection per param group.

    With ``R`` the gradient (or its projection ``P G`` / ``G Pᵀ``), ``m ← β₁m + (1−β₁)R``,
    ``v ← β₂v + (1−β₂)R²``, ``b₁ = 1−β₁ᵗ``, ``b₂ = 1−β₂ᵗ`` (both 1 when ``correct_bias=False``) and
    ``back`` the map to full size (``Pᵀ·`` or ``·P``; identity when not projected, where scale = 1):

    * ``compat="torch"`` (default here): ``torch.optim.AdamW``,
      ``X ← X(1 − lr·wd) − lr·scale·back((m/b₁) / (√v/√b₂ + eps))``, eps 1e-8 by default.
    * ``compat="galore-torch"``: galore-torch 1.0's (transformers-style) AdamW,
      ``X ← X − lr·(√b₂/b₁)·(scale·back(m / (√v + eps)))``, then ``X ← X − lr·wd·X``; eps 1e-6 by
      default; the SVD projection as galore-torch takes it (:func:`~rso.optim.base.galore_svd_factor`).

    Group keys (all optional): ``rank``, ``update_proj_gap`` (τ, default 200), ``scale`` (1.0),
    ``projection`` (``svd`` | ``stiefel`` | ``gaussian`` | ``coordinate`` | ``hybrid`` or a
    :class:`~rso.projections.ProjectionSampler`), ``random_fraction`` and ``total_steps`` (hybrid),
    ``proj_side`` (``auto`` | ``left`` | ``right`` | ``reverse``), galore-torch's ``proj_type``
    (``std`` | ``reverse_std`` | ``left`` | ``right``), ``state_on_switch`` (``keep`` | ``reset`` |
    ``project``), ``seed``, ``compat``, ``correct_bias``. The constructor's keyword arguments of the
    same names set the defaults; ``no_deprecation_warning`` is accepted (and ignored) so that
    galore-torch's calls work unchanged.

    On ``state_on_switch="project"`` the first moment moves to the new coordinates exactly
    (``m ← Q m`` with ``Q = P_new P_oldᵀ``) and the second as the variance of independent
    coordinates would (``v ← (Q∘Q) v``). ``reset`` zeroes both and restarts bias correction.
    """

    default_projection = "svd"
    compat_modes = COMPAT_MODES
    legacy_group_defaults = {"compat": "torch", "correct_bias": True}
    #: eps when neither the group nor the constructor gives one.
    default_eps = {"torch": 1e-8, "galore-torch": 1e-6}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=None, weight_decay=0.0,
                 correct_bias=True, no_deprecation_warning=False, *, projection=None, proj_side="auto",
                 compat=None, **projection_defaults):
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "correct_bias": correct_bias}
        super().__init__(params, defaults, projection=projection, proj_side=proj_side, compat=compat,
                         **projection_defaults)

    def _resolve_defaults(self, group):
        if group["eps"] is None:
            group["eps"] = self.default_eps[group["compat"]]

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
        if not isinstance(group["correct_bias"], bool):
            raise ValueError(f"correct_bias must be a bool, got {group['correct_bias']!r}")

    def _apply_weight_decay(self, group, p):
        wd = group["weight_decay"]
        if wd == 0:
            return
        if group["compat"] == "galore-torch":
            p.add_(p, alpha=-group["lr"] * wd)
        else:
            p.mul_(1 - group["lr"] * wd)

    def _inner_step(self, group, state, grad):
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
            state["moment_step"] = 0
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        state["moment_step"] += 1
        t = state["moment_step"]
        bias_correction1, bias_correction2 = (1.0 - beta1 ** t, 1.0 - beta2 ** t) if group["correct_bias"] \
            else (1.0, 1.0)
        galore = group["compat"] == "galore-torch"
        if galore:
            exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        else:
            exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        if galore:   # eps on √v, the bias corrections in the step size
            return exp_avg / exp_avg_sq.sqrt().add_(group["eps"]), \
                group["lr"] * math.sqrt(bias_correction2) / bias_correction1
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(group["eps"])
        return (exp_avg / bias_correction1) / denom, group["lr"]

    def _reset_state(self, state):
        for key in ("exp_avg", "exp_avg_sq", "moment_step"):
            state.pop(key, None)


register_moments(SubspaceAdamW, {"exp_avg": FIRST, "exp_avg_sq": SECOND})


class GaLoreAdamW(SubspaceAdamW):
    """:class:`SubspaceAdamW` with ``projection="svd"`` and ``compat="galore-torch"`` by default.

    A drop-in for ``galore_torch.GaLoreAdamW``: the same groups and arguments give the same numbers
    (tested to float32 round-off against galore-torch 1.0). ``compat="torch"`` gives
    ``torch.optim.AdamW``'s formula instead, the one :class:`SubspaceAdamW` and :class:`GoLoreAdamW` use.
    """

    default_projection = "svd"
    default_compat = "galore-torch"


class GoLoreAdamW(SubspaceAdamW):
    """:class:`SubspaceAdamW` whose projected groups default to ``projection="stiefel"`` (GoLore)."""

    default_projection = "stiefel"

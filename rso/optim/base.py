"""Gradient-projection bookkeeping shared by :class:`SubspaceAdamW` and :class:`SubspaceSGD`.

For a 2-D parameter ``X`` (m × n) with gradient ``G`` a projected group keeps a matrix ``P`` of shape
``(r, d)`` and runs the inner optimizer ρ on the low-rank gradient

* left side  (d = m):  ``R = P G``   (r × n),  update ``Δ = Pᵀ ρ(R)``
* right side (d = n):  ``R = G Pᵀ``  (m × r),  update ``Δ = ρ(R) P``

and steps ``X ← X − lr · scale · Δ``. ``P`` is redrawn every ``update_proj_gap`` steps (a *cycle*)
from the group's sampler (:mod:`rso.projections`); a hybrid sampler also starts a new cycle at the
step where it switches from SVD to random. Random samples come from a generator seeded by
``(seed, parameter index, cycle)``, so no generator object is kept: the optimizer state holds only
tensors and integers, ``state_dict()`` loads with ``torch.load(weights_only=True)``, and a run that
resumes from it continues bit for bit.

What happens to the inner optimizer's state when ``P`` changes is the group's ``state_on_switch``
(:mod:`rso.state_policy`): ``keep`` (the default: reuse the low-rank state in the new coordinates, as
galore-torch does), ``reset`` (start from zero) or ``project`` (carry it over through ``Q = P_new P_oldᵀ``;
each subclass registers which state tensors are first and second moments with
:func:`rso.state_policy.register_moments`).

A group's ``compat`` names whose numerics it follows. ``"torch"``: the ``torch.optim`` formula,
``X ← decay(X) − lr·scale·Δ``. ``"galore-torch"`` (AdamW only): galore-torch 1.0's order of
operations, ``X ← X − s_t·(scale·Δ)`` then ``X ← X − lr·wd·X``, with its projector: the SVD of ``G``
itself in float32, ``P = Vh[:r]`` (right) or ``P = U[:, :r]ᵀ`` (left). Under ``keep`` the signs of
these factors carry over into the reused moments, so the left side must not come from ``svd(Gᵀ)``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

from ..projections import (HybridSampler, ProjectionSampler, SAMPLERS, SVDSampler, generator_for,
                           make_sampler)
from ..state_policy import STATE_POLICIES, SWITCH_DEFAULT, map_moments, moments_of, policy_names

__all__ = ["SubspaceOptimizer", "PROJ_SIDES", "STATE_POLICIES", "GALORE_PROJ_TYPES", "COMPAT_MODES",
           "galore_svd_factor"]

PROJ_SIDES = ("auto", "left", "right", "reverse")
# galore-torch's ``proj_type`` names the side; "full" (two-sided) has no equivalent here.
GALORE_PROJ_TYPES = {"std": "auto", "reverse_std": "reverse", "left": "left", "right": "right"}
# Whose numerics a group follows (see the module docstring).
COMPAT_MODES = ("torch", "galore-torch")

# Keys a projected group may carry, with their defaults (``rank`` itself has none: no rank, no projection).
PROJECTION_DEFAULTS = {
    "update_proj_gap": 200,
    "scale": 1.0,
    "state_on_switch": SWITCH_DEFAULT,
    "seed": 0,
    "random_fraction": 0.2,
    "total_steps": None,
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def resolve_side(proj_side: str, shape) -> str:
    """``left`` or ``right`` for a gradient of ``shape`` (m, n).

    ``auto`` projects the smaller side (as GaLore's ``std``): m ≥ n → right, else left;
    ``reverse`` the larger one (GaLore's ``reverse_std``).
    """
    m, n = shape
    if proj_side == "auto":
        return "right" if m >= n else "left"
    if proj_side == "reverse":
        return "left" if m >= n else "right"
    return proj_side


def galore_svd_factor(grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """galore-torch's projection ``P`` (r × d): ``svd(G)`` in float32, ``Vh[:r]`` or ``U[:, :r]ᵀ``.

    Returned with the strides of galore-torch's views (LAPACK's column-major factors), so the
    projection matmuls make the same BLAS calls, but compact: galore-torch's view keeps the whole
    ``min(m, n) × d`` factor alive.
    """
    g = grad if grad.dtype == torch.float32 else grad.float()
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    p = vh[:rank].mT.contiguous().mT if side == "right" else u[:, :rank].mT.clone()
    return p.to(grad.dtype)


class SubspaceOptimizer(Optimizer):
    """Base class: param-group validation, projection sampling and the state-switch policy.

    Subclasses implement :meth:`_inner_step` (ρ on the low-rank or full gradient, returning the
    direction to subtract and its step size), :meth:`_apply_weight_decay` and :meth:`_reset_state` (the
    ``reset`` policy), and register their moments (:func:`rso.state_policy.register_moments`) for ``project``.
    """

    #: projection used by groups that have a ``rank`` but no ``projection`` key.
    default_projection = "svd"
    #: ``compat`` of groups that do not set it, and the values a subclass supports.
    default_compat = "torch"
    compat_modes: tuple[str, ...] = ("torch",)

    def __init__(self, params, defaults: dict[str, Any], *, projection=None, proj_side="auto",
                 compat=None, **projection_defaults):
        defaults = dict(defaults)
        defaults["compat"] = self.default_compat if compat is None else compat
        defaults["projection"] = self.default_projection if projection is None else projection
        for key, value in PROJECTION_DEFAULTS.items():
            defaults[key] = projection_defaults.pop(key, value)
        if projection_defaults:
            raise TypeError(f"unexpected keyword arguments: {sorted(projection_defaults)}")
        # proj_side is not a plain default: a galore-torch group's proj_type must win over it.
        self._default_proj_side = proj_side
        self._samplers: dict[tuple, ProjectionSampler] = {}
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        if "proj_side" not in group:
            if "proj_type" in group:
                proj_type = group["proj_type"]
                if proj_type not in GALORE_PROJ_TYPES:
                    raise ValueError(f"proj_type must be one of {sorted(GALORE_PROJ_TYPES)} "
                                     f"(galore-torch's sides), got {proj_type!r}")
                group["proj_side"] = GALORE_PROJ_TYPES[proj_type]
            else:
                group["proj_side"] = self._default_proj_side
        super().add_param_group(group)
        group = self.param_groups[-1]
        if group["compat"] not in self.compat_modes:
            raise ValueError(f"compat must be one of {list(self.compat_modes)} for {type(self).__name__}, "
                             f"got {group['compat']!r}")
        self._resolve_defaults(group)
        self._validate_group(group, len(self.param_groups) - 1)

    @staticmethod
    def is_projected(group: dict[str, Any]) -> bool:
        return group.get("rank") is not None

    def _validate_group(self, group: dict[str, Any], index: int) -> None:
        self._validate_inner_options(group)
        if not self.is_projected(group):
            return
        rank = group["rank"]
        if not _is_int(rank) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        gap = group["update_proj_gap"]
        if not _is_int(gap) or gap < 1:
            raise ValueError(f"update_proj_gap must be a positive int, got {gap!r}")
        if not _is_real(group["scale"]):
            raise ValueError(f"scale must be a real number, got {group['scale']!r}")
        if group["proj_side"] not in PROJ_SIDES:
            raise ValueError(f"proj_side must be one of {list(PROJ_SIDES)}, got {group['proj_side']!r}")
        if group["state_on_switch"] not in STATE_POLICIES:
            raise ValueError(f"state_on_switch must be one of {list(policy_names(SWITCH_DEFAULT))}, "
                             f"got {group['state_on_switch']!r}")
        if group["state_on_switch"] == "project" and moments_of(type(self)) is None:
            raise ValueError(f"state_on_switch='project' needs to know {type(self).__name__}'s moments: register them "
                             "with rso.state_policy.register_moments, or use 'keep' or 'reset'")
        if not _is_int(group["seed"]):
            raise ValueError(f"seed must be an int, got {group['seed']!r}")
        projection = group["projection"]
        named = isinstance(projection, str) and projection in SAMPLERS
        if not named and not isinstance(projection, ProjectionSampler):
            raise ValueError(f"projection must be one of {sorted(SAMPLERS)} or a ProjectionSampler, "
                             f"got {projection!r}")
        self._sampler(group)  # raises ValueError for bad hybrid options (total_steps, random_fraction)
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            if p.dim() != 2:
                name = names[i] if names is not None else f"param_groups[{index}]['params'][{i}]"
                raise ValueError(
                    f"parameter {name} has shape {tuple(p.shape)}, but a projected group (one with "
                    f"'rank') takes only 2-D parameters of shape (m, n); put it in a group without "
                    f"'rank' to train it unprojected")

    def _resolve_defaults(self, group: dict[str, Any]) -> None:
        """Subclasses fill defaults that depend on ``compat`` (AdamW's eps)."""

    def _validate_inner_options(self, group: dict[str, Any]) -> None:
        """Subclasses check their own hyperparameters (lr, betas, ...)."""

    def _sampler(self, group: dict[str, Any]) -> ProjectionSampler:
        projection = group["projection"]
        if isinstance(projection, ProjectionSampler):
            return projection
        key = (projection, group.get("total_steps"), group.get("random_fraction"))
        sampler = self._samplers.get(key)
        if sampler is None:
            sampler = make_sampler(projection, total_steps=group.get("total_steps"),
                                   random_fraction=group.get("random_fraction", 0.2))
            self._samplers[key] = sampler
        return sampler

    #: keys that groups saved before they existed get on load (those runs used these values).
    legacy_group_defaults = {"compat": "torch"}

    def __getstate__(self):  # pickles and deep copies keep the proj_side later add_param_group calls use
        return {**super().__getstate__(), "_default_proj_side": self._default_proj_side}

    def __setstate__(self, state):
        super().__setstate__(state)
        if not hasattr(self, "_samplers"):  # a cache of samplers: rebuilt on use
            self._samplers = {}
        if not hasattr(self, "_default_proj_side"):  # pickled before it was saved
            self._default_proj_side = "auto"
        for group in self.param_groups:
            for key, value in self.legacy_group_defaults.items():
                group.setdefault(key, value)

    # ------------------------------------------------------------------ projection
    def _projection(self, group, state, grad: torch.Tensor, index: int):
        """The current ``(P, side)`` for a parameter, drawing a new P when a cycle starts."""
        side = resolve_side(group["proj_side"], grad.shape)
        m, n = grad.shape
        rank = min(group["rank"], m, n)
        dim = m if side == "left" else n
        step = state["step"]
        sampler = self._sampler(group)
        new_cycle = (
            "proj" not in state
            or step % group["update_proj_gap"] == 0
            or (step > 0 and sampler.uses_gradient(step) != sampler.uses_gradient(step - 1))
        )
        if new_cycle:
            cycle = state["cycle"] + 1 if "cycle" in state else 0
            proj = None
            if (group["compat"] == "galore-torch" and isinstance(sampler, (SVDSampler, HybridSampler))
                    and sampler.uses_gradient(step)):
                try:
                    proj = galore_svd_factor(grad, rank, side)
                except (RuntimeError, torch.linalg.LinAlgError):
                    proj = None
                if proj is not None and not torch.isfinite(proj).all():
                    proj = None                  # the sampler below warns and falls back (Stiefel)
            if proj is None:
                gradient = None
                if sampler.uses_gradient(step):
                    gradient = grad if side == "right" else grad.T
                generator = generator_for(group["seed"], index, cycle)
                proj = sampler.sample(rank, dim, generator, gradient=gradient, step=step,
                                      dtype=grad.dtype, device=grad.device)
            old = state.get("proj")
            state["proj"] = proj
            state["cycle"] = cycle
            if old is not None:
                policy = group["state_on_switch"]
                if policy == "reset":
                    self._reset_state(state)
                elif policy == "project":
                    self._transfer_state(state, proj @ old.T, side)
        return state["proj"], side

    @staticmethod
    def project(grad: torch.Tensor, proj: torch.Tensor, side: str) -> torch.Tensor:
        """Low-rank gradient: ``P G`` (left) or ``G Pᵀ`` (right)."""
        return proj @ grad if side == "left" else grad @ proj.T

    @staticmethod
    def project_back(low: torch.Tensor, proj: torch.Tensor, side: str) -> torch.Tensor:
        """Full-size direction: ``Pᵀ D`` (left) or ``D P`` (right)."""
        return proj.T @ low if side == "left" else low @ proj

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; ``closure`` re-evaluates the loss, as in ``torch.optim``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._update_params()
        return loss

    def _update_params(self) -> None:
        """The update of every parameter with a gradient (called by :meth:`step`, under no_grad)."""
        index = -1
        for group in self.param_groups:
            projected = self.is_projected(group)
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                grad = self._preprocess_grad(group, p, grad)
                if projected:
                    proj, side = self._projection(group, state, grad, index)
                    direction, step_size = self._inner_step(group, state, self.project(grad, proj, side))
                    direction = self.project_back(direction, proj, side)
                    scale = group["scale"]
                else:
                    direction, step_size = self._inner_step(group, state, grad)
                    scale = 1
                self._update(group, p, direction, step_size, scale)
                state["step"] += 1

    def _update(self, group, p, direction, step_size, scale) -> None:
        """``torch``: ``X ← decay(X) − step_size·scale·D``. ``galore-torch``: ``X ← X − step_size·(scale·D)``,
        then ``decay(X)`` (galore-torch scales the projected-back tensor, and decays after the step)."""
        if group["compat"] == "galore-torch":
            if scale != 1:
                direction = direction * scale
            p.add_(direction, alpha=-step_size)
            self._apply_weight_decay(group, p)
        else:
            self._apply_weight_decay(group, p)
            p.add_(direction, alpha=-step_size * scale)

    # ------------------------------------------------------------------ subclass hooks
    def _preprocess_grad(self, group, p, grad):
        return grad

    def _apply_weight_decay(self, group, p) -> None:
        pass

    def _inner_step(self, group, state, grad: torch.Tensor) -> tuple[torch.Tensor, float]:
        """ρ: ``(D, step_size)``; the step subtracts ``step_size·D`` (times ``scale`` when projected)."""
        raise NotImplementedError

    def _reset_state(self, state) -> None:
        raise NotImplementedError

    def _transfer_state(self, state, q: torch.Tensor, side: str) -> None:
        """The ``project`` policy with ``q = P_new P_oldᵀ``: the registered moments map by ``R = qᵀ``
        (:func:`rso.state_policy.map_moments`)."""
        map_moments(state, moments_of(type(self)), q.T, side)

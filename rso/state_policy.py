"""What becomes of an optimizer's state for a matrix trained in a subspace when the subspace's basis changes:
``rso.wrap(state_on_merge=...)`` at each merge, ``rso.optim``'s ``state_on_switch`` at each new projection.

``reset`` drops the state and ``keep`` reuses it as it is (both work with any optimizer). ``project`` expresses
each moment in the new basis, for the optimizers whose state layout is known (:data:`MOMENTS`, and
bitsandbytes' Adam family). A moment ``M`` holding coordinates over the old basis (the orthonormal rows of
``P_old``) stands for ``M·P_old``; in the new basis that is ``M·R``, ``R = P_old·P_newᵀ`` (exact when both
bases span one subspace, else the orthogonal projection onto the new one). By kind of moment:

* ``first`` (linear in the gradient: Adam's ``exp_avg``, momentum buffers): ``M ← M·R``;
* ``second`` (per-coordinate mean of g²: ``exp_avg_sq``, Adagrad's ``sum``): ``M ← M·(R∘R)``, the variance of
  independent zero-mean coordinates (non-negative); ``about(mean)``, for a second moment whose optimizer also
  tracks the mean μ (centered RMSprop): ``M ← (M − μ²)·(R∘R) + (μ·R)²``, so its variance ``M − μ²`` maps as
  above and stays non-negative;
* ``bound`` (Adamax's ``exp_inf``, u ≥ |g|): ``M ← M·|R|``, which keeps u ≥ |g·R| (|Σᵢ gᵢRᵢⱼ| ≤ Σᵢ |gᵢ||Rᵢⱼ|).

Scalar entries (step counts) stay. A moment of a left-side projection (``rso.optim``: ``r × n`` coordinates
standing for ``Pᵀ·M``) maps the same way transposed: ``M ← f(R)ᵀ·M``.
"""
from __future__ import annotations

import sys

import torch

__all__ = ["STATE_POLICIES", "MERGE_DEFAULT", "SWITCH_DEFAULT", "FIRST", "SECOND", "BOUND", "MOMENTS", "about",
           "policy_names", "register_moments", "moments_of", "map_moments", "check_state_policy",
           "check_projectable", "update_state"]

STATE_POLICIES = ("reset", "keep", "project")
MERGE_DEFAULT = "reset"  # rso.wrap's state_on_merge: Adam restarts its bias correction in each new subspace
SWITCH_DEFAULT = "keep"  # rso.optim's state_on_switch: galore-torch's behaviour

FIRST, SECOND, BOUND = "first", "second", "bound"
_MAPS = {FIRST: lambda R: R, SECOND: lambda R: R * R, BOUND: torch.abs}

#: optimizer class → {state key: kind of moment}. A subclass uses its nearest registered base class's entry;
#: its state may hold no other tensor than scalars and these moments ('project' refuses it otherwise).
MOMENTS: dict[type, dict] = {}

BNB_BLOCKSIZE = 256  # bitsandbytes' 8-bit optimizers quantize in blocks of 256 elements


def about(mean_key: str) -> tuple[str, str]:
    """The kind of a second moment whose optimizer tracks the gradient's mean under ``mean_key``."""
    return (SECOND, mean_key)


def policy_names(default: str) -> tuple[str, ...]:
    """The policy names, ``default`` first (the order messages list them in)."""
    return (default, *(p for p in STATE_POLICIES if p != default))


def register_moments(optimizer_class: type, moments: dict) -> None:
    """Teach 'project' an optimizer's state layout: ``{state key: FIRST | SECOND | BOUND | about(mean key)}``."""
    for key, kind in moments.items():
        base, mean = kind if isinstance(kind, tuple) else (kind, None)
        if base not in _MAPS or (mean is not None and (base != SECOND or moments.get(mean) != FIRST)):
            raise ValueError(f"register_moments: moment {key!r} of {optimizer_class.__name__} has kind {kind!r}; "
                             f"allowed: {FIRST!r}, {SECOND!r}, {BOUND!r} or about(<the key of a first moment>)")
    MOMENTS[optimizer_class] = dict(moments)


_ADAM = {"exp_avg": FIRST, "exp_avg_sq": SECOND, "max_exp_avg_sq": SECOND}
for _cls, _moments in (
        (torch.optim.Adam, _ADAM), (torch.optim.AdamW, _ADAM),
        (torch.optim.NAdam, {"exp_avg": FIRST, "exp_avg_sq": SECOND}),
        (torch.optim.RAdam, {"exp_avg": FIRST, "exp_avg_sq": SECOND}),
        (torch.optim.Adamax, {"exp_avg": FIRST, "exp_inf": BOUND}),
        (torch.optim.Adadelta, {"square_avg": SECOND, "acc_delta": SECOND}),
        (torch.optim.Adagrad, {"sum": SECOND}),
        (torch.optim.RMSprop, {"square_avg": about("grad_avg"), "grad_avg": FIRST, "momentum_buffer": FIRST}),
        (torch.optim.SGD, {"momentum_buffer": FIRST}),
        (getattr(torch.optim, "Muon", None), {"momentum_buffer": FIRST})):  # Muon: torch ≥ 2.9
    if _cls is not None:
        register_moments(_cls, _moments)
del _ADAM, _cls, _moments


def moments_of(optimizer_class: type) -> dict | None:
    """The registered moments of ``optimizer_class`` or of its nearest registered base class; None if none."""
    return next((MOMENTS[c] for c in optimizer_class.__mro__ if c in MOMENTS), None)


def _apply(M: torch.Tensor, A: torch.Tensor, side: str) -> torch.Tensor:
    return M @ A if side == "right" else A.T @ M


def map_moments(state: dict, moments: dict, R: torch.Tensor, side: str = "right") -> None:
    """Map, in place, each moment of ``state`` named in ``moments`` to the new basis (see the module docstring),
    computed in ``R``'s dtype and stored in the moment's own dtype; every moment is read before any is written."""
    new = {}
    for key, kind in moments.items():
        value = state.get(key)
        if not torch.is_tensor(value):
            continue
        base, mean = kind if isinstance(kind, tuple) else (kind, None)
        M = value.to(R.dtype)
        if mean is not None and torch.is_tensor(state.get(mean)):
            mu = state[mean].to(R.dtype)
            new[key] = _apply(M - mu * mu, R * R, side) + _apply(mu, R, side).square()
        else:
            new[key] = _apply(M, _MAPS[base](R), side)
    for key, value in new.items():
        state[key].copy_(value.to(state[key].dtype))


# ------------------------------------------------------------------ the outer loop's checks and maps
def _is_bitsandbytes(optimizer) -> bool:
    return type(optimizer).__module__.startswith("bitsandbytes")


def _package(cls: type) -> str:
    """The shortest module path that exposes ``cls`` (torch.optim for torch.optim.adam.Adam)."""
    parts = cls.__module__.split(".")
    paths = (".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return next((p for p in paths if getattr(sys.modules.get(p), cls.__name__, None) is cls), cls.__module__)


def _known() -> str:
    packages = {}
    for cls in MOMENTS:
        packages.setdefault(_package(cls), []).append(cls.__name__)
    return ", ".join(f"{package}'s {', '.join(names)}" for package, names in packages.items())


def _cannot_project(optimizer, why: str) -> str:
    return (f"rso: state_on_merge='project' cannot map the optimizer state of {type(optimizer).__name__}: {why}; "
            f"use state_on_merge='reset' or 'keep' with it (allowed policies: {', '.join(STATE_POLICIES)}; "
            f"'project' knows {_known()} and bitsandbytes' Adam/AdamW, 8- or 32-bit, and their subclasses; "
            "rso.state_policy.register_moments teaches it others)")


def check_state_policy(optimizer, state_policy: str) -> None:
    """ValueError unless ``state_policy`` is a policy name that works with ``optimizer``: 'reset' and 'keep' work
    with any; 'project' with a registered class (:func:`moments_of`) or bitsandbytes' Adam family."""
    if state_policy not in STATE_POLICIES:
        raise ValueError(f"rso: state_on_merge must be one of {STATE_POLICIES}, got {state_policy!r}")
    if state_policy != "project":
        return
    if _is_bitsandbytes(optimizer):
        if getattr(optimizer, "optimizer_name", None) != "adam":
            raise ValueError(_cannot_project(optimizer, f"its states ({getattr(optimizer, 'optimizer_name', '?')}) "
                                                        "are not Adam's first and second moments"))
    elif moments_of(type(optimizer)) is None:
        raise ValueError(_cannot_project(optimizer, "rso does not know its state layout"))


def check_projectable(optimizer, params) -> None:
    """ValueError, before any state changes, unless 'project' can map ``optimizer``'s state of every parameter in
    ``params``: a known optimizer whose non-scalar state tensors are its floating-point moments, of the
    parameter's shape (bitsandbytes: :func:`_check_bitsandbytes_state`)."""
    check_state_policy(optimizer, "project")
    moments = None if _is_bitsandbytes(optimizer) else moments_of(type(optimizer))
    for p in params:
        state = optimizer.state.get(p)  # .get: the state is a defaultdict, do not add entries
        if not state:
            continue
        if moments is None:
            _check_bitsandbytes_state(optimizer, state)
            continue
        for key, value in state.items():
            if not torch.is_tensor(value) or value.dim() == 0:
                continue
            if not value.is_floating_point():
                raise ValueError(_cannot_project(optimizer, f"its state {key!r} is {value.dtype}, not a "
                                                            "floating-point moment"))
            if key not in moments:
                raise ValueError(_cannot_project(optimizer, f"its state {key!r} is none of the moments it knows "
                                                            f"({', '.join(moments)})"))
            if value.shape != p.shape:
                raise ValueError(_cannot_project(optimizer, f"its state {key!r} has shape {tuple(value.shape)}, "
                                                            f"not the parameter's {tuple(p.shape)}"))


def update_state(optimizer, param, state_policy: str, old_P: torch.Tensor, new_P: torch.Tensor) -> None:
    """Apply ``state_policy`` to ``optimizer``'s state of ``param`` (coordinates over the rows of ``old_P``, now of
    ``new_P``): 'project' maps with ``R = P_old P_newᵀ`` in fp32 (float64 for a float64 parameter), after
    :func:`check_projectable`."""
    if state_policy == "reset":
        optimizer.state.pop(param, None)
    elif state_policy == "project" and param in optimizer.state:
        acc = torch.promote_types(param.dtype, torch.float32)
        R = old_P.to(acc) @ new_P.to(acc).T
        state = optimizer.state[param]
        if _is_bitsandbytes(optimizer):
            _project_bitsandbytes_state(optimizer, state, R)
        else:
            map_moments(state, moments_of(type(optimizer)), R)


# ------------------------------------------------------------------ bitsandbytes optimizer states
def _project_bitsandbytes_state(optimizer, state, R):
    """``state1`` ← state1·R, ``state2`` ← state2·(R∘R) for bitsandbytes' Adam family: fp32 states in place;
    8-bit blockwise states (uint8 codes, an fp32 absmax per 256 elements, a shared quantization map)
    dequantized, mapped in fp32 and quantized again with the same map and block size (the layout checked
    before the merge: :func:`_check_bitsandbytes_state`)."""
    import bitsandbytes.functional as F
    with torch.no_grad():
        for key, mat in (("state1", R), ("state2", R * R)):
            value = state[key]
            if value.dtype == torch.float32:
                value.copy_(value @ mat)
                continue
            absmax, code = state[f"absmax{key[-1]}"], state[f"qmap{key[-1]}"]
            moments = F.dequantize_blockwise(value, absmax=absmax, code=code, blocksize=BNB_BLOCKSIZE).float()
            codes, quant_state = F.quantize_blockwise((moments @ mat).contiguous(), code=code, blocksize=BNB_BLOCKSIZE)
            value.copy_(codes)
            absmax.copy_(quant_state.absmax)


def _check_bitsandbytes_state(optimizer, state) -> None:
    """ValueError unless ``state1`` and ``state2`` are each fp32, or uint8 codes with a quantization map and one
    scale per block."""
    if "state1" not in state or "state2" not in state:
        raise ValueError(_cannot_project(optimizer, f"its state has no state1/state2 (keys {sorted(state)})"))
    for key in ("state1", "state2"):
        value = state[key]
        if value.dtype == torch.float32:
            continue
        absmax, code = state.get(f"absmax{key[-1]}"), state.get(f"qmap{key[-1]}")
        if value.dtype != torch.uint8 or absmax is None or code is None:
            raise ValueError(_cannot_project(optimizer, f"its {key} is {value.dtype} without blockwise scales "
                                                        f"(keys {sorted(state)})"))
        if absmax.numel() != -(-value.numel() // BNB_BLOCKSIZE):
            raise ValueError(_cannot_project(optimizer, f"{absmax.numel()} scales for {value.numel()} elements "
                                                        f"are not blocks of {BNB_BLOCKSIZE}"))

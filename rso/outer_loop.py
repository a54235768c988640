"""The RSO outer loop: every ``tau`` optimizer steps, merge B into W₀ and move to a new subspace.

For each projection group at the end of a cycle:

    W₀ ← W₀ + s·B P   (fp32, cast back)      B ← 0 (in place: same Parameter)
    P  ← sampler(seed, cycle + 1[, gradient])  optimizer state of B: reset | keep | project

It runs from global optimizer step hooks (``torch.optim.Optimizer`` calls them after every
``step()``), so an ordinary training loop with any optimizer needs no RSO call. Only optimizers that
hold a group's ``B`` advance that group's counter, so gradient accumulation (several backward passes
per step) and steps skipped by a ``GradScaler`` count correctly.

Optional proximal term (RSO paper): minimize f(W₀ + s·B P) + ‖B‖²/(2η) by adding B/η to B's gradient
just before each step.
"""
from __future__ import annotations

import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from rso.layers.subspace_linear import ProjectionGroup
from .projections import CoordinateSampler, ProjectionSampler, generator_for

STATE_POLICIES = ("reset", "keep", "project")
#: Hook handles of collected loops (inert: their loop is gone). A collection can run while torch iterates the
#: global hook dicts inside ``Optimizer.step``, so removing them there would mutate the dict being iterated;
#: the next ``attach`` removes them instead.
_RETIRED_HANDLES = []

__all__ = ["OuterLoop", "STATE_POLICIES", "check_state_policy"]


class OuterLoop:
    """Counts optimizer steps per projection group and runs merge + resample every ``tau`` steps."""

    def __init__(self, groups: list[ProjectionGroup], sampler: ProjectionSampler, tau: int | None,
                 state_policy: str = "reset", proximal: float | None = None):
        self.groups = groups
        self.sampler = sampler
        self.tau = tau
        self.state_policy = state_policy
        self.proximal = proximal
        self.settings = {}  # the arguments of rso.wrap, as JSON data (set by wrap)
        self.defer_first_cycle = False  # True when rso.distributed averages the captured gradients first
        self._handles = []

    # --------------------------------------------------------------- hooks
    def attach(self):
        """Register the global optimizer hooks (held weakly: a deleted model leaves inert hooks, removed at the
        next attach)."""
        ref = weakref.ref(self)

        def post(optimizer, args, kwargs):
            loop = ref()
            if loop is not None:
                loop.after_step(optimizer)

        def pre(optimizer, args, kwargs):
            loop = ref()
            if loop is None:
                return
            if loop.proximal is not None:
                loop.add_proximal_gradient(optimizer)
            if not loop.defer_first_cycle:
                loop.start_first_cycle(optimizer)

        while _RETIRED_HANDLES:  # hooks of collected loops, removed here rather than by the collector
            _RETIRED_HANDLES.pop().remove()
        self._handles = [register_optimizer_step_post_hook(post), register_optimizer_step_pre_hook(pre)]
        weakref.finalize(self, _RETIRED_HANDLES.extend, list(self._handles))
        self.rearm()
        return self

    def __getstate__(self):  # copies and pickles get hooks of their own (see __setstate__)
        state = dict(self.__dict__)
        state["_handles"] = []
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if all("_buffers" in m.__dict__ for g in self.groups for m in g.members):
            self.attach()

    def detach(self):
        for h in self._handles:
            h.remove()
        self._handles = []
        for g in self.groups:
            for m in g.members:
                m._capture = None

    def _groups_in(self, optimizer):
        ids = {id(p) for pg in optimizer.param_groups for p in pg["params"]}
        return [g for g in self.groups if any(id(m.B) in ids for m in g.members)]

    def add_proximal_gradient(self, optimizer):
        with torch.no_grad():
            for g in self._groups_in(optimizer):
                for m in g.members:
                    if m.B.grad is not None:
                        m.B.grad.add_(m.B, alpha=1.0 / self.proximal)

    def start_first_cycle(self, optimizer):
        """Before the first step, give a gradient-based sampler ("svd", "hybrid") the gradient it lacked
        at wrap time, as GaLore does: P ← sampler(G₁) from the step's full gradient G₁ (captured), and
        B's gradient becomes that of the new subspace, ∂B = c·s·G₁ P_newᵀ, where c = ‖B.grad‖ /
        ‖s·G₁ P_oldᵀ‖ carries over whatever scaled B.grad since backward (clipping, GradScaler's unscale);
        c = 1 when ‖s·G₁ P_oldᵀ‖ is at rounding level (≤ 64 ulps of ‖s·G₁‖: nothing to carry over)."""
        with torch.no_grad():
            groups = [g for g in self._groups_in(optimizer)
                      if int(g.members[0].step) == 0 and int(g.members[0].cycle) == 0
                      and all(m._capture is not None and m._capture.grad is not None for m in g.members)]
            if not groups:
                return
            due_now = self.tau == 1  # the merge after this step needs the same gradient: leave it captured
            gradients = [[m._capture.grad if due_now else m.take_captured_gradient() for m in g.members]
                         for g in groups]
            if any(type(m.B.grad).__name__ == "DTensor" for g in groups for m in g.members):
                return  # FSDP2-sharded B: the first cycle stays random (its captures are dropped above)
            new = self.draw(groups, [0] * len(groups), [torch.cat(grads, 0) for grads in gradients])
            coordinate = isinstance(self.sampler, CoordinateSampler)
            for g, grads, P in zip(groups, gradients, new):
                old_P = g.members[0].P.to(grads[0].dtype, copy=True)  # the buffer is overwritten in place next
                g.set_projection_(P, coordinate=coordinate)
                new_P = g.members[0].P.to(grads[0].dtype)
                for m, G in zip(g.members, grads):
                    if m.B.grad is None:
                        continue
                    before = (m.scale * G @ old_P.T).norm()
                    # A gradient (all but) orthogonal to the old subspace leaves only rounding in both norms: c = 1.
                    floor = 64 * torch.finfo(G.dtype).eps * (m.scale * G).norm()
                    c = m.B.grad.to(G.dtype).norm() / before if before > floor else 1.0
                    m.B.grad.copy_((c * m.scale) * (G @ new_P.T))

    def after_step(self, optimizer):
        due = []
        for g in self._groups_in(optimizer):
            for m in g.members:
                m.step += 1
            if self.tau is not None and int(g.members[0].step) % self.tau == 0:
                due.append(g)
        if due:
            self.resample(due, optimizer)
        self._arm_captures()

    # ---------------------------------------------------------- the merge
    def outer_step(self, optimizer=None):
        """Merge and resample every group now (the explicit form of the automatic cycle end)."""
        self.resample(self.groups, optimizer)
        self._arm_captures()

    def resample(self, groups: list[ProjectionGroup], optimizer=None):
        """Merge each group's B into W₀, then move every group to its next cycle's P (an optimizer whose state
        'project' cannot map is refused first, before anything changes)."""
        if optimizer is not None and self.state_policy == "project":
            self._check_projectable(optimizer, groups)
        with torch.no_grad():
            gradients = []
            for g in groups:
                for m in g.members:
                    m.merge_()
                grads = [m.take_captured_gradient() for m in g.members]
                gradients.append(torch.cat(grads, 0) if all(x is not None for x in grads) else None)
            old = [g.members[0].P.detach().clone() for g in groups] if self.state_policy == "project" else None
            new = self.draw(groups, [int(g.members[0].cycle) + 1 for g in groups], gradients)
            coordinate = isinstance(self.sampler, CoordinateSampler)
            for i, (g, P) in enumerate(zip(groups, new)):
                g.set_projection_(P, coordinate=coordinate)
                for m in g.members:
                    m.cycle += 1
                    if optimizer is not None:
                        self._update_optimizer_state(optimizer, m.B, old[i] if old else None, P)

    def draw(self, groups: list[ProjectionGroup], cycles: list[int], gradients=None) -> list[torch.Tensor]:
        """P for ``cycles[i]`` of ``groups[i]``: a pure function of (seed, cycle[, gradient]).

        Random draws use a generator on the layer's device; groups of one shape are sampled together
        (one batched QR for Stiefel)."""
        gradients = gradients if gradients is not None else [None] * len(groups)
        out = [None] * len(groups)
        buckets = {}
        for i, g in enumerate(groups):
            lead = g.members[0]
            key = (lead.rank, lead.in_features, lead.P.dtype, lead.P.device, int(lead.step))
            buckets.setdefault(key, []).append(i)
        for (rank, dim, dtype, device, step), idx in buckets.items():
            gens = [generator_for(int(groups[i].members[0].seed), cycles[i], device=device) for i in idx]
            Ps = self.sampler.sample_many(rank, dim, gens, gradients=[gradients[i] for i in idx], step=step,
                                          dtype=dtype, device=device)
            for i, P in zip(idx, Ps):
                out[i] = P
        return out

    @staticmethod
    def _check_projectable(optimizer, groups: list[ProjectionGroup]) -> None:
        """ValueError, before any merge, if 'project' cannot map the optimizer state of a B in ``groups``:
        an optimizer it does not know, or a state tensor of B's shape that is not a floating-point moment."""
        check_state_policy(optimizer, "project")
        for g in groups:
            for m in g.members:
                state = optimizer.state.get(m.B)  # .get: the state is a defaultdict, do not add entries
                if not state:
                    continue
                if _is_bitsandbytes(optimizer):
                    _check_bitsandbytes_state(optimizer, state)
                    continue
                for key, value in state.items():
                    if torch.is_tensor(value) and value.shape == m.B.shape and not value.is_floating_point():
                        raise ValueError(_cannot_project(optimizer, f"its state {key!r} is {value.dtype}, not a "
                                                                    "floating-point moment"))

    def _update_optimizer_state(self, optimizer, B, old_P, new_P):
        if self.state_policy == "reset":
            optimizer.state.pop(B, None)
        elif self.state_policy == "project" and B in optimizer.state:
            # Coordinates c in the old basis stand for c·P_old; in the new basis that is c·(P_old P_newᵀ).
            acc = torch.promote_types(B.dtype, torch.float32)  # fp32, or float64 for a float64 model
            R = old_P.to(acc) @ new_P.to(acc).T
            state = optimizer.state[B]
            if _is_bitsandbytes(optimizer):
                _project_bitsandbytes_state(optimizer, state, R)
                return
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == B.shape:  # floating point (_check_projectable)
                    # Second moments stay non-negative: map them with R∘R.
                    mat = R * R if "sq" in key else R
                    value.copy_((value.to(mat.dtype) @ mat).to(value.dtype))

    def rearm(self):
        """Re-decide gradient captures from the step counters (after a load_state_dict, say)."""
        for g in self.groups:
            for m in g.members:
                m._capture = None
        self._arm_captures()

    def _arm_captures(self):
        """Keep the full gradient on the last inner step of a cycle whose next P needs it, and on the
        first step if the first cycle's P needs one (see :meth:`start_first_cycle`)."""
        if self.tau is None:
            return
        for g in self.groups:
            step = int(g.members[0].step)
            first = step == 0 and int(g.members[0].cycle) == 0 and self.sampler.uses_gradient(0)
            if first or (step + 1) % self.tau == 0 and self.sampler.uses_gradient(step + 1):
                for m in g.members:
                    if m._capture is None:
                        m.arm_capture()


# ------------------------------------------------------------------ bitsandbytes optimizer states
def _is_bitsandbytes(optimizer) -> bool:
    return type(optimizer).__module__.startswith("bitsandbytes")


def _cannot_project(optimizer, why: str) -> str:
    return (f"rso: state_on_merge='project' cannot map the optimizer state of {type(optimizer).__name__}: {why}; "
            f"use state_on_merge='reset' or 'keep' with it (allowed policies: {', '.join(STATE_POLICIES)}; "
            "'project' works with torch.optim's Adam/AdamW and bitsandbytes' Adam/AdamW, 8- or 32-bit)")


def check_state_policy(optimizer, state_policy: str) -> None:
    """ValueError if ``state_policy`` cannot work with ``optimizer`` (checked before training starts):
    'project' maps moments, which it knows how to do for torch.optim's floating-point states and for
    bitsandbytes' Adam family (first moment ``state1``, second ``state2``, 8-bit blockwise or 32-bit)."""
    if state_policy == "project" and _is_bitsandbytes(optimizer) and getattr(optimizer, "optimizer_name", None) != "adam":
        raise ValueError(_cannot_project(optimizer, f"its states ({getattr(optimizer, 'optimizer_name', '?')}) are not "
                                                    "Adam's first and second moments"))


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


BNB_BLOCKSIZE = 256  # bitsandbytes' 8-bit optimizers quantize in blocks of 256 elements


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

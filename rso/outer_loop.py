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

Before any step changes anything, an optimizer that would train the model wrongly is refused
(:meth:`OuterLoop.check_optimizer`), and a merge is refused while a B is not finite.
"""
from __future__ import annotations

import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from rso.layers.subspace_linear import ProjectionGroup
from .projections import CoordinateSampler, ProjectionSampler, generator_for
from .state_policy import MERGE_DEFAULT, STATE_POLICIES, check_projectable, check_state_policy, update_state

#: Hook handles of collected loops (inert: their loop is gone). A collection can run while torch iterates the
#: global hook dicts inside ``Optimizer.step``, so removing them there would mutate the dict being iterated;
#: the next ``attach`` removes them instead.
_RETIRED_HANDLES = []
#: Weak references to parameters and optimizers, by id: a loop's copies and pickles start without them.
_WEAK = ("_replaced", "_model_params", "_owners", "_without_B")

__all__ = ["OuterLoop", "STATE_POLICIES", "check_state_policy"]


class OuterLoop:
    """Counts optimizer steps per projection group and runs merge + resample every ``tau`` steps."""

    def __init__(self, groups: list[ProjectionGroup], sampler: ProjectionSampler, tau: int | None,
                 state_policy: str = MERGE_DEFAULT, proximal: float | None = None, *, names=None, model_params=(),
                 replaced=()):
        """``names``: {layer: its name in the model}, for messages; ``model_params``: the model's parameters before
        the wrap, ``replaced``: those the wrap replaced (old weights), both held weakly, to refuse an optimizer
        created before the wrap (:meth:`check_optimizer`)."""
        self.groups = groups
        self.sampler = sampler
        self.tau = tau
        self.state_policy = state_policy
        self.proximal = proximal
        self.names = dict(names or {})
        self.settings = {}  # the arguments of rso.wrap, as JSON data (set by wrap)
        self.defer_first_cycle = False  # True when rso.distributed averages the captured gradients first
        self._handles = []
        self._replaced = {id(p): weakref.ref(p) for p in replaced}
        self._model_params = {id(p): weakref.ref(p) for p in model_params}
        self._owners = {}  # id(group) → the optimizer that last stepped it
        self._without_B = {}  # id(optimizer) → an optimizer that stepped model parameters but no B

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
            loop.check_optimizer(optimizer)
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
        state.update({key: {} for key in _WEAK})
        return state

    def __setstate__(self, state):
        self.__dict__.update({"names": {}, **{key: {} for key in _WEAK}, **state})  # older pickles lack these
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

    def _name(self, layer) -> str:
        if layer in self.names:
            return self.names[layer]
        return f"layer {[m for g in self.groups for m in g.members].index(layer)}"

    # --------------------------------------------------- optimizers that would train the model wrongly
    def check_optimizer(self, optimizer):
        """ValueError, before ``optimizer``'s step changes anything, if it holds a weight the wrap replaced (it was
        created before the wrap), if it shares a projection group with another optimizer (the group's counter would
        advance twice per step), or if it trains the model's other parameters while no optimizer steps any B."""
        params = [p for pg in optimizer.param_groups for p in pg["params"]]
        stale = sum(_held(self._replaced, p) for p in params)
        if stale:
            raise ValueError(f"rso: this {type(optimizer).__name__} was created before rso.wrap: it holds {stale} "
                             "weight(s) of the layers rso.wrap replaced, which no longer train, so the wrapped layers "
                             "would not train and no merge would run; create the optimizer after rso.wrap(model, ...)")
        ids = {id(p) for p in params}
        held = [g for g in self.groups if any(id(m.B) in ids for m in g.members)]
        for g in held:
            self._check_one_optimizer(g, optimizer, ids)
        if not held and any(_held(self._model_params, p) for p in params):
            self._check_some_B_trains(optimizer)

    def _check_one_optimizer(self, group, optimizer, ids):
        """Refuse a group whose B's another live optimizer holds and has stepped (it takes over otherwise)."""
        ref = self._owners.get(id(group))
        other = ref() if ref is not None else None
        if other is None or other is optimizer:
            return
        theirs = {id(p) for pg in other.param_groups for p in pg["params"]}
        if not any(id(m.B) in theirs for m in group.members):
            return
        both = [m for m in group.members if id(m.B) in theirs and id(m.B) in ids]
        what = (f"the B of {self._name(both[0])} is in two optimizers" if both else
                f"{', '.join(self._name(m) for m in group.members)} share one projection and step counter, but "
                "their B's are in two optimizers")
        raise ValueError(f"rso: {what} ({type(other).__name__} and {type(optimizer).__name__}): each one's step would "
                         "advance the cycle counter, so merges would come at the wrong time; give each B, and all "
                         "B's of layers sharing a projection, to one optimizer (other layers' B's may go to other "
                         "optimizers), or delete the optimizer you no longer step")

    def _check_some_B_trains(self, optimizer):
        """Refuse the second step of an optimizer that holds the model's parameters but no B while no optimizer has
        stepped a B yet (at its first step the B's optimizer may simply not have stepped yet)."""
        if self._owners or not any(m.B.requires_grad for g in self.groups for m in g.members):
            return
        if not _held(self._without_B, optimizer):
            self._without_B[id(optimizer)] = weakref.ref(optimizer)
            return
        raise ValueError(f"rso: this {type(optimizer).__name__} trains parameters of the wrapped model but none of "
                         "its B's, and no optimizer has stepped a B, so the wrapped layers do not train and no merge "
                         "runs; create the optimizer after rso.wrap from the parameters that require grad (or freeze "
                         "every B, B.requires_grad_(False), to train only the others)")

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
                    m.B.grad.copy_(((c * m.scale) * (G @ new_P.T)).view_as(m.B.grad))  # experts: (E·out)×r → E×out×r

    def after_step(self, optimizer):
        groups = self._groups_in(optimizer)
        due = [g for g in groups if self.tau is not None and (int(g.members[0].step) + 1) % self.tau == 0]
        self._check_merge(due, optimizer)  # before the counters move: a refused merge leaves them as they were
        for g in groups:
            self._owners[id(g)] = weakref.ref(optimizer)
            for m in g.members:
                m.step += 1
                m.note_update_()
        if due:
            self._merge_and_move(due, optimizer)
        self._arm_captures()

    # ---------------------------------------------------------- the merge
    def outer_step(self, optimizer=None):
        """Merge and resample every group now (the explicit form of the automatic cycle end)."""
        self.resample(self.groups, optimizer)
        self._arm_captures()

    def resample(self, groups: list[ProjectionGroup], optimizer=None):
        """Merge each group's B into W₀, then move every group to its next cycle's P; refused first, before anything
        changes, while a B is not finite or where 'project' cannot map the optimizer state."""
        self._check_merge(groups, optimizer)
        self._merge_and_move(groups, optimizer)

    def _check_merge(self, groups: list[ProjectionGroup], optimizer) -> None:
        """FloatingPointError if a B of ``groups`` holds an inf or nan; ValueError if 'project' cannot map the state."""
        bad = [self._name(m) for g in groups for m in g.members if not bool(torch.isfinite(m.B).all())]
        if bad:
            listed = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
            raise FloatingPointError(f"rso: B is not finite (inf or nan) in {listed}: nothing was merged (W₀, P and "
                                     "the step counters are as they were); lower the learning rate, clip gradients "
                                     "(torch.nn.utils.clip_grad_norm_) or resume from the last checkpoint")
        if groups and optimizer is not None and self.state_policy == "project":
            check_projectable(optimizer, [m.B for g in groups for m in g.members])

    def _merge_and_move(self, groups: list[ProjectionGroup], optimizer=None):
        """Draw each group's next P, then merge (a quantized W₀ carries its rounding residual into the new
        subspace: ``merge_(next_projection=P)``), then move the group to P."""
        with torch.no_grad():
            grads = [[m.take_captured_gradient() for m in g.members] for g in groups]
            gradients = [torch.cat(x, 0) if all(t is not None for t in x) else None for x in grads]
            old = [g.members[0].P.detach().clone() for g in groups] if self.state_policy == "project" else None
            new = self.draw(groups, [int(g.members[0].cycle) + 1 for g in groups], gradients)
            coordinate = isinstance(self.sampler, CoordinateSampler)
            for i, (g, P) in enumerate(zip(groups, new)):
                for m in g.members:
                    m.merge_(next_projection=P)
                g.set_projection_(P, coordinate=coordinate)
                for m in g.members:
                    m.cycle += 1
                    if optimizer is not None:
                        update_state(optimizer, m.B, self.state_policy, old[i] if old else None, P)

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

    def rearm(self):
        """Re-decide gradient captures from the step counters (after a load_state_dict, say)."""
        for g in self.groups:
            for m in g.members:
                m._capture = None
                m.note_update_()
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


def refuse_stale_optimizers(removed) -> None:
    """After ``rso.unwrap``: an optimizer still holding the removed layers' B's (``removed``) would train nothing of
    those layers (their plain weights are new Parameters), so its next step raises. The hook is retired (removed at
    the next ``attach``) once every B is collected."""
    refs = {id(B): weakref.ref(B) for B in removed}

    def pre(optimizer, args, kwargs):
        held = sum(_held(refs, p) for g in optimizer.param_groups for p in g["params"])
        if held:
            raise ValueError(f"rso: this {type(optimizer).__name__} holds {held} B parameter(s) of layers rso.unwrap "
                             f"replaced, so it would train nothing of them; create the optimizer again over the "
                             f"unwrapped model's parameters")

    handle, left = register_optimizer_step_pre_hook(pre), [len(refs)]

    def collected():
        left[0] -= 1
        if left[0] == 0:
            _RETIRED_HANDLES.append(handle)

    for B in removed:
        weakref.finalize(B, collected)


def _held(refs: dict, obj) -> bool:
    """Whether ``refs`` (id → weak reference) holds ``obj`` itself (not a later object with a reused id)."""
    ref = refs.get(id(obj))
    return ref is not None and ref() is obj

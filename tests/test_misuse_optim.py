"""Optimizer misuse the outer loop refuses instead of training wrongly (issue 49), and the one state-policy module
(issue 47 item 3): an optimizer created before rso.wrap, one B (or one projection group) in two optimizers, a
'project' merge with an optimizer whose state layout is unknown, a non-finite B at a merge."""
import ast
import copy
import gc
import inspect
import weakref

import pytest
import torch
from torch import nn

import rso
import rso.optim
import rso.state_policy as sp
from conftest import lm_batch, tiny_gpt2, tiny_llama
from rso.outer_loop import OuterLoop
from rso.projections import ProjectionSampler

U64 = torch.finfo(torch.float64).eps / 2


def regression(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(32, 12, generator=g, dtype=dtype)
    return model, x, x @ torch.randn(12, 4, generator=g, dtype=dtype) / 3


def wrap(model, **kw):
    """rso.wrap, plus what wrap gives the outer loop (layer names, the parameters before the wrap, the weights it
    replaced), filled in here the way wrap does where this checkout's wrap does not pass them yet."""
    params, modules = list(model.parameters()), dict(model.named_modules())
    rso.wrap(model, **kw)
    loop = model._rso_outer_loop
    if not loop.names:
        layers = rso.subspace_layers(model)
        told = OuterLoop([], None, None, names={layer: name for name, layer in layers}, model_params=params,
                         replaced=[modules[name].weight for name, _ in layers])
        loop.names, loop._model_params, loop._replaced = told.names, told._model_params, told._replaced
    return model


def loss_of(model, x, y):
    out = model(**x) if isinstance(x, dict) else model(x)
    return out.loss if isinstance(x, dict) else (out - y).pow(2).mean()


def stepped_once():
    """The regression model wrapped (rank 4, τ 2) after one SGD step: (model, x, y, its optimizer)."""
    model, x, y = regression()
    wrap(model, rank=4, tau=2)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss_of(model, x, y).backward()
    opt.step()
    return model, x, y, opt


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()} | {
        k: v.clone() for k, v in model.named_buffers()}


def same(a, b):
    """Equal, nan where nan was."""
    return torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))


def assert_unchanged(model, before):
    after = snapshot(model)
    assert all(same(after[k], v) for k, v in before.items()), [k for k, v in before.items() if not same(after[k], v)]


def counters(model):
    return [(int(m.step), int(m.cycle)) for _, m in rso.subspace_layers(model)]


# ------------------------------------------------------------------ 1. an optimizer created before rso.wrap
@pytest.mark.parametrize("build", ["regression", "gpt2_conv1d"])
@pytest.mark.parametrize("select", ["all", "requires_grad"])
def test_an_optimizer_created_before_wrap_is_refused_at_its_first_step(build, select):
    """It holds the replaced nn.Linear / Conv1D weights and no B: refused before its first step changes anything."""
    if build == "regression":
        model, x, y = regression()
    else:
        model, x, y = tiny_gpt2(), lm_batch(), None
    params = [p for p in model.parameters() if select == "all" or p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    wrap(model, rank=4, tau=2)
    loss_of(model, x, y).backward()
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        opt.step()
    message = str(err.value)
    assert "\n" not in message and message.startswith("rso: this AdamW was created before rso.wrap")
    assert message.endswith("create the optimizer after rso.wrap(model, ...)")
    assert_unchanged(model, before)
    assert not opt.state and set(counters(model)) == {(0, 0)}


def train_steps(model, x, y, steps, *optimizers):
    """``steps`` training steps, each optimizer stepping in the order given."""
    for _ in range(steps):
        loss_of(model, x, y).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad()


def test_an_optimizer_created_after_wrap_trains_and_merges():
    model, x, y = regression()
    wrap(model, rank=4, tau=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_steps(model, x, y, 4, opt)
    assert set(counters(model)) == {(4, 2)}


def test_an_optimizer_of_model_parameters_but_no_B_is_refused_at_its_second_step():
    """Only the biases (kept by the wrap), in an optimizer created before it: at its first step the B's optimizer
    may not have stepped yet; at its second no optimizer has stepped a B, so nothing else trains: refused."""
    model, x, y = regression()
    opt = torch.optim.SGD([model[0].bias, model[2].bias], lr=0.1)
    wrap(model, rank=4, tau=2)
    loss_of(model, x, y).backward()
    opt.step()
    opt.zero_grad()
    loss_of(model, x, y).backward()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"^rso: this SGD trains parameters of the wrapped model but none of its "
                                         r"B's, .*create the optimizer after rso.wrap .*B.requires_grad_\(False\)"):
        opt.step()
    assert_unchanged(model, before)


def test_biases_and_B_in_separate_optimizers_train_and_merge():
    """The bias optimizer steps first, before any B was stepped: legitimate, the B's optimizer follows."""
    model, x, y = regression()
    wrap(model, rank=4, tau=2)
    biases = torch.optim.SGD([model[0].bias, model[2].bias], lr=0.1)
    bs = torch.optim.SGD([model[0].B, model[2].B], lr=0.1)
    train_steps(model, x, y, 4, biases, bs)
    assert set(counters(model)) == {(4, 2)}


def test_frozen_B_with_an_optimizer_of_the_other_parameters_is_not_refused():
    model, x, y = regression()
    opt = torch.optim.SGD([model[0].bias, model[2].bias], lr=0.1)
    wrap(model, rank=4, tau=2)
    for _, layer in rso.subspace_layers(model):
        layer.B.requires_grad_(False)
    train_steps(model, x, y, 3, opt)
    assert set(counters(model)) == {(0, 0)}


def test_optimizers_of_other_models_are_not_affected():
    """Another model's optimizer, created before this model's wrap, and a second wrapped model's: both step."""
    model, x, y = regression()
    plain, other = nn.Linear(12, 4), regression(seed=1)[0]
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    wrap(model, rank=4, tau=2)
    wrap(other, rank=4, tau=2)
    other_opt = torch.optim.SGD([p for p in other.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        for m, opt in ((plain, plain_opt), (other, other_opt)):
            (m(x) - y).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    assert set(counters(other)) == {(2, 1)} and set(counters(model)) == {(0, 0)}


# ------------------------------------------------------------------ 2. one B in several optimizers
def test_one_B_in_two_optimizers_is_refused_before_the_second_changes_anything():
    model, x, y = regression()
    wrap(model, rank=4, tau=2)
    first = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    second = torch.optim.Adam([model[2].B], lr=0.1)
    loss_of(model, x, y).backward()
    first.step()
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        second.step()
    assert str(err.value).startswith("rso: the B of 2 is in two optimizers (SGD and Adam): each one's step would "
                                     "advance the cycle counter, so merges would come at the wrong time; ")
    assert_unchanged(model, before)
    assert counters(model) == [(1, 0), (1, 0)] and not second.state


def test_layers_sharing_a_projection_split_over_two_optimizers_are_refused():
    """q, k, v share one P and one step counter: q's B in one optimizer and k's, v's in another would advance it
    twice per step."""
    model = wrap(tiny_llama(), rank=4, tau=2)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.P is attn.k_proj.P
    rest = [p for p in model.parameters() if p.requires_grad and p is not attn.q_proj.B]
    first, second = torch.optim.SGD([attn.q_proj.B], lr=0.1), torch.optim.SGD(rest, lr=0.1)
    model(**lm_batch()).loss.backward()
    first.step()
    with pytest.raises(ValueError, match=r"^rso: model.layers.0.self_attn.q_proj, model.layers.0.self_attn.k_proj, "
                                         r"model.layers.0.self_attn.v_proj share one projection and step counter, "
                                         r"but their B's are in two optimizers \(SGD and SGD\)"):
        second.step()


def test_different_Bs_in_two_optimizers_keep_working():
    model, x, y = regression()
    wrap(model, rank=4, tau=2)
    first = torch.optim.SGD([model[0].B, model[0].bias], lr=0.1)
    second = torch.optim.Adam([model[2].B, model[2].bias], lr=1e-2)
    for _ in range(4):
        loss_of(model, x, y).backward()
        first.step()
        second.step()
        model.zero_grad()
    assert counters(model) == [(4, 2), (4, 2)]


def test_an_optimizer_replacing_a_deleted_one_takes_over():
    model, x, y, opt = stepped_once()
    del opt
    gc.collect()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    assert counters(model) == [(2, 1), (2, 1)]


# ------------------------------------------------------------------ 3. the state policies
FIRST, SECOND, BOUND = "first", "second", "bound"
ADAM = {"exp_avg": FIRST, "exp_avg_sq": SECOND}
# The moments each optimizer keeps and how each is a function of the gradient (this test's own table).
OPTIMIZERS = {
    "Adam": (lambda ps: torch.optim.Adam(ps, lr=1e-2), ADAM),
    "AdamW_amsgrad": (lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True), {**ADAM, "max_exp_avg_sq": SECOND}),
    "NAdam": (lambda ps: torch.optim.NAdam(ps, lr=1e-2), ADAM),
    "RAdam": (lambda ps: torch.optim.RAdam(ps, lr=1e-2), ADAM),
    "Adamax": (lambda ps: torch.optim.Adamax(ps, lr=1e-2), {"exp_avg": FIRST, "exp_inf": BOUND}),
    "Adadelta": (lambda ps: torch.optim.Adadelta(ps, lr=1.0), {"square_avg": SECOND, "acc_delta": SECOND}),
    "Adagrad": (lambda ps: torch.optim.Adagrad(ps, lr=1e-2), {"sum": SECOND}),
    "RMSprop": (lambda ps: torch.optim.RMSprop(ps, lr=1e-3), {"square_avg": SECOND}),
    "RMSprop_centered": (lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.9, centered=True),
                         {"square_avg": "centered", "grad_avg": FIRST, "momentum_buffer": FIRST}),
    "SGD_momentum": (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), {"momentum_buffer": FIRST}),
    "SubspaceAdamW": (lambda ps: rso.optim.SubspaceAdamW(ps, lr=1e-2), ADAM),
    "SubspaceSGD": (lambda ps: rso.optim.SubspaceSGD(ps, lr=0.05, momentum=0.9), {"momentum_buffer": FIRST}),
}
if hasattr(torch.optim, "Muon"):
    OPTIMIZERS["Muon"] = (lambda ps: torch.optim.Muon(ps, lr=1e-2), {"momentum_buffer": FIRST})


class SameSubspace(ProjectionSampler):
    """First draw: orthonormal rows P₀; each later one: the previous rows rolled by one and every other one negated
    (a signed permutation: the same subspace in a new basis)."""

    name = "same-subspace-test"

    def __init__(self):
        self.last = {}

    def sample(self, rank, dim, generator, *, gradient=None, step=0, dtype=torch.float32, device=None):
        if dim in self.last:
            signs = torch.tensor([(-1.0) ** i for i in range(rank)], dtype=torch.float64)
            P = signs[:, None] * self.last[dim].roll(1, dims=0)
        else:
            P = torch.linalg.qr(torch.randn(dim, rank, generator=generator, dtype=torch.float64))[0].T
        self.last[dim] = P
        return P.to(dtype)


def project_merge(make_opt, projection):
    """Three float64 steps on the B's, then a 'project' merge: [(state before, state after, P_old, P_new)]."""
    model, x, y = regression(torch.float64)
    wrap(model, rank=4, tau=None, state_on_merge="project", projection=projection)
    layers = [m for _, m in rso.subspace_layers(model)]
    opt = make_opt([m.B for m in layers])
    for _ in range(3):
        loss_of(model, x, y).backward()
        opt.step()
        opt.zero_grad()
    before = [({k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[m.B].items()}, m.P.clone())
              for m in layers]
    rso.outer_step(model, opt)
    return [(st, opt.state[m.B], P_old, m.P) for m, (st, P_old) in zip(layers, before)]


def close(actual, expected, scale):
    """Equal up to float64 rounding in products of d ≤ 16 terms, relative to ``scale`` (the largest input)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=64 * 16 * U64 * float(scale))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_project_expresses_each_moment_in_the_new_basis(name):
    """A moment c over the rows of P_old stands for c·P_old; in the new basis it is c·P_old·P_newᵀ (first moments),
    (c∘c-like) second moments map by (R∘R), R = P_old·P_newᵀ (their variance, if the optimizer tracks the mean), a
    bound u ≥ |g| by |R|; scalar entries stay."""
    make, kinds = OPTIMIZERS[name]
    for before, after, P_old, P_new in project_merge(make, "stiefel"):
        R = P_old @ P_new.T
        assert R.abs().max() < 0.99  # a new subspace: the maps are not the identity
        for key, value in before.items():
            if not torch.is_tensor(value) or value.dim() == 0:
                assert after[key] == value, key
                continue
            kind, scale = kinds[key], value.abs().max()
            assert scale > 0, key
            if kind == FIRST:
                close(after[key], value @ P_old @ P_new.T, scale)
            elif kind == SECOND:
                close(after[key], value @ (R * R), scale)
            elif kind == BOUND:
                close(after[key], value @ R.abs(), scale)
            else:  # centered: the variance v − μ² maps as a second moment, the mean μ as a first
                mean_before, mean_after = before["grad_avg"], after["grad_avg"]
                variance = after[key] - mean_after ** 2
                close(variance, (value - mean_before ** 2) @ (R * R), scale)
                assert (variance >= -64 * 16 * U64 * scale).all()
        assert set(kinds) == {k for k, v in before.items() if torch.is_tensor(v) and v.dim() > 0}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_project_is_exact_when_the_new_basis_spans_the_same_subspace(name):
    """P_new a signed permutation of P_old's rows: the full-space first moment c·P_old is unchanged
    (c·P_old = (c·P_old·P_newᵀ)·P_new), and so is each input coordinate's second moment v·(P∘P) and bound u·|P|."""
    make, kinds = OPTIMIZERS[name]
    for before, after, P_old, P_new in project_merge(make, SameSubspace()):
        assert not torch.equal(P_new, P_old)
        for key, kind in kinds.items():
            scale = before[key].abs().max()
            if kind == FIRST:
                close(after[key] @ P_new, before[key] @ P_old, scale)
            elif kind == BOUND:
                close(after[key] @ P_new.abs(), before[key] @ P_old.abs(), scale)
            else:
                close(after[key] @ (P_new * P_new), before[key] @ (P_old * P_old), scale)


class Unknown(torch.optim.Optimizer):
    """Momentum SGD written from scratch: 'project' cannot know what its 'velocity' is."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    v = self.state[p].setdefault("velocity", torch.zeros_like(p)).mul_(0.9).add_(p.grad)
                    p.sub_(v, alpha=group["lr"])


class AdamWithEMA(torch.optim.Adam):
    """Adam that also keeps an average of the parameter: a state tensor Adam does not have."""

    @torch.no_grad()
    def step(self, closure=None):
        out = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p].setdefault("ema", p.detach().clone()).lerp_(p, 0.1)
        return out


@pytest.mark.parametrize("make, why", [
    (lambda ps: Unknown(ps), "Unknown: rso does not know its state layout"),
    (lambda ps: torch.optim.Rprop(ps), "Rprop: rso does not know its state layout"),
    (lambda ps: AdamWithEMA(ps), "AdamWithEMA: its state 'ema' is none of the moments it knows (exp_avg, exp_avg_sq, "
                                 "max_exp_avg_sq)"),
    (lambda ps: rso.optim.SubspaceAdamW([{"params": ps, "rank": 2}]),
     "SubspaceAdamW: its state 'proj' is none of the moments it knows (exp_avg, exp_avg_sq)"),
], ids=["custom", "rprop", "subclass_with_more_state", "projected_group"])
def test_project_refuses_a_state_it_cannot_map_before_anything_changes(make, why):
    model, x, y = regression()
    wrap(model, rank=4, tau=None, state_on_merge="project")
    opt = make([m.B for _, m in rso.subspace_layers(model)])
    loss_of(model, x, y).backward()
    opt.step()
    before = snapshot(model)
    state = {id(p): {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for p, s in opt.state.items()}
    with pytest.raises(ValueError) as err:
        rso.outer_step(model, opt)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"rso: state_on_merge='project' cannot map the optimizer state of {why}; use "
                              "state_on_merge='reset' or 'keep' with it (allowed policies: reset, keep, project; "
                              "'project' knows torch.optim's Adam, AdamW, NAdam, RAdam, Adamax, Adadelta, Adagrad, "
                              "RMSprop, SGD")
    assert "rso.optim's SubspaceAdamW, SubspaceSGD and bitsandbytes' Adam/AdamW, 8- or 32-bit" in message
    assert_unchanged(model, before)
    assert all(torch.equal(opt.state[p][k], v) for p in opt.state for k, v in state[id(p)].items())


@pytest.mark.parametrize("policy", ["reset", "keep"])
def test_reset_and_keep_work_with_any_optimizer(policy):
    model, x, y = regression()
    wrap(model, rank=4, tau=None, state_on_merge=policy)
    B = model[0].B
    opt = Unknown([m.B for _, m in rso.subspace_layers(model)])
    loss_of(model, x, y).backward()
    opt.step()
    velocity = opt.state[B]["velocity"].clone()
    rso.outer_step(model, opt)
    assert (B not in opt.state) if policy == "reset" else torch.equal(opt.state[B]["velocity"], velocity)


def test_register_moments_teaches_project_an_optimizer():
    model, x, y = regression(torch.float64)
    wrap(model, rank=4, tau=None, state_on_merge="project")
    opt = Unknown([m.B for _, m in rso.subspace_layers(model)])
    loss_of(model, x, y).backward()
    opt.step()
    velocity, P_old = opt.state[model[0].B]["velocity"].clone(), model[0].P.clone()
    sp.register_moments(Unknown, {"velocity": sp.FIRST})
    try:
        rso.outer_step(model, opt)
    finally:
        del sp.MOMENTS[Unknown]
    close(opt.state[model[0].B]["velocity"], velocity @ P_old @ model[0].P.T, velocity.abs().max())
    with pytest.raises(ValueError, match=r"^register_moments: moment 'v' of Unknown has kind 'third'; allowed: "):
        sp.register_moments(Unknown, {"v": "third"})
    with pytest.raises(ValueError, match="moment 'v' of Unknown has kind"):
        sp.register_moments(Unknown, {"v": sp.about("mean")})  # no first moment 'mean' among them
    assert Unknown not in sp.MOMENTS


def test_the_policy_names_and_defaults_live_in_one_module():
    from rso.optim import base
    assert rso.outer_loop.STATE_POLICIES is sp.STATE_POLICIES and base.STATE_POLICIES is sp.STATE_POLICIES
    assert rso.RSOConfig().state_on_merge == sp.MERGE_DEFAULT == "reset"
    X = nn.Parameter(torch.zeros(3, 2))
    assert rso.optim.SubspaceAdamW([{"params": [X], "rank": 1}]).param_groups[0]["state_on_switch"] \
        == sp.SWITCH_DEFAULT == "keep"
    with pytest.raises(ValueError, match=r"^state_on_switch must be one of \['keep', 'reset', 'project'\]"):
        rso.optim.SubspaceSGD([{"params": [X], "rank": 1, "state_on_switch": "rotate"}])
    with pytest.raises(ValueError, match=r"^rso: state_on_merge must be one of \('reset', 'keep', 'project'\)"):
        sp.check_state_policy(torch.optim.SGD([X]), "rotate")


def test_an_rso_optim_subclass_without_registered_moments_cannot_project_on_switch():
    class Plain(rso.optim.SubspaceOptimizer):
        pass

    X = nn.Parameter(torch.zeros(3, 2))
    Plain([{"params": [X], "rank": 1, "state_on_switch": "keep"}], {})
    with pytest.raises(ValueError, match=r"^state_on_switch='project' needs to know Plain's moments: register them "
                                         r"with rso.state_policy.register_moments, or use 'keep' or 'reset'$"):
        Plain([{"params": [X], "rank": 1, "state_on_switch": "project"}], {})


def test_the_state_policy_module_imports_nothing_from_the_rest_of_rso():
    tree = ast.parse(inspect.getsource(sp))
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)] + [
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.startswith("rso") or m.startswith(".")]
    assert all(n.level == 0 for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))


# ------------------------------------------------------------------ 4. a non-finite B at a merge
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_B_at_a_cycle_end_is_refused_with_nothing_merged(bad):
    """Layer 2's B turns non-finite in the step that ends the cycle: the step raises after the optimizer's update,
    but no layer is merged, no P moves and the counters stay where they were."""
    model, x, y, opt = stepped_once()
    opt.zero_grad()
    loss_of(model, x, y).backward()
    model[2].B.grad[0, 0] = bad
    kept = {k: v for k, v in snapshot(model).items() if not k.endswith(("B", "bias"))}  # W₀, P, counters
    with pytest.raises(FloatingPointError) as err:
        opt.step()
    assert str(err.value) == ("rso: B is not finite (inf or nan) in 2: nothing was merged (W₀, P and the step "
                              "counters are as they were); lower the learning rate, clip gradients "
                              "(torch.nn.utils.clip_grad_norm_) or resume from the last checkpoint")
    assert_unchanged(model, kept)
    assert counters(model) == [(1, 0), (1, 0)] and torch.count_nonzero(model[0].B) > 0


def test_an_explicit_outer_step_with_a_non_finite_B_merges_nothing():
    model, x, y = regression()
    wrap(model, rank=4, tau=None)
    with torch.no_grad():
        for _, layer in rso.subspace_layers(model):
            layer.B.fill_(0.5)
        model[0].B[1, 1] = float("nan")
    before = snapshot(model)
    with pytest.raises(FloatingPointError, match=r"^rso: B is not finite \(inf or nan\) in 0: nothing was merged"):
        rso.outer_step(model)
    assert_unchanged(model, before)
    model._rso_outer_loop.names = {}  # a loop built without names (not by rso.wrap) counts its layers
    with pytest.raises(FloatingPointError, match=r"^rso: B is not finite \(inf or nan\) in layer 0: "):
        rso.outer_step(model)


def test_a_copied_loop_forgets_the_optimizers_and_parameters_it_held_weakly():
    model, x, y, opt = stepped_once()
    loop = model._rso_outer_loop
    assert loop._owners and loop._model_params
    twin = copy.deepcopy(model)
    copied = twin._rso_outer_loop
    assert not copied._owners and not copied._model_params and not copied._replaced
    assert [copied.names[m] for _, m in rso.subspace_layers(twin)] == ["0", "2"]
    assert isinstance(next(iter(loop._owners.values())), weakref.ref)

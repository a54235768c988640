"""Behaviours no other test covers: GradScaler skips, the "project" policy on every layer, the proximal term
across merges, several optimizers, custom samplers, native low-precision weights and their merge, unwrap of
frozen weights, the coordinate and Gaussian projections' math.

References are float64 (or the library's documented fp32 merge), tolerances derived from the dtype: ``u`` is
the unit roundoff ``eps/2`` of the dtype that did the rounding.
"""
import pytest
import torch
from torch import nn

import rso
from conftest import lm_batch, tiny_gpt2, tiny_llama
from rso.layers import SubspaceLinear
from rso.projections import CoordinateSampler, GaussianSampler, ProjectionSampler, generator_for

U32 = torch.finfo(torch.float32).eps / 2


def regression(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(32, 12, generator=g, dtype=dtype)
    y = x @ torch.randn(12, 4, generator=g, dtype=dtype) / 3
    return model, x, y


def train_step(model, opt, x, y, micro=1):
    for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
        ((model(xs) - ys).pow(2).mean() / micro).backward()
    opt.step()
    opt.zero_grad()


def layers_of(model):
    return [m for _, m in rso.subspace_layers(model)]


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def snapshot(model):
    """Every parameter and buffer, cloned (``state_dict`` would merge B into W₀)."""
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


def fill_B(model, seed=3, std=1.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in layers_of(model):
            m.B.copy_(torch.randn(m.B.shape, generator=g, dtype=torch.float64) * std)


# --------------------------------------------------------------------------- GradScaler
def test_gradscaler_skipped_fp16_steps_do_not_advance_the_loop():
    model, x, y = regression()
    rso.wrap(model, rank=4, tau=2)
    opt = torch.optim.SGD(trainable(model), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)  # GradScaler runs on CPU in torch ≥ 2.3
    seen = []

    def overflow(g):  # the fp16 gradient of the output gets an inf, as an fp16 overflow would
        seen.append(g.dtype)
        return g.index_fill(0, torch.tensor([0]), float("inf"))

    skips = [False, True, False, True, True, False, False]
    taken = 0
    for skip in skips:
        before = snapshot(model)
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(x)
        assert out.dtype == torch.float16
        if skip:
            out.register_hook(overflow)
        scaler.scale((out.float() - y).pow(2).mean()).backward()
        assert torch.isfinite(model[0].B.grad).all() != skip
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if skip:  # skipped: nothing moved, no counter, no merge; the scale backed off
            assert scaler.get_scale() == scale / 2
            after = snapshot(model)
            assert all(torch.equal(before[k], after[k]) for k in before)
        else:
            taken += 1
        for m in layers_of(model):
            assert int(m.step) == taken and int(m.cycle) == taken // 2
    assert seen == [torch.float16] * sum(skips) and taken == 4 and rso.state(model)["cycle"] == 2


# --------------------------------------------------------------------------- state_on_merge="project"
def adam_update(state, g, opt):
    beta1, beta2 = opt.param_groups[0]["betas"]
    zero = torch.zeros_like(g)
    return {"exp_avg": beta1 * state.get("exp_avg", zero) + (1 - beta1) * g,
            "exp_avg_sq": beta2 * state.get("exp_avg_sq", zero) + (1 - beta2) * g * g}


def momentum_update(state, g, opt):
    mu = opt.param_groups[0]["momentum"]
    return {"momentum_buffer": g.clone() if "momentum_buffer" not in state else mu * state["momentum_buffer"] + g}


@pytest.mark.parametrize("make_opt,update", [
    (lambda ps: torch.optim.Adam(ps, lr=1e-2), adam_update),
    (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), momentum_update),
], ids=["adam", "sgd_momentum"])
def test_project_policy_maps_every_layers_state(make_opt, update):
    model = rso.wrap(tiny_llama(dtype=torch.float64), rank=4, tau=2, state_on_merge="project")
    attn = model.model.layers[1].self_attn
    assert attn.q_proj.P is attn.k_proj.P is attn.v_proj.P  # a shared group beyond layer 0
    layers = layers_of(model)
    opt = make_opt(trainable(model))
    pre = {}

    def record(optimizer, args, kwargs):  # each B's state, gradient and P just before the step
        pre.clear()
        for m in layers:
            st = {k: v.clone() for k, v in optimizer.state.get(m.B, {}).items() if torch.is_tensor(v)}
            pre[m] = (st, m.B.grad.clone(), m.P.clone())

    opt.register_step_pre_hook(record)
    batch = lm_batch()
    for n in range(1, 6):  # merges after steps 2 and 4
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        merged = n % 2 == 0
        for m in layers:
            st, g, P_old = pre[m]
            assert torch.equal(m.P, P_old) != merged
            R = P_old @ m.P.T  # coordinates c·P_old are c·R in the new basis
            R_terms = P_old.abs() @ m.P.abs().T  # Σ|terms| of each entry of R
            for key, value in update(st, g, opt).items():
                if not merged:
                    mat, bound = torch.eye(4, dtype=torch.float64), 1e-12 * (1 + value.abs())
                else:
                    # The library maps the state in fp32 (R too): |err| ≤ 4u₃₂·|value|·(Σ|terms| of mat).
                    sq = key == "exp_avg_sq"
                    mat = R * R if sq else R
                    terms = R * R + 2 * R.abs() * R_terms if sq else R.abs() + R_terms
                    bound = 4 * U32 * (value.abs() @ terms)
                expected = value @ mat
                err = (opt.state[m.B][key] - expected).abs()
                assert (err <= bound).all(), (n, key, float((err / bound).max()))
            if "step" in opt.state[m.B]:
                assert int(opt.state[m.B]["step"]) == n  # Adam's bias correction goes on
    assert rso.state(model)["cycle"] == 2


def test_project_policy_keeps_float64_precision():
    model, x, y = regression(dtype=torch.float64)
    rso.wrap(model, rank=4, tau=None, state_on_merge="project")
    opt = torch.optim.SGD(trainable(model), lr=0.1, momentum=0.9)
    train_step(model, opt, x, y)
    buf, P_old = opt.state[model[0].B]["momentum_buffer"].clone(), model[0].P.clone()
    rso.outer_step(model, opt)
    torch.testing.assert_close(opt.state[model[0].B]["momentum_buffer"], buf @ (P_old @ model[0].P.T),
                               rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- proximal term
def test_proximal_term_across_merges_with_accumulation():
    eta, micro = 0.5, 4
    model, x, y = regression(dtype=torch.float64)
    twin, _, _ = regression(dtype=torch.float64)
    plain, _, _ = regression(dtype=torch.float64)
    rso.wrap(model, rank=4, tau=2, proximal=eta)
    rso.wrap(twin, rank=4, tau=2)
    rso.wrap(plain, rank=4, tau=2)
    opts = [torch.optim.SGD(trainable(m), lr=0.1, momentum=0.5) for m in (model, twin, plain)]
    for _ in range(6):  # three cycles; each step accumulates four micro-batches
        train_step(model, opts[0], x, y, micro=micro)
        train_step(plain, opts[2], x, y, micro=micro)
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):  # by hand: B/η added once per optimizer step
            ((twin(xs) - ys).pow(2).mean() / micro).backward()
        with torch.no_grad():
            for m in layers_of(twin):
                m.B.grad.add_(m.B, alpha=1 / eta)
        opts[1].step()
        opts[1].zero_grad()
    assert rso.state(model)["cycle"] == 3 and rso.state(twin)["cycle"] == 3
    got, want, without = snapshot(model), snapshot(twin), snapshot(plain)
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-14, msg=k)
    assert not torch.allclose(got["0.weight"], without["0.weight"])  # the term did act


# --------------------------------------------------------------------------- several optimizers
def test_two_models_two_optimizers_each_advances_only_its_own():
    a, x, y = regression(seed=0)
    b, _, _ = regression(seed=1)
    rso.wrap(a, rank=4, tau=2)
    rso.wrap(b, rank=4, tau=2)
    oa, ob = torch.optim.SGD(trainable(a), lr=0.1), torch.optim.SGD(trainable(b), lr=0.1)
    b_before = snapshot(b)
    for _ in range(3):
        train_step(a, oa, x, y)
    after = snapshot(b)
    assert all(torch.equal(b_before[k], after[k]) for k in b_before)  # a's steps left b untouched
    assert [int(m.step) for m in layers_of(a)] == [3, 3] and [int(m.step) for m in layers_of(b)] == [0, 0]
    train_step(b, ob, x, y)
    assert rso.state(a)["step"] == 3 and rso.state(a)["cycle"] == 1
    assert rso.state(b)["step"] == 1 and rso.state(b)["cycle"] == 0


def test_two_optimizers_on_one_model_move_only_their_groups():
    model, x, y = regression()
    rso.wrap(model, rank=4, tau=2)
    first, second = model[0], model[2]
    o1 = torch.optim.SGD([first.B, first.bias], lr=0.1)
    o2 = torch.optim.SGD([second.B, second.bias], lr=0.1)
    P2 = second.P.clone()
    for _ in range(2):
        (model(x) - y).pow(2).mean().backward()
        o1.step()
        model.zero_grad()
    assert (int(first.step), int(first.cycle)) == (2, 1) and (int(second.step), int(second.cycle)) == (0, 0)
    assert torch.equal(second.P, P2) and torch.count_nonzero(second.B) == 0
    (model(x) - y).pow(2).mean().backward()
    o2.step()
    assert (int(first.step), int(second.step)) == (2, 1)


# --------------------------------------------------------------------------- custom sampler
class UniformSampler(ProjectionSampler):
    """Uniform [0, 1) entries: unlike every built-in sampler; counts its draws."""

    name = "uniform-test"

    def __init__(self):
        self.draws = []

    def sample(self, rank, dim, generator, *, gradient=None, step=0, dtype=torch.float32, device=None):
        self.draws.append((rank, dim, step))
        return torch.rand(rank, dim, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)


def test_custom_sampler_is_used_for_every_draw():
    sampler = UniformSampler()
    model, x, y = regression(dtype=torch.float64)
    rso.wrap(model, rank=4, tau=2, projection=sampler)
    layers = layers_of(model)

    def expected(m):  # a pure function of (the group's seed, cycle)
        return UniformSampler().sample(m.rank, m.in_features, generator_for(int(m.seed), int(m.cycle)),
                                       dtype=torch.float64)

    assert sampler.draws == [(4, 12, 0), (4, 16, 0)]
    assert all(torch.equal(m.P, expected(m)) for m in layers)
    opt = torch.optim.SGD(trainable(model), lr=0.05)
    for _ in range(4):
        train_step(model, opt, x, y)
    rso.outer_step(model, opt)
    assert [int(m.cycle) for m in layers] == [3, 3] and len(sampler.draws) == 2 * 4
    assert [s for _, _, s in sampler.draws] == [0, 0, 2, 2, 4, 4, 4, 4]
    assert all(torch.equal(m.P, expected(m)) for m in layers)
    assert rso.state(model)["projection"] == "uniform-test"


# --------------------------------------------------------------------------- native low precision
def float64_forward(model, x):
    """The wrapped regression model at ``x``, in float64 from its own (low-precision) values, with an
    elementwise bound on the rounding error of a run in a dtype of unit roundoff u: ``(out, bound / u)``."""
    x = x.double()
    h, carried = x, torch.zeros_like(x)  # value, and its error bound / u
    for m in (model[0], model[2]):
        W0, B, P, b = (t.detach().double() for t in (m.weight, m.B, m.P, m.bias))
        s = m.scale
        terms = h.abs() @ W0.abs().T + s * h.abs() @ (B.abs() @ P.abs()).T + b.abs()
        out = h @ W0.T + s * (h @ P.T) @ B.T + b
        carried = 4 * terms + carried @ (W0.abs() + s * B.abs() @ P.abs()).T  # this layer's roundings + input's
        h = out
        if m is model[0]:
            h = torch.tanh(out)  # 1-Lipschitz, then one more rounding
            carried = carried + h.abs()
    return h, carried


@pytest.mark.parametrize("evaluation", ["merged", "split"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_low_precision_weights_output_and_merge(dtype, evaluation):
    model, x, _ = regression()
    model = rso.wrap(model.to(dtype), rank=4, tau=None, scale=0.5)
    fill_B(model)
    for m in layers_of(model):
        m.evaluation = evaluation
    x = x.to(dtype)
    u = torch.finfo(dtype).eps / 2
    with torch.no_grad():
        out = model(x)
    assert out.dtype == dtype
    ref, bound = float64_forward(model, x)
    err = (out.double() - ref).abs()
    assert (err <= u * bound).all(), float((err / (u * bound)).max())
    assert float(err.norm() / ref.norm()) <= 3 * u  # independent roundings (measured ≈ 1u)
    # The merge: W₀ ← dtype(W₀ + s·B·P computed in fp32), i.e. one rounding from a value exact to fp32.
    pre = [(m.weight.clone(), m.B.detach().clone(), m.P.clone()) for m in layers_of(model)]
    rso.outer_step(model)
    for m, (W, B, P) in zip(layers_of(model), pre):
        assert m.weight.dtype == dtype and torch.count_nonzero(m.B) == 0
        assert torch.equal(m.weight, (W.float() + 0.5 * (B.float() @ P.float())).to(dtype))
        exact = W.double() + 0.5 * B.double() @ P.double()
        slack = 4 * U32 * (W.double().abs() + 0.5 * B.double().abs() @ P.double().abs())
        assert ((m.weight.double() - exact).abs() <= u * exact.abs() + slack).all()


# --------------------------------------------------------------------------- unwrap
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_unwrap_restores_weights_frozen_before_wrapping(kind):
    if kind == "linear":
        model, _, _ = regression()
        frozen, free, cls = model[0], model[2], nn.Linear
        path_frozen, path_free = "0", "2"
    else:
        model = tiny_gpt2()
        frozen, free = model.transformer.h[0].attn.c_attn, model.transformer.h[0].mlp.c_fc
        cls = type(frozen)
        path_frozen, path_free = "transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"
    frozen.weight.requires_grad_(False)
    frozen.bias.requires_grad_(False)
    rso.wrap(model, rank=4, tau=None)
    assert type(model.get_submodule(path_frozen)) is cls  # frozen: left as it is
    assert isinstance(model.get_submodule(path_free), SubspaceLinear)
    rso.unwrap(model)
    back, other = model.get_submodule(path_frozen), model.get_submodule(path_free)
    assert type(back) is cls and type(other) is cls
    assert back.weight.requires_grad is False and back.bias.requires_grad is False
    assert other.weight.requires_grad is True and other.bias.requires_grad is True


# --------------------------------------------------------------------------- coordinate and Gaussian math
@pytest.mark.parametrize("evaluation", ["merged", "split"])
def test_coordinate_projection_layer_matches_dense_autograd(evaluation):
    torch.manual_seed(0)
    layer = SubspaceLinear(12, 10, 4, scale=0.5, dtype=torch.float64)
    P = CoordinateSampler().sample(4, 12, generator_for(3), dtype=torch.float64)
    layer.set_projection_(P, coordinate=True)
    layer.evaluation = evaluation
    with torch.no_grad():
        layer.B.normal_()
        layer.bias.normal_()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 12, generator=g, dtype=torch.float64, requires_grad=True)
    G = torch.randn(2, 3, 10, generator=g, dtype=torch.float64)
    y = layer(x)
    (y * G).sum().backward()
    # Dense equivalent: W = W₀ + s·B·P with P the identity rows, by autograd.
    W = (layer.weight + 0.5 * layer.B.detach() @ P).requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = nn.functional.linear(x2, W, b)
    (y2 * G).sum().backward()
    assert layer._coordinate_index().tolist() == CoordinateSampler.indices(P).tolist()
    torch.testing.assert_close(y, y2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.B.grad, 0.5 * W.grad @ P.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.B.grad, 0.5 * G.reshape(-1, 10).T @ x.detach().reshape(-1, 12)[:, P.argmax(1)],
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, b.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("evaluation", ["merged", "split"])
def test_gaussian_projection_math_through_wrap(evaluation):
    model, x, _ = regression(dtype=torch.float64)
    rso.wrap(model, rank=4, tau=None, projection="gaussian", scale=0.5)
    layer = model[0]
    layer.evaluation = evaluation
    P = GaussianSampler().sample(4, 12, generator_for(int(layer.seed), 0), dtype=torch.float64)
    assert torch.equal(layer.P, P) and not layer.coordinate
    assert not torch.allclose(P @ P.T, torch.eye(4, dtype=torch.float64), atol=0.1)  # not orthonormal rows
    fill_B(model)
    W0, B, b = layer.weight.clone(), layer.B.detach().clone(), layer.bias.detach().clone()
    xr = x.clone().requires_grad_(True)
    out = layer(xr)
    z = x @ P.T
    torch.testing.assert_close(out, x @ W0.T + 0.5 * z @ B.T + b, rtol=1e-12, atol=1e-12)
    G = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (out * G).sum().backward()
    torch.testing.assert_close(layer.B.grad, 0.5 * G.T @ z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xr.grad, G @ (W0 + 0.5 * B @ P), rtol=1e-12, atol=1e-12)

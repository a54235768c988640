"""The outer loop under ordinary training loops: merge timing, optimizer state, accumulation, SVD."""
import copy
import pytest
import torch
from torch import nn

import rso
from rso.state_policy import _cannot_project
from conftest import lm_batch, tiny_llama


def regression(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(32, 12, generator=g, dtype=dtype)
    y = x @ torch.randn(12, 4, generator=g, dtype=dtype) / 3  # a learnable (linear) teacher
    return model, x, y


def step(model, opt, x, y, micro=1):
    for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
        ((model(xs) - ys).pow(2).mean() / micro).backward()
    opt.step()
    opt.zero_grad()


def test_merge_at_tau_with_plain_adamw():
    model, x, y = regression(dtype=torch.float64)
    rso.wrap(model, rank=4, tau=3, scale=0.5)
    layer = model[0]
    lr, wd, (beta1, beta2), eps = 1e-2, 1e-2, (0.9, 0.999), 1e-8
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=wd,
                            betas=(beta1, beta2), eps=eps)
    W0, P0 = layer.weight.clone(), layer.P.clone()
    B_param = layer.B
    for _ in range(2):
        step(model, opt, x, y)
    assert torch.equal(layer.weight, W0) and torch.count_nonzero(layer.B) > 0 and layer.B in opt.state
    # The third step: its AdamW update of B by hand from the pre-step values, then the merge W₀ + s·B·P.
    (model(x) - y).pow(2).mean().backward()
    pre = {m: (m.B.detach().clone(), m.B.grad.clone(), m.P.clone(), m.weight.clone(),
               opt.state[m.B]["exp_avg"].clone(), opt.state[m.B]["exp_avg_sq"].clone()) for m in (model[0], model[2])}
    opt.step()
    opt.zero_grad()
    assert rso.state(model)["cycle"] == 1
    for m, (B, g, P, W, exp_avg, exp_avg_sq) in pre.items():
        exp_avg = beta1 * exp_avg + (1 - beta1) * g
        exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
        B3 = B * (1 - lr * wd) - lr * (exp_avg / (1 - beta1 ** 3)) / ((exp_avg_sq / (1 - beta2 ** 3)).sqrt() + eps)
        # The merge runs in fp32 (``effective_weight``), even for float64 weights: a few fp32 roundings of W₀,
        # B, P, the rank-4 product and the sum, so |err| ≤ 8u₃₂·(|W₀| + s·|B||P|) with u₃₂ the fp32 unit roundoff.
        expected = W + 0.5 * B3 @ P
        bound = 8 * torch.finfo(torch.float32).eps / 2 * (W.abs() + 0.5 * B3.abs() @ P.abs())
        assert ((m.weight - expected).abs() <= bound).all(), float(((m.weight - expected).abs() / bound).max())
        assert torch.count_nonzero(m.B) == 0 and not torch.equal(m.P, P)
    assert not torch.equal(layer.P, P0) and layer.B is B_param
    assert layer.B not in opt.state  # Adam restarts its bias correction in the new subspace
    assert model[2].B not in opt.state and model[0].bias in opt.state
    step(model, opt, x, y)
    assert opt.state[layer.B]["step"].item() == 1


def test_float64_merge_keeps_float64_precision():
    from rso.layers import SubspaceLinear
    torch.manual_seed(0)
    layer = SubspaceLinear(8, 6, 2, dtype=torch.float64)
    with torch.no_grad():
        layer.B.normal_()
        layer.P.normal_()
    expected = layer.weight.detach() + layer.scale * layer.B.detach() @ layer.P
    layer.merge_()
    torch.testing.assert_close(layer.weight.detach(), expected)  # float64 tolerances (rtol 1e-7)


def test_gradient_accumulation_counts_optimizer_steps():
    model, x, y = regression()
    rso.wrap(model, rank=4, tau=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    cycles = []
    for _ in range(6):
        step(model, opt, x, y, micro=4)
        cycles.append(rso.state(model)["cycle"])
    assert cycles == [0, 1, 1, 2, 2, 3]


def test_accumulated_equals_full_batch():
    a, x, y = regression(dtype=torch.float64)
    b, _, _ = regression(dtype=torch.float64)
    for m in (a, b):
        rso.wrap(m, rank=4, tau=2)
    oa = torch.optim.SGD([p for p in a.parameters() if p.requires_grad], lr=0.05)
    ob = torch.optim.SGD([p for p in b.parameters() if p.requires_grad], lr=0.05)
    for _ in range(5):
        step(a, oa, x, y)
        step(b, ob, x, y, micro=4)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb)


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    lambda ps: __import__("torch_optimizer").DiffGrad(ps, lr=1e-2),
    lambda ps: torch.optim.RMSprop(ps, lr=1e-2),
], ids=["sgd_momentum", "torch_optimizer_diffgrad", "rmsprop"])
def test_any_optimizer_drives_the_loop_and_reduces_loss(make_opt):
    model, x, y = regression()
    rso.wrap(model, rank=4, tau=5)
    opt = make_opt([p for p in model.parameters() if p.requires_grad])
    first = (model(x) - y).pow(2).mean().item()
    for _ in range(30):
        step(model, opt, x, y)
    assert rso.state(model)["cycle"] == 6
    assert model[0].B not in opt.state or all(
        not torch.is_tensor(v) or v.numel() <= 1 or torch.count_nonzero(v) == 0 for v in opt.state[model[0].B].values())
    assert (model(x) - y).pow(2).mean().item() < 0.7 * first


@pytest.mark.parametrize("policy", ["keep", "project"])
def test_state_policies_keep_and_project(policy):
    model, x, y = regression(dtype=torch.float64)
    rso.wrap(model, rank=4, tau=2, state_on_merge=policy)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    # Replay without merges: Adam's moments after two steps, i.e. just before the merge of step 2.
    replay, _, _ = regression(dtype=torch.float64)
    rso.wrap(replay, rank=4, tau=None)
    ro = torch.optim.Adam([p for p in replay.parameters() if p.requires_grad], lr=1e-2)
    step(model, opt, x, y)
    old_P = [model[i].P.clone() for i in (0, 2)]
    step(model, opt, x, y)  # this step merges
    for _ in range(2):
        step(replay, ro, x, y)
    assert rso.state(model)["cycle"] == 1
    for i, P_old in zip((0, 2), old_P):
        state, before = opt.state[model[i].B], ro.state[replay[i].B]
        assert state["step"].item() == 2 and not torch.equal(model[i].P, P_old)
        if policy == "keep":  # carried unchanged across the merge
            torch.testing.assert_close(state["exp_avg"], before["exp_avg"], rtol=1e-12, atol=0)
            torch.testing.assert_close(state["exp_avg_sq"], before["exp_avg_sq"], rtol=1e-12, atol=0)
        else:  # mapped by R = P_old P_newᵀ (R∘R for the second moment)
            R, R_terms = P_old @ model[i].P.T, P_old.abs() @ model[i].P.abs().T
            u32 = torch.finfo(torch.float32).eps / 2  # the library maps the state in fp32 (R too)
            for key, mat, terms in (("exp_avg", R, R.abs() + R_terms),
                                    ("exp_avg_sq", R * R, R * R + 2 * R.abs() * R_terms)):
                err = (state[key] - before[key] @ mat).abs()
                assert (err <= 4 * u32 * (before[key].abs() @ terms)).all(), key
    assert all(torch.count_nonzero(opt.state[model[i].B]["exp_avg"]) > 0 for i in (0, 2))


def test_proximal_term_adds_B_over_eta():
    model, x, y = regression(dtype=torch.float64)
    twin, _, _ = regression(dtype=torch.float64)
    rso.wrap(model, rank=4, tau=None, proximal=0.5)
    rso.wrap(twin, rank=4, tau=None)
    oa = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ob = torch.optim.SGD([p for p in twin.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        step(model, oa, x, y)
    step(twin, ob, x, y)
    B1 = twin[0].B.detach().clone()
    (twin(x) - y).pow(2).mean().backward()
    expected = B1 - 0.1 * (twin[0].B.grad + B1 / 0.5)
    torch.testing.assert_close(model[0].B.detach(), expected)


def test_explicit_outer_step_and_manual_mode():
    model, x, y = regression()
    rso.wrap(model, rank=4, tau=None)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    for _ in range(4):
        step(model, opt, x, y)
    assert rso.state(model)["cycle"] == 0 and rso.state(model)["steps_to_merge"] is None
    before = model(x).detach()
    rso.outer_step(model, opt)
    assert rso.state(model)["cycle"] == 1 and model[0].B not in opt.state
    torch.testing.assert_close(model(x), before, atol=1e-6, rtol=1e-5)


def test_svd_projection_uses_the_full_gradient_of_the_last_inner_step():
    model, x, y = regression(dtype=torch.float64)
    rso.wrap(model, rank=4, tau=3, projection="svd")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(2):
        step(model, opt, x, y)
    layer = model[0]
    assert layer._capture is not None  # armed for the third (last inner) step only
    # The true full-weight gradient on that step, from autograd on the unwrapped equivalent.
    W = layer.effective_weight().requires_grad_(True)
    h = torch.tanh(nn.functional.linear(x, W, layer.bias))
    (model[2](h) - y).pow(2).mean().backward()
    model.zero_grad()
    step(model, opt, x, y, micro=2)  # accumulation: captured over both micro-batches
    assert layer._capture is None and rso.state(model)["cycle"] == 1
    _, _, vh = torch.linalg.svd(W.grad)
    torch.testing.assert_close(layer.P.T @ layer.P, vh[:4].T @ vh[:4])


def test_svd_capture_memory_is_only_on_the_first_step_and_the_last_inner_steps():
    model = tiny_llama()
    rso.wrap(model, rank=8, tau=3, projection="svd")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = lm_batch()
    first = rso.memory.measure_step(model, batch, opt)       # step 1: keeps x, its gradient picks cycle 0's P
    normal = rso.memory.measure_step(model, batch, opt)      # step 2: not the last of its cycle
    last = rso.memory.measure_step(model, batch, opt)        # step 3: keeps x, merges with SVD
    after = rso.memory.measure_step(model, batch, opt)
    # Extra activations = the inputs x of the wrapped layers (shared inputs once: qkv, o, gate/up, down).
    width = model.config.hidden_size * 3 + model.config.intermediate_size
    extra = 2 * 8 * width * model.config.num_hidden_layers * 4
    assert first.activations - normal.activations == extra
    assert last.activations - normal.activations == extra
    assert after.activations == normal.activations
    assert rso.state(model)["cycle"] == 1


@pytest.mark.parametrize("total_steps, random_fraction, armed_steps", [
    (8, 0.5, [0, 1]),  # switch at step 4: cycles starting at 0 and 2 use SVD, captured on steps 1 and 2
    (6, 0.5, [0, 1]),  # switch at 3: the cycle starting at 2 still uses SVD
    (5, 0.8, [0]),     # switch at 1: only cycle 0 (its P from step 1's gradient)
    (8, 1.0, []),      # GoLore@100%: never SVD, nothing captured
])
def test_hybrid_is_svd_then_stiefel(total_steps, random_fraction, armed_steps):
    model, x, y = regression(dtype=torch.float64)
    rso.wrap(model, rank=4, tau=2, projection="hybrid", total_steps=total_steps, random_fraction=random_fraction)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    armed = []
    for i in range(8):
        if model[0]._capture is not None:  # armed for the coming step i + 1 (0-based: i)
            armed.append(i)
        step(model, opt, x, y)
    assert armed == armed_steps


@pytest.mark.parametrize("projection", ["svd", "hybrid"])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_first_cycle_of_a_gradient_sampler_uses_the_first_gradient(projection, clip):
    """Like GaLore: cycle 0's P is the SVD of step 1's gradient, and step 1 already moves in it."""
    from rso.projections import SVDSampler, generator_for
    model, x, y = regression(dtype=torch.float64)
    plain = copy.deepcopy(model)
    rso.wrap(model, rank=4, tau=3, projection=projection, scale=0.5,
             **({"total_steps": 30} if projection == "hybrid" else {}))
    random_P = model[0].P.clone()
    (plain(x) - y).pow(2).mean().backward()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    (model(x) - y).pow(2).mean().backward()
    factor = 1.0
    if clip is not None:
        total = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
        factor = clip / (float(total) + 1e-6)
        assert factor < 1
    opt.step()
    for i in (0, 2):
        layer, G = model[i], plain[i].weight.grad
        P = SVDSampler().sample(4, G.shape[1], generator_for(0), gradient=G, dtype=torch.float64)
        torch.testing.assert_close(layer.P, P, rtol=0, atol=1e-12)
        assert not torch.allclose(layer.P, random_P) if i == 0 else True
        torch.testing.assert_close(layer.B, -0.1 * factor * 0.5 * G @ P.T, rtol=1e-10, atol=1e-14)
        assert layer._capture is None                  # the step's full gradient is not kept
    assert rso.state(model)["cycle"] == 0 and rso.state(model)["step"] == 1


def test_first_cycle_of_stiefel_stays_the_wrap_time_sample():
    model, x, y = regression(dtype=torch.float64)
    rso.wrap(model, rank=4, tau=3)
    P0 = model[0].P.clone()
    assert model[0]._capture is None
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    step(model, opt, x, y)
    assert torch.equal(model[0].P, P0)


def test_hf_model_loop_runs_and_deleted_model_leaves_inert_hooks():
    import gc

    from torch.optim import optimizer as optim_module
    model = rso.wrap(tiny_llama(), rank=8, tau=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(4):
        model(**lm_batch()).loss.backward()
        opt.step()
        opt.zero_grad()
    assert rso.state(model)["cycle"] == 2
    from rso.wrapping import _LOOP_ATTR
    ids = [h.id for h in getattr(model, _LOOP_ATTR)._handles]
    hooks = (optim_module._global_optimizer_post_hooks, optim_module._global_optimizer_pre_hooks)
    del model, opt
    gc.collect()  # the collected loop's hooks are inert and retired, not removed by the collector ...
    assert all(any(i in d for d in hooks) for i in ids)
    other = rso.wrap(nn.Sequential(nn.Linear(4, 4)), rank=2, tau=2)  # ... but by the next attach
    assert not any(i in d for d in hooks for i in ids)
    del other


def test_a_collection_during_an_optimizer_step_does_not_break_the_hook_iteration():
    """A wrapped model collected while torch iterates the global optimizer hooks (here: from a hook that runs
    first) must not mutate the dict being iterated."""
    import gc

    from torch.optim.optimizer import register_optimizer_step_pre_hook
    doomed = rso.wrap(nn.Sequential(nn.Linear(4, 4)), rank=2, tau=2)
    ref = [doomed]
    del doomed

    def collect(optimizer, args, kwargs):
        ref.clear()
        gc.collect()
    handle = register_optimizer_step_pre_hook(collect)
    try:
        model, x, y = regression()
        rso.wrap(model, rank=4, tau=2)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        step(model, opt, x, y)
    finally:
        handle.remove()
    assert rso.state(model)["step"] == 1


# ---------------------------------------------------------------- found by mutation testing (docs/mutation.md)
def full_weight_gradient(model, x, y):
    """∂loss/∂W of model[0] at W = W₀ + s·B·P, by autograd on the unwrapped layer (model's grads left zero)."""
    layer = model[0]
    W = layer.effective_weight().requires_grad_(True)
    h = torch.tanh(nn.functional.linear(x, W, layer.bias))
    (model[2](h) - y).pow(2).mean().backward()
    model.zero_grad()
    return W.grad


def row_space(P):
    return P.T @ P


@pytest.mark.parametrize("tau", [1, 2])
def test_svd_merges_use_the_gradient_of_their_own_step_at_short_cycles(tau):
    """τ = 1: step 1's gradient picks cycle 0's P and, left captured, cycle 1's too; τ = 2: cycle 1's P comes
    from step 2's gradient alone (step 1's capture was taken, not accumulated into step 2's)."""
    model, x, y = regression(dtype=torch.float64)
    rso.wrap(model, rank=4, tau=tau, projection="svd")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    grads = []
    for _ in range(2 * tau):
        grads.append(full_weight_gradient(model, x, y))
        step(model, opt, x, y)
        if rso.state(model)["step"] % tau == 0:  # right after a merge: P is the SVD of this step's gradient
            _, _, vh = torch.linalg.svd(grads[-1])
            torch.testing.assert_close(row_space(model[0].P), row_space(vh[:4]))
    assert rso.state(model)["cycle"] == 2


def test_first_cycle_with_a_zero_gradient_keeps_B_zero_and_finite():
    """‖s·G₁ P_oldᵀ‖ = 0: B's gradient is rescaled by 1, not 0/0."""
    model, x, y = regression(dtype=torch.float64)
    rso.wrap(model, rank=4, tau=3, projection="svd")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    (0.0 * model(x).sum()).backward()
    opt.step()
    for i in (0, 2):
        assert torch.equal(model[i].B.grad, torch.zeros_like(model[i].B)) and torch.count_nonzero(model[i].B) == 0


def test_first_cycle_of_a_bf16_model_from_its_fp32_captured_gradient():
    """bf16 weights and P, the captured full gradient in fp32: cycle 0's P is that gradient's SVD (in bf16) and
    B's gradient its projection, within bf16 rounding."""
    from rso.projections import SVDSampler, generator_for
    model, x, y = regression(dtype=torch.bfloat16)
    rso.wrap(model, rank=4, tau=3, projection="svd")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    (model(x) - y).pow(2).mean().backward()
    G = model[0]._capture.grad.clone()
    assert G.dtype == torch.float32 and model[0].P.dtype == torch.bfloat16
    opt.step()
    P = SVDSampler().sample(4, G.shape[1], generator_for(0), gradient=G, dtype=torch.float32)
    u = torch.finfo(torch.bfloat16).eps
    assert (model[0].P.float() - P).abs().max() <= 2 * u
    want = model[0].scale * G @ model[0].P.float().T
    assert (model[0].B.grad.float() - want).abs().max() <= 8 * u * want.abs().max()


def test_project_policy_maps_bf16_state_in_fp32():
    """A bf16 model's Adam moments (bf16) are mapped as fp32 products: (m.float() @ R).to(bf16), R = P_old P_newᵀ
    in fp32, bit for bit."""
    model, x, y = regression(dtype=torch.bfloat16)
    rso.wrap(model, rank=4, tau=None, state_on_merge="project")
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        step(model, opt, x, y)
    layer = model[0]
    before = {k: opt.state[layer.B][k].clone() for k in ("exp_avg", "exp_avg_sq")}
    assert before["exp_avg"].dtype == torch.bfloat16
    P_old = layer.P.clone()
    rso.outer_step(model, opt)
    R = P_old.float() @ layer.P.float().T
    for key, mat in (("exp_avg", R), ("exp_avg_sq", R * R)):
        assert torch.equal(opt.state[layer.B][key], (before[key].float() @ mat).to(torch.bfloat16)), key


class CountingSGD(torch.optim.SGD):
    """SGD that keeps a per-element integer count beside the parameters (a state 'project' cannot map)."""

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p].setdefault("visits", torch.zeros_like(p, dtype=torch.int32)).add_(1)
        return super().step(closure)


def test_project_policy_refuses_integer_state_before_anything_changes():
    model, x, y = regression()
    rso.wrap(model, rank=4, tau=None, state_on_merge="project")
    opt = CountingSGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    step(model, opt, x, y)
    del opt.state[model[0].B]  # the first layer's B has no state: the second one's is still checked
    before = [(model[i].weight.clone(), model[i].B.detach().clone(), model[i].P.clone()) for i in (0, 2)]
    with pytest.raises(ValueError) as err:
        rso.outer_step(model, opt)
    assert str(err.value) == (
        "rso: state_on_merge='project' cannot map the optimizer state of CountingSGD: its state 'visits' is "
        "torch.int32, not a floating-point moment; " + _cannot_project(None, "").split("; ", 1)[1])
    for i, (W, B, P) in zip((0, 2), before):
        assert torch.equal(model[i].weight, W) and torch.equal(model[i].B, B) and torch.equal(model[i].P, P)
    assert rso.state(model)["cycle"] == 0


@pytest.mark.parametrize("size", [1.0, 1e6])
def test_first_cycle_when_the_gradient_misses_the_random_subspace(size):
    """A one-example batch: G = g xᵀ has row space span(x). With the wrap-time P orthogonal to x, B's gradient
    is 0 up to rounding (nothing to carry over, c = 1) and, after the SVD moves P onto x, B's gradient is
    s·G P_newᵀ. The rounding floor scales with ‖s·G‖, so a large gradient (size 1e6) is no different."""
    from rso.projections import SVDSampler, generator_for
    model, x, y = regression(dtype=torch.float64)
    x, y = x[:1], size * y[:1]
    rso.wrap(model, rank=4, tau=3, projection="svd", scale=0.5)
    basis, _ = torch.linalg.qr(torch.cat([x.T, torch.randn(12, 4, dtype=torch.float64,
                                                           generator=torch.Generator().manual_seed(3))], 1))
    with torch.no_grad():
        model[0].P.copy_(basis[:, 1:5].T)  # four orthonormal rows orthogonal to x
    G = full_weight_gradient(model, x, y)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    (model(x) - y).pow(2).mean().backward()
    assert model[0].B.grad.abs().max() < 1e-12 * size
    opt.step()
    P = SVDSampler().sample(4, 12, generator_for(0), gradient=G, dtype=torch.float64)
    torch.testing.assert_close(model[0].P, P, rtol=0, atol=1e-12)
    want = 0.5 * G @ P.T
    assert want.abs().max() > 1e-3 * size
    torch.testing.assert_close(model[0].B.grad, want, rtol=1e-10, atol=1e-14 * size)


def test_explicit_outer_step_without_an_optimizer_under_project():
    """No optimizer, so no state to map: the merge and resample run, nothing is checked."""
    model, x, y = regression()
    rso.wrap(model, rank=4, tau=None, state_on_merge="project")
    before = model(x).detach()
    rso.outer_step(model)
    assert rso.state(model)["cycle"] == 1
    torch.testing.assert_close(model(x), before, atol=1e-6, rtol=1e-5)


def test_project_policy_checks_every_member_of_a_shared_group():
    """q, k and v share one P: with only k's B holding (integer) state, q's stateless B before it in the group
    does not end the check."""
    model = tiny_llama()
    rso.wrap(model, rank=8, tau=None, state_on_merge="project")
    opt = CountingSGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**lm_batch()).loss.backward()
    opt.step()
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.P is attn.k_proj.P
    for _, layer in rso.subspace_layers(model):
        if layer is not attn.k_proj:
            del opt.state[layer.B]
    P = attn.q_proj.P.clone()
    with pytest.raises(ValueError, match="CountingSGD: its state 'visits' is torch.int32"):
        rso.outer_step(model, opt)
    assert torch.equal(attn.q_proj.P, P) and rso.state(model)["cycle"] == 0


def test_first_cycle_moves_every_member_of_a_shared_group_past_one_with_a_frozen_B():
    """q, k and v share one P. With q's B frozen (no B.grad), k's and v's B gradients still move to the new
    subspace, exactly as when q trains."""
    grads = []
    for freeze_q in (False, True):
        model = tiny_llama(dtype=torch.float64)
        rso.wrap(model, rank=4, tau=3, projection="svd", seed=0)
        attn = model.model.layers[0].self_attn
        assert attn.q_proj.P is attn.k_proj.P is attn.v_proj.P
        attn.q_proj.B.requires_grad_(not freeze_q)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        model(**lm_batch()).loss.backward()
        before = attn.k_proj.B.grad.clone()
        opt.step()  # the first cycle: P from the step's gradient, B's gradients rewritten into it
        assert (attn.q_proj.B.grad is None) == freeze_q
        grads.append((before, attn.k_proj.B.grad.clone(), attn.v_proj.B.grad.clone()))
    (before, k, v), (_, k_frozen, v_frozen) = grads
    assert not torch.allclose(k, before)
    torch.testing.assert_close(k_frozen, k, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(v_frozen, v, rtol=1e-12, atol=1e-15)

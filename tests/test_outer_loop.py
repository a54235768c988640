"""The outer loop under ordinary training loops: merge timing, optimizer state, accumulation, SVD."""
import pytest
import torch
from torch import nn

import rso
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
    model, x, y = regression()
    rso.wrap(model, rank=4, tau=3)
    layer = model[0]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    W0, P0 = layer.weight.clone(), layer.P.clone()
    B_param = layer.B
    for _ in range(2):
        step(model, opt, x, y)
    assert torch.equal(layer.weight, W0) and torch.count_nonzero(layer.B) > 0 and layer.B in opt.state
    expected_W = layer.weight + layer.scale * layer.B.detach() @ layer.P  # before the third step's update
    step(model, opt, x, y)
    assert rso.state(model)["cycle"] == 1
    assert not torch.equal(layer.weight, W0) and not torch.equal(layer.P, P0)
    assert torch.count_nonzero(layer.B) == 0 and layer.B is B_param
    assert layer.B not in opt.state  # Adam restarts its bias correction in the new subspace
    assert model[2].B not in opt.state and model[0].bias in opt.state
    assert not torch.allclose(layer.weight, expected_W)  # the third step's update was merged too
    step(model, opt, x, y)
    assert opt.state[layer.B]["step"].item() == 1


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


def test_state_policies_keep_and_project():
    for policy in ("keep", "project"):
        model, x, y = regression(dtype=torch.float64)
        rso.wrap(model, rank=4, tau=2, state_on_merge=policy)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        step(model, opt, x, y)
        layer = model[0]
        old_P = layer.P.clone()
        step(model, opt, x, y)  # this step merges
        state = opt.state[layer.B]
        assert state["step"].item() == 2
        if policy == "keep":
            continue
        # Replay: the moments before projection, mapped by R = P_old P_newᵀ (R∘R for the second moment).
        replay, _, _ = regression(dtype=torch.float64)
        rso.wrap(replay, rank=4, tau=None)
        ro = torch.optim.Adam([p for p in replay.parameters() if p.requires_grad], lr=1e-2)
        step(replay, ro, x, y)
        step(replay, ro, x, y)
        R = old_P @ layer.P.T
        torch.testing.assert_close(state["exp_avg"], ro.state[replay[0].B]["exp_avg"] @ R)
        torch.testing.assert_close(state["exp_avg_sq"], ro.state[replay[0].B]["exp_avg_sq"] @ (R * R))


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


def test_svd_capture_memory_is_only_on_the_last_inner_step():
    model = tiny_llama()
    rso.wrap(model, rank=8, tau=2, projection="svd")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = lm_batch()
    normal = rso.memory.measure_step(model, batch, opt)      # step 1: not the last of its cycle
    capture = rso.memory.measure_step(model, batch, opt)     # step 2: keeps x, merges with SVD
    after = rso.memory.measure_step(model, batch, opt)
    # Extra activations = the inputs x of the wrapped layers (shared inputs once: qkv, o, gate/up, down).
    width = model.config.hidden_size * 3 + model.config.intermediate_size
    extra = 2 * 8 * width * model.config.num_hidden_layers * 4
    assert capture.activations - normal.activations == extra
    assert after.activations == normal.activations
    assert rso.state(model)["cycle"] == 1


def test_hybrid_is_svd_then_stiefel():
    model, x, y = regression(dtype=torch.float64)
    rso.wrap(model, rank=4, tau=2, projection="hybrid", total_steps=8, random_fraction=0.5)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    armed = []
    for _ in range(8):
        armed.append(model[0]._capture is not None)
        step(model, opt, x, y)
    # Cycles starting at steps 2 (< 4) use SVD: capture on step 2 only; cycles at 4, 6, 8 are Stiefel.
    assert armed == [False, True, False, False, False, False, False, False]


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
    before = len(optim_module._global_optimizer_post_hooks)
    del model, opt
    gc.collect()
    assert len(optim_module._global_optimizer_post_hooks) < before

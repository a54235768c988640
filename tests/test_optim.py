"""rso.optim: projected updates against hand computation, state policies, resume, galore-torch groups, memory."""
import copy
import io
import math
import pickle

import pytest
import torch
from torch import nn

from conftest import lm_batch, tiny_llama
from rso.optim import (GaLoreAdamW, GaLoreSGD, GoLoreAdamW, GoLoreSGD, SubspaceAdamW, SubspaceSGD)
from rso.projections import StiefelSampler, generator_for

F64 = torch.float64


# ---------------------------------------------------------------------------- helpers
def least_squares(m, n, k=12, seed=0):
    """½‖A X − Y‖² with A (k × m), Y (k × n): the gradient is Aᵀ(AX − Y)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(k, m, generator=g, dtype=F64)
    Y = torch.randn(k, n, generator=g, dtype=F64)
    X = nn.Parameter(torch.randn(m, n, generator=g, dtype=F64))
    return A, Y, X


def backward(A, Y, X):
    X.grad = None
    (0.5 * ((A @ X - Y) ** 2).sum()).backward()
    return X.grad.detach().clone()


def low(G, P, side):
    return P @ G if side == "left" else G @ P.T


def back(D, P, side):
    return P.T @ D if side == "left" else D @ P


# (shape, proj_side, resolved side)
SIDES = [((7, 4), "auto", "right"), ((4, 7), "auto", "left"), ((7, 4), "left", "left"), ((4, 7), "right", "right")]


# ---------------------------------------------------------------------------- AdamW by hand
@pytest.mark.parametrize("shape,proj_side,side", SIDES)
@pytest.mark.parametrize("projection", ["svd", "stiefel"])
def test_adamw_projected_update_matches_hand_computation(shape, proj_side, side, projection):
    m, n = shape
    A, Y, X = least_squares(m, n)
    lr, betas, eps, wd, scale, r = 0.05, (0.8, 0.95), 1e-8, 0.1, 0.5, 2
    opt = SubspaceAdamW([{"params": [X], "rank": r, "update_proj_gap": 100, "scale": scale,
                          "projection": projection, "proj_side": proj_side}],
                        lr=lr, betas=betas, eps=eps, weight_decay=wd)
    x_ref = X.detach().clone()
    mom = vel = None
    for t in range(1, 6):
        G = backward(A, Y, X)
        opt.step()
        P = opt.state[X]["proj"]
        dim = m if side == "left" else n
        assert P.shape == (r, dim)
        if t == 1 and projection == "svd":
            # P spans the top-r singular subspace of the first gradient on the projected side.
            U, _, Vh = torch.linalg.svd(G)
            basis = U[:, :r].T if side == "left" else Vh[:r]
            torch.testing.assert_close(P.T @ P, basis.T @ basis, atol=1e-5, rtol=0)
        R = low(G, P, side)
        mom = (1 - betas[0]) * R if mom is None else betas[0] * mom + (1 - betas[0]) * R
        vel = (1 - betas[1]) * R * R if vel is None else betas[1] * vel + (1 - betas[1]) * R * R
        mhat, vhat = mom / (1 - betas[0] ** t), vel / (1 - betas[1] ** t)
        x_ref = x_ref * (1 - lr * wd) - lr * scale * back(mhat / (vhat.sqrt() + eps), P, side)
        torch.testing.assert_close(X.detach(), x_ref, atol=1e-12, rtol=0)
    st = opt.state[X]
    assert st["exp_avg"].shape == ((r, n) if side == "left" else (m, r))
    assert st["step"] == 5 and st["cycle"] == 0
    # Sanity: a projected update differs from the full-rank one (the test can tell them apart).
    A2, Y2, X2 = least_squares(m, n)
    full = torch.optim.AdamW([X2], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    for _ in range(5):
        backward(A2, Y2, X2)
        full.step()
    assert (X2.detach() - X.detach()).abs().max() > 1e-3


@pytest.mark.parametrize("shape,proj_side,side", SIDES)
@pytest.mark.parametrize("nesterov,dampening", [(False, 0.0), (False, 0.9), (True, 0.0)])
def test_sgd_projected_update_matches_hand_computation(shape, proj_side, side, nesterov, dampening):
    m, n = shape
    A, Y, X = least_squares(m, n, seed=1)
    lr, mu, wd, scale, r = 0.02, 0.9, 0.01, 2.0, 3
    opt = SubspaceSGD([{"params": [X], "rank": r, "update_proj_gap": 100, "scale": scale,
                        "projection": "stiefel", "proj_side": proj_side, "seed": 5}],
                      lr=lr, momentum=mu, dampening=dampening, weight_decay=wd, nesterov=nesterov)
    x_ref = X.detach().clone()
    buf = None
    dim = m if side == "left" else n
    # Stiefel: P is a pure function of (seed, parameter index, cycle).
    P = StiefelSampler().sample(r, dim, generator_for(5, 0, 0), dtype=F64)
    for _ in range(4):
        G = backward(A, Y, X) + wd * X.detach()
        opt.step()
        assert torch.equal(opt.state[X]["proj"], P)
        R = low(G, P, side)
        buf = R.clone() if buf is None else mu * buf + (1 - dampening) * R
        d = R + mu * buf if nesterov else buf
        x_ref = x_ref - lr * scale * back(d, P, side)
        torch.testing.assert_close(X.detach(), x_ref, atol=1e-12, rtol=0)


def test_plain_groups_match_torch_optimizers():
    for make_ours, make_ref in [
        (lambda p: SubspaceAdamW(p, lr=0.03, betas=(0.85, 0.99), weight_decay=0.05),
         lambda p: torch.optim.AdamW(p, lr=0.03, betas=(0.85, 0.99), weight_decay=0.05, foreach=False)),
        (lambda p: SubspaceSGD(p, lr=0.01, momentum=0.9, weight_decay=0.1, nesterov=True),
         lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=0.1, nesterov=True, foreach=False)),
        # weight decay 1 exactly (the decay is applied for every non-zero value)
        (lambda p: SubspaceAdamW(p, lr=0.03, weight_decay=1.0),
         lambda p: torch.optim.AdamW(p, lr=0.03, weight_decay=1.0, foreach=False)),
        (lambda p: SubspaceSGD(p, lr=0.01, weight_decay=1.0), lambda p: torch.optim.SGD(p, lr=0.01, weight_decay=1.0)),
    ]:
        A, Y, X1 = least_squares(5, 3, seed=2)
        _, _, X2 = least_squares(5, 3, seed=2)
        o1, o2 = make_ours([X1]), make_ref([X2])
        for _ in range(6):
            backward(A, Y, X1), backward(A, Y, X2)
            o1.step(), o2.step()
        torch.testing.assert_close(X1.detach(), X2.detach(), atol=1e-13, rtol=1e-12)
        assert (X1.detach() - least_squares(5, 3, seed=2)[2].detach()).abs().max() > 1e-3


# ---------------------------------------------------------------------------- subspace switches
def _run_to_switch(opt_cls, policy, side, **kw):
    """Three steps with τ = 2: the third starts cycle 1. Returns the states around the switch."""
    shape = (7, 4) if side == "right" else (4, 7)
    A, Y, X = least_squares(*shape, seed=3)
    opt = opt_cls([{"params": [X], "rank": 2, "update_proj_gap": 2, "projection": "stiefel",
                    "state_on_switch": policy, "proj_side": side, "seed": 11}], lr=0.05, **kw)
    for _ in range(2):
        backward(A, Y, X)
        opt.step()
    before = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[X].items()}
    x_before = X.detach().clone()
    G = backward(A, Y, X)
    opt.step()
    return opt, X, before, x_before, G


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("policy", ["keep", "reset", "project"])
def test_adamw_state_on_switch(policy, side):
    betas, eps, lr = (0.9, 0.999), 1e-8, 0.05
    opt, X, before, x_before, G = _run_to_switch(SubspaceAdamW, policy, side, betas=betas, eps=eps)
    st = opt.state[X]
    P_old, P_new = before["proj"], st["proj"]
    assert st["cycle"] == 1 and before["cycle"] == 0
    assert (P_new - P_old).abs().max() > 1e-2
    R = low(G, P_new, side)
    m_old, v_old = before["exp_avg"], before["exp_avg_sq"]
    Q = P_new @ P_old.T
    if policy == "keep":
        m0, v0, t = m_old, v_old, 3
    elif policy == "reset":
        m0, v0, t = torch.zeros_like(m_old), torch.zeros_like(v_old), 1
    else:
        m0 = Q @ m_old if side == "left" else m_old @ Q.T
        v0 = (Q * Q) @ v_old if side == "left" else v_old @ (Q * Q).T
        t = 3
    m_new = betas[0] * m0 + (1 - betas[0]) * R
    v_new = betas[1] * v0 + (1 - betas[1]) * R * R
    torch.testing.assert_close(st["exp_avg"], m_new, atol=1e-14, rtol=0)
    torch.testing.assert_close(st["exp_avg_sq"], v_new, atol=1e-14, rtol=0)
    assert st["moment_step"] == t
    d = (m_new / (1 - betas[0] ** t)) / ((v_new / (1 - betas[1] ** t)).sqrt() + eps)
    torch.testing.assert_close(X.detach(), x_before - lr * back(d, P_new, side), atol=1e-12, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("policy", ["keep", "reset", "project"])
@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_sgd_state_on_switch(policy, side, momentum):
    opt, X, before, x_before, G = _run_to_switch(SubspaceSGD, policy, side, momentum=momentum)
    st = opt.state[X]
    P_old, P_new = before["proj"], st["proj"]
    R = low(G, P_new, side)
    if momentum == 0:  # plain SGD: no buffer to keep, reset or project
        assert "momentum_buffer" not in before and "momentum_buffer" not in st
        torch.testing.assert_close(X.detach(), x_before - 0.05 * back(R, P_new, side), atol=1e-12, rtol=0)
        return
    b_old = before["momentum_buffer"]
    if policy == "keep":
        buf = 0.9 * b_old + R
    elif policy == "reset":
        buf = R
    else:
        Q = P_new @ P_old.T
        buf = 0.9 * (Q @ b_old if side == "left" else b_old @ Q.T) + R
    torch.testing.assert_close(st["momentum_buffer"], buf, atol=1e-14, rtol=0)
    torch.testing.assert_close(X.detach(), x_before - 0.05 * back(buf, P_new, side), atol=1e-12, rtol=0)


def test_sgd_defaults_options_and_errors():
    X = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    assert {k: SubspaceSGD([X]).defaults[k] for k in ("lr", "momentum", "dampening", "weight_decay", "nesterov")} \
        == {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False}
    group = SubspaceSGD([{"params": [X], "rank": 2}], projection="stiefel", proj_side="right").param_groups[0]
    assert (group["projection"], group["proj_side"]) == ("stiefel", "right")
    SubspaceSGD([X], lr=0.0)
    SubspaceSGD([X], lr=torch.tensor(0.1))
    for kw, message in ((dict(lr=-1.0), r"lr must be >= 0, got -1\.0"),
                        (dict(lr=torch.tensor(-1.0)), r"lr must be >= 0, got tensor\(-1\.\)"),
                        (dict(momentum=1.0), r"momentum must be in \[0, 1\), got 1\.0"),
                        (dict(momentum=-0.5), r"momentum must be in \[0, 1\), got -0\.5"),
                        (dict(weight_decay=-0.5), r"weight_decay must be >= 0, got -0\.5"),
                        (dict(nesterov=True), r"nesterov=True needs momentum > 0 and dampening = 0")):
        with pytest.raises(ValueError, match=f"^{message}$"):
            SubspaceSGD([X], **kw)


def test_adamw_edge_options_and_errors():
    X = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    for kw in (dict(lr=0.0), dict(lr=torch.tensor(0.1)), dict(betas=(0.0, 0.0)), dict(eps=0.0)):
        SubspaceAdamW([X], **kw)
    for kw, message in ((dict(lr=-1.0), r"lr must be >= 0, got -1\.0"),
                        (dict(lr=torch.tensor(-1.0)), r"lr must be >= 0, got tensor\(-1\.\)"),
                        (dict(betas=(0.9, 1.0)), r"betas must be two numbers in \[0, 1\), got \(0\.9, 1\.0\)"),
                        (dict(betas=(-0.1, 0.9)), r"betas must be two numbers in \[0, 1\), got \(-0\.1, 0\.9\)"),
                        (dict(betas=(0.9, 0.99, 0.9)), r"betas must be two numbers in \[0, 1\), got \(0\.9, 0\.99, 0\.9\)"),
                        (dict(eps=-1.0), r"eps must be >= 0, got -1\.0"),
                        (dict(weight_decay=-1.0), r"weight_decay must be >= 0, got -1\.0"),
                        (dict(correct_bias="yes"), r"correct_bias must be a bool, got 'yes'")):
        with pytest.raises(ValueError, match=f"^{message}$"):
            SubspaceAdamW([X], **kw)


@pytest.mark.parametrize("make", [SubspaceAdamW, SubspaceSGD])
def test_copied_and_pickled_optimizers_step_like_the_original_and_keep_their_proj_side(make):
    A, Y, X = least_squares(4, 7, seed=3)
    opt = make([{"params": [X], "rank": 2, "update_proj_gap": 2, "projection": "stiefel", "seed": 11}], lr=0.05,
               proj_side="right")
    backward(A, Y, X)
    opt.step()
    twins = [copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))]
    for o in [opt, *twins]:
        x = o.param_groups[0]["params"][0]
        for _ in range(3):  # through a new cycle: a copy draws with samplers of its own
            backward(A, Y, x)
            o.step()
    for twin in twins:
        X2 = twin.param_groups[0]["params"][0]
        assert X2 is not X and torch.equal(X2, X)
        twin.add_param_group({"params": [nn.Parameter(torch.zeros(5, 3, dtype=torch.float64))], "rank": 2})
        assert twin.param_groups[1]["proj_side"] == "right"


@pytest.mark.parametrize("make", [SubspaceAdamW, SubspaceSGD])
def test_optimizer_pickled_before_proj_side_was_saved_adds_groups_on_the_auto_side(make):
    """A pickle from before ``_default_proj_side`` was part of the state loads with the old default, ``auto``."""
    _, _, X = least_squares(4, 7, seed=3)
    opt = make([{"params": [X], "rank": 2}], lr=0.05, proj_side="left")
    old_state = {k: v for k, v in opt.__getstate__().items() if k != "_default_proj_side"}
    old = make.__new__(make)
    old.__setstate__(old_state)
    old.add_param_group({"params": [nn.Parameter(torch.zeros(5, 3, dtype=F64))], "rank": 2})
    assert [g["proj_side"] for g in old.param_groups] == ["left", "auto"]


def test_project_policy_is_exact_for_the_first_moment_in_full_space():
    """With orthonormal rows, the carried momentum is the old full-space momentum seen through P_new."""
    opt, X, before, _, G = _run_to_switch(SubspaceSGD, "project", "left", momentum=0.5)
    P_old, P_new = before["proj"], opt.state[X]["proj"]
    full_old = P_old.T @ before["momentum_buffer"]                  # m × n
    carried = opt.state[X]["momentum_buffer"] - P_new @ G            # 0.5·(carried old buffer)
    torch.testing.assert_close(carried, 0.5 * (P_new @ full_old), atol=1e-14, rtol=0)


def test_cycles_start_every_gap_steps_and_at_the_hybrid_switch():
    A, Y, X = least_squares(8, 5, seed=4)
    # total 10, random_fraction 0.25 → SVD before step round(7.5) = 8, Stiefel from step 8 on.
    opt = SubspaceSGD([{"params": [X], "rank": 2, "update_proj_gap": 3, "projection": "hybrid",
                        "total_steps": 10, "random_fraction": 0.25, "seed": 2}], lr=0.01)
    cycles, projs, grads = [], [], []
    for _ in range(10):
        grads.append(backward(A, Y, X))
        opt.step()
        cycles.append(opt.state[X]["cycle"])
        projs.append(opt.state[X]["proj"].clone())
    # Cycles start at steps 0, 3, 6 (every τ), 8 (the switch to random), 9 (τ after 6).
    assert cycles == [0, 0, 0, 1, 1, 1, 2, 2, 3, 4]
    for step in (0, 3, 6):   # SVD cycles: top right singular vectors of that step's gradient (m ≥ n: right)
        _, _, Vh = torch.linalg.svd(grads[step])
        torch.testing.assert_close(projs[step].T @ projs[step], Vh[:2].T @ Vh[:2], atol=1e-5, rtol=0)
    for step, cycle in ((8, 3), (9, 4)):  # Stiefel cycles: a function of (seed, index, cycle) only
        expected = StiefelSampler().sample(2, 5, generator_for(2, 0, cycle), dtype=F64)
        assert torch.equal(projs[step], expected)


def test_random_projections_depend_on_seed_and_parameter_index():
    A, Y, X1 = least_squares(6, 6, seed=5)
    X2 = nn.Parameter(X1.detach().clone())
    opt = GoLoreSGD([{"params": [X1, X2], "rank": 2, "seed": 3}], lr=0.01)
    X1.grad = torch.ones_like(X1)
    X2.grad = torch.ones_like(X2)
    opt.step()
    P1, P2 = opt.state[X1]["proj"], opt.state[X2]["proj"]
    assert torch.equal(P1, StiefelSampler().sample(2, 6, generator_for(3, 0, 0), dtype=F64))
    assert torch.equal(P2, StiefelSampler().sample(2, 6, generator_for(3, 1, 0), dtype=F64))
    assert (P1 - P2).abs().max() > 1e-2


# ---------------------------------------------------------------------------- resume
def _groups(params):
    a, b, c, d = params
    return [{"params": [a], "rank": 2, "update_proj_gap": 3, "projection": "svd"},
            {"params": [b], "rank": 3, "update_proj_gap": 4, "projection": "stiefel",
             "state_on_switch": "project", "proj_side": "left"},
            {"params": [c], "rank": 2, "update_proj_gap": 2, "projection": "hybrid", "total_steps": 14,
             "random_fraction": 0.5, "state_on_switch": "reset", "seed": 9},
            {"params": [d]}]


def _params(seed=6):
    g = torch.Generator().manual_seed(seed)
    shapes = [(9, 5), (5, 9), (6, 6), (6,)]
    return [nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]


def _loss(params, t):
    g = torch.Generator().manual_seed(100 + t)      # a different least-squares batch every step
    total = 0
    for p in params:
        shape = p.shape if p.dim() == 2 else (1, p.shape[0])
        A = torch.randn(4, shape[0], generator=g)
        Y = torch.randn(4, shape[1], generator=g)
        total = total + 0.5 * ((A @ p.reshape(shape) - Y) ** 2).sum()
    return total


@pytest.mark.parametrize("make", [
    lambda groups: SubspaceAdamW(groups, lr=0.01, weight_decay=0.01),
    lambda groups: SubspaceSGD(groups, lr=0.01, momentum=0.9),
    lambda groups: GaLoreAdamW(groups, lr=0.01, weight_decay=0.01),             # compat="galore-torch"
], ids=["adamw", "sgd", "galore-adamw"])
def test_state_dict_round_trip_resumes_bit_for_bit(make):
    ref = _params()
    opt = make(_groups(ref))
    for t in range(7):
        opt.zero_grad()
        _loss(ref, t).backward()
        opt.step()
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in ref], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)                         # only tensors and plain data
    resumed = [nn.Parameter(p.clone()) for p in ckpt["params"]]
    opt2 = make(_groups(resumed))
    opt2.load_state_dict(ckpt["opt"])
    for t in range(7, 14):                                             # crosses several new cycles
        for params, o in ((ref, opt), (resumed, opt2)):
            o.zero_grad()
            _loss(params, t).backward()
            o.step()
    for a, b in zip(ref, resumed):
        assert torch.equal(a.detach(), b.detach())
    for a, b in zip(ref, resumed):
        for key, value in opt.state[a].items():
            other = opt2.state[b][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other
    # Not a tautology: a fresh optimizer on the same weights does not follow the same path.
    fresh = [nn.Parameter(p.clone()) for p in ckpt["params"]]
    opt3 = make(_groups(fresh))
    for t in range(7, 14):
        opt3.zero_grad()
        _loss(fresh, t).backward()
        opt3.step()
    assert any(not torch.equal(a.detach(), c.detach()) for a, c in zip(ref, fresh))


# ---------------------------------------------------------------------------- galore-torch compatibility
@pytest.mark.parametrize("proj_type,shape,side", [
    ("std", (7, 4), "right"), ("std", (4, 7), "left"), ("reverse_std", (7, 4), "left"),
    ("reverse_std", (4, 7), "right"), ("left", (7, 4), "left"), ("right", (4, 7), "right")])
def test_galore_torch_param_groups_work_unchanged(proj_type, shape, side):
    """Same groups and arguments, same trajectory as galore-torch's GaLoreAdamW, bit for bit: GaLoreAdamW
    defaults to compat="galore-torch" (eps 1e-6 on √v, galore-torch's SVD factors); more in
    test_galore_compat.py. (This test used to set eps=1e-30 and allow 1e-6: the torch formula's eps.)"""
    galore_torch = pytest.importorskip("galore_torch")
    A, Y, X1 = least_squares(*shape, seed=7)
    X2 = nn.Parameter(X1.detach().clone())
    group = {"rank": 2, "update_proj_gap": 3, "scale": 0.25, "proj_type": proj_type}
    ours = GaLoreAdamW([dict(group, params=[X1])], lr=0.01)
    peer = galore_torch.GaLoreAdamW([dict(group, params=[X2])], lr=0.01, no_deprecation_warning=True)
    for _ in range(8):
        backward(A, Y, X1), backward(A, Y, X2)
        ours.step(), peer.step()
    m, n = shape
    assert ours.state[X1]["proj"].shape == (2, m if side == "left" else n)
    assert torch.equal(X1.detach(), X2.detach())
    assert (X1.detach() - least_squares(*shape, seed=7)[2].detach()).abs().max() > 1e-3


def test_aliases_set_the_default_projection():
    X = nn.Parameter(torch.randn(6, 4, dtype=F64))
    for cls, name, compat in [(GaLoreAdamW, "svd", "galore-torch"), (GaLoreSGD, "svd", "torch"),
                              (GoLoreAdamW, "stiefel", "torch"), (GoLoreSGD, "stiefel", "torch"),
                              (SubspaceAdamW, "svd", "torch"), (SubspaceSGD, "svd", "torch")]:
        opt = cls([{"params": [X], "rank": 2}], lr=0.1)
        assert opt.param_groups[0]["projection"] == name
        assert opt.param_groups[0]["compat"] == compat
        opt2 = cls([{"params": [X], "rank": 2, "projection": "gaussian"}], lr=0.1)
        assert opt2.param_groups[0]["projection"] == "gaussian"
    X.grad = torch.randn(6, 4, dtype=F64)
    opt = GoLoreAdamW([{"params": [X], "rank": 2}], lr=0.1)
    opt.step()
    assert torch.equal(opt.state[X]["proj"], StiefelSampler().sample(2, 4, generator_for(0, 0, 0), dtype=F64))


# ---------------------------------------------------------------------------- errors
def test_non_matrix_parameter_in_projected_group_is_refused_by_name():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    with pytest.raises(ValueError, match=r"0\.bias.*\(3,\).*2-D"):
        SubspaceAdamW([{"params": list(model.named_parameters()), "rank": 2}])
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\].*2-D"):
        SubspaceSGD([{"params": list(model.parameters()), "rank": 2}])
    SubspaceAdamW([{"params": [model[0].weight], "rank": 2},
                   {"params": [model[0].bias, model[1].weight, model[1].bias]}])     # the right way


@pytest.mark.parametrize("key,value,match", [
    ("projection", "pca", r"projection must be one of \['coordinate', 'gaussian', 'hybrid', 'stiefel', 'svd'\]"),
    ("state_on_switch", "rotate", r"state_on_switch must be one of \['keep', 'reset', 'project'\]"),
    ("proj_side", "top", r"proj_side must be one of \['auto', 'left', 'right', 'reverse'\]"),
    ("proj_type", "full", r"proj_type must be one of \['left', 'reverse_std', 'right', 'std'\]"),
    ("update_proj_gap", 0, "update_proj_gap must be a positive int"),
    ("rank", 0, "rank must be a positive int"),
    ("seed", 1.5, "seed must be an int"),
    ("scale", "big", "scale must be a real number"),
])
def test_bad_options_name_the_option_and_the_allowed_values(key, value, match):
    X = nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match=match):
        SubspaceAdamW([{"params": [X], "rank": 2, key: value}])


def test_hybrid_needs_total_steps_and_inner_options_are_checked():
    X = nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match="total_steps"):
        SubspaceSGD([{"params": [X], "rank": 2, "projection": "hybrid"}])
    with pytest.raises(ValueError, match="random_fraction"):
        SubspaceSGD([{"params": [X], "rank": 2, "projection": "hybrid", "total_steps": 10,
                      "random_fraction": 1.5}])
    with pytest.raises(ValueError, match="betas"):
        SubspaceAdamW([X], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="nesterov"):
        SubspaceSGD([X], nesterov=True)


# ---------------------------------------------------------------------------- memory on a tiny LLaMA
def _state_bytes(opt):
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v))


def test_llama_optimizer_state_bytes_match_the_shapes_and_beat_adamw():
    rank = 8
    model = tiny_llama()
    names = [n for n, p in model.named_parameters()
             if p.dim() == 2 and (".self_attn." in n or ".mlp." in n)]
    assert len(names) == 2 * 7
    proj = [p for n, p in model.named_parameters() if n in names]
    rest = [p for n, p in model.named_parameters() if n not in names]
    opt = SubspaceAdamW([{"params": proj, "rank": rank, "update_proj_gap": 50, "scale": 0.25},
                         {"params": rest}], lr=1e-3)
    opt.zero_grad()
    model(**lm_batch()).loss.backward()
    opt.step()

    predicted = 0
    for p in proj:                           # fp32: 4 bytes per entry
        m, n = p.shape
        r = min(rank, m, n)
        predicted += 4 * (r * n + 2 * m * r if m >= n else r * m + 2 * r * n)   # P + two moments
    predicted += sum(4 * 2 * p.numel() for p in rest)                            # two full moments
    assert _state_bytes(opt) == predicted

    reference = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(**lm_batch()).loss.backward()
    reference.step()
    adamw_bytes = _state_bytes(reference)
    assert adamw_bytes == sum(4 * 2 * p.numel() + 4 for p in model.parameters())   # + fp32 step
    saved = sum(4 * 2 * p.numel() for p in proj) - (predicted - sum(4 * 2 * p.numel() for p in rest))
    assert _state_bytes(opt) < adamw_bytes and saved > 0
    assert math.isclose(adamw_bytes - _state_bytes(opt), saved + 4 * len(list(model.parameters())))


# ---------------------------------------------------------------------------- found by mutation testing
def test_adamw_defaults_and_constructor_options_reach_every_group():
    X = nn.Parameter(torch.randn(4, 3, dtype=F64))
    keys = ("lr", "betas", "eps", "weight_decay", "correct_bias", "compat", "projection", "proj_side",
            "update_proj_gap", "scale", "state_on_switch", "seed", "random_fraction", "total_steps")
    group = SubspaceAdamW([X]).param_groups[0]
    assert {k: group[k] for k in keys} == {
        "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "correct_bias": True,
        "compat": "torch", "projection": "svd", "proj_side": "auto", "update_proj_gap": 200, "scale": 1.0,
        "state_on_switch": "keep", "seed": 0, "random_fraction": 0.2, "total_steps": None}
    options = dict(projection="hybrid", proj_side="left", compat="galore-torch", update_proj_gap=7, scale=0.25,
                   state_on_switch="project", seed=5, random_fraction=0.5, total_steps=40)
    group = SubspaceAdamW([{"params": [X], "rank": 2}], no_deprecation_warning=True, **options).param_groups[0]
    assert {k: group[k] for k in options} == options and group["eps"] == 1e-6  # galore-torch's eps
    with pytest.raises(TypeError, match=r"^unexpected keyword arguments: \['proj_type', 'tau'\]$"):
        SubspaceAdamW([X], tau=3, proj_type="std")


class RecordingSampler(StiefelSampler):
    """A custom sampler that records what the optimizer passes it (the ProjectionSampler interface)."""

    def __init__(self, gradient_steps=()):
        self.gradient_steps, self.calls = set(gradient_steps), []

    def uses_gradient(self, step):
        return step in self.gradient_steps

    def sample(self, rank, dim, generator, *, gradient=None, step=0, dtype=torch.float32, device=None):
        self.calls.append(dict(rank=rank, dim=dim, gradient=None if gradient is None else gradient.clone(),
                               step=step, dtype=dtype, device=device))
        return super().sample(rank, dim, generator, dtype=dtype, device=device)


@pytest.mark.parametrize("make", [SubspaceAdamW, SubspaceSGD])
def test_a_custom_sampler_gets_the_step_the_gradient_dtype_and_device(make):
    A, Y, X = least_squares(6, 4, seed=7)  # m ≥ n: right side, dim n = 4
    sampler = RecordingSampler(gradient_steps={2})
    opt = make([{"params": [X], "rank": 2, "update_proj_gap": 2, "projection": sampler}], lr=0.01)
    grads = []
    for _ in range(4):
        grads.append(backward(A, Y, X))
        opt.step()
    # cycles at 0, at the gap (2), and at 3, where uses_gradient changes back
    assert [(c["step"], c["rank"], c["dim"], c["dtype"], c["device"]) for c in sampler.calls] == \
        [(step, 2, 4, F64, torch.device("cpu")) for step in (0, 2, 3)]
    assert sampler.calls[0]["gradient"] is None and sampler.calls[2]["gradient"] is None
    assert torch.equal(sampler.calls[1]["gradient"], grads[2])       # right side: G itself (k × dim)


@pytest.mark.parametrize("shape", [(3, 7), (7, 3)])
def test_a_rank_above_the_smaller_side_is_capped_to_it(shape):
    """rank 5 on a 3 × 7 (left) or 7 × 3 (right) matrix: a square orthogonal P, so SGD's step is the plain one."""
    A, Y, X = least_squares(*shape, seed=8)
    X_ref = nn.Parameter(X.detach().clone())
    opt = SubspaceSGD([{"params": [X], "rank": 5, "projection": "stiefel"}], lr=0.01, momentum=0.9)
    ref = torch.optim.SGD([X_ref], lr=0.01, momentum=0.9)
    for _ in range(3):
        backward(A, Y, X), backward(A, Y, X_ref)
        opt.step(), ref.step()
    assert opt.state[X]["proj"].shape == (3, 3)
    torch.testing.assert_close(X, X_ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("total,fraction,switch", [(4, 0.75, 1), (10, 0.25, 8)])
def test_the_hybrid_switch_starts_one_new_cycle_between_gaps(total, fraction, switch):
    A, Y, X = least_squares(8, 5, seed=4)
    opt = SubspaceSGD([{"params": [X], "rank": 2, "update_proj_gap": 100, "projection": "hybrid",
                        "total_steps": total, "random_fraction": fraction}], lr=0.01)
    cycles = []
    for _ in range(total):
        backward(A, Y, X)
        opt.step()
        cycles.append(opt.state[X]["cycle"])
    assert cycles == [0] * switch + [1] * (total - switch)


def test_groups_with_different_samplers_each_draw_from_their_own():
    """Samplers are cached per (projection, total_steps, random_fraction): no group borrows another's."""
    A, Y, X1 = least_squares(6, 4, seed=9)
    X2, X3 = (nn.Parameter(X1.detach().clone()) for _ in range(2))
    opt = SubspaceSGD([{"params": [X1], "rank": 2, "projection": "svd"},
                       {"params": [X2], "rank": 2, "projection": "stiefel", "seed": 3},
                       {"params": [X3], "rank": 2, "projection": "hybrid", "total_steps": 100,
                        "random_fraction": 1.0, "seed": 3}], lr=0.01, update_proj_gap=100)
    G = backward(A, Y, X1)
    X2.grad, X3.grad = G.clone(), G.clone()
    opt.step()
    _, _, Vh = torch.linalg.svd(G)
    torch.testing.assert_close(opt.state[X1]["proj"].T @ opt.state[X1]["proj"], Vh[:2].T @ Vh[:2],
                               atol=1e-12, rtol=0)
    for X, index in ((X2, 1), (X3, 2)):  # hybrid with random_fraction 1 is Stiefel from step 0
        assert torch.equal(opt.state[X]["proj"], StiefelSampler().sample(2, 4, generator_for(3, index, 0), dtype=F64))
    # hybrid groups that differ only in total_steps or random_fraction switch at their own step
    A, Y, Xa = least_squares(6, 4, seed=10)
    Xb, Xc = (nn.Parameter(Xa.detach().clone()) for _ in range(2))
    opt = SubspaceSGD([{"params": [Xa], "rank": 2, "total_steps": 4},                           # switch at 2
                       {"params": [Xb], "rank": 2, "total_steps": 40},                          # at 20
                       {"params": [Xc], "rank": 2, "total_steps": 4, "random_fraction": 0.25}],  # at 3
                      lr=0.01, projection="hybrid", random_fraction=0.5, update_proj_gap=100)
    for _ in range(3):
        G = backward(A, Y, Xa)
        Xb.grad, Xc.grad = G.clone(), G.clone()
        opt.step()
    assert [opt.state[X]["cycle"] for X in (Xa, Xb, Xc)] == [1, 0, 0]


def test_torch_compat_takes_the_svd_in_the_gradient_dtype():
    """compat="torch": the SVD sampler's float64 SVD (galore-torch's factor would be float32)."""
    for shape in ((6, 4), (4, 6)):
        A, Y, X = least_squares(*shape, seed=11)
        opt = SubspaceAdamW([{"params": [X], "rank": 2}], lr=0.01)
        G = backward(A, Y, X)
        opt.step()
        U, _, Vh = torch.linalg.svd(G)
        span = Vh[:2].T @ Vh[:2] if shape[0] >= shape[1] else U[:, :2] @ U[:, :2].T
        P = opt.state[X]["proj"]
        torch.testing.assert_close(P.T @ P, span, atol=1e-13, rtol=0)


def test_galore_torch_compat_falls_back_to_a_stiefel_draw_for_a_non_finite_gradient():
    X = nn.Parameter(torch.zeros(6, 4, dtype=F64))
    opt = GaLoreAdamW([{"params": [X], "rank": 2, "seed": 4}], lr=0.01)
    X.grad = torch.full_like(X, float("nan"))
    with pytest.warns(RuntimeWarning, match="using a Stiefel sample"):
        opt.step()
    assert torch.equal(opt.state[X]["proj"], StiefelSampler().sample(2, 4, generator_for(4, 0, 0), dtype=F64))


def test_galore_torch_compat_takes_the_samplers_draw_when_its_factor_is_not_finite(monkeypatch):
    """Some SVD backends return NaN without raising: such a factor is dropped for the sampler's own draw."""
    import rso.optim.base as base
    A, Y, X = least_squares(6, 4, seed=12)
    monkeypatch.setattr(base, "galore_svd_factor", lambda grad, rank, side: torch.full((rank, 4), float("nan")))
    opt = GaLoreAdamW([{"params": [X], "rank": 2}], lr=0.01)
    G = backward(A, Y, X)
    opt.step()
    _, _, Vh = torch.linalg.svd(G)
    torch.testing.assert_close(opt.state[X]["proj"], Vh[:2], atol=1e-13, rtol=0)


@pytest.mark.parametrize("make", [SubspaceAdamW, SubspaceSGD])
def test_a_parameter_without_a_gradient_is_skipped_not_the_rest_of_its_group(make):
    A, Y, X = least_squares(5, 3, seed=13)
    frozen = nn.Parameter(torch.ones(5, 3, dtype=F64))
    opt = make([{"params": [frozen, X], "rank": 2}], lr=0.1)
    before = X.detach().clone()
    backward(A, Y, X)
    opt.step()
    assert torch.equal(frozen, torch.ones(5, 3, dtype=F64)) and frozen not in opt.state
    assert not torch.equal(X, before) and opt.state[X]["step"] == 1


@pytest.mark.parametrize("make", [SubspaceAdamW, SubspaceSGD])
def test_sparse_gradients_are_refused_by_name(make):
    X = nn.Parameter(torch.zeros(4, 3, dtype=F64))
    X.grad = torch.eye(4, 3, dtype=F64).to_sparse()
    with pytest.raises(RuntimeError, match=f"^{make.__name__} does not support sparse gradients$"):
        make([X], lr=0.1).step()


def test_projection_rank_and_gap_at_their_edges():
    X = nn.Parameter(torch.randn(4, 3, dtype=F64))
    group = SubspaceSGD([{"params": [X], "rank": 1, "update_proj_gap": 1}]).param_groups[0]
    assert (group["rank"], group["update_proj_gap"]) == (1, 1)
    for projection in (["svd"], {"svd": 1}, None.__class__):  # unhashable or not a name: the same clear error
        with pytest.raises(ValueError, match=r"^projection must be one of \['coordinate', 'gaussian', 'hybrid', "
                                             r"'stiefel', 'svd'\] or a ProjectionSampler, got "):
            SubspaceSGD([{"params": [X], "rank": 1, "projection": projection}])


@pytest.mark.parametrize("compat", ["torch", "galore-torch"])
@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_scale_multiplies_the_projected_step(compat, scale):
    """Adam's first step is ±lr per coordinate of the low-rank update: ``scale`` multiplies the whole step."""
    steps = []
    for s in (1.0, scale):
        A, Y, X = least_squares(6, 4, seed=14)
        before = X.detach().clone()
        opt = SubspaceAdamW([{"params": [X], "rank": 2, "scale": s}], lr=0.01, compat=compat)
        backward(A, Y, X)
        opt.step()
        steps.append(X.detach() - before)
    torch.testing.assert_close(steps[1], scale * steps[0], atol=1e-15, rtol=1e-12)

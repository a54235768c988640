"""Copies of a wrapped model that live beside it: reference models, snapshots, averaged (EMA / SWA) models.

A copy whose B changes outside an optimizer step (``AveragedModel`` averages W₀ and B one by one, which across
subspaces is not the average of W₀ + s·B P) refuses its next forward; the right EMA averages the merged weights."""
import copy

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import rso

F64 = torch.float64


def wrapped(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)).to(F64)
    return rso.wrap(model, rank=4, tau=3)


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 16, generator=g, dtype=F64), torch.randn(8, 4, generator=g, dtype=F64)


def step(model, opt, x, y):
    opt.zero_grad()
    (model(x) - y).pow(2).mean().backward()
    opt.step()


def test_an_averaged_model_of_a_wrapped_model_refuses_instead_of_averaging_across_subspaces():
    model, (x, y) = wrapped(), data()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5))
    for _ in range(4):  # across a merge (tau=3)
        step(model, opt, x, y)
        ema.update_parameters(model)
    with pytest.raises(RuntimeError, match=r"^rso: B of SubspaceLinear\(in_features=16, out_features=16\) in a copy of "
                                           r"a wrapped model changed outside an optimizer step \(AveragedModel"):
        ema(x)


def test_the_ema_of_the_merged_weights_is_the_average_model():
    model, (x, y) = wrapped(), data()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ema = rso.unwrap(copy.deepcopy(model))  # a plain model
    expected = {k: v.clone() for k, v in ema.state_dict().items()}
    decay = 0.5
    for _ in range(7):  # two merges
        step(model, opt, x, y)
        effective = {f"{n}.weight": layer.effective_weight() for n, layer in rso.subspace_layers(model)}
        for k in expected:  # the reference: the EMA of the effective weights, computed by hand
            current = effective.get(k, model.state_dict(keep_vars=True).get(k))
            expected[k] = decay * expected[k] + (1 - decay) * current.detach()
        with torch.no_grad():  # the recipe: the effective weights, without merging (training untouched)
            merged = rso.effective_state_dict(model)
            for k, v in ema.state_dict().items():
                v.lerp_(merged[k], 1 - decay)
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=1e-12)


def test_a_reference_copy_keeps_its_function_while_the_model_trains():
    model, (x, y) = wrapped(), data()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    step(model, opt, x, y)  # B ≠ 0 at the copy
    reference = copy.deepcopy(model).requires_grad_(False)  # TRL's create_reference_model
    with torch.no_grad():
        before = reference(x).clone()
    for _ in range(4):
        step(model, opt, x, y)
    with torch.no_grad():
        torch.testing.assert_close(reference(x), before, rtol=0, atol=0)
        assert not torch.equal(model(x), before)


def test_a_copy_trained_with_its_own_optimizer_trains_and_merges():
    model, (x, y) = wrapped(), data()
    other = copy.deepcopy(model)
    opt = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(4):
        step(other, opt, x, y)
    assert rso.state(other)["cycle"] == 1 and rso.state(model)["step"] == 0
    other.load_state_dict(model.state_dict())  # a load is a known change too
    other(x)


def test_the_effective_state_dict_is_the_unwrapped_model_s_and_changes_nothing():
    model, (x, y) = wrapped(), data()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    step(model, opt, x, y)
    B = model[0].B.detach().clone()
    state = rso.effective_state_dict(model)
    assert torch.equal(model[0].B, B)  # no merge: weight decay on B goes on from the same point
    plain = rso.unwrap(copy.deepcopy(model))
    assert state.keys() == plain.state_dict().keys()
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)


def test_an_optimizer_kept_after_unwrap_refuses_to_step():
    model, (x, y) = wrapped(), data()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    step(model, opt, x, y)
    rso.unwrap(model)
    with pytest.raises(ValueError, match=r"^rso: this AdamW holds 2 B parameter\(s\) of layers rso\.unwrap replaced, "
                                         r"so it would train nothing of them; create the optimizer again"):
        step(model, opt, x, y)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = model[0].weight.detach().clone()
    step(model, fresh, x, y)
    assert not torch.equal(model[0].weight, before)

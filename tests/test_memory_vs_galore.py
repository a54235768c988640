"""RSO against GaLore, exact bytes on a small LLaMA (CPU, seconds): galore-torch's ``GaLoreAdamW`` (the
peer package) and our ``rso.optim.GaLoreAdamW``, both at the rank RSO uses.

* activations: GaLore leaves the forward pass alone, so it keeps every linear layer's input; RSO keeps
  one r-wide projection per group instead. The saving is exactly batch·seq·Σ(in − r) per layer.
* gradients: GaLore forms the full weight gradient; RSO only B's (out × r): rank/in of the full.
* optimizer state: GaLore keeps Adam's moments of r·max(m, n) per weight plus its projector; RSO keeps
  moments of B (out × r) and the same-size P as a model buffer: no more even counting P.
"""

import pytest
import torch

from conftest import measure_method
from rso.memory import estimate
from train.benchmark_methods import available

CFG = dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=4,
           num_hidden_layers=2, vocab_size=256)
B, S, R = 2, 32, 16
GALORES = ["galore-torch", "galore"]


def run(method, attn="sdpa", dtype=torch.float32):
    reason = available(method)
    if reason:
        pytest.skip(f"cannot compare with {method}: {reason}")
    rep, s = measure_method(method, CFG, R, B, S, attn, dtype, seed=5)
    return rep, rep.optimizer_state, s  # includes galore-torch's projector objects


def linear_shapes():
    h, i, L = CFG["hidden_size"], CFG["intermediate_size"], CFG["num_hidden_layers"]
    qd = kvd = h
    return L, [(qd, h), (kvd, h), (kvd, h), (h, qd), (i, h), (i, h), (h, i)]  # (out, in)


@pytest.fixture(scope="module")
def rso_run():
    return run("rso-stiefel")


@pytest.mark.parametrize("galore", GALORES)
def test_activations_fall_by_the_shapes_factor(galore, rso_run):
    g, _, _ = run(galore)
    a, _, _ = run("adamw")
    r, _, _ = rso_run
    assert g.activations == a.activations  # GaLore does not touch the forward pass
    h, i, L = CFG["hidden_size"], CFG["intermediate_size"], CFG["num_hidden_layers"]
    # per layer: q/k/v input h → r, gate/up input h → r, down input i → r, o: SDPA's output → + r
    saved = 4 * L * B * S * ((h - R) + (h - R) + (i - R) - R)
    assert g.activations - r.activations == saved
    predicted = (estimate(CFG, "rso", rank=R, batch=B, seq=S, dtype="fp32")["activations"]
                 / estimate(CFG, "galore", rank=R, batch=B, seq=S, dtype="fp32")["activations"])
    assert r.activations / g.activations == pytest.approx(predicted, rel=1e-12)
    assert r.activations < g.activations


@pytest.mark.parametrize("galore", GALORES)
def test_gradients_only_of_B(galore, rso_run):
    g, _, _ = run(galore)
    r, _, _ = rso_run
    L, shapes = linear_shapes()
    assert g.gradients - r.gradients == 4 * L * sum(out * (inp - R) for out, inp in shapes)
    full_linear = sum(out * inp for out, inp in shapes)
    b_only = sum(out * R for out, inp in shapes)
    assert b_only / full_linear < 0.3
    assert r.gradients < g.gradients


@pytest.mark.parametrize("galore", GALORES)
def test_optimizer_state_at_most_galore(galore, rso_run):
    _, g_opt, _ = run(galore)
    r, r_opt, s = rso_run
    assert r_opt <= g_opt
    # even counting RSO's projections P (model buffers, r × in per layer) against GaLore's projectors
    p_bytes = sum(m.P.numel() * m.P.element_size() for m in s.model.modules() if hasattr(m, "P"))
    assert r_opt + p_bytes <= g_opt
    L, shapes = linear_shapes()
    moments_galore = 2 * 4 * L * sum(R * max(o, n) for o, n in shapes)
    moments_rso = 2 * 4 * L * sum(o * R for o, n in shapes)
    assert moments_rso <= moments_galore


@pytest.mark.parametrize("attn", ["eager"])
def test_same_with_eager_attention_and_bf16(attn):
    g, g_opt, _ = run("galore-torch", attn, torch.bfloat16)
    r, r_opt, _ = run("rso-stiefel", attn, torch.bfloat16)
    h, i, L = CFG["hidden_size"], CFG["intermediate_size"], CFG["num_hidden_layers"]
    # eager: o_proj's input is a copy only a trained o_proj keeps: h → r too
    assert g.activations - r.activations == 2 * L * B * S * ((h - R) * 3 + (i - R))
    assert r.gradients < g.gradients and r_opt <= g_opt

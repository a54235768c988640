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

import rso
from conftest import measure_method
from rso.memory import estimate, storage_bytes
from rso.memory.measure import tensors_in
from rso.train.bench.recipes import available

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


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def state_bytes(optimizer, param, keys=None):
    """Bytes of the tensors in ``optimizer.state[param]`` (those under ``keys`` only, if given)."""
    st = optimizer.state[param]
    return storage_bytes(list(tensors_in({k: v for k, v in st.items() if keys is None or k in keys})))


def galore_weights(setup):
    """name → weight Parameter of the linear layers GaLore projects (those in its group with a rank)."""
    projected = {id(p) for g in setup.optimizer.param_groups if g.get("rank") for p in g["params"]}
    return {n.removesuffix(".weight"): p for n, p in setup.model.named_parameters() if id(p) in projected}


@pytest.mark.parametrize("galore", GALORES)
def test_gradients_only_of_B(galore, rso_run):
    g, _, gs = run(galore)
    r, _, s = rso_run
    layers = dict(rso.subspace_layers(s.model))
    weights = galore_weights(gs)
    L, shapes = linear_shapes()
    assert sorted(layers) == sorted(weights) and len(layers) == L * len(shapes)
    # Measured gradient bytes are exactly those of the trainable parameters: in RSO the wrapped layers' B
    # (out × r), never their frozen weights; in GaLore every full weight.
    assert r.gradients == storage_bytes(trainable(s.model))
    assert g.gradients == storage_bytes(trainable(gs.model))
    for name, m in layers.items():
        assert not m.weight.requires_grad and tuple(m.B.shape) == (m.out_features, R)
        assert m.weight.shape == weights[name].shape
    full = sum(storage_bytes([w]) for w in weights.values())
    b_only = sum(storage_bytes([m.B]) for m in layers.values())
    assert g.gradients - r.gradients == full - b_only
    # The wrapped layers' share: RSO's gradient bytes beyond the common parameters (embeddings, norms, head)
    # are rank/in of GaLore's for them.
    common = r.gradients - b_only
    assert g.gradients - common == full
    assert (r.gradients - common) / (g.gradients - common) == pytest.approx(
        sum(o * R for o, _ in shapes) / sum(o * n for o, n in shapes), rel=1e-12)
    assert (r.gradients - common) / (g.gradients - common) < 0.3


@pytest.mark.parametrize("galore", GALORES)
def test_optimizer_state_at_most_galore(galore, rso_run):
    _, g_opt, gs = run(galore)
    r, r_opt, s = rso_run
    assert r_opt <= g_opt
    # The measured state is AdamW's: two moments per trainable parameter, plus its fp32 step scalar.
    params = trainable(s.model)
    assert r_opt == 2 * storage_bytes(params) + 4 * len(params)
    # Per wrapped layer, from the real optimizer states: RSO's moments of B (out × r) are at most GaLore's
    # low-rank moments of the weight, and B's whole state at most the weight's (with GaLore's projector).
    layers, weights = dict(rso.subspace_layers(s.model)), galore_weights(gs)
    moments = ("exp_avg", "exp_avg_sq")
    rso_moments = galore_moments = 0
    for name, m in layers.items():
        mine, theirs = state_bytes(s.optimizer, m.B, moments), state_bytes(gs.optimizer, weights[name], moments)
        assert mine == 2 * storage_bytes([m.B]) and mine <= theirs, name
        assert state_bytes(s.optimizer, m.B) <= state_bytes(gs.optimizer, weights[name]), name
        assert m.weight not in s.optimizer.state
        rso_moments, galore_moments = rso_moments + mine, galore_moments + theirs
    assert rso_moments <= galore_moments
    # Even counting RSO's projections P (model buffers, one r × in tensor per projection group) against
    # GaLore's projectors.
    p_bytes = storage_bytes([m.P for m in layers.values()])
    assert p_bytes == sum(storage_bytes([grp.members[0].P]) for grp in rso.wrapping._loop(s.model, "test").groups)
    assert r_opt + p_bytes <= g_opt


@pytest.mark.parametrize("attn", ["eager"])
def test_same_with_eager_attention_and_bf16(attn):
    g, g_opt, _ = run("galore-torch", attn, torch.bfloat16)
    r, r_opt, _ = run("rso-stiefel", attn, torch.bfloat16)
    h, i, L = CFG["hidden_size"], CFG["intermediate_size"], CFG["num_hidden_layers"]
    # eager: o_proj's input is a copy only a trained o_proj keeps: h → r too
    assert g.activations - r.activations == 2 * L * B * S * ((h - R) * 3 + (i - R))
    assert r.gradients < g.gradients and r_opt <= g_opt

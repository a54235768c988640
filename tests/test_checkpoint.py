"""Checkpoints: a wrapped state_dict carries W₀, B, P, seeds and counters; resume is bit for bit."""
import io

import torch

import rso
from conftest import lm_batch, tiny_llama


def train(model, opt, steps, start=0):
    losses = []
    for i in range(start, start + steps):
        loss = model(**lm_batch(seed=100 + i)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def fresh(seed=0, projection="stiefel"):
    model = rso.wrap(tiny_llama(), rank=8, tau=3, seed=seed, projection=projection)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    return model, opt


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_dict_holds_rso_state():
    model, _ = fresh()
    sd = model.state_dict()
    prefix = "model.layers.0.self_attn.q_proj."
    for key in ("weight", "B", "P", "seed", "cycle", "step"):
        assert prefix + key in sd
    assert sd[prefix + "P"].shape == (8, 32) and sd[prefix + "B"].shape == (32, 8)


def test_resume_is_bit_for_bit_and_restores_the_saved_seed():
    for projection in ("stiefel", "svd"):
        model, opt = fresh(projection=projection)
        train(model, opt, 4)  # mid-cycle 1 (merged at step 3)
        ckpt = roundtrip({"model": model.state_dict(), "optim": opt.state_dict()})
        reference = train(model, opt, 5, start=4)  # crosses merges at steps 6 and 9

        other, other_opt = fresh(seed=123, projection=projection)  # wrapped with another seed
        other.load_state_dict(ckpt["model"])
        other_opt.load_state_dict(ckpt["optim"])
        assert rso.state(other)["step"] == 4 and rso.state(other)["cycle"] == 1
        resumed = train(other, other_opt, 5, start=4)
        assert resumed == reference
        for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
            assert torch.equal(a, b), k

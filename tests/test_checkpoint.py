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


def test_restore_run_puts_back_every_random_generator(tmp_path):
    """``save_run`` / ``restore_run``: after a resume the Python, NumPy and torch generators draw what the
    uninterrupted run draws next (dropout masks, shuffles), whatever was drawn in between."""
    import random

    import numpy as np

    from rso.train.checkpoint import load_run, restore_run, save_run

    class Stateful:  # the data position and the logged-loss interval: any object with a state_dict
        def __init__(self):
            self.state = {"position": 3}

        def state_dict(self):
            return dict(self.state)

        def load_state_dict(self, state):
            self.state = dict(state)

    def draws():
        return random.random(), float(np.random.rand()), torch.rand(4).tolist()

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_run(tmp_path, 5, model, optimizer, scheduler, Stateful(), Stateful(), {"seed": 0})
    expected = draws()
    draws(), draws()  # the generators move on, as in a process that ran further (or a new one)
    assert restore_run(load_run(tmp_path), model, optimizer, scheduler, Stateful(), Stateful()) == 5
    assert draws() == expected

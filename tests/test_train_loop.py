"""The pieces shared by the training entry points (train/loop.py, train/checkpoint.py's run state)."""
import argparse
import contextlib
import types

import pytest
import torch

from rso.train.checkpoint import restore_run, save_run
from rso.train.loop import accumulate_gradients, cli_main, due, fill_step_defaults, optimizer_step
from rso.train.metrics import IntervalLoss
from rso.train.models import ConfigError


class Regressor(torch.nn.Module):
    """A linear model with an HF-style output: ``.loss`` is the mean squared error."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, x, y):
        return types.SimpleNamespace(loss=torch.nn.functional.mse_loss(self.linear(x), y))


def test_accumulated_gradients_are_the_whole_batch_mean():
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    whole, split = Regressor(), Regressor()
    loss = whole(x, y).loss
    loss.backward()
    micro = [{"x": x[i:i + 2], "y": y[i:i + 2]} for i in range(0, 8, 2)]
    split_loss = accumulate_gradients(split, micro, torch.device("cpu"), contextlib.nullcontext)
    assert split_loss == pytest.approx(loss.item())
    for a, b in zip(whole.parameters(), split.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_optimizer_step_clips_steps_and_clears():
    model = Regressor()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    (model(torch.randn(4, 4), torch.randn(4, 1)).loss * 1e3).backward()
    before = [p.detach().clone() for p in model.parameters()]
    norm, lr = optimizer_step(1.0, 1, list(model.parameters()), 0.5, optimizer, scheduler)
    assert norm.item() > 0.5 and lr == 0.1 and scheduler.get_last_lr()[0] == 0.05
    moved = torch.cat([(p - b).flatten() for p, b in zip(model.parameters(), before)])
    assert moved.norm().item() == pytest.approx(0.1 * 0.5, rel=1e-4)  # lr x clipped norm
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(FloatingPointError, match="at step 7"):
        optimizer_step(float("nan"), 7, list(model.parameters()), 1.0, optimizer, scheduler)


def test_due_and_step_defaults():
    assert [s for s in range(1, 8) if due(s, 3, 7)] == [3, 6, 7]
    from rso.train.config import RunConfig
    c = RunConfig()
    c.training.max_steps = 100
    fill_step_defaults(c, warmup=6, evals_per_run=4)
    assert (c.optimizer.warmup, c.logging.eval_every, c.checkpoint.save_every) == (6, 25, 25)


def test_interval_loss_survives_a_checkpoint(tmp_path):
    model = Regressor()
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    data = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)  # any object with a state_dict
    losses = IntervalLoss()
    losses.add(1.0)
    losses.add(2.0)
    save_run(tmp_path, 5, model, optimizer, scheduler, data, losses, {"lr": 0.1, "seed": 3}, config={"a": 1})
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert list(ckpt) == ["step", "model", "optimizer", "scheduler", "data", "rng", "log_interval", "args", "config"]
    assert ckpt["log_interval"] == [3.0, 2] and ckpt["args"] == {"lr": 0.1, "seed": 3}
    restored = IntervalLoss()
    assert restore_run(ckpt, Regressor(), optimizer, scheduler, data, restored) == 5
    restored.add(6.0)
    assert restored.pop_mean() == 3.0 and restored.pop_mean() == 0.0
    assert restore_run(None, model, optimizer, scheduler, data, restored) == 0


def test_cli_main_turns_user_errors_into_status_2(capsys):
    parser = argparse.ArgumentParser()

    def fails(args):
        raise ConfigError("unknown config 'x'")

    assert cli_main(fails, parser, []) == 2
    assert capsys.readouterr().err == "error: unknown config 'x'\n"
    assert cli_main(lambda args: None, parser, []) == 0

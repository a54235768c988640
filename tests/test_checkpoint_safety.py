"""No code runs from a checkpoint: every file the pipelines write loads with ``torch.load(weights_only=True)``, and
``--resume`` / ``--keep-best`` / ``rso.from_pretrained`` refuse a file that pickles anything else (one line naming
the file and what it pickles) before any of it is built; ``RSO_TRUST_CHECKPOINT=1`` opts in to a full unpickle."""
import argparse
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from conftest import write_micro_llama_config  # noqa: E402
from rso.train.checkpoint import (CHECKPOINT_NAME, TRUST_ENV, CheckpointError, load_checkpoint,  # noqa: E402
                                  save_checkpoint)
from rso.train.pretrain import build_parser, main, run  # noqa: E402


class Touch:
    """Unpickling it creates ``marker``: what a tampered checkpoint could do with any other function."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.fixture(autouse=True)
def untrusted(monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    return {"config": write_micro_llama_config(root / "micro.json"), "cache": str(root / "cache")}


def _argv(env, out, *extra):
    return ["--config", env["config"], "--max-docs", "200", "--cache-dir", env["cache"], "--output-dir", str(out),
            "--eval-batches", "1", "--no-progress", "--threads", "1", "--max-steps", "2", *extra]


TRAINING = [("rso", ["--tau", "1"]), ("galore", ["--tau", "1"]), ("adamw", ["--optimizer", "adafactor"]),
            ("adamw", ["--optimizer", "lamb"]), ("rso", ["--tau", "1", "--optimizer", "adamw8bit"])]


@pytest.mark.parametrize("method,extra", TRAINING, ids=[m + "".join(e[-1:]) for m, e in TRAINING])
def test_a_training_checkpoint_loads_weights_only_and_resumes(env, tmp_path, capsys, method, extra):
    """The real path (``save_run``): RNG states, run arguments, data position, LR scheduler, and the optimizer
    states of torch.optim, rso.optim (GaLore's projectors), torch_optimizer and bitsandbytes."""
    if "adamw8bit" in extra:
        pytest.importorskip("bitsandbytes")
    assert run(build_parser().parse_args(_argv(env, tmp_path, "--method", method, *extra, "--stop-after", "1"))) \
        == {"stopped_at": 1}
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert saved["step"] == 1 and saved["args"]["method"] == method
    capsys.readouterr()
    assert main(["--output-dir", str(tmp_path), "--resume", "--no-progress", "--cache-dir", env["cache"]]) == 0
    assert f"resumed from {tmp_path / CHECKPOINT_NAME} at step 1" in capsys.readouterr().out
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["step"] == 2


def _optimizer_names():
    import torch_optimizer

    from rso.train.methods import BITSANDBYTES_OPTIMIZERS
    names = [a for a in dir(torch.optim) if isinstance(getattr(torch.optim, a), type)
             and issubclass(getattr(torch.optim, a), torch.optim.Optimizer) and a != "Optimizer"]
    return names + sorted(torch_optimizer._NAME_OPTIM_MAP) + sorted(BITSANDBYTES_OPTIMIZERS)


@pytest.mark.parametrize("name", _optimizer_names())
def test_every_optimizer_state_loads_weights_only(tmp_path, name):
    """Each ``--optimizer`` that can step a plain model: its state after three steps, with the cosine scheduler's,
    round-trips through save_checkpoint / load_checkpoint (weights only) and loads back into a fresh optimizer."""
    from rso.train.methods import is_bitsandbytes, resolve_optimizer
    from rso.train.schedule import cosine_schedule

    if is_bitsandbytes(name):
        pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    try:
        optimizer = resolve_optimizer(name)(model.parameters(), lr=1e-3)
        scheduler = cosine_schedule(optimizer, 1, 4)
        for _ in range(3):
            model(torch.randn(4, 8)).pow(2).sum().backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    except (TypeError, ValueError, RuntimeError) as e:  # needs a closure, 2-D or sparse gradients, a wrapped optimizer
        pytest.skip(f"{name} cannot step a plain model: {e}")
    save_checkpoint(tmp_path / CHECKPOINT_NAME,
                    {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()})
    loaded = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    resolve_optimizer(name)(model.parameters(), lr=1e-3).load_state_dict(loaded["optimizer"])
    assert loaded["scheduler"]["last_epoch"] == 3


def _one_line_refusal(message, path, *named):
    assert "\n" not in message and f"checkpoint {path} refused" in message, message
    assert f"{TRUST_ENV}=1" in message and all(n in message for n in named), message


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_malicious_checkpoint_is_refused_and_runs_nothing(env, tmp_path, capsys, zip_format):
    marker = tmp_path / "marker"
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"step": 1, "args": {}, "rng": Touch(marker)}, out / CHECKPOINT_NAME,
               _use_new_zipfile_serialization=zip_format)
    assert main(["--output-dir", str(out), "--resume", "--no-progress", "--cache-dir", env["cache"]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    _one_line_refusal(err.rstrip("\n"), out / CHECKPOINT_NAME, "pathlib" if zip_format else "Unsupported global")
    assert not marker.exists()
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(out / CHECKPOINT_NAME)
    _one_line_refusal(str(refused.value), out / CHECKPOINT_NAME)
    assert not marker.exists() and sorted(p.name for p in out.iterdir()) == [CHECKPOINT_NAME]


def test_a_malicious_best_pt_is_refused_and_runs_nothing(tmp_path):
    from rso.train.best import BEST_NAME, BestWeights

    marker = tmp_path / "marker"
    torch.save({"step": 1, "value": 0.5, "tensors": Touch(marker)}, tmp_path / BEST_NAME)
    with pytest.raises(CheckpointError) as refused:
        BestWeights(tmp_path, {"val_key": "final_val_loss", "higher_is_better": False}, resume_step=3)
    _one_line_refusal(str(refused.value), tmp_path / BEST_NAME, "pathlib.Path")
    assert not marker.exists()


def test_from_pretrained_refuses_a_malicious_pytorch_model_bin(tmp_path):
    import rso
    from conftest import tiny_llama

    model = rso.wrap(tiny_llama(), rank=4, tau=2)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    marker = tmp_path / "marker"  # the weights as a pytorch_model.bin that also pickles a Touch
    torch.save({**load_file(tmp_path / "model.safetensors"), "x": Touch(marker)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError) as refused:
        rso.from_pretrained(tiny_llama(), tmp_path)
    message = str(refused.value)
    assert "\n" not in message and f"rso.from_pretrained: {tmp_path / 'pytorch_model.bin'} refused" in message
    assert "model.safetensors" in message and not marker.exists()


def test_the_opt_in_loads_a_trusted_file_with_other_objects(tmp_path, monkeypatch):
    """A legitimate object outside the weights-only allow-list (a saved ``argparse.Namespace``): refused by
    default, loaded in full with ``RSO_TRUST_CHECKPOINT=1``; any other value of the variable is no opt-in."""
    path = tmp_path / CHECKPOINT_NAME
    torch.save({"step": 3, "args": argparse.Namespace(lr=0.1), "w": torch.ones(2)}, path)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path)
    _one_line_refusal(str(refused.value), path, "argparse.Namespace")
    monkeypatch.setenv(TRUST_ENV, "yes")
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    monkeypatch.setenv(TRUST_ENV, "1")
    loaded = load_checkpoint(path)
    assert loaded["step"] == 3 and loaded["args"] == argparse.Namespace(lr=0.1)
    assert torch.equal(loaded["w"], torch.ones(2))


def test_an_unreadable_checkpoint_is_one_line(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    path.write_bytes(b"PK\x03\x04 a torn zip")
    with pytest.raises(CheckpointError, match=rf"^checkpoint {path} is unreadable \(") as refused:
        load_checkpoint(path)
    assert "\n" not in str(refused.value)

"""Checkpoints: everything a run needs to continue exactly, written atomically.

A checkpoint holds the model (for ``rso`` that includes W₀, B, P, seeds and counters), optimizer,
LR scheduler, data-loader position, every RNG state, the step and the run's arguments. It is written
to a temporary file in the same directory and moved into place with ``os.replace``, so a run killed
at any moment leaves either the previous checkpoint or the new one, never a torn file. It holds tensors and plain
data only, and is read back with ``torch.load(weights_only=True)``, so a tampered file cannot run code on ``--resume``.
"""
from __future__ import annotations

import os
import pathlib
import pickle
import random
import tempfile

import numpy as np
import torch

from rso.trust import TRUST_ENV, weights_only_refusal

__all__ = ["CHECKPOINT_NAME", "rng_state", "set_rng_state", "save_checkpoint", "load_checkpoint",
           "find_checkpoint", "CheckpointError", "TRUST_ENV", "load_run", "save_run", "load_model_state", "restore_run"]

CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(RuntimeError):
    pass


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, payload: dict) -> pathlib.Path:
    """``torch.save`` to a temp file in the same folder, fsync, then ``os.replace`` (atomic)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint with ``torch.load(weights_only=True)``: tensors, containers and plain Python data.

    That is all :func:`save_run` writes (every RNG state, the run's arguments, the data position, the LR
    scheduler and the optimizer states of every method and ``--optimizer`` the pipelines support) and all
    ``best.pt`` holds, so no object in the file is built and nothing in it can run. A file that pickles
    anything else is refused with a one-line :class:`CheckpointError` naming it and what it pickles;
    ``RSO_TRUST_CHECKPOINT=1`` in the environment loads it with ``weights_only=False`` (only a file you
    trust: unpickling can run arbitrary code).
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    trusted = os.environ.get(TRUST_ENV) == "1"
    try:
        return torch.load(path, map_location=map_location, weights_only=not trusted)
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError) and not trusted:
            raise CheckpointError(f"checkpoint {path} refused: torch.load(weights_only=True) cannot read it "
                                  f"({weights_only_refusal(path, e)}) and unpickling more than tensors and plain data can run "
                                  f"code; if you trust the file, set {TRUST_ENV}=1 to load it in full") from None
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {_one_line(e)})") from e


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def find_checkpoint(output_dir: str | os.PathLike) -> pathlib.Path | None:
    path = pathlib.Path(output_dir) / CHECKPOINT_NAME
    return path if path.exists() else None


def load_run(output_dir: pathlib.Path) -> dict:
    """``--resume``: the checkpoint saved in ``output_dir`` (a CheckpointError if there is none)."""
    path = find_checkpoint(output_dir)
    if path is None:
        raise CheckpointError(f"--resume: no checkpoint in {output_dir} (expected {output_dir / CHECKPOINT_NAME})")
    return load_checkpoint(path)


def save_run(output_dir: pathlib.Path, step: int, model, optimizer, scheduler, data, train_loss, settings: dict,
             **extra) -> None:
    """Write ``<output_dir>/checkpoint.pt``: the run's states, every RNG state, the step, its ``settings``
    (``RunConfig.saved()``, stored as ``"args"``) and ``extra``."""
    save_checkpoint(output_dir / CHECKPOINT_NAME, {
        "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "data": data.state_dict(), "rng": rng_state(),
        "log_interval": train_loss.state_dict(), "args": dict(settings), **extra})


def load_model_state(model, state: dict) -> None:
    """``model.load_state_dict(state)``, where a frozen bitsandbytes base (QLoRA's ``Linear4bit`` /
    ``Linear8bitLt``, as this run loaded it) is checked equal instead: bitsandbytes' layers write their quantization
    state (absmax, code table, …) into ``state_dict()`` but do not read it back. A CheckpointError if it differs."""
    from rso.layers.quantized import is_quantized_linear

    modules = model.named_modules() if hasattr(model, "named_modules") else ()  # a distributed state adapter: none
    prefixes = tuple(n + "." for n, m in modules if is_quantized_linear(m))
    if not prefixes:
        model.load_state_dict(state)
        return
    loadable = {n for n, _ in model.named_parameters(remove_duplicate=False)} | \
        {n for n, _ in model.named_buffers(remove_duplicate=False)}
    base = {k for k in state if k.startswith(prefixes)}
    current = model.state_dict()
    differ = sorted(k for k in base if k not in current or not torch.equal(current[k], state[k]))
    if differ:
        raise CheckpointError(f"--resume: the checkpoint's quantized base differs from the one this run loaded "
                              f"({differ[0]}): resume with the model the run started from")
    model.load_state_dict({k: v for k, v in state.items() if k not in base or k in loadable})


def restore_run(ckpt: dict | None, model, optimizer, scheduler, data, train_loss) -> int:
    """Load a checkpoint saved by ``save_run`` into the run's pieces and the RNGs; the step to continue from (0: none)."""
    if ckpt is None:
        return 0
    load_model_state(model, ckpt["model"])  # rso re-arms its gradient captures for the loaded step itself
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    data.load_state_dict(ckpt["data"])
    set_rng_state(ckpt["rng"])
    if "log_interval" in ckpt:
        train_loss.load_state_dict(ckpt["log_interval"])
    return int(ckpt["step"])

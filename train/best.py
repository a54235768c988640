"""Early stopping on the validation split (``rso.train.finetune --keep-best``): keep the weights of the evaluation
with the best validation metric and end the run with them.

At each evaluation whose validation metric beats every earlier one (ties keep the earlier), every parameter and
buffer of the model as it is (for RSO the unmerged W₀, B, P and the outer loop's counters) is written to
``<output-dir>/best.pt``, through a temporary file, so a crash never leaves half of one. At the end they are
copied back in place, so the final evaluation and the saved model are that evaluation's. The copy lives on
disk (one model's weights), not in memory, and a resumed run reads it back (tensors and plain data only, as
``rso.train.checkpoint.load_checkpoint`` reads ``checkpoint.pt``: anything else is refused).
"""
from __future__ import annotations

import os
import pathlib

import torch
from torch import nn

from .checkpoint import load_checkpoint

BEST_NAME = "best.pt"


def live_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, as the model holds them (``state_dict`` would merge RSO's B into W₀)."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


class BestWeights:
    """The best evaluation so far (``step``, ``value`` of ``headline['val_key']``) and its weights on disk."""

    def __init__(self, folder: pathlib.Path, headline: dict, resume_step: int | None = None):
        self.path = pathlib.Path(folder) / BEST_NAME
        self.key = headline["val_key"].removeprefix("final_")
        self.higher_is_better = headline["higher_is_better"]
        self.step = self.value = None
        if self.path.exists() and resume_step is not None:
            saved = load_checkpoint(self.path)
            if saved["step"] <= resume_step:  # one written after the checkpoint is evaluated again
                self.step, self.value = saved["step"], saved["value"]
        if self.step is None:
            self.path.unlink(missing_ok=True)  # an earlier run's, or one past the resumed step

    def consider(self, step: int, result: dict, model: nn.Module) -> bool:
        """Save the model's weights if ``result`` (an evaluation at ``step``) is the best so far; True if it was."""
        value = result[self.key]
        if self.value is not None and (value <= self.value if self.higher_is_better else value >= self.value):
            return False
        tmp = self.path.with_suffix(".tmp")
        torch.save({"step": step, "value": value,
                    "tensors": {k: t.detach().cpu() for k, t in live_tensors(model).items()}}, tmp)
        os.replace(tmp, self.path)
        self.step, self.value = step, value
        return True

    @torch.no_grad()
    def restore(self, model: nn.Module) -> int:
        """Copy the saved weights back into ``model`` (in place: same tensors, devices and dtypes); their step."""
        saved = load_checkpoint(self.path)
        tensors = live_tensors(model)
        if set(tensors) != set(saved["tensors"]):
            raise RuntimeError(f"{self.path}: its tensors are not this model's")
        for name, tensor in tensors.items():
            tensor.copy_(saved["tensors"][name])
        return saved["step"]

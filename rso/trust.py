"""Which checkpoints are unpickled in full: none, unless ``RSO_TRUST_CHECKPOINT=1`` is in the environment.

Every checkpoint reader of the library and of ``rso.train`` loads tensors and plain data only, so a tampered
file cannot run code; a file that pickles anything else is refused with one line naming it, what it pickles
and this opt-in (only for a file you trust: unpickling can run arbitrary code).
"""
import os
import pickle

import torch

__all__ = ["TRUST_ENV", "CheckpointRefused", "trusted", "weights_only_refusal"]

#: ``RSO_TRUST_CHECKPOINT=1`` opts in to unpickling a checkpoint in full; any other value is no opt-in.
TRUST_ENV = "RSO_TRUST_CHECKPOINT"


class CheckpointRefused(pickle.UnpicklingError):
    """A checkpoint pickles more than the reader allows, and :data:`TRUST_ENV` is not set to ``1``."""


def trusted() -> bool:
    """True when the environment opts in to unpickling checkpoints in full."""
    return os.environ.get(TRUST_ENV) == "1"


def weights_only_refusal(file, error: Exception) -> str:
    """What ``torch.load(weights_only=True)`` refused in ``file`` (a path or a seekable binary file).

    The globals it pickles beyond torch's allowed ones (read from the pickle's opcodes: nothing is built),
    else torch's reason.
    """
    try:  # torch >= 2.5 and zip-format files only
        if hasattr(file, "seek"):
            file.seek(0)
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(file)
    except (AttributeError, ValueError, RuntimeError):
        unsafe = []
    if unsafe:
        return "it pickles " + ", ".join(sorted(unsafe))
    reason = " ".join(str(error).split()).partition("WeightsUnpickler error:")[2]
    return reason.partition(". ")[0].partition(" Check the documentation")[0].strip() or type(error).__name__

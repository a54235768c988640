"""Gradient-projection optimizers in the ``torch.optim`` style (GaLore, GoLore, GoLore@x%).

They keep the model unchanged and save optimizer memory only: a param group with ``rank`` keeps
its optimizer state in an r-dimensional subspace of each 2-D weight's gradient. See
``docs/convergence.md`` for which variant converges under which conditions.

>>> from rso.optim import SubspaceAdamW
>>> opt = SubspaceAdamW([{"params": matrices, "rank": 128, "update_proj_gap": 200, "scale": 0.25,
...                       "projection": "hybrid", "random_fraction": 0.2, "total_steps": 10_000},
...                      {"params": others}], lr=1e-3)                          # doctest: +SKIP
"""
from .adamw import GaLoreAdamW, GoLoreAdamW, SubspaceAdamW
from .base import SubspaceOptimizer
from .sgd import GaLoreSGD, GoLoreSGD, SubspaceSGD

__all__ = [
    "SubspaceOptimizer",
    "SubspaceAdamW",
    "SubspaceSGD",
    "GaLoreAdamW",
    "GaLoreSGD",
    "GoLoreAdamW",
    "GoLoreSGD",
]

"""Learning-rate schedule: linear warm-up, then cosine decay to ``min_ratio`` of the peak."""
from __future__ import annotations

import math

import torch

__all__ = ["CosineWithWarmup", "cosine_schedule", "resize"]


class CosineWithWarmup:
    """Multiplier of the peak learning rate at optimizer step ``t`` (a picklable LambdaLR lambda)."""

    def __init__(self, warmup: int, total: int, min_ratio: float = 0.1):
        self.warmup, self.total, self.min_ratio = int(warmup), max(int(total), 1), float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def cosine_schedule(optimizer, warmup: int, total: int, min_ratio: float = 0.1):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, CosineWithWarmup(warmup, total, min_ratio))


def resize(scheduler, total: int) -> tuple[int, float, float] | None:
    """Give a (restored) :func:`cosine_schedule` the length ``total``: the cosine is rebuilt for it and
    continues from the scheduler's step, the optimizer's LRs set to the new curve's value there.
    Returns (old length, LR at this step before, after), or None if the length was ``total`` already.

    Needed after ``load_state_dict``: it restores the saved length along with the step."""
    total = max(int(total), 1)
    old = scheduler.lr_lambdas[0].total
    if old == total:
        return None
    before = scheduler.get_last_lr()[0]
    for fn in scheduler.lr_lambdas:
        fn.total = total
    for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    return old, before, scheduler.get_last_lr()[0]

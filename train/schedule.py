"""Learning-rate schedule: linear warm-up, then cosine decay to ``min_ratio`` of the peak."""
from __future__ import annotations

import math

import torch

__all__ = ["CosineWithWarmup", "cosine_schedule"]


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

"""Projection samplers: where the r-dimensional subspace of each cycle comes from.

A sampler returns a matrix ``P`` of shape ``(rank, dim)``. The RSO layers use it on the input side
(``z = x Pᵀ``), the GaLore-family optimizers on either side of a gradient (``G Pᵀ`` or ``P G``).

==============  ===============================================================  ==============
name            P                                                                E[PᵀP]
==============  ===============================================================  ==============
``stiefel``     Haar-uniform on the Stiefel manifold: rows orthonormal,            (r/dim)·I
                ``P = Qᵀ`` with ``Z = QR`` (Z iid N(0, 1), ``Q ← Q·sign(diag R)``)
``gaussian``    iid N(0, 1/r) entries (a Johnson–Lindenstrauss sketch)             I
``coordinate``  r distinct rows of the identity (block-coordinate descent)        (r/dim)·I
``svd``         top-r right singular vectors of a gradient (GaLore's choice)       data dependent
``hybrid``      GoLore@x%: ``svd`` before step (1−x)·T, ``stiefel`` from then on   —
==============  ===============================================================  ==============

Randomness comes only from the ``torch.Generator`` passed in, and random matrices are drawn on that
generator's device (then moved to ``device``): a seed gives the same P on every rank of one device
type. A CPU generator and a CUDA generator with the same seed give different (equally distributed)
samples; drawing on the GPU keeps a resample step cheap.

To add a sampler, subclass :class:`ProjectionSampler` and implement :meth:`sample`; set
``needs_gradient`` (or override :meth:`uses_gradient`) if it looks at the gradient.
"""
from __future__ import annotations

import math
import numbers
import warnings

import torch

__all__ = [
    "ProjectionSampler",
    "StiefelSampler",
    "GaussianSampler",
    "CoordinateSampler",
    "SVDSampler",
    "HybridSampler",
    "SAMPLERS",
    "make_sampler",
    "mix_seed",
    "generator_for",
]


def mix_seed(*values: int) -> int:
    """Deterministic 63-bit hash of integers (splitmix64 chain): the same on every rank and run."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def generator_for(*values: int, device=None) -> torch.Generator:
    """A generator on ``device`` (default CPU) seeded by :func:`mix_seed` of ``values`` (seed, group, cycle)."""
    return torch.Generator(device=device if device is not None else "cpu").manual_seed(mix_seed(*values))


class ProjectionSampler:
    """Interface: ``sample(rank, dim, generator, gradient=None) -> (rank, dim)`` matrix.

    ``gradient`` (shape ``(k, dim)``) is passed only when :meth:`uses_gradient` is true for the
    step at which the new cycle starts.
    """

    name = "custom"
    needs_gradient = False

    def uses_gradient(self, step: int) -> bool:
        """Whether the sample for a cycle starting at optimizer step ``step`` needs a gradient."""
        return self.needs_gradient

    def sample(self, rank, dim, generator, *, gradient=None, step=0, dtype=torch.float32, device=None):
        raise NotImplementedError

    def sample_many(self, rank, dim, generators, *, gradients=None, step=0, dtype=torch.float32, device=None):
        """One sample per generator (and gradient); samplers may override it to batch the work."""
        gradients = gradients if gradients is not None else [None] * len(generators)
        return [self.sample(rank, dim, g, gradient=grad, step=step, dtype=dtype, device=device)
                for g, grad in zip(generators, gradients)]

    def __repr__(self):
        return f"{type(self).__name__}()"


def _compute_dtype(dtype):
    """Samples are computed in float64 when float64 is asked for, else in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_rank(rank, dim):
    if not 1 <= rank <= dim:
        raise ValueError(f"projection rank must be in [1, {dim}], got {rank}")


class StiefelSampler(ProjectionSampler):
    """Uniform (Haar) on St(dim, rank): rows orthonormal, E[PᵀP] = (rank/dim)·I."""

    name = "stiefel"

    def sample(self, rank, dim, generator, *, gradient=None, step=0, dtype=torch.float32, device=None):
        return self.sample_many(rank, dim, [generator], dtype=dtype, device=device)[0]

    def sample_many(self, rank, dim, generators, *, gradients=None, step=0, dtype=torch.float32, device=None):
        """Draws each Gaussian from its own generator, then one batched QR for all of them."""
        _check_rank(rank, dim)
        z = torch.stack([torch.randn(dim, rank, generator=g, device=g.device, dtype=_compute_dtype(dtype))
                         for g in generators])
        z = z.to(device) if device is not None else z
        q, r = torch.linalg.qr(z)
        # Sign fix: makes the QR factor unique, hence Q Haar-distributed.
        sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
        sign[sign == 0] = 1
        return list((q * sign.unsqueeze(-2)).transpose(-2, -1).contiguous().to(dtype).unbind(0))


class GaussianSampler(ProjectionSampler):
    """iid N(0, 1/rank) entries: E[PᵀP] = I (rows are not orthonormal)."""

    name = "gaussian"

    def sample(self, rank, dim, generator, *, gradient=None, step=0, dtype=torch.float32, device=None):
        _check_rank(rank, dim)
        p = torch.randn(rank, dim, generator=generator, device=generator.device,
                        dtype=_compute_dtype(dtype)) / math.sqrt(rank)
        return p.to(device=device, dtype=dtype)


class CoordinateSampler(ProjectionSampler):
    """``rank`` distinct rows of the identity (sorted): z = x[..., idx], no projection matmul."""

    name = "coordinate"

    @staticmethod
    def indices(p: torch.Tensor) -> torch.Tensor:
        """The coordinates a coordinate projection keeps (the column of each row's 1)."""
        return p.argmax(dim=1)

    def sample(self, rank, dim, generator, *, gradient=None, step=0, dtype=torch.float32, device=None):
        _check_rank(rank, dim)
        idx = torch.randperm(dim, generator=generator, device=generator.device)[:rank].sort().values
        p = torch.zeros(rank, dim, dtype=dtype, device=idx.device)
        p[torch.arange(rank, device=idx.device), idx] = 1
        return p.to(device) if device is not None else p


class SVDSampler(ProjectionSampler):
    """Top-``rank`` right singular vectors of ``gradient`` (k × dim), as GaLore does.

    With no gradient (the first cycle) or when the SVD fails or is not finite, falls back to a
    Stiefel sample (with a warning in the failure case) instead of stopping training.
    """

    name = "svd"
    needs_gradient = True

    def __init__(self):
        self._fallback = StiefelSampler()

    def sample(self, rank, dim, generator, *, gradient=None, step=0, dtype=torch.float32, device=None):
        _check_rank(rank, dim)
        if gradient is None:
            return self._fallback.sample(rank, dim, generator, dtype=dtype, device=device)
        if gradient.shape[-1] != dim or gradient.shape[0] < rank:
            raise ValueError(f"SVD sampler: gradient of shape {tuple(gradient.shape)} cannot give "
                             f"{rank} singular vectors of dimension {dim}")
        g = gradient.detach().to(_compute_dtype(dtype))
        try:
            if not torch.isfinite(g).all():
                raise torch.linalg.LinAlgError("gradient has non-finite entries")
            _, _, vh = torch.linalg.svd(g, full_matrices=False)
            p = vh[:rank]
            if not torch.isfinite(p).all():
                raise torch.linalg.LinAlgError("SVD returned non-finite vectors")
        except (RuntimeError, torch.linalg.LinAlgError) as err:
            warnings.warn(f"SVD projection failed ({err}); using a Stiefel sample for this cycle",
                          RuntimeWarning, stacklevel=2)
            return self._fallback.sample(rank, dim, generator, dtype=dtype, device=device)
        p = p.contiguous().to(dtype)
        return p.to(device) if device is not None else p


class HybridSampler(ProjectionSampler):
    """GoLore@x%: SVD for cycles starting before step (1 − x)·T, Stiefel after."""

    name = "hybrid"

    def __init__(self, total_steps: int, random_fraction: float = 0.2):
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"projection='hybrid' needs total_steps, a positive int; got {total_steps!r}")
        if isinstance(random_fraction, bool) or not isinstance(random_fraction, numbers.Real) \
                or not 0.0 <= random_fraction <= 1.0:
            raise ValueError(f"random_fraction must be in [0, 1], got {random_fraction!r}")
        self.total_steps = total_steps
        self.random_fraction = float(random_fraction)
        self.switch_step = int(round((1.0 - self.random_fraction) * total_steps))
        self._svd, self._stiefel = SVDSampler(), StiefelSampler()

    def uses_gradient(self, step: int) -> bool:
        return step < self.switch_step

    def sample(self, rank, dim, generator, *, gradient=None, step=0, dtype=torch.float32, device=None):
        inner = self._svd if self.uses_gradient(step) else self._stiefel
        return inner.sample(rank, dim, generator, gradient=gradient, step=step, dtype=dtype, device=device)

    def sample_many(self, rank, dim, generators, *, gradients=None, step=0, dtype=torch.float32, device=None):
        inner = self._svd if self.uses_gradient(step) else self._stiefel
        return inner.sample_many(rank, dim, generators, gradients=gradients, step=step, dtype=dtype, device=device)

    def __repr__(self):
        return f"HybridSampler(total_steps={self.total_steps}, random_fraction={self.random_fraction})"


SAMPLERS = {
    "stiefel": StiefelSampler,
    "gaussian": GaussianSampler,
    "coordinate": CoordinateSampler,
    "svd": SVDSampler,
    "hybrid": HybridSampler,
}


def make_sampler(projection, *, total_steps=None, random_fraction=0.2) -> ProjectionSampler:
    """A sampler from a name in :data:`SAMPLERS` or a :class:`ProjectionSampler` instance."""
    if isinstance(projection, ProjectionSampler):
        return projection
    if not isinstance(projection, str) or projection not in SAMPLERS:
        raise ValueError(f"projection must be one of {sorted(SAMPLERS)} or a ProjectionSampler, "
                         f"got {projection!r}")
    if projection == "hybrid":
        if total_steps is None:
            raise ValueError("projection='hybrid' (GoLore@x%) needs total_steps=N, the planned number "
                             "of optimizer steps")
        return HybridSampler(total_steps, random_fraction)
    return SAMPLERS[projection]()

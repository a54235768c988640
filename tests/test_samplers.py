"""Projection samplers: shapes, orthonormality, Monte Carlo moments, reproducibility, SVD fallback."""
import warnings

import pytest
import torch

from rso.projections import (CoordinateSampler, GaussianSampler, HybridSampler, SVDSampler, StiefelSampler,
                             generator_for, make_sampler)

N_MC = 2000


def mc_mean(sampler, r, n, fn):
    acc = None
    for i in range(N_MC):
        P = sampler.sample(r, n, generator_for(7, i), dtype=torch.float64)
        v = fn(P)
        acc = v if acc is None else acc + v
    return acc / N_MC


def test_stiefel_rows_orthonormal():
    P = StiefelSampler().sample(5, 40, generator_for(0), dtype=torch.float64)
    assert P.shape == (5, 40)
    torch.testing.assert_close(P @ P.T, torch.eye(5, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("sampler,expected", [(StiefelSampler(), "r/n"), (CoordinateSampler(), "r/n"),
                                              (GaussianSampler(), "I")])
def test_expected_PtP(sampler, expected):
    r, n = 3, 8
    mean = mc_mean(sampler, r, n, lambda P: P.T @ P)
    target = torch.eye(n, dtype=torch.float64) * (r / n if expected == "r/n" else 1.0)
    # Per-entry std of the mean: Stiefel/coordinate ≤ 0.22/√N = 0.005 (tol 0.025 = 5σ);
    # Gaussian diagonal √(2/r)/√N = 0.018 (tol 0.08 = 4.4σ).
    tol = 0.025 if expected == "r/n" else 0.08
    assert (mean - target).abs().max() < tol


def test_stiefel_projection_residual():
    r, n = 3, 8
    G = torch.randn(5, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    resid = mc_mean(StiefelSampler(), r, n, lambda P: ((G @ P.T @ P - G) ** 2).sum())
    expected = (1 - r / n) * (G ** 2).sum()
    assert abs(resid / expected - 1) < 0.03


def test_same_seed_same_P_and_cycles_differ():
    for sampler in (StiefelSampler(), GaussianSampler(), CoordinateSampler()):
        a = sampler.sample(4, 16, generator_for(1, 2, 3))
        b = sampler.sample(4, 16, generator_for(1, 2, 3))
        c = sampler.sample(4, 16, generator_for(1, 2, 4))
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_coordinate_is_identity_rows():
    P = CoordinateSampler().sample(4, 10, generator_for(0))
    assert torch.equal(P.sum(1), torch.ones(4)) and set(P.unique().tolist()) == {0.0, 1.0}
    assert len(set(CoordinateSampler.indices(P).tolist())) == 4


def test_svd_top_right_singular_vectors():
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(12, 6, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(9, 6, generator=g, dtype=torch.float64))
    G = U @ torch.diag(torch.tensor([10.0, 8, 6, 1, 0.5, 0.1], dtype=torch.float64)) @ V.T
    P = SVDSampler().sample(3, 9, generator_for(0), gradient=G, dtype=torch.float64)
    # Same subspace as the top-3 right singular vectors (signs may differ).
    torch.testing.assert_close(P.T @ P, V[:, :3] @ V[:, :3].T, atol=1e-5, rtol=0)


def test_svd_without_gradient_is_stiefel_and_failure_falls_back_with_warning():
    s = SVDSampler()
    assert torch.equal(s.sample(3, 9, generator_for(5)), StiefelSampler().sample(3, 9, generator_for(5)))
    bad = torch.full((6, 9), float("nan"))
    with pytest.warns(RuntimeWarning, match="SVD projection failed"):
        P = s.sample(3, 9, generator_for(5), gradient=bad)
    assert torch.isfinite(P).all()
    torch.testing.assert_close(P @ P.T, torch.eye(3), atol=1e-5, rtol=0)


def test_hybrid_switches_from_svd_to_stiefel():
    h = HybridSampler(total_steps=1000, random_fraction=0.2)
    assert h.uses_gradient(0) and h.uses_gradient(799) and not h.uses_gradient(800)
    G = torch.randn(6, 9, dtype=torch.float64)
    early = h.sample(3, 9, generator_for(1), gradient=G, step=100, dtype=torch.float64)
    late = h.sample(3, 9, generator_for(1), gradient=G, step=900, dtype=torch.float64)
    torch.testing.assert_close(early, SVDSampler().sample(3, 9, generator_for(1), gradient=G, dtype=torch.float64))
    torch.testing.assert_close(late, StiefelSampler().sample(3, 9, generator_for(1), dtype=torch.float64))


def test_make_sampler_errors():
    with pytest.raises(ValueError, match="stiefel"):
        make_sampler("nope")
    with pytest.raises(ValueError, match="total_steps"):
        make_sampler("hybrid")
    with pytest.raises(ValueError, match="random_fraction"):
        make_sampler("hybrid", total_steps=10, random_fraction=1.5)
    with pytest.raises(ValueError, match="rank"):
        StiefelSampler().sample(0, 5, generator_for(0))


# ---------------------------------------------------------------- found by mutation testing (docs/mutation.md)
def test_hybrid_arguments_at_their_bounds_and_the_errors_beyond():
    assert HybridSampler(total_steps=1).switch_step == 1          # one step: the smallest valid plan
    assert HybridSampler(total_steps=10).switch_step == 8         # default random_fraction 0.2: GoLore@20%
    assert HybridSampler(10, random_fraction=0.0).switch_step == 10 and HybridSampler(10, 1.0).switch_step == 0
    assert repr(HybridSampler(10, 0.5)) == "HybridSampler(total_steps=10, random_fraction=0.5)"
    for bad in (0, -3, True, 2.0, "10"):
        with pytest.raises(ValueError) as err:
            HybridSampler(total_steps=bad)
        assert str(err.value) == f"projection='hybrid' needs total_steps, a positive int; got {bad!r}"
    for bad in (-0.1, 1.2):
        with pytest.raises(ValueError) as err:
            HybridSampler(10, random_fraction=bad)
        assert str(err.value) == f"random_fraction must be in [0, 1], got {bad!r}"


def test_hybrid_sample_without_a_step_is_the_first_cycle():
    h, G = HybridSampler(total_steps=5, random_fraction=0.8), torch.randn(6, 9, dtype=torch.float64)  # switch at 1
    want = SVDSampler().sample(3, 9, generator_for(1), gradient=G, dtype=torch.float64)
    torch.testing.assert_close(h.sample(3, 9, generator_for(1), gradient=G, dtype=torch.float64), want)
    torch.testing.assert_close(h.sample_many(3, 9, [generator_for(1)], gradients=[G], dtype=torch.float64)[0], want)


def test_svd_refuses_a_gradient_of_the_wrong_shape():
    s = SVDSampler()
    for shape in ((8, 6), (3, 8)):  # last dimension ≠ dim; fewer rows than the rank
        with pytest.raises(ValueError) as err:
            s.sample(4, 8, generator_for(0), gradient=torch.ones(shape))
        assert str(err.value) == f"SVD sampler: gradient of shape {shape} cannot give 4 singular vectors of dimension 8"


def test_svd_of_a_bf16_gradient_is_computed_in_fp32_and_returned_in_bf16():
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(12, 6, generator=g))
    V, _ = torch.linalg.qr(torch.randn(9, 6, generator=g))
    G = (U @ torch.diag(torch.tensor([10.0, 8, 6, 1, 0.5, 0.1])) @ V.T).bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to a Stiefel sample would warn
        P = SVDSampler().sample(3, 9, generator_for(0), gradient=G, dtype=torch.bfloat16)
    assert P.dtype == torch.bfloat16
    want = SVDSampler().sample(3, 9, generator_for(0), gradient=G.float(), dtype=torch.float32)
    assert (P.float() - want).abs().max() <= torch.finfo(torch.bfloat16).eps


def test_fallbacks_keep_the_requested_dtype_and_say_why():
    s = SVDSampler()
    assert s.sample(3, 9, generator_for(5), dtype=torch.float64).dtype == torch.float64          # no gradient
    with pytest.warns(RuntimeWarning) as record:
        P = s.sample(3, 9, generator_for(5), gradient=torch.full((6, 9), float("inf")), dtype=torch.float64)
    assert P.dtype == torch.float64
    assert str(record[0].message) == ("SVD projection failed (gradient has non-finite entries); using a Stiefel "
                                      "sample for this cycle")
    torch.testing.assert_close(P, StiefelSampler().sample(3, 9, generator_for(5), dtype=torch.float64))


def test_an_svd_that_returns_non_finite_vectors_falls_back_and_says_so(monkeypatch):
    """A finite gradient whose SVD comes back non-finite (a LAPACK failure, forced here) gets the Stiefel sample
    and a warning that names the cause."""
    real_svd = torch.linalg.svd

    def failing_svd(g, full_matrices=True):
        u, s, vh = real_svd(g, full_matrices=full_matrices)
        return u, s, vh * float("nan")

    monkeypatch.setattr(torch.linalg, "svd", failing_svd)
    G = torch.randn(6, 9, generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning) as record:
        P = SVDSampler().sample(3, 9, generator_for(5), gradient=G)
    assert [str(w.message) for w in record] == [
        "SVD projection failed (SVD returned non-finite vectors); using a Stiefel sample for this cycle"]
    torch.testing.assert_close(P, StiefelSampler().sample(3, 9, generator_for(5)), rtol=0, atol=0)


@pytest.mark.parametrize("sampler", [GaussianSampler(), CoordinateSampler(), StiefelSampler(), SVDSampler()],
                         ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_each_sampler_returns_the_requested_dtype_and_batches_like_single_draws(sampler, dtype):
    gens = [generator_for(3, c) for c in range(3)]
    many = sampler.sample_many(2, 7, gens, dtype=dtype)                      # gradients default to None
    single = [sampler.sample(2, 7, generator_for(3, c), dtype=dtype) for c in range(3)]
    assert all(P.dtype == dtype and P.shape == (2, 7) for P in many)
    for a, b in zip(many, single):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert repr(sampler) == f"{type(sampler).__name__}()"



def test_hybrid_batched_draws_switch_too_and_make_sampler_defaults():
    h, G = HybridSampler(total_steps=10, random_fraction=0.5), torch.randn(6, 9, dtype=torch.float64)
    late = h.sample_many(3, 9, [generator_for(1)], gradients=[G], step=5, dtype=torch.float64)[0]
    torch.testing.assert_close(late, StiefelSampler().sample(3, 9, generator_for(1), dtype=torch.float64))
    assert make_sampler("hybrid", total_steps=10).switch_step == 8  # GoLore@20% unless told otherwise
    with pytest.raises(ValueError) as err:
        make_sampler("hybrid")
    assert str(err.value) == ("projection='hybrid' (GoLore@x%) needs total_steps=N, the planned number of optimizer "
                              "steps")


def test_seed_hash_is_frozen():
    """A run resumed from an older checkpoint redraws its random P from (seed, parameter, cycle) with this hash
    (rso.optim keeps no generator state), so its values may never change between versions (recorded from the
    implementation on 1 December 2026)."""
    from rso.projections import mix_seed
    assert [mix_seed(0), mix_seed(0, 0), mix_seed(7, 1), mix_seed(1234, 3, 2), mix_seed(2 ** 40, 5)] == [
        6367277893379345895, 1970727333155262614, 2821166504716910302, 6755110533305875683, 2865345117464540770]
    assert mix_seed(-1) == mix_seed(2 ** 64 - 1) and all(0 <= mix_seed(s) < 2 ** 63 for s in range(100))
    assert generator_for(7, 1).initial_seed() == mix_seed(7, 1)

"""Property tests (hypothesis): the samplers' and the layer's contracts over many shapes, ranks and dtypes.

Each property runs a small, fixed set of examples (``derandomize=True``: the same examples on every run,
no example database), so the suite stays fast and deterministic.
"""
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

from rso.layers import SubspaceLinear  # noqa: E402
from rso.projections import CoordinateSampler, GaussianSampler, StiefelSampler, generator_for  # noqa: E402

FAST = settings(max_examples=30, deadline=None, derandomize=True, database=None)
DTYPES = st.sampled_from([torch.float32, torch.float64])


@st.composite
def rank_and_dim(draw, max_dim=48):
    dim = draw(st.integers(1, max_dim))
    return draw(st.integers(1, dim)), dim


def _eps(dtype):
    return torch.finfo(dtype).eps


@FAST
@given(rd=rank_and_dim(), seed=st.integers(0, 2**31 - 1), dtype=DTYPES)
def test_stiefel_sample_is_the_sign_fixed_q_factor(rd, seed, dtype):
    """P has orthonormal rows, and Pᵀ is the Q of the QR of the very Gaussian the generator draws with R's
    diagonal made positive (the sign fix that makes Q Haar-distributed): P·Z is upper triangular with a positive
    diagonal, and Z lies in the span of P's rows."""
    rank, dim = rd
    P = StiefelSampler().sample(rank, dim, generator_for(seed), dtype=dtype)
    assert P.shape == (rank, dim) and P.dtype == dtype
    # QR's orthonormality error grows like dim·eps of the dtype it is computed in
    tol = 8 * dim * _eps(dtype)
    torch.testing.assert_close(P.double() @ P.double().T, torch.eye(rank, dtype=torch.float64), atol=tol, rtol=0)
    Z = torch.randn(dim, rank, generator=generator_for(seed), dtype=dtype).double()
    R = P.double() @ Z
    scale = float(Z.norm())
    assert (R.diagonal() > 0).all()
    assert R.tril(-1).abs().max() <= tol * scale
    # Z lies in the row space of P (Z = Pᵀ R)
    torch.testing.assert_close(P.double().T @ R, Z, atol=tol * scale, rtol=0)


@FAST
@given(rd=rank_and_dim(), seed=st.integers(0, 2**31 - 1), dtype=DTYPES)
def test_coordinate_sample_is_distinct_sorted_rows_of_the_identity(rd, seed, dtype):
    rank, dim = rd
    P = CoordinateSampler().sample(rank, dim, generator_for(seed), dtype=dtype)
    assert P.shape == (rank, dim) and P.dtype == dtype
    idx = CoordinateSampler.indices(P)
    assert torch.equal(P, torch.eye(dim, dtype=dtype)[idx])  # exactly rows of I
    assert (idx[1:] > idx[:-1]).all()  # distinct and sorted
    assert torch.equal(P @ P.T, torch.eye(rank, dtype=dtype))


@FAST
@given(rd=rank_and_dim(), seed=st.integers(0, 2**31 - 1), dtype=DTYPES)
def test_gaussian_sample_is_the_generators_normal_draw_over_sqrt_rank(rd, seed, dtype):
    rank, dim = rd
    P = GaussianSampler().sample(rank, dim, generator_for(seed), dtype=dtype)
    assert P.shape == (rank, dim) and P.dtype == dtype
    draw = torch.randn(rank, dim, generator=generator_for(seed), dtype=dtype)
    torch.testing.assert_close(P, draw / rank ** 0.5, atol=0, rtol=2 * _eps(dtype))


@FAST
@given(rd=rank_and_dim(max_dim=12), sampler=st.sampled_from([StiefelSampler(), GaussianSampler(), CoordinateSampler()]),
       seed=st.integers(0, 2**31 - 1))
def test_samples_are_a_function_of_the_seed(rd, sampler, seed):
    rank, dim = rd
    a = sampler.sample(rank, dim, generator_for(seed), dtype=torch.float64)
    assert torch.equal(a, sampler.sample(rank, dim, generator_for(seed), dtype=torch.float64))
    with pytest.raises(ValueError):
        sampler.sample(dim + 1, dim, generator_for(seed))


@st.composite
def layer_case(draw):
    in_f, out_f = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    return {"in": in_f, "out": out_f, "rank": draw(st.integers(1, min(in_f, out_f))),
            "lead": tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))),  # token dims of x
            "bias": draw(st.booleans()), "scale": draw(st.floats(-2.0, 2.0, allow_nan=False)),
            "evaluation": draw(st.sampled_from(["merged", "split"])), "coordinate": draw(st.booleans()),
            "seed": draw(st.integers(0, 2**31 - 1))}


@FAST
@given(case=layer_case())
def test_layer_output_and_gradients_equal_autograd_of_the_formula_in_float64(case):
    """SubspaceLinear's forward and hand-written backward against autograd on y = x (W₀ + s·B P)ᵀ + b, in float64,
    for random shapes, ranks, scales, both evaluation orders, dense and coordinate projections; W₀ and P get no
    gradient."""
    g = torch.Generator().manual_seed(case["seed"])
    f64 = torch.float64
    layer = SubspaceLinear(case["in"], case["out"], case["rank"], bias=case["bias"], scale=case["scale"], dtype=f64)
    layer.evaluation = case["evaluation"]
    if case["coordinate"]:
        P = CoordinateSampler().sample(case["rank"], case["in"], g, dtype=f64)
    else:
        P = torch.randn(case["rank"], case["in"], generator=g, dtype=f64)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(case["out"], case["in"], generator=g, dtype=f64))
        layer.B.copy_(torch.randn(case["out"], case["rank"], generator=g, dtype=f64))
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(case["out"], generator=g, dtype=f64))
    layer.set_projection_(P, coordinate=case["coordinate"])
    x = torch.randn(*case["lead"], case["in"], generator=g, dtype=f64, requires_grad=True)
    upstream = torch.randn(*case["lead"], case["out"], generator=g, dtype=f64)

    y = layer(x)
    y.backward(upstream)

    W0, B = layer.weight.detach().clone(), layer.B.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True) if layer.bias is not None else None
    xr = x.detach().clone().requires_grad_(True)
    yr = xr @ (W0 + case["scale"] * B @ P).T + (b if b is not None else 0)
    yr.backward(upstream)

    # float64 sums of at most ~(in + rank)·|lead| products of O(1) values: a few hundred ulps of the largest
    def close(actual, expected):
        tol = 256 * _eps(f64) * max(1.0, float(expected.detach().abs().max()) if expected.numel() else 1.0)
        torch.testing.assert_close(actual, expected, atol=tol, rtol=0)

    close(y, yr)
    close(x.grad, xr.grad)
    close(layer.B.grad, B.grad)
    if b is not None:
        close(layer.bias.grad, b.grad)
    assert layer.weight.grad is None and not layer.P.requires_grad

"""rso.layers.quantized: bitsandbytes' storage formats, stochastic rounding, the requantizing merge."""
import pytest
import torch

from rso.layers import quantized as qz

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional
FOUR_BIT = ("nf4", "fp4")


def weight(out_f=24, in_f=80, seed=0):
    """in_f not a multiple of the block size: blocks straddle rows."""
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))


def sorted_code(kind):
    return torch.sort(F.get_4bit_type(kind, device="cpu")).values


@pytest.mark.parametrize("kind", FOUR_BIT)
def test_nearest_4bit_is_bitsandbytes_own(kind):
    W = weight()
    q = qz.quantize(W, kind)
    data, qs = F.quantize_4bit(W, blocksize=64, compress_statistics=False, quant_type=kind)
    assert torch.equal(q.data, data) and torch.equal(q.absmax, qs.absmax)
    assert q.data.dtype == torch.uint8 and q.data.shape == (W.numel() // 2, 1) and q.absmax.dtype == torch.float32
    # dequantized block by block from the flat layout (the reference bitsandbytes' generic kernel computes)
    codes = torch.stack([data.view(-1) >> 4, data.view(-1) & 0xF], 1).view(-1).long()
    ref = (F.get_4bit_type(kind, device="cpu")[codes].view(-1, 64) * qs.absmax[:, None]).view_as(W)
    assert torch.equal(qz.dequantize(q), ref)


def test_nearest_int8_is_bitsandbytes_own():
    W = weight()
    q = qz.quantize(W, "int8")
    CB, SCB, _ = F.int8_vectorwise_quant(W.clone())
    assert torch.equal(q.data, CB) and torch.equal(q.absmax, SCB)
    assert torch.equal(qz.dequantize(q), F.int8_vectorwise_dequant(CB, SCB))


@pytest.mark.parametrize("kind,nested", [("nf4", False), ("nf4", True), ("fp4", False), ("int8", False)])
def test_round_trip_keeps_codes(kind, nested):
    """quantize(deq(q)) is q: the same codes (fp4: the same values, it has ±0), the same values up to the
    rounding of recomputed scales (int8's 127·SCB/127; double quantization's 8-bit absmax)."""
    q = qz.quantize(weight(), kind, nested=nested)
    again = qz.quantize(qz.dequantize(q, torch.float32), kind, nested=nested)
    assert torch.equal(again.data, q.data) or kind == "fp4"
    tol = {"int8": 1e-6, "nf4": 1e-2 if nested else 0, "fp4": 0}[kind]
    torch.testing.assert_close(qz.dequantize(again), qz.dequantize(q), rtol=tol, atol=0)


@pytest.mark.parametrize("kind", ("nf4", "int8"))
def test_nearest_error_is_half_a_step(kind):
    W = weight()
    err = (qz.dequantize(qz.quantize(W, kind)) - W).abs()
    if kind == "int8":
        bound = W.abs().amax(1, keepdim=True) / 254 * (1 + 1e-5)
    else:
        half_gap = sorted_code(kind).diff().max() / 2
        bound = (W.reshape(-1, 64).abs().amax(1, keepdim=True) * half_gap * (1 + 1e-5)).expand(-1, 64).reshape(W.shape)
    assert bool((err <= bound).all())


@pytest.mark.parametrize("kind", FOUR_BIT)
def test_stochastic_values_are_neighbouring_code_points_packed_exactly(kind):
    W = weight()
    g = torch.Generator().manual_seed(1)
    rounded = qz._round_to_codebook(W, kind, 64, g)
    q = qz.quantize(rounded, kind)  # bitsandbytes' nearest packing keeps exact code points
    assert torch.equal(qz.dequantize(q), rounded)
    absmax = W.reshape(-1, 64).abs().amax(1, keepdim=True)
    assert torch.equal(q.absmax, absmax.view(-1))  # ±1 are code points: each block keeps its absmax
    u, v = (W.reshape(-1, 64) / absmax), (rounded.reshape(-1, 64) / absmax)
    code = sorted_code(kind)
    upper = torch.searchsorted(code, u).clamp(1, 15)
    assert bool(((v - code[upper - 1]).abs() < 1e-6).logical_or((v - code[upper]).abs() < 1e-6).all())


@pytest.mark.parametrize("kind", ("nf4", "int8"))
def test_stochastic_rounding_is_unbiased(kind):
    """N copies of one 4 × 64 block set in one call; each value's sample mean is within 5 standard errors of W,
    the standard error from the exact Bernoulli variance (u − lo)(hi − u)·absmax² / N (4·64 values: a false
    alarm has probability < 2e-4)."""
    n = 4000
    W = weight(4, 64, seed=3)
    q = qz.quantize(W.repeat(n, 1), kind, "stochastic", torch.Generator().manual_seed(2))
    samples = qz.dequantize(q).double().view(n, 4, 64)
    W64, absmax = W.double(), W.double().abs().amax(1, keepdim=True)
    if kind == "int8":
        x = W64 / absmax * 127
        var = (x - x.floor()) * (x.floor() + 1 - x) * (absmax / 127) ** 2
    else:
        u, code = W64 / absmax, sorted_code(kind).double()
        upper = torch.searchsorted(code, u).clamp(1, 15)
        var = (u - code[upper - 1]) * (code[upper] - u) * absmax ** 2
    z = (samples.mean(0) - W64) / (var / n).sqrt().clamp_min(1e-12)
    assert float(z.abs().max()) < 5
    assert float((samples - W64).abs().amax(0).max()) > 0  # it is random, not nearest


@pytest.mark.parametrize("kind", ("nf4", "int8"))
def test_zero_and_tiny_blocks_stay_finite(kind):
    W = weight(4, 128)
    W[0] = 0
    W[1] = W[1] * 1e-39  # subnormal
    W[2] = W[2] * 1e35
    for rounding in qz.ROUNDINGS:
        deq = qz.dequantize(qz.quantize(W, kind, rounding, torch.Generator().manual_seed(0)))
        assert bool(torch.isfinite(deq).all()) and bool((deq[0] == 0).all())
        step = 2 / 127 if kind == "int8" else float(sorted_code(kind).diff().max())
        assert float((deq[2] - W[2]).abs().max()) <= step * float(W[2].abs().max())  # within one code step


@pytest.mark.parametrize("kind", ("nf4", "int8"))
def test_requantize_is_the_merge_and_feedback_its_residual(kind):
    q = qz.quantize(weight(), kind)
    delta = 0.05 * weight(seed=1)
    target = qz.dequantize(q) + delta
    near, none = qz.requantize(q, delta, "nearest")
    assert none is None and torch.equal(near.data, qz.quantize(target, kind).data)
    new, R = qz.requantize(q, delta, "stochastic+feedback", torch.Generator().manual_seed(0))
    assert torch.equal(R, target - qz.dequantize(new))
    same, _ = qz.requantize(q, delta, "stochastic", torch.Generator().manual_seed(0))
    assert torch.equal(same.data, new.data)  # one rounding, with or without the residual


@pytest.mark.parametrize("kind", ("nf4", "int8"))
def test_requantize_refuses_non_finite_and_out_of_range(kind):
    q = qz.quantize(weight(), kind)
    before = [t.clone() for t in q.tensors()]
    bad = torch.zeros(q.shape)
    bad[3, 5] = float("nan")
    with pytest.raises(FloatingPointError, match="inf/nan"):
        qz.requantize(q, bad, "stochastic", torch.Generator())
    q16 = qz.quantize(weight().half(), kind)
    with pytest.raises(FloatingPointError, match=f"exceeds what {kind} in torch.float16 holds"):
        qz.requantize(q16, torch.full(q.shape, 7e4), "nearest")
    if kind == "int8":  # bitsandbytes dequantizes q·SCB·(1/127): SCB ≤ fp32 max / 127
        with pytest.raises(FloatingPointError, match="exceeds what int8 in torch.float32 holds"):
            qz.requantize(q, torch.full(q.shape, 3e36), "nearest")
    assert all(torch.equal(a, b) for a, b in zip(before, q.tensors()))


@pytest.mark.parametrize("kind", ("nf4", "int8"))
def test_requantize_never_yields_non_finite(kind):
    g = torch.Generator().manual_seed(5)
    q = qz.quantize(weight(), kind)
    for scale in (1e-40, 1e-20, 1.0, 1e20, 1e35):
        for mode in qz.MERGE_MODES:
            new, R = qz.requantize(q, torch.randn(q.shape, generator=g) * scale, mode, g)
            assert bool(torch.isfinite(qz.dequantize(new)).all())
            assert R is None or bool(torch.isfinite(R).all())


def test_residual_coordinates_are_least_squares():
    g = torch.Generator().manual_seed(0)
    R = torch.randn(6, 20, dtype=torch.float64, generator=g)
    P = torch.randn(4, 20, dtype=torch.float64, generator=g) / 2  # not orthonormal (the Gaussian sampler's)
    ref = torch.linalg.lstsq(P.T, R.T).solution.T
    torch.testing.assert_close(qz.residual_coordinates(R, P), ref)
    Q = torch.linalg.qr(P.T)[0].T  # orthonormal rows: R Qᵀ
    torch.testing.assert_close(qz.residual_coordinates(R, Q), R @ Q.T)


def test_state_entries_are_linear4bit_keys_and_read_back():
    W = weight(32, 64)
    module = bnb.nn.Linear4bit(64, 32, bias=False, quant_type="nf4", compress_statistics=False)
    module.weight = bnb.nn.Params4bit(W.clone(), requires_grad=False, quant_type="nf4", compress_statistics=False,
                                      module=module).to("cpu")
    theirs = module.state_dict()
    q = qz.quantize(W, "nf4")
    mine = qz.state_entries(q)
    assert set(mine) == set(theirs)
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key
    back = qz.read_state_entries({"l." + k: v for k, v in mine.items()}, "l.", q)
    assert all(torch.equal(a, b) for a, b in zip(back.tensors(), q.tensors()))


def test_read_state_entries_refuses_another_layout():
    q = qz.quantize(weight(32, 64), "nf4")
    int8 = qz.state_entries(qz.quantize(weight(32, 64), "int8"))
    with pytest.raises(ValueError, match="holds int8 .* the layer nf4"):
        qz.read_state_entries(dict(int8), "", q)
    codes_only = {"weight": q.data}
    with pytest.raises(ValueError, match="without their scales"):
        qz.read_state_entries(codes_only, "", q)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r"kind must be one of \('int8', 'nf4', 'fp4'\)"):
        qz.quantize(weight(), "int4")
    with pytest.raises(ValueError, match="rounding must be one of"):
        qz.quantize(weight(), "nf4", "up")
    with pytest.raises(ValueError, match="mode must be one of"):
        qz.requantize(qz.quantize(weight(), "nf4"), torch.zeros(24, 80), "feedback")
    with pytest.raises(FloatingPointError, match="inf/nan"):
        qz.quantize(torch.full((4, 64), float("inf")), "nf4")

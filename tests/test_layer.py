"""SubspaceLinear math: forward, gradients against autograd, saved tensors, dtypes, shared projections."""
import pytest
import torch
from torch import nn

import rso
from conftest import OpRecorder
from rso.layers import SubspaceLinear, SubspaceLinearFunction, project
from rso.projections import StiefelSampler, generator_for


def make_layer(in_f=12, out_f=10, rank=4, scale=0.5, bias=True, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    layer = SubspaceLinear(in_f, out_f, rank, bias=bias, scale=scale, dtype=dtype)
    layer.set_projection_(StiefelSampler().sample(rank, in_f, generator_for(seed), dtype=dtype))
    with torch.no_grad():
        layer.B.normal_()
        if bias:
            layer.bias.normal_()
    return layer


def test_forward_equals_effective_linear():
    layer = make_layer()
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    ref = nn.functional.linear(x, layer.weight + layer.scale * layer.B @ layer.P, layer.bias)
    torch.testing.assert_close(layer(x), ref)


def test_gradients_match_autograd_on_effective_weight():
    layer = make_layer()
    x = torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 3, 10, dtype=torch.float64)
    (layer(x) - target).pow(2).sum().backward()

    W = (layer.weight + layer.scale * layer.B @ layer.P).detach().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    (nn.functional.linear(x2, W, b) - target).pow(2).sum().backward()

    torch.testing.assert_close(layer.B.grad, layer.scale * W.grad @ layer.P.T)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(layer.bias.grad, b.grad)
    assert layer.weight.grad is None and not layer.weight.requires_grad


@pytest.mark.parametrize("merged", [True, False])
@pytest.mark.parametrize("coordinate", [False, True])
def test_gradcheck_both_evaluation_orders(merged, coordinate):
    torch.manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([0, 3]) if coordinate else None
    P = torch.zeros(2, 5, dtype=torch.float64) if coordinate else torch.randn(2, 5, dtype=torch.float64)
    if coordinate:
        P[torch.arange(2), index] = 1
    W = torch.randn(4, 5, dtype=torch.float64)
    B = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def f(x, B, b):
        return SubspaceLinearFunction.apply(x, project(x, P, index), W, B, P, index, b, 0.7, merged, None)

    torch.testing.assert_close(f(x, B, b), x @ (W + 0.7 * B @ P).T + b)
    assert torch.autograd.gradcheck(f, (x, B, b))


def saved_activations(fn, exclude):
    """(shape, numel) of tensors saved for backward whose storage is not in ``exclude``."""
    out = []
    skip = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            out.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return out


def test_saves_only_the_projection():
    layer = make_layer(in_f=64, out_f=32, rank=8, dtype=torch.float32)
    x = torch.randn(3, 7, 64, requires_grad=True)
    saved = saved_activations(lambda: layer(x), list(layer.parameters()) + list(layer.buffers()))
    assert saved == [(21, 8)]  # z = x Pᵀ (3 × 7 tokens), never the 64-wide x


@pytest.mark.parametrize("evaluation", ["split", "merged"])
def test_coordinate_projection_indexes_instead_of_matmul(evaluation):
    layer = make_layer(in_f=12, out_f=10, rank=4)
    layer.evaluation = evaluation
    idx = torch.tensor([1, 4, 7, 9])
    P = torch.zeros(4, 12, dtype=torch.float64)
    P[torch.arange(4), idx] = 1
    layer.set_projection_(P, coordinate=True)
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    with OpRecorder() as forward:
        y = layer(x)
    assert layer._coordinate_index().tolist() == idx.tolist()
    torch.testing.assert_close(y, nn.functional.linear(x, layer.weight + layer.scale * layer.B @ P, layer.bias))
    with OpRecorder() as backward:
        y.sum().backward()
    # P (4 × 12) is read once, for its index; z = x[:, index] and x's gradient is scattered back by index
    assert forward.ops_reading((4, 12)) == {"argmax"} and backward.ops_reading((4, 12)) == set()
    if evaluation == "split":
        assert "index_select" in forward.ops_reading((5, 12)) and "index_add_" in backward.ops_reading((5, 4))
    torch.testing.assert_close(x.grad, (layer.weight + layer.scale * layer.B @ P).sum(0).expand(5, 12))


def float64_reference(layer, x, G):
    """Output and gradients of ``layer`` at ``x`` with upstream gradient ``G``, in float64 from the layer's own
    values, each with the magnitude Σ|terms| of every entry's sum (what rounding errors scale with)."""
    W0, B, P = (t.detach().double() for t in (layer.weight, layer.B, layer.P))
    b = layer.bias.detach().double()
    s = layer.scale
    x, G = x.detach().double().reshape(-1, layer.in_features), G.detach().double().reshape(-1, layer.out_features)
    z = x @ P.T
    BP_abs = B.abs() @ P.abs()
    return {
        "y": (x @ W0.T + s * z @ B.T + b, x.abs() @ W0.abs().T + s * x.abs() @ BP_abs.T + b.abs()),
        "B": (s * G.T @ z, s * G.abs().T @ (x.abs() @ P.abs().T)),
        "x": (G @ (W0 + s * B @ P), G.abs() @ (W0.abs() + s * BP_abs)),
        "bias": (G.sum(0), G.abs().sum(0)),
    }


def assert_rounding_close(actual, expected, magnitude, dtype, what):
    """``actual``, computed in ``dtype`` (fp32 accumulation), against a float64 ``expected``.

    With u = eps/2 the unit roundoff of ``dtype``: each entry is a sum that the layer rounds a few times (inputs
    cast to ``dtype``, z, the partial products, the sum), each rounding of relative size ≤ u, so elementwise
    |err| ≤ 4u·Σ|terms| (``magnitude``); and since those roundings are independent, norm-wise
    ‖err‖ ≤ 2u·‖expected‖ (measured: 0.5–1.2u). A 3% error in ``scale`` is ≈ 5u (bf16) and ≈ 40u (fp16) here.
    """
    u = torch.finfo(dtype).eps / 2
    err = (actual.detach().double().reshape(expected.shape) - expected).abs()
    worst = float((err / (4 * u * magnitude)).max())
    assert worst <= 1, f"{what}: elementwise error {worst:.2f}× the bound 4u·Σ|terms| ({dtype})"
    rel = float(err.norm() / expected.norm()) / u
    assert rel <= 2, f"{what}: norm-wise relative error {rel:.2f}u > 2u ({dtype})"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_low_precision(dtype):
    layer = make_layer(in_f=32, out_f=16, rank=8, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 32, generator=g).requires_grad_(True)
    G = torch.randn(4, 16, generator=g)
    ref = float64_reference(layer, x, G)  # from the fp32 values autocast rounds to ``dtype``
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype
    assert_rounding_close(y, *ref["y"], dtype, "output")
    (y.float() * G).sum().backward()
    assert layer.B.grad.dtype == torch.float32 and layer.bias.grad.dtype == torch.float32
    assert_rounding_close(layer.B.grad, *ref["B"], dtype, "B.grad")
    assert_rounding_close(x.grad, *ref["x"], dtype, "x.grad")
    assert_rounding_close(layer.bias.grad, *ref["bias"], dtype, "bias.grad")


def test_bf16_weights_without_autocast():
    layer = make_layer(in_f=32, out_f=16, rank=8, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 32, generator=g).to(torch.bfloat16).requires_grad_(True)
    G = torch.randn(2, 5, 16, generator=g).to(torch.bfloat16)
    ref = float64_reference(layer, x, G)  # the same bf16 weights and inputs, exactly, in float64
    y = layer(x)
    assert y.dtype == torch.bfloat16
    assert_rounding_close(y, *ref["y"], torch.bfloat16, "output")
    (y * G).sum().backward()
    assert layer.B.grad.dtype == torch.bfloat16 and x.grad.shape == x.shape
    assert_rounding_close(layer.B.grad, *ref["B"], torch.bfloat16, "B.grad")
    assert_rounding_close(x.grad, *ref["x"], torch.bfloat16, "x.grad")


def test_shared_projection_stores_one_z_and_matches_unshared_gradients():
    torch.manual_seed(0)
    block = nn.ModuleDict({n: nn.Linear(16, 12, dtype=torch.float64) for n in ("q_proj", "k_proj", "v_proj")})
    unshared = nn.ModuleDict({n: nn.Linear(16, 12, dtype=torch.float64) for n in ("q_proj", "k_proj", "v_proj")})
    unshared.load_state_dict(block.state_dict())
    rso.wrap(block, rank=4, tau=None, share_projections=True)
    rso.wrap(unshared, rank=4, tau=None, share_projections=False)
    P = block["q_proj"].P
    assert all(torch.equal(block[n].P, P) for n in ("k_proj", "v_proj"))
    with torch.no_grad():
        for n in block:
            unshared[n].P.copy_(P)
            block[n].B.normal_()
            unshared[n].B.copy_(block[n].B)

    x = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    params = list(block.parameters()) + list(block.buffers())
    saved = saved_activations(lambda: [block[n](x).sum().backward() for n in block], params)
    assert saved.count((6, 4)) == 3  # autograd saves the same z (2 × 3 tokens) three times...
    store = set()

    def pack(t):
        if t.shape[-1] == 4:
            store.add(t.untyped_storage().data_ptr())
        return t

    x.grad = None
    block.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = sum((block[n](x) ** 2).sum() for n in block)
    fixed = {t.untyped_storage().data_ptr() for t in params}
    assert len(store - fixed) == 1  # ...but it is one storage: the input costs rank once
    loss.backward()
    x_ref = x.detach().clone().requires_grad_(True)
    sum((unshared[n](x_ref) ** 2).sum() for n in unshared).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    for n in block:
        torch.testing.assert_close(block[n].B.grad, unshared[n].B.grad)


@pytest.mark.parametrize("evaluation", ["split", "merged"])
def test_P_follows_the_compute_dtype(evaluation):
    # As under an FSDP2 mixed-precision policy: parameters and inputs bf16, the P buffer left fp32.
    layer = make_layer(in_f=32, out_f=16, rank=8, dtype=torch.bfloat16)
    layer.P.data = StiefelSampler().sample(8, 32, generator_for(0), dtype=torch.float32)
    layer.evaluation = evaluation
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 32, generator=g).to(torch.bfloat16).requires_grad_(True)
    G = torch.randn(3, 16, generator=g).to(torch.bfloat16)
    ref = float64_reference(layer, x, G)  # with the fp32 P the layer rounds to bf16
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.P.dtype == torch.float32
    assert_rounding_close(y, *ref["y"], torch.bfloat16, "output")
    (y * G).sum().backward()
    assert layer.B.grad.dtype == torch.bfloat16
    assert_rounding_close(layer.B.grad, *ref["B"], torch.bfloat16, "B.grad")
    assert_rounding_close(x.grad, *ref["x"], torch.bfloat16, "x.grad")


# --- found by mutation testing (docs/mutation.md) ------------------------------------------------------------------
def test_constructor_defaults_and_init_match_nn_linear():
    # Same seed, same draw: the frozen W₀ of a fresh layer is nn.Linear's kaiming_uniform_(a=√5) init.
    torch.manual_seed(0)
    ref = nn.Linear(12, 7)
    torch.manual_seed(0)
    layer = SubspaceLinear(12, 7, rank=3)
    torch.testing.assert_close(layer.weight, ref.weight, rtol=0, atol=0)
    assert layer.scale == 1.0 and layer.bias is not None and torch.equal(layer.bias, torch.zeros(7))
    assert SubspaceLinear(12, 7, rank=3, bias=False).bias is None


def test_state_dict_keep_vars_returns_the_parameters():
    layer = SubspaceLinear(6, 4, rank=2)
    sd = layer.state_dict(keep_vars=True)
    assert sd["B"] is layer.B and sd["weight"] is layer.weight
    assert not isinstance(layer.state_dict()["B"], nn.Parameter)


def test_gradient_capture_accumulates_low_precision_in_fp32():
    from rso.layers import GradientCapture
    g = torch.Generator().manual_seed(0)
    G, X = torch.randn(2, 5, 4, generator=g, dtype=torch.float64), torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    cap = GradientCapture()
    for _ in range(2):
        cap.add(G.to(torch.bfloat16), X.to(torch.bfloat16))
    assert cap.grad.dtype == torch.float32
    ref = 2 * G.to(torch.bfloat16).double().reshape(-1, 4).T @ X.to(torch.bfloat16).double().reshape(-1, 6)
    torch.testing.assert_close(cap.grad.double(), ref, rtol=1e-6, atol=1e-6)


def test_effective_weight_and_merge_are_w0_plus_scaled_BP_rounded_once():
    g = torch.Generator().manual_seed(3)
    layer = make_layer(in_f=32, out_f=16, rank=4, scale=0.75)
    with torch.no_grad():
        layer.B.copy_(torch.randn(16, 4, generator=g, dtype=torch.float64))
    W0, B, P = layer.weight.clone(), layer.B.clone(), layer.P.clone()
    torch.testing.assert_close(layer.effective_weight(), W0 + 0.75 * B @ P, rtol=1e-14, atol=1e-14)
    layer.merge_()
    torch.testing.assert_close(layer.weight, W0 + 0.75 * B @ P, rtol=1e-14, atol=1e-14)
    assert torch.count_nonzero(layer.B) == 0
    # bf16 weights: the sum is formed in fp32 and rounded to bf16 once (not in bf16, term by term).
    low = make_layer(in_f=32, out_f=16, rank=4, scale=0.75, dtype=torch.bfloat16)
    with torch.no_grad():
        low.B.copy_(torch.randn(16, 4, generator=g))
    ref = (low.weight.float() + 0.75 * (low.B.float() @ low.P.float())).to(torch.bfloat16)
    eff = low.effective_weight()
    assert eff.dtype == torch.bfloat16 and torch.equal(eff, ref)


def _group(n=2, dtype=torch.float64):
    from rso.layers import ProjectionGroup
    members = [make_layer(in_f=12, out_f=6, rank=3, dtype=dtype, seed=i) for i in range(n)]
    return ProjectionGroup(members), members


def test_group_shares_one_P_stored_once_and_ties_again_after_conversion():
    group, (a, b, c) = _group(3)
    assert a.P is b.P and b.P is c.P
    assert [k for k in nn.ModuleList([a, b, c]).state_dict() if k.endswith(".P")] == ["0.P"]
    nn.ModuleList([a, b, c]).float()
    assert a.P.dtype == torch.float32 and a.P is b.P and b.P is c.P
    a.double()  # one member alone: the others keep their dtype and their own (shared) P
    assert b.P.dtype == torch.float32 and c.P is b.P and a.P is not b.P


def test_is_conv1d_and_from_module_of_a_conv1d():
    from transformers.pytorch_utils import Conv1D
    from rso.layers import is_conv1d
    torch.manual_seed(0)
    conv = Conv1D(6, 8)  # nf=6 outputs, nx=8 inputs, weight stored 8×6
    assert is_conv1d(conv) and not is_conv1d(nn.Linear(8, 6))

    class Conv1D(nn.Module):  # the name alone is not enough
        def __init__(self, nf=None, weight=None):
            super().__init__()
            if nf is not None:
                self.nf = nf
            if weight is not None:
                self.weight = weight
    assert not is_conv1d(Conv1D(weight=nn.Parameter(torch.ones(2, 2))))
    assert not is_conv1d(Conv1D(nf=2))
    layer = SubspaceLinear.from_module(conv, rank=2)
    assert layer.layout == "conv1d" and (layer.out_features, layer.in_features) == (6, 8)
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), conv(x))


def test_from_module_of_a_linear_keeps_bias_and_requires_grad_and_refuses_others():
    lin = nn.Linear(8, 5)
    lin.weight.requires_grad_(False)
    layer = SubspaceLinear.from_module(lin, rank=2)
    assert layer.layout == "linear" and layer.scale == 1.0 and layer.bias is lin.bias
    assert layer.weight_requires_grad is False
    assert layer.weight.data_ptr() == lin.weight.data_ptr()  # storage reused, not copied
    with pytest.raises(TypeError, match="got Embedding"):
        SubspaceLinear.from_module(nn.Embedding(4, 4), rank=2)


def test_group_cache_is_keyed_on_the_input_and_dropped_after_every_member_read_it():
    group, members = _group(3)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in members:
            m.B.copy_(torch.randn(m.B.shape, generator=g, dtype=torch.float64))
    x1, x2 = (torch.randn(4, 12, generator=g, dtype=torch.float64) for _ in range(2))
    plain = lambda m, x: x @ m.effective_weight().T + m.bias  # noqa: E731
    a, b, c = members
    for m in members:
        torch.testing.assert_close(m(x1), plain(m, x1))
    assert group._z is None and group._key is None  # every member read it: dropped
    a(x1)
    torch.testing.assert_close(b(x2), plain(b, x2))  # another tensor: b projects its own input
    x2.mul_(2)  # same tensor, new version
    torch.testing.assert_close(c(x2), plain(c, x2))
    a(x1)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # another compute dtype: no reuse of a's fp64 z
        yb = b(x1)
    assert yb.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a(x1)
    torch.testing.assert_close(c(x1), plain(c, x1))


@pytest.mark.parametrize("evaluation", ["split", "merged"])
def test_armed_capture_accumulates_the_full_weight_gradient_over_micro_batches(evaluation):
    layer = make_layer(in_f=12, out_f=10, rank=4)
    layer.evaluation = evaluation
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(2, 3, 12, generator=g, dtype=torch.float64) for _ in range(2)]
    Gs = [torch.randn(2, 3, 10, generator=g, dtype=torch.float64) for _ in range(2)]
    assert layer.take_captured_gradient() is None
    layer.arm_capture()
    for x, G in zip(xs, Gs):
        (layer(x) * G).sum().backward()
    ref = sum(G.reshape(-1, 10).T @ x.reshape(-1, 12) for x, G in zip(xs, Gs))
    grad = layer.take_captured_gradient()
    assert grad.dtype == torch.float64
    torch.testing.assert_close(grad, ref, rtol=1e-12, atol=1e-12)
    assert layer.take_captured_gradient() is None  # taken once; the next step saves no x


@pytest.mark.parametrize("scale", [1.0, 2.0, 0.25])
def test_B_grad_is_scale_times_gT_z(scale):
    layer = make_layer(in_f=12, out_f=10, rank=4, scale=scale)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(5, 12, generator=g, dtype=torch.float64)
    G = torch.randn(5, 10, generator=g, dtype=torch.float64)
    (layer(x) * G).sum().backward()
    torch.testing.assert_close(layer.B.grad, scale * G.T @ (x @ layer.P.T), rtol=1e-12, atol=1e-12)


def test_use_merged_is_the_flop_rule_at_its_threshold():
    from rso.layers import use_merged
    # merged iff 4·m·n·r < t·(2n + 4m)·r, i.e. t > 4mn / (2n + 4m): t > 4 for m = n = 6, t > 10 for m=10, n=20.
    for rank in (1, 3, 6):
        assert not use_merged(4, 6, 6, rank) and use_merged(5, 6, 6, rank)
        assert not use_merged(10, 10, 20, rank) and use_merged(11, 10, 20, rank)
    assert not use_merged(1, 64, 64, 8) and use_merged(4096, 64, 64, 8)


def _coordinate_P(rows, dim):
    P = torch.zeros(len(rows), dim, dtype=torch.float64)
    P[torch.arange(len(rows)), torch.tensor(rows)] = 1
    return P


def test_coordinate_index_follows_an_in_place_change_of_P(monkeypatch):
    layer = make_layer(in_f=8, out_f=5, rank=3)
    with torch.no_grad():
        layer.B.copy_(torch.randn(5, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64))
    layer.set_projection_(_coordinate_P([1, 4, 6], 8), coordinate=True)
    x = torch.randn(2, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ layer.effective_weight().T + layer.bias)
    cached = layer._coordinate_index()
    assert layer._coordinate_index() is cached  # one argmax per version of P, not one per forward
    with torch.no_grad():
        layer.P.copy_(_coordinate_P([0, 2, 7], 8))  # as a load_state_dict does: same tensor, new version
    assert layer._coordinate_index().tolist() == [0, 2, 7]
    assert layer._coordinate_index() is not cached and layer._coordinate_index() is layer._coordinate_index()
    torch.testing.assert_close(layer(x), x @ layer.effective_weight().T + layer.bias)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the traced path: argmax of each row
    assert layer._coordinate_index().tolist() == [0, 2, 7]


def test_autocast_without_bias():
    layer = make_layer(in_f=16, out_f=8, rank=4, bias=False, dtype=torch.float32)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.bias is None
    ref = x.double() @ layer.effective_weight().double().T
    torch.testing.assert_close(y.double(), ref, rtol=0.02, atol=0.05)


def test_build_defaults_buffers_and_rank_validation():
    layer = SubspaceLinear(8, 4, rank=2)
    assert (layer.layout, layer.weight_requires_grad, layer.coordinate, layer.evaluation) == ("linear", True, False, "auto")
    for name in ("step", "cycle", "seed"):
        buf = layer.get_buffer(name)
        assert buf.dtype == torch.long and buf.shape == () and buf.item() == 0
    assert layer.identity.dtype == torch.uint8 and layer.identity.numel() == 0
    meta = SubspaceLinear(8, 4, rank=2, device="meta")  # every tensor follows W₀'s device
    assert {t.device.type for t in [*meta.parameters(), *meta.buffers()]} == {"meta"}
    for bad in (0, 5, True, 2.0):
        with pytest.raises(ValueError, match=r"rank must be an int in \[1, 4\], got"):
            SubspaceLinear(8, 4, rank=bad)


@pytest.mark.parametrize("n", [2, 3])
def test_group_of_two_or_more_projects_each_input_once(monkeypatch, n):
    import rso.layers.subspace_linear as sl
    calls = []
    real = sl.project
    monkeypatch.setattr(sl, "project", lambda *a: calls.append(1) or real(*a))
    _, members = _group(n)
    x = torch.randn(4, 12, dtype=torch.float64)
    for m in members:
        m(x)
    assert len(calls) == 1


def test_evaluation_order_chosen_per_call(monkeypatch):
    import rso.layers.subspace_linear as sl
    seen = []
    real = sl.SubspaceLinearFunction.apply
    monkeypatch.setattr(sl.SubspaceLinearFunction, "apply", lambda *a: seen.append(a[8]) or real(*a))
    layer = make_layer(in_f=6, out_f=6, rank=2)  # merged iff tokens > 4 (see the FLOP rule test)
    for evaluation, tokens in [("auto", 4), ("auto", 5), ("merged", 1), ("split", 64)]:
        layer.evaluation = evaluation
        layer(torch.randn(tokens, 6, dtype=torch.float64))
    assert seen == [False, True, True, False]


# --- the CPU low-precision GEMM layout (layers/functional.py) ----------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_gemm_lhs_is_column_major_only_for_low_precision_cpu_tensors(dtype):
    from rso.layers.functional import gemm_lhs
    t = torch.randn(2, 3, 5).to(dtype)
    out = gemm_lhs(t)
    assert out.shape == (6, 5) and torch.equal(out, t.reshape(6, 5))
    if dtype in (torch.bfloat16, torch.float16):
        assert out.stride() == (1, 6)  # column-major: the fast layout against a row-major W on the CPU
    else:
        assert out.is_contiguous() and out.data_ptr() == t.data_ptr()  # no copy


@pytest.mark.parametrize("evaluation", ["split", "merged", "coordinate"])
def test_bf16_backward_hands_column_major_left_operands_and_keeps_the_values(evaluation, monkeypatch):
    import rso.layers.functional as functional
    layer = make_layer(in_f=32, out_f=16, rank=8, dtype=torch.bfloat16)
    if evaluation == "coordinate":
        P = torch.zeros(8, 32, dtype=torch.bfloat16)
        P[torch.arange(8), torch.arange(0, 32, 4)] = 1
        layer.set_projection_(P, coordinate=True)
    else:
        layer.evaluation = evaluation
    seen = []
    real = functional.gemm_lhs

    def spy(t):
        out = real(t)
        seen.append((tuple(out.shape), out.stride()))
        return out

    monkeypatch.setattr(functional, "gemm_lhs", spy)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, generator=g).to(torch.bfloat16).requires_grad_(True)
    G = torch.randn(2, 3, 16, generator=g).to(torch.bfloat16)
    ref = float64_reference(layer, x, G)
    y = layer(x)
    (y * G).sum().backward()
    assert ((6, 16), (1, 6)) in seen  # g, column-major, for g W₀ (and g B)
    if evaluation == "split":
        assert ((6, 8), (1, 6)) in seen  # g B, column-major, for (g B) P
    if evaluation == "merged":
        assert ((16, 8), (1, 16)) in seen  # B, column-major, for W₀ + s·B P
    assert x.grad.shape == x.shape and x.grad.is_contiguous()
    assert_rounding_close(y, *ref["y"], torch.bfloat16, "output")
    assert_rounding_close(x.grad, *ref["x"], torch.bfloat16, "x.grad")
    assert_rounding_close(layer.B.grad, *ref["B"], torch.bfloat16, "B.grad")


def test_load_state_dict_reports_unexpected_keys_and_size_mismatches():
    layer = make_layer()
    sd = layer.state_dict()
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "bogus"'):
        layer.load_state_dict({**sd, "bogus": torch.zeros(1)})
    with pytest.raises(RuntimeError, match=r"size mismatch for bias: copying a param with shape torch\.Size\(\[3\]\)"):
        layer.load_state_dict({**sd, "bias": torch.zeros(3, dtype=torch.float64)})
    layer.load_state_dict({k: v for k, v in sd.items() if k != "_extra_state"})  # older checkpoints have none


def test_deep_copy_between_group_members_forwards_carries_no_activation():
    import copy
    block = nn.ModuleDict({n: nn.Linear(8, 6, dtype=torch.float64) for n in ("q_proj", "k_proj", "v_proj")})
    rso.wrap(block, rank=3, tau=None, share_projections=True)
    x = torch.randn(2, 8, dtype=torch.float64)
    block["q_proj"](x)  # z is cached for k and v now
    group = block["q_proj"]._group
    assert group._z is not None
    twin = copy.deepcopy(block)
    tg = twin["q_proj"]._group
    assert tg._z is None and tg._key is None and tg._consumed == set()
    for n in ("q_proj", "k_proj", "v_proj"):  # the copy runs on its own and matches the original
        torch.testing.assert_close(twin[n](x), block[n](x))


def test_extra_repr_names_the_shapes_rank_scale_bias_and_sharing():
    block = nn.ModuleDict({"q_proj": nn.Linear(8, 6), "k_proj": nn.Linear(8, 4, bias=False), "o_proj": nn.Linear(6, 8)})
    rso.wrap(block, rank=3, tau=None, scale=0.5, share_projections=True)
    assert block["q_proj"].extra_repr() == "in_features=8, out_features=6, rank=3, scale=0.5, bias=True, shared_with=1"
    assert block["k_proj"].extra_repr() == "in_features=8, out_features=4, rank=3, scale=0.5, bias=False, shared_with=1"
    assert block["o_proj"].extra_repr() == "in_features=6, out_features=8, rank=3, scale=0.5, bias=True"

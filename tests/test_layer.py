"""SubspaceLinear math: forward, gradients against autograd, saved tensors, dtypes, shared projections."""
import pytest
import torch
from torch import nn

import rso
from layers import SubspaceLinear, SubspaceLinearFunction, project
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
    assert saved == [(3, 7, 8)]  # z = x Pᵀ, never the 64-wide x


def test_coordinate_projection_indexes_instead_of_matmul():
    layer = make_layer(in_f=12, out_f=10, rank=4)
    idx = torch.tensor([1, 4, 7, 9])
    P = torch.zeros(4, 12, dtype=torch.float64)
    P[torch.arange(4), idx] = 1
    layer.set_projection_(P, coordinate=True)
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert layer._coordinate_index().tolist() == idx.tolist()
    torch.testing.assert_close(y, nn.functional.linear(x, layer.weight + layer.scale * layer.B @ P, layer.bias))
    y.sum().backward()
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
    assert saved.count((2, 3, 4)) == 3  # autograd saves the same z three times...
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

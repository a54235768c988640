"""CUDA checks (skipped without a GPU; run on the device machine): dtypes, training, merges, memory."""
import pytest
import torch

import rso
from conftest import lm_batch, tiny_llama
from rso.layers import SubspaceLinear
from rso.projections import StiefelSampler, generator_for

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_layer_on_cuda_matches_cpu(dtype):
    torch.manual_seed(0)
    layer = SubspaceLinear(64, 48, 16, scale=0.5)
    layer.set_projection_(StiefelSampler().sample(16, 64, generator_for(0)))
    with torch.no_grad():
        layer.B.normal_(std=0.1)
    x = torch.randn(4, 37, 64)
    ref = layer(x)
    ref.square().mean().backward()
    ref_grad = layer.B.grad.clone()
    layer.B.grad = None
    gpu = layer.cuda()
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        y = gpu(x.cuda())
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(y.float().cpu(), ref, **tol)
    y.float().square().mean().backward()
    torch.testing.assert_close(gpu.B.grad.cpu(), ref_grad, **tol)


@cuda
def test_llama_trains_and_merges_on_cuda_bf16_with_reproducible_P():
    model = tiny_llama().cuda()
    rso.wrap(model, rank=8, tau=3)
    twin = rso.wrap(tiny_llama().cuda(), rank=8, tau=3)
    P = model.model.layers[0].self_attn.q_proj.P
    assert P.is_cuda and torch.equal(P, twin.model.layers[0].self_attn.q_proj.P)
    torch.testing.assert_close(P @ P.T, torch.eye(8, device="cuda"), atol=1e-5, rtol=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    batch = {k: v.cuda() for k, v in lm_batch(batch=4, seq=16).items()}
    losses = []
    for _ in range(9):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert rso.state(model)["cycle"] == 3 and losses[-1] < losses[0]
    report = rso.memory.measure_step(model, batch, opt)
    assert report.peak_source == "CUDA allocator" and report.peak > report.parameters


def check_svd_projection(device):
    """Train a wrapped LLaMA with ``projection="svd"`` on ``device`` through two cycle ends and check that each
    new P of ``down_proj`` is the top-8 right singular subspace of the full weight gradient of the cycle's
    last inner step (taken independently, from hooks: gᵀx), with no fallback to a Stiefel sample."""
    import warnings
    model = rso.wrap(tiny_llama().to(device), rank=8, tau=2, projection="svd")
    layer = model.model.layers[0].mlp.down_proj
    loop = model._rso_outer_loop
    drawn = []  # (gradient the sampler received, P it returned) for down_proj's group
    inner = loop.sampler.sample_many

    def spy(rank, dim, generators, *, gradients=None, **kw):
        Ps = inner(rank, dim, generators, gradients=gradients, **kw)
        if dim == layer.in_features:  # only down_proj reads the intermediate width
            drawn.extend(zip(gradients or [None] * len(Ps), Ps))
        return Ps

    loop.sampler.sample_many = spy
    seen = {}
    layer.register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach()))
    layer.register_full_backward_hook(lambda m, gin, gout: seen.update(g=gout[0].detach()))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = {k: v.to(device) for k, v in lm_batch().items()}
    full = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the sampler's "SVD projection failed" fallback
        for _ in range(4):
            model(**batch).loss.backward()
            full.append((seen["g"].flatten(0, -2).double().T @ seen["x"].flatten(0, -2).double()).cpu())
            opt.step()
            opt.zero_grad()
    assert rso.state(model)["cycle"] == 2
    # One draw per cycle end for each of the two layers' down_proj, each given a gradient.
    assert len(drawn) == 2 * model.config.num_hidden_layers and all(grad is not None for grad, _ in drawn)
    mine = [(grad, P) for grad, P in drawn if grad.shape == full[0].shape
            and any(torch.allclose(grad.double().cpu(), G, rtol=1e-4, atol=1e-4 * float(G.abs().max()))
                    for G in (full[1], full[3]))]
    assert len(mine) == 2  # the gradients handed over for layer 0 are its full weight gradients gᵀx
    for (grad, P), G in zip(mine, (full[1], full[3])):  # the last inner steps of cycles 0 and 1
        assert P.device.type == torch.device(device).type
        torch.testing.assert_close(grad.double().cpu(), G, rtol=1e-4, atol=1e-4 * float(G.abs().max()))
        _, S, Vh = torch.linalg.svd(G)
        assert S[7] > 1.05 * S[8]  # the top-8 subspace is well defined (sin θ ≤ ε/gap)
        P = P.double().cpu()
        torch.testing.assert_close(P @ P.T, torch.eye(8, dtype=torch.float64), atol=1e-4, rtol=0)
        # Rows of P span the top-8 right singular vectors: equal orthogonal projectors.
        torch.testing.assert_close(P.T @ P, Vh[:8].T @ Vh[:8], atol=1e-3, rtol=0)
    torch.testing.assert_close(layer.P.double().cpu(), mine[-1][1].double().cpu(), rtol=0, atol=0)


@cuda
def test_svd_projection_on_cuda():
    check_svd_projection("cuda")

"""CUDA checks (skipped without a GPU; run on the device machine): dtypes, training, merges, memory."""
import pytest
import torch

import rso
from conftest import lm_batch, tiny_llama
from layers import SubspaceLinear
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


@cuda
def test_svd_projection_on_cuda():
    model = rso.wrap(tiny_llama().cuda(), rank=8, tau=2, projection="svd")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = {k: v.cuda() for k, v in lm_batch().items()}
    for _ in range(4):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    P = model.model.layers[0].mlp.down_proj.P
    assert rso.state(model)["cycle"] == 2
    torch.testing.assert_close(P @ P.T, torch.eye(8, device="cuda"), atol=1e-4, rtol=0)

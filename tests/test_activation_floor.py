"""Whole-model activation bytes of an RSO-wrapped LLaMA = the frozen-linear floor + the stored projections,
to the byte.

The floor is the same model with every decoder linear weight frozen (embeddings, norms and head still
train): then no linear layer keeps its input, and what remains is what any method that compresses only
linear-layer inputs must still store (RMSNorm, RoPE, attention, SiLU·mul, the head and its loss).
``rso.wrap`` adds exactly one ``z = x Pᵀ`` of ``batch × seq × rank`` elements per projection group
(q/k/v share one, gate/up share one, o and down one each).

The identity holds to the byte with both attention implementations, for different reasons worth
knowing: with SDPA the kernel saves its own output, which is o_proj's input, so o_proj's input costs
nothing in either model; with eager attention o_proj's input is a separate contiguous copy that only a
trained o_proj keeps. Either way the frozen model and the wrapped one save the same tensors apart from
the linear layers' inputs, which the wrapped model replaces by its r-wide projections.
"""
import pytest
import torch

import rso
from rso.memory import estimate, measure_step
from rso.train.bench.recipes import setup

CFG = dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2,
           num_hidden_layers=2, vocab_size=256)
B, S = 2, 20


def activation_bytes(method, attn="sdpa", dtype=torch.float32, rank=16, steps=1, **wrap):
    """Activation bytes of the last of ``steps`` training steps."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CFG, attn_implementation=attn)).to(dtype)
    if wrap:
        rso.wrap(model, rank=rank, **wrap)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    else:
        s = setup(method, model, rank=rank)
        model, opt = s.model, s.optimizer
    ids = torch.randint(0, CFG["vocab_size"], (B, S), generator=torch.Generator().manual_seed(3))
    for _ in range(steps):
        report = measure_step(model, {"input_ids": ids, "labels": ids}, opt, track_peak=False)
    return report.activations


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_rso_activations_equal_floor_plus_projections(attn, dtype):
    size = torch.finfo(dtype).bits // 8
    L, r = CFG["num_hidden_layers"], 16
    floor = activation_bytes("frozen", attn, dtype)
    wrapped = activation_bytes("rso-stiefel", attn, dtype, rank=r)
    groups = 4  # q/k/v, o, gate/up, down
    assert wrapped == floor + L * groups * B * S * r * size
    full = activation_bytes("adamw", attn, dtype)
    h, i = CFG["hidden_size"], CFG["intermediate_size"]
    o_input = h if attn == "eager" else 0  # SDPA already saves its output, o_proj's input
    assert full == floor + L * B * S * size * (h + o_input + h + i)


def test_identity_without_sharing_and_for_every_sampler():
    floor = activation_bytes("frozen")
    L, r = CFG["num_hidden_layers"], 8
    unshared = activation_bytes(None, rank=r, projection="stiefel", share_projections=False)
    assert unshared == floor + L * 7 * B * S * r * 4
    for sampler in ("gaussian", "coordinate", "svd"):
        # "svd" keeps the layers' inputs on step 1 to take cycle 0's P from its gradient: measure step 2
        steps = 2 if sampler == "svd" else 1
        assert activation_bytes(f"rso-{sampler}", rank=r, steps=steps) == floor + L * 4 * B * S * r * 4, sampler


def test_chunked_head_goes_past_the_floor():
    floor = activation_bytes("frozen")
    floor_ce = activation_bytes("frozen+ce")
    wrapped_ce = activation_bytes("rso-stiefel+ce", rank=16)
    V = CFG["vocab_size"]
    # The head keeps an fp32 log-sum-exp per token instead of the fp32 log-softmax of V logits.
    assert floor - floor_ce == B * S * (4 * V - 4) + 4
    assert wrapped_ce == floor_ce + CFG["num_hidden_layers"] * 4 * B * S * 16 * 4


def test_floor_share_on_the_60m_config():
    """On LLaMA-60M (batch 8 × 256, fp32) freezing every linear weight removes ~16% of the activations:
    most of them are not linear-layer inputs."""
    full = estimate("llama-60m", "adamw", batch=8, seq=256, dtype="fp32")["activations"]
    floor = estimate("llama-60m", "frozen", batch=8, seq=256, dtype="fp32")["activations"]
    rso_ = estimate("llama-60m", "rso", rank=128, batch=8, seq=256, dtype="fp32")["activations"]
    ce = estimate("llama-60m", "rso", rank=128, batch=8, seq=256, dtype="fp32", chunked_ce=True)["activations"]
    assert 0.12 < 1 - floor / full < 0.20
    assert floor < rso_ < full
    assert ce < 0.8 * floor  # the chunked head removes the 128 KB/token log-softmax


@pytest.mark.parametrize("mode", ["recompute", "fused"])
def test_chunked_head_equals_hugging_face_loss_and_gradients(mode):
    import rso.heads
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CFG))
    rso.wrap(model, rank=8)
    ids = torch.randint(0, CFG["vocab_size"], (B, S), generator=torch.Generator().manual_seed(4))
    labels = ids.clone()
    labels[0, :5] = -100
    ref = model(input_ids=ids, labels=labels).loss
    ref.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    rso.heads.use_chunked_head(model, chunk_size=7, mode=mode)
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None
    out.loss.backward()
    assert torch.allclose(out.loss, ref, atol=1e-5)
    for n, p in model.named_parameters():
        if n in want:
            assert torch.allclose(p.grad, want[n], atol=1e-5, rtol=1e-4), n
    rso.heads.restore_head(model)
    assert model(input_ids=ids).logits.shape == (B, S, CFG["vocab_size"])
    with pytest.raises(ValueError, match="mode"):
        rso.heads.use_chunked_head(model, mode="nope")

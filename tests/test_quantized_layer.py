"""QuantizedSubspaceLinear: W₀ stored int8 / NF4 (bitsandbytes' formats), dequantized inside the autograd function,
requantized at each merge; bitsandbytes Linear4bit / Linear8bitLt wrapped in place (the QLoRA user's model)."""
import copy

import pytest
import torch
from torch import nn

from rso.layers import quantized as qz
from rso.layers import ProjectionGroup, QuantizedSubspaceLinear, SubspaceLinear
from rso.projections import CoordinateSampler, GaussianSampler, StiefelSampler, generator_for

bnb = pytest.importorskip("bitsandbytes")
KINDS = ("nf4", "int8")
F64 = dict(rtol=1e-12, atol=1e-12)  # float64 math; W₀'s dequantized values are exact in float64


def make_layer(kind, in_f=80, out_f=24, rank=6, scale=0.5, dtype=torch.float64, seed=0, sampler=StiefelSampler()):
    torch.manual_seed(seed)
    layer = SubspaceLinear.from_module(nn.Linear(in_f, out_f).to(dtype), rank, scale, quantize=kind)
    layer.set_projection_(sampler.sample(rank, in_f, generator_for(seed), dtype=dtype),
                          coordinate=isinstance(sampler, CoordinateSampler))
    with torch.no_grad():
        layer.B.normal_()
    return layer


def reference(layer):
    """An nn.Linear holding deq(W₀) + s·B P, in float64."""
    ref = nn.Linear(layer.in_features, layer.out_features, dtype=torch.float64)
    with torch.no_grad():
        W0 = qz.dequantize(layer.quantized(), torch.float64)
        ref.weight.copy_(W0 + layer.scale * layer.B.double() @ layer.P.double())
        ref.bias.copy_(layer.bias)
    return ref


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("evaluation", ["merged", "split"])
@pytest.mark.parametrize("sampler", [StiefelSampler(), CoordinateSampler()], ids=["stiefel", "coordinate"])
def test_forward_backward_equal_autograd_on_dequantized_weight(kind, evaluation, sampler):
    layer = make_layer(kind, sampler=sampler)
    layer.evaluation = evaluation
    ref = reference(layer)
    x = torch.randn(3, 5, 80, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = layer(x), ref(x2)
    torch.testing.assert_close(y, y2, **F64)
    g = torch.randn_like(y)
    gx, gB, gb = torch.autograd.grad(y, (x, layer.B, layer.bias), g)
    gx2, gW, gb2 = torch.autograd.grad(y2, (x2, ref.weight, ref.bias), g)
    torch.testing.assert_close(gx, gx2, **F64)
    torch.testing.assert_close(gB, layer.scale * gW @ layer.P.T, **F64)  # ∂B = s·(∂W) Pᵀ
    torch.testing.assert_close(gb, gb2, **F64)


@pytest.mark.parametrize("kind", KINDS)
def test_saved_for_backward_holds_no_wide_activation_and_no_dequantized_weight(kind):
    layer = make_layer(kind, dtype=torch.float32)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    x = torch.randn(7, 80, requires_grad=True)  # 7 tokens: no other saved tensor has 7·80 elements
    for evaluation in ("merged", "split"):
        layer.evaluation = evaluation
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x).sum().backward()
    assert saved, "nothing was saved"
    assert not [s for s in saved if s[0] in ((7, 80), (24, 80)) and s[1].is_floating_point], saved
    assert {s for s in saved if not s[1].is_floating_point} == {(tuple(layer.weight.shape), layer.weight.dtype)}


@pytest.mark.parametrize("kind", KINDS)
def test_captured_gradient_for_the_svd_sampler(kind):
    layer = make_layer(kind)
    ref = reference(layer)
    x = torch.randn(2, 4, 80, dtype=torch.float64)
    layer.arm_capture()
    g = torch.randn(2, 4, 24, dtype=torch.float64)
    layer(x).backward(g)
    ref(x).backward(g)
    torch.testing.assert_close(layer.take_captured_gradient(), ref.weight.grad, **F64)


@pytest.mark.parametrize("kind", KINDS)
def test_nearest_merge_is_the_requantized_sum_and_zeroes_B(kind):
    layer = make_layer(kind)
    layer.merge_mode = "nearest"
    target = reference(layer).weight.detach().float()
    layer.merge_()
    assert torch.equal(layer.weight, qz.quantize(target, kind).data)
    assert torch.equal(layer.B, torch.zeros_like(layer.B))
    codes = layer.weight.clone()
    layer.merge_()  # B = 0: nothing to do
    assert torch.equal(layer.weight, codes)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sampler", [StiefelSampler(), GaussianSampler()], ids=["stiefel", "gaussian"])
def test_feedback_carries_the_residual_the_next_subspace_holds(kind, sampler):
    layer = make_layer(kind, sampler=sampler)
    layer.merge_mode = "stochastic+feedback"
    target = reference(layer).weight.detach()
    P_next = sampler.sample(6, 80, generator_for(9), dtype=torch.float64)
    layer.merge_(next_projection=P_next)
    layer.set_projection_(P_next)
    R = target - qz.dequantize(layer.quantized(), torch.float64)
    projector = P_next.T @ torch.linalg.pinv(P_next @ P_next.T) @ P_next  # onto the row space of P′
    fp32 = 8 * torch.finfo(torch.float32).eps * float(target.abs().max())  # the merge is computed in fp32
    torch.testing.assert_close(layer.scale * layer.B @ P_next, R @ projector, rtol=0, atol=fp32)
    assert (layer.effective_weight() - target).norm() < R.norm()


@pytest.mark.parametrize("kind", KINDS)
def test_stochastic_merge_is_reproducible_from_seed_cycle_and_step(kind):
    a, b = make_layer(kind), make_layer(kind)
    a.merge_mode = b.merge_mode = "stochastic"
    a.merge_()
    b.merge_()
    assert torch.equal(a.weight, b.weight)
    c = make_layer(kind)
    c.merge_mode = "stochastic"
    c.step.fill_(1)
    c.merge_()
    assert not torch.equal(a.weight, c.weight)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_refuses_non_finite_B_and_changes_nothing(kind):
    layer = make_layer(kind)
    with torch.no_grad():
        layer.B[0, 0] = float("inf")
    before = [t.clone() for t in (layer.weight, *layer.buffers(), layer.B)]
    with pytest.raises(FloatingPointError, match=r"quantize='%s'\) cannot merge: B holds inf/nan" % kind):
        layer.merge_()
    with pytest.raises(FloatingPointError):
        layer.state_dict()
    after = [layer.weight, *layer.buffers(), layer.B]
    assert all(torch.equal(x, y) for x, y in zip(before, after))


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_merges_and_loads_back_exactly(kind):
    layer = make_layer(kind)
    layer.step.fill_(7)
    layer.cycle.fill_(2)
    layer.seed.fill_(11)
    effective = layer.effective_weight()
    state = layer.state_dict()
    assert torch.equal(layer.B, torch.zeros_like(layer.B))
    torch.testing.assert_close(layer.effective_weight(), effective, rtol=0, atol=0.3)  # one requantization
    other = make_layer(kind, seed=1)
    other.load_state_dict(state)
    for (name, mine), theirs in zip(layer.state_dict().items(), other.state_dict().values()):
        assert torch.equal(mine, theirs), name
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(layer.quantized().tensors(),
                                                                  other.quantized().tensors()))
    x = torch.randn(3, 80, dtype=torch.float64)
    assert torch.equal(layer(x), other(x))


@pytest.mark.parametrize("kind,bnb_class", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_state_dict_keys_are_bitsandbytes_own(kind, bnb_class):
    layer = make_layer(kind, dtype=torch.float32)
    mine = {k for k in layer.state_dict() if k not in ("B", "P", "step", "cycle", "seed", "_extra_state")}
    theirs = set(bnb_module(kind if kind == "int8" else "4bit").state_dict())
    assert mine == theirs


def test_float_state_dict_is_quantized_on_load():
    layer = make_layer("nf4")
    plain = nn.Linear(80, 24, dtype=torch.float64)
    layer.load_state_dict(plain.state_dict(), strict=False)
    assert torch.equal(layer.weight, qz.quantize(plain.weight.detach(), "nf4").data)
    assert torch.equal(layer.B, torch.zeros_like(layer.B))


def test_loading_another_quantization_is_refused():
    state = make_layer("int8").state_dict()
    layer = make_layer("nf4")
    with pytest.raises(RuntimeError, match=r"holds int8 \(24, 80\), the layer nf4 \(24, 80\), blocksize 64"):
        layer.load_state_dict(state)


def test_dtype_conversion_keeps_the_scales():
    layer = make_layer("nf4", dtype=torch.float32)
    absmax = layer.quantized().absmax.clone()
    layer.to(torch.bfloat16)
    assert layer.B.dtype == layer.P.dtype == torch.bfloat16
    assert torch.equal(layer.quantized().absmax, absmax) and layer.quantized().dtype == torch.bfloat16
    copied = copy.deepcopy(layer)
    x = torch.randn(2, 80, dtype=torch.bfloat16)
    assert torch.equal(copied(x), layer(x))


def test_group_members_round_apart():
    layers = [make_layer("nf4") for _ in range(2)]
    ProjectionGroup(layers)
    for layer in layers:
        layer.merge_mode = "stochastic"
        layer.merge_()
    assert not torch.equal(layers[0].weight, layers[1].weight)


# ----------------------------------------------------------------- bitsandbytes modules
def bnb_module(kind, in_f=64, out_f=32, quant_type="nf4", nested=False, seed=0):
    torch.manual_seed(seed)
    if kind == "int8":
        module = bnb.nn.Linear8bitLt(in_f, out_f, bias=True, has_fp16_weights=False)
    else:
        module = bnb.nn.Linear4bit(in_f, out_f, bias=True, quant_type=quant_type, compress_statistics=nested)
    return module.to("cpu")  # bitsandbytes quantizes on .to(device)


def bnb_dequantized(module):
    """The module's weight as bitsandbytes dequantizes it (4-bit: read flat, as its generic kernel does; its CPU
    kernel reads a 2-D shape block by row, wrong where in_features % blocksize ≠ 0)."""
    if isinstance(module, bnb.nn.Linear8bitLt):
        return bnb.functional.int8_vectorwise_dequant(module.weight.data, module.weight.SCB)
    state = copy.copy(module.weight.quant_state)
    state.shape = torch.Size([module.out_features * module.in_features])
    return bnb.functional.dequantize_4bit(module.weight.data, state).view(module.out_features, -1)


@pytest.mark.parametrize("kind,quant_type,nested", [("nf4", "nf4", False), ("nf4", "nf4", True),
                                                    ("fp4", "fp4", False), ("int8", None, False)])
def test_bitsandbytes_layers_wrap_train_and_come_back(kind, quant_type, nested):
    module = bnb_module(kind if kind == "int8" else "4bit", quant_type=quant_type, nested=nested)
    W0 = bnb_dequantized(module).clone()
    layer = SubspaceLinear.from_module(module, 8, 0.5)
    assert isinstance(layer, QuantizedSubspaceLinear) and layer.quantize == kind
    assert (layer.in_features, layer.out_features) == (64, 32) and layer.B.dtype == torch.float32
    assert torch.equal(qz.dequantize(layer.quantized(), torch.float32), W0)
    layer.set_projection_(StiefelSampler().sample(8, 64, generator_for(0)))
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), x @ W0.T + module.bias, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        layer.B.normal_(std=0.1)
    back = layer.to_module()  # the layer is left as it is
    assert type(back) is type(module) and back.bias is layer.bias and bool(layer.B.any())
    layer.merge_()  # the same rounding draws (seed, cycle, step)
    W1 = bnb_dequantized(back)
    assert torch.equal(W1, qz.dequantize(layer.quantized(), torch.float32))
    # bitsandbytes' own CPU matmuls (int8 activations, a bf16 4-bit kernel) are approximate
    torch.testing.assert_close(back(x), x @ W1.T + module.bias, rtol=0.05, atol=0.05)


def test_quantize_on_a_plain_linear_comes_back_as_nn_linear():
    layer = make_layer("int8")
    back = layer.to_module()
    assert type(back) is nn.Linear and back.weight.dtype == torch.float64
    torch.testing.assert_close(back.weight, reference(layer).weight, **F64)


def test_conv1d_is_quantized_out_by_in_and_comes_back_as_conv1d():
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    conv = Conv1D(24, 80).double()  # weight stored in × out
    layer = SubspaceLinear.from_module(conv, 6, 0.5, quantize="int8")
    assert layer.layout == "conv1d" and layer.weight.shape == (24, 80)
    layer.set_projection_(StiefelSampler().sample(6, 80, generator_for(0), dtype=torch.float64))
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(3, 80, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference(layer)(x), **F64)
    back = layer.to_module()
    assert isinstance(back, Conv1D)
    torch.testing.assert_close(back(x), reference(layer)(x), **F64)


def test_refusals():
    with pytest.raises(ValueError, match=r"quantize must be None, 'int8' or 'nf4', got 'int4'"):
        SubspaceLinear.from_module(nn.Linear(8, 8), 2, quantize="int4")
    with pytest.raises(ValueError, match=r"stored as nf4 by bitsandbytes; pass quantize=None"):
        SubspaceLinear.from_module(bnb_module("4bit"), 2, quantize="int8")
    fp16_weights = bnb.nn.Linear8bitLt(16, 8, has_fp16_weights=True)
    with pytest.raises(ValueError, match="has_fp16_weights=True"):
        SubspaceLinear.from_module(fp16_weights, 2)
    storage = bnb.nn.Linear4bit(16, 8, quant_type="nf4", quant_storage=torch.bfloat16).to("cpu")
    with pytest.raises(ValueError, match="bnb_4bit_quant_storage=torch.uint8"):
        SubspaceLinear.from_module(storage, 2)
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, 8\]"):
        SubspaceLinear.from_module(nn.Linear(16, 8), 9, quantize="nf4")
    with pytest.raises(ValueError, match="dtype=torch.bfloat16 sets a quantized layer's compute dtype"):
        SubspaceLinear.from_module(nn.Linear(16, 8), 2, dtype=torch.bfloat16)
    layer = make_layer("nf4")
    layer.merge_mode = "feedback"
    with pytest.raises(ValueError, match=r"merge_mode must be one of \('nearest', 'stochastic'"):
        layer.merge_()


# ----------------------------------------------------------------- the QLoRA user's model, saved and loaded by HF
def wrap_quantized(model, rank=4):
    """What rso.wrap does to a bitsandbytes model's quantized linears (replace, seed, first P)."""
    names = [n for n, m in model.named_modules() if qz.is_quantized_linear(m)]
    for i, name in enumerate(names):
        parent, _, leaf = name.rpartition(".")
        layer = SubspaceLinear.from_module(model.get_submodule(name), rank)
        layer.seed.fill_(i)
        layer.set_projection_(StiefelSampler().sample(rank, layer.in_features, generator_for(i)))
        setattr(model.get_submodule(parent), leaf, layer)
    return names


@pytest.mark.parametrize("load", ["load_in_4bit", "load_in_8bit"])
def test_hf_quantized_model_saves_in_bitsandbytes_format(tmp_path, load):
    from conftest import tiny_llama
    from transformers import BitsAndBytesConfig, LlamaForCausalLM
    tiny_llama().save_pretrained(tmp_path / "base")
    config = BitsAndBytesConfig(**{load: True}, **({"bnb_4bit_quant_type": "nf4"} if load == "load_in_4bit" else {}))
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base", quantization_config=config)
    names = wrap_quantized(model)
    assert len(names) == 14
    again = copy.deepcopy(model)  # wrapped alike, untrained: the load below must restore everything
    x = torch.randint(0, 64, (2, 8))
    model(x, labels=x).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-0.1)
    model.save_pretrained(tmp_path / "wrapped")  # merges: W₀ requantized, B = 0
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "wrapped")
    for name in names:
        mine, theirs = model.get_submodule(name), plain.get_submodule(name)
        assert qz.is_quantized_linear(theirs), name
        assert torch.equal(bnb_dequantized(theirs), qz.dequantize(mine.quantized(), torch.float32)), name
    again.load_state_dict(model.state_dict())
    for (key, mine), theirs in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(mine, theirs), key

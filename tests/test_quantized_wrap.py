"""rso.wrap(quantize=...) and the QLoRA user's path: a bitsandbytes-quantized model wraps, trains, requantizes at each
merge, saves in bitsandbytes' format (a plain loader gives the same weights) and resumes exactly."""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

import rso
from rso.layers import QuantizedSubspaceLinear
from rso.layers.quantized import dequantize

CONFIG = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
LOADED = {"nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
          "int8": dict(load_in_8bit=True)}


def tiny():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG))


def ids():
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def train(model, steps, optimizer=None):
    optimizer = optimizer or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(ids(), labels=ids()).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def quantized_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedSubspaceLinear)}


def same_quantized_weights(wrapped, plain):
    """Each wrapped layer's W₀ codes and scales are the plain bitsandbytes module's, bit for bit."""
    for name, layer in quantized_layers(wrapped).items():
        module, q = plain.get_submodule(name), layer.quantized()
        scales = module.weight.SCB if layer.quantize == "int8" else module.weight.quant_state.absmax
        assert torch.equal(q.data.flatten(), module.weight.data.flatten()), name
        assert torch.equal(q.absmax.flatten(), scales.flatten()), name


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantize_wraps_trains_saves_for_a_plain_loader_and_resumes_exactly(kind, tmp_path):
    model = rso.wrap(tiny(), rank=8, tau=2, quantize=kind)
    assert f"rso: W₀ stored as {kind} in 14 layers" in rso.summary(model)
    optimizer = train(model, 3)  # a merge (requantization) after step 2
    assert int(next(iter(quantized_layers(model).values())).cycle) == 1
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in model.config.to_dict()  # only the saved config.json carries it
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(plain.model.layers[0].self_attn.q_proj).__name__ == ("Linear4bit" if kind == "nf4" else "Linear8bitLt")
    same_quantized_weights(model, plain)
    resumed = rso.from_pretrained(AutoModelForCausalLM, tmp_path).train()
    other = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-2)
    other.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    train(model, 2, optimizer), train(resumed, 2, other)  # across the next merge
    for (name, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_bitsandbytes_model_wraps_keeps_its_format_and_saves_it(kind, tmp_path):
    tiny().save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=BitsAndBytesConfig(**LOADED[kind]))
    rso.wrap(model, rank=8, tau=2)
    layers = quantized_layers(model)
    assert len(layers) == 14 and {m.quantize for m in layers.values()} == {kind}
    assert all(m.B.dtype == torch.float32 for m in layers.values())
    train(model, 3)
    model.save_pretrained(tmp_path / "wrapped")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "wrapped")
    same_quantized_weights(model, plain)
    effective = rso.effective_state_dict(model)
    expected = {k: v for k, v in plain.state_dict().items()}
    assert set(effective) == set(expected)
    unwrapped = rso.unwrap(copy.deepcopy(model))
    same_quantized_weights(model, unwrapped)


def test_bad_quantize_values_and_combinations_are_refused_before_anything_changes():
    for kwargs, match in (({"quantize": "int4"}, r"quantize must be one of \(None, 'int8', 'nf4'\)"),
                          ({"quantize": "nf4", "requantize": "round"}, "requantize must be one of"),
                          ({"requantize": "stochastic"}, "applies to a quantized W₀ only")):
        model = tiny()
        with pytest.raises(ValueError, match=match):
            rso.wrap(model, rank=8, **kwargs)
        assert not rso.is_wrapped(model)
    model = rso.wrap(tiny(), rank=8, quantize="nf4", requantize="stochastic+feedback")
    assert {m.merge_mode for m in quantized_layers(model).values()} == {"stochastic+feedback"}
    with pytest.raises(NotImplementedError, match="FSDP2 does not shard a quantized W₀"):
        rso.distributed.fully_shard_model(model)


def test_feedback_carries_the_rounding_residual_into_the_next_subspace():
    """With stochastic+feedback, after a merge deq(W₀′) + s·B′P′ is closer to deq(W₀) + s·B P than deq(W₀′) alone."""
    model = rso.wrap(tiny(), rank=8, tau=None, quantize="nf4", requantize="stochastic+feedback")
    train(model, 2)
    layer = quantized_layers(model)["model.layers.0.mlp.down_proj"]
    before = layer.effective_weight().double()
    rso.outer_step(model)
    after = layer.effective_weight().double()
    stored = dequantize(layer.quantized(), torch.float64)
    assert layer.B.any()
    assert (after - before).norm() < (stored - before).norm()


def test_torch_compile_trains_a_quantized_model_like_eager():
    """bitsandbytes' 4-bit op has no shape rule for the flat read: dequantization runs eagerly inside the graph."""
    model = rso.wrap(tiny(), rank=8, quantize="nf4")
    model(ids(), labels=ids()).loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    loss = torch.compile(model)(ids(), labels=ids()).loss
    loss.backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(p.grad, eager[name], rtol=1e-4, atol=1e-6), name


def test_quantize_frees_each_float_weight_before_reading_the_next(monkeypatch):
    """A float model is quantized one layer at a time: when layer k is built, the k float weights before it are gone
    (a second whole copy of the model never exists); without quantize= every old weight lives until the end."""
    import weakref

    from rso import wrapping
    build = wrapping._subspace_linear
    for kind in ("nf4", None):
        model = tiny()
        refs = [weakref.ref(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)][:-1]  # not lm_head
        n, alive = len(refs), []
        monkeypatch.setattr(wrapping, "_subspace_linear",
                            lambda *a, **k: alive.append(sum(r() is not None for r in refs)) or build(*a, **k))
        rso.wrap(model, rank=8, quantize=kind)
        if kind is None:
            assert alive == [n] * n
        else:  # one late at most: under pytest something (its capture) keeps the first layer a call longer
            assert all(count <= n - k + 1 for k, count in enumerate(alive)) and alive[-1] <= 2, alive


def test_a_non_finite_weight_is_refused_before_any_layer_is_quantized():
    model = tiny()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="layer 'model.layers.1.mlp.down_proj' holds inf/nan"):
        rso.wrap(model, rank=8, quantize="int8")
    assert not rso.is_wrapped(model)
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))

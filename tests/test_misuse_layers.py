"""The subspace layer on the paths its ordinary tests do not take (issue 49): Conv1D models exported and
reloaded, inference outside ``no_grad``, activation checkpointing, plain state dicts loaded mid-cycle and
non-finite numbers reaching a merge."""
import copy
import functools

import pytest
import torch
import transformers as hf
from safetensors.torch import load_file
from torch.utils.checkpoint import checkpoint

import rso
from conftest import assert_close_hf, lm_batch, tiny_llama
from rso.layers import SubspaceLinear

CONV1D_TARGETS = r".*\.(c_attn|q_attn|c_proj|c_fc)"


def _ids(seed, batch=2, seq=6, vocab=64):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _decision_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return {"states": torch.randn(2, 5, 3, generator=g, dtype=torch.float64),
            "actions": torch.randn(2, 5, 2, generator=g, dtype=torch.float64),
            "rewards": torch.randn(2, 5, 1, generator=g, dtype=torch.float64),
            "returns_to_go": torch.randn(2, 5, 1, generator=g, dtype=torch.float64),
            "timesteps": torch.arange(5).expand(2, 5), "attention_mask": torch.ones(2, 5, dtype=torch.long)}


def _cross_inputs(seed):
    g = torch.Generator().manual_seed(seed + 100)
    return {"input_ids": _ids(seed), "encoder_hidden_states": torch.randn(2, 5, 32, generator=g, dtype=torch.float64)}


GPT2 = dict(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
#: Every transformers model built from ``transformers.pytorch_utils.Conv1D`` (``grep -r "Conv1D(" transformers/
#: models``): (build, the class a plain load uses, inputs of a seed, target_modules).
CONV1D_MODELS = {
    "gpt2": (lambda: hf.GPT2LMHeadModel(hf.GPT2Config(**GPT2)), hf.AutoModelForCausalLM,
             lambda s: {"input_ids": _ids(s)}, None),
    "gpt2-cross-attention": (lambda: hf.GPT2LMHeadModel(hf.GPT2Config(**GPT2, add_cross_attention=True)),
                             hf.AutoModelForCausalLM, _cross_inputs, None),
    "openai-gpt": (lambda: hf.OpenAIGPTLMHeadModel(hf.OpenAIGPTConfig(**GPT2)), hf.AutoModelForCausalLM,
                   lambda s: {"input_ids": _ids(s)}, None),
    "imagegpt": (lambda: hf.ImageGPTForCausalImageModeling(hf.ImageGPTConfig(**{**GPT2, "vocab_size": 65})),
                 hf.ImageGPTForCausalImageModeling, lambda s: {"input_ids": _ids(s)}, None),
    "clvp": (lambda: hf.ClvpForCausalLM(hf.ClvpDecoderConfig(
        vocab_size=64, max_position_embeddings=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        bos_token_id=0, eos_token_id=1)), hf.ClvpForCausalLM, lambda s: {"input_ids": _ids(s)}, None),
    "decision-transformer": (lambda: hf.DecisionTransformerModel(hf.DecisionTransformerConfig(
        state_dim=3, act_dim=2, hidden_size=32, n_layer=2, n_head=2, max_ep_len=16, bos_token_id=0, eos_token_id=0)),
        hf.DecisionTransformerModel, _decision_inputs, CONV1D_TARGETS),
}


def _output(model, inputs):
    return model(**inputs)[0]


def _train(model, inputs_of, steps, opt=None):
    opt = opt or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for i in range(steps):
        _output(model, inputs_of(i)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return opt


def _rso_state(model):
    return {f"{n}.{k}": getattr(m, k).clone() for n, m in rso.subspace_layers(model)
            for k in ("P", "step", "cycle", "seed")}


# ----------------------------------------------------------------------------- 1. Conv1D export
@pytest.mark.parametrize("name", CONV1D_MODELS)
def test_a_wrapped_conv1d_model_saves_in_conv1d_layout_and_every_loader_gets_the_same_model(name, tmp_path):
    build, plain_class, inputs_of, targets = CONV1D_MODELS[name]
    torch.manual_seed(0)
    model = rso.wrap(build().double(), rank=4, tau=2, target_modules=targets)
    _train(model, inputs_of, 3)  # cycle 1, one step into it: B ≠ 0
    assert any(m.layout == "conv1d" for _, m in rso.subspace_layers(model))
    assert all(torch.count_nonzero(m.B) for _, m in rso.subspace_layers(model))
    model.eval()
    inputs = inputs_of(50)
    with torch.no_grad():
        expected = _output(model, inputs)
    state = _rso_state(model)
    model.save_pretrained(tmp_path)

    saved = load_file(tmp_path / "model.safetensors")
    for n, m in rso.subspace_layers(model):  # the file's weight is the plain module's (Conv1D: in×out)
        torch.testing.assert_close(saved[n + ".weight"], m.to_module().weight.detach(), rtol=0, atol=0)
    plain = plain_class.from_pretrained(tmp_path, dtype=torch.float64)
    assert not rso.is_wrapped(plain)
    with torch.no_grad():
        torch.testing.assert_close(_output(plain, inputs), expected)
        back = rso.from_pretrained(type(model), tmp_path, dtype=torch.float64)
        torch.testing.assert_close(_output(back.eval(), inputs), expected)
        unwrapped = rso.unwrap(copy.deepcopy(model))
        torch.testing.assert_close(_output(unwrapped, inputs), expected)
    assert rso.state(back) == rso.state(model) and rso.state(back)["step"] == 3
    for key, value in _rso_state(back).items():
        assert torch.equal(value, state[key]), key


def _square_conv1d_layer(seed=0):
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(seed)
    conv = Conv1D(6, 6).double()  # square, like attn.c_proj: a transposed load would fit and be wrong
    torch.nn.init.normal_(conv.weight)
    torch.nn.init.normal_(conv.bias)
    layer = SubspaceLinear.from_module(copy.deepcopy(conv), rank=2)
    layer.set_projection_(torch.linalg.qr(torch.randn(6, 2, dtype=torch.float64))[0].T)
    with torch.no_grad():
        layer.B.normal_()
    return conv, layer


def test_a_conv1d_layer_state_dict_holds_the_conv1d_weight_and_loads_back_from_it():
    conv, layer = _square_conv1d_layer()
    x = torch.randn(4, 6, dtype=torch.float64)
    expected = layer(x).detach()
    sd = layer.state_dict()
    torch.testing.assert_close(sd["weight"], layer.to_module().weight.detach(), rtol=0, atol=0)
    assert sd["weight"].is_contiguous()
    view = layer.state_dict(keep_vars=True)["weight"]  # a view of W₀, in×out
    assert view.shape == (6, 6) and view.data_ptr() == layer.weight.data_ptr() and torch.equal(view, layer.weight.T)

    _, other = _square_conv1d_layer(seed=1)
    other.load_state_dict(sd)
    torch.testing.assert_close(other(x), expected)

    _, other = _square_conv1d_layer(seed=1)  # a plain Conv1D's state dict: the layer becomes that Conv1D
    other.load_state_dict(conv.state_dict(), strict=False)
    assert torch.count_nonzero(other.B) == 0
    torch.testing.assert_close(other(x), conv(x))


def test_an_older_rso_state_dict_of_a_conv1d_layer_still_loads_out_by_in():
    """rso before the layout marker saved a Conv1D layer's weight out×in, with no "layout" in its extra state."""
    _, layer = _square_conv1d_layer()
    x = torch.randn(4, 6, dtype=torch.float64)
    expected = layer(x).detach()
    sd = layer.state_dict()
    assert b'"layout": "conv1d"' in bytes(sd["_extra_state"].tolist())
    older = {**sd, "weight": sd["weight"].T.contiguous(), "_extra_state": layer.identity.clone()}
    for state in (older, {k: v for k, v in older.items() if k != "_extra_state"}):
        _, other = _square_conv1d_layer(seed=1)
        other.load_state_dict(state)
        torch.testing.assert_close(other(x), expected)


def test_a_plain_gpt2_state_dict_loads_into_a_wrapped_gpt2_mid_cycle():
    torch.manual_seed(3)
    plain = hf.GPT2LMHeadModel(hf.GPT2Config(**GPT2)).double().eval()
    torch.manual_seed(0)
    model = rso.wrap(hf.GPT2LMHeadModel(hf.GPT2Config(**GPT2)).double(), rank=4, tau=3)
    _train(model, lambda s: {"input_ids": _ids(s)}, 2)
    model.load_state_dict(plain.state_dict(), strict=False)  # no rso keys: the Conv1D weights become W₀
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=_ids(9)).logits, plain(input_ids=_ids(9)).logits)


# ----------------------------------------------------------------------------- 2. inference paths
@pytest.fixture
def trained_llama():
    """A float64 tiny LLaMA (no dropout), wrapped (q/k/v and gate/up share a P) and 2 steps into a 3-step cycle."""
    model = rso.wrap(tiny_llama(torch.float64), rank=4, tau=3)
    opt = _train(model, lambda s: lm_batch(seed=s), 2)
    assert all(torch.count_nonzero(m.B) for _, m in rso.subspace_layers(model))
    return model, opt


@pytest.mark.parametrize("projection", ["stiefel", "coordinate"])
def test_every_inference_mode_gives_the_training_forward(projection):
    model = rso.wrap(tiny_llama(torch.float64), rank=4, tau=3, projection=projection)
    opt = _train(model, lambda s: lm_batch(seed=s), 2)
    ids = lm_batch(seed=9)["input_ids"]
    expected = model(input_ids=ids).logits.detach()  # training mode, grad enabled (dropout is 0)
    reference = rso.unwrap(copy.deepcopy(model))(input_ids=ids).logits.detach()
    assert_close_hf(expected, reference)
    for mode in (torch.inference_mode, torch.no_grad, torch.enable_grad):
        for training in (True, False):
            model.train(training)
            with mode():
                torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)
    model.train()
    with torch.inference_mode():  # a group's cache filled in inference mode does not reach training
        model(input_ids=ids)
    loss = model(**lm_batch(seed=3)).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


def test_a_group_reuses_no_z_across_a_change_of_P():
    """z = x Pᵀ cached by one member is not handed to a mate after P changed in place (a merge in between)."""
    block = torch.nn.ModuleDict({n: torch.nn.Linear(8, 6, dtype=torch.float64) for n in ("q_proj", "k_proj")})
    rso.wrap(block, rank=3, tau=None)
    q, k = block["q_proj"], block["k_proj"]
    with torch.no_grad():
        k.B.normal_()
    x = torch.randn(2, 8, dtype=torch.float64)
    q(x)  # z is cached for k now
    q._group.set_projection_(torch.linalg.qr(torch.randn(8, 3, dtype=torch.float64))[0].T)
    torch.testing.assert_close(k(x), x @ k.effective_weight().T + k.bias)


def test_generate_with_a_kv_cache_gives_the_unwrapped_model_s_logits(trained_llama):
    model, _ = trained_llama
    model.eval()
    reference = rso.unwrap(copy.deepcopy(model))
    prompt = lm_batch(seed=9)["input_ids"][:, :4]
    kw = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True,
              attention_mask=torch.ones_like(prompt), pad_token_id=0)
    want = reference.generate(prompt, **kw)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            got = model.generate(prompt, **kw)
        assert torch.equal(got.sequences, want.sequences)
        for a, b in zip(got.logits, want.logits):
            assert_close_hf(a, b)
    full = model(input_ids=want.sequences).logits.detach()  # one forward without a cache (generate casts to fp32)
    for i, step_logits in enumerate(want.logits):
        assert_close_hf(full[:, prompt.shape[1] - 1 + i].to(step_logits.dtype), step_logits)


def test_state_dict_and_save_pretrained_inside_inference_mode(trained_llama, tmp_path):
    model, opt = trained_llama
    ids = lm_batch(seed=9)["input_ids"]
    expected = model(input_ids=ids).logits.detach()
    layers = rso.subspace_layers(model)
    effective = {n: m.effective_weight() for n, m in layers}
    with torch.inference_mode():
        sd = model.state_dict()
        model.save_pretrained(tmp_path)
    for n, m in layers:
        assert not m.weight.is_inference() and torch.equal(m.weight, effective[n]) and torch.count_nonzero(m.B) == 0
        assert torch.equal(sd[n + ".weight"], effective[n])
    torch.testing.assert_close(model(input_ids=ids).logits, expected)
    plain = hf.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    torch.testing.assert_close(plain(input_ids=ids).logits, expected)
    other = rso.wrap(tiny_llama(torch.float64, seed=5), rank=4, tau=3)
    other.load_state_dict(sd)  # inference tensors copied into a model that trains
    torch.testing.assert_close(other(input_ids=ids).logits, expected)
    _train(model, lambda s: lm_batch(seed=s), 1, opt)  # and training goes on


# ----------------------------------------------------------------------------- 3. activation checkpointing
def _checkpoint_blocks(model):
    """``torch.utils.checkpoint`` (non-reentrant) around every decoder layer, by hand."""
    for block in model.model.layers:
        forward = block.forward
        block.forward = lambda *a, _f=forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)


def _with_checkpointing(model, how):
    if how == "torch":
        _checkpoint_blocks(model)
    elif how is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": how == "reentrant"})
    return model.train()


def _weight_gradients(model, batches):
    """The full weight gradient of each wrapped layer at the model's current point (unwrapped copy, autograd)."""
    plain = rso.unwrap(copy.deepcopy(model))
    for batch in batches:
        plain(**batch, use_cache=False).loss.backward()
    return {n: plain.get_submodule(n).weight.grad for n, _ in rso.subspace_layers(model)}


@functools.lru_cache(maxsize=None)
def _run(projection, how):
    """Two optimizer steps (one cycle, tau 2) of two micro-batches each: per step the B gradients and the captured
    full gradients (and, without checkpointing, autograd's full gradients); then P after the merge."""
    hybrid = {"total_steps": 8} if projection == "hybrid" else {}
    model = _with_checkpointing(rso.wrap(tiny_llama(torch.float64), rank=4, tau=2, projection=projection, **hybrid),
                                how)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    layers = rso.subspace_layers(model)
    steps = []
    for step in range(2):
        batches = [lm_batch(seed=2 * step + k) for k in range(2)]
        true = _weight_gradients(model, batches) if how is None and projection != "stiefel" else None
        for batch in batches:
            model(**batch, use_cache=False).loss.backward()  # a cache would grow again in the recompute
        captured = {n: m._capture.grad.clone() for n, m in layers if m._capture is not None}
        steps.append(({n: m.B.grad.clone() for n, m in layers}, captured, true))
        opt.step()
        opt.zero_grad()
    assert rso.state(model)["cycle"] == 1
    return steps, {n: m.P.clone() for n, m in layers}


@pytest.mark.parametrize("projection", ["svd", "hybrid"])
def test_the_captured_gradient_is_the_full_weight_gradient(projection):
    steps, _ = _run(projection, None)
    for _, captured, true in steps:  # armed on the first step and on the cycle's last: both steps here
        assert captured.keys() == true.keys()
        for n, g in captured.items():  # each micro-batch once, at the step's own weights
            assert_close_hf(g, true[n], msg=f"captured gradient of {n}")


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("how", ["reentrant", "non-reentrant", "torch"])
@pytest.mark.parametrize("projection", ["stiefel", "svd", "hybrid"])
def test_activation_checkpointing_changes_no_gradient_capture_or_projection(projection, how):
    (reference, reference_P), (steps, P) = _run(projection, None), _run(projection, how)
    for (B_grads, captured, _), (B_ref, captured_ref, _) in zip(steps, reference):
        for n, g in B_grads.items():
            torch.testing.assert_close(g, B_ref[n], msg=f"B gradient of {n}")
        assert captured.keys() == captured_ref.keys()
        for n, g in captured.items():
            torch.testing.assert_close(g, captured_ref[n], msg=f"captured gradient of {n}")
    for n, p in P.items():
        torch.testing.assert_close(p, reference_P[n], msg=f"P of {n} after the merge")


# ----------------------------------------------------------------------------- 4. plain state dicts mid-cycle
def test_a_plain_state_dict_loaded_mid_cycle_makes_the_model_exactly_those_weights(trained_llama):
    model, opt = trained_llama
    plain = tiny_llama(torch.float64, seed=2)
    before = _rso_state(model)
    moments = {n: opt.state[m.B]["exp_avg"].clone() for n, m in rso.subspace_layers(model)}
    model.load_state_dict(plain.state_dict(), strict=False)  # no rso keys: weight is the whole layer
    ids = lm_batch(seed=9)["input_ids"]
    for n, m in rso.subspace_layers(model):
        assert torch.count_nonzero(m.B) == 0
        assert torch.equal(m.effective_weight(), plain.get_submodule(n).weight), n
        assert torch.equal(opt.state[m.B]["exp_avg"], moments[n])  # the optimizer's state is the caller's
    for key, value in _rso_state(model).items():  # P and the counters: as they were
        assert torch.equal(value, before[key]), key
    torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_a_wrapped_state_dict_keeps_its_B():
    model = rso.wrap(tiny_llama(torch.float64), rank=4, tau=3)
    sd = model.state_dict()
    key = "model.layers.0.mlp.down_proj.B"
    sd[key] = torch.randn_like(sd[key])
    model.load_state_dict(sd)
    assert torch.equal(model.get_parameter(key), sd[key])


# ----------------------------------------------------------------------------- 5. non-finite merges
def _layer(dtype=torch.float64):
    layer = SubspaceLinear(6, 5, rank=2, dtype=dtype)
    layer.set_projection_(torch.eye(6, dtype=dtype)[:2])
    with torch.no_grad():
        layer.B.normal_()
    return layer


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("via", ["merge_", "state_dict"])
def test_a_merge_refuses_a_non_finite_B_before_W0_changes(bad, via):
    layer = _layer()
    with torch.no_grad():
        layer.B[3, 1] = bad
    weight, B = layer.weight.clone(), layer.B.clone()
    message = (r"^rso: SubspaceLinear\(in_features=6, out_features=5, rank=2\) cannot merge: B holds inf/nan, "
               r"W₀ left unchanged; lower the learning rate, enable gradient clipping, or load the last checkpoint$")
    with pytest.raises(FloatingPointError, match=message):
        getattr(layer, via)()
    assert torch.equal(layer.weight, weight)
    torch.testing.assert_close(layer.B, B, rtol=0, atol=0, equal_nan=True)


def test_a_merge_refuses_a_sum_that_overflows_W0_dtype():
    layer = _layer(torch.float16)
    with torch.no_grad():
        layer.weight.fill_(60000.0)
        layer.B.fill_(10000.0)  # finite, but W₀ + B P > 65504 = float16's largest
    weight = layer.weight.clone()
    with pytest.raises(FloatingPointError, match=r"cannot merge: W₀ \+ s·B P overflows torch\.float16, W₀ left"):
        layer.merge_()
    assert torch.equal(layer.weight, weight) and torch.all(layer.B == 10000.0)


def test_a_merge_into_a_W0_that_held_inf_already_adds_none():
    layer = _layer()
    with torch.no_grad():
        layer.weight[0, 5] = float("inf")  # outside P's two columns: B P adds 0 there
    expected = layer.effective_weight()
    layer.merge_()
    assert torch.equal(layer.weight, expected) and torch.count_nonzero(layer.B) == 0


def test_a_meta_layer_state_dict_merges_without_reading_values():
    """A layer on the meta device (no values to check for inf/nan; e.g. a model moved there) still gives its state
    dict."""
    from transformers.pytorch_utils import Conv1D
    with torch.device("meta"):
        layers = [SubspaceLinear(8, 6, rank=2), SubspaceLinear.from_module(Conv1D(6, 8), rank=2)]
    for layer, shape in zip(layers, [(6, 8), (8, 6)]):
        sd = layer.state_dict()
        assert sd["weight"].shape == shape and sd["weight"].is_meta

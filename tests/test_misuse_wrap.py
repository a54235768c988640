"""rso.wrap on models it could get wrong (issue 49): frozen layers, PEFT models, modules that read a linear
child's ``.weight`` instead of calling it, models not materialized yet, and arguments that would do nothing.
Each case either gives the right model (outputs equal to the merged model's in every mode) or a one-line error
raised before anything changes."""
import copy
import re

import pytest
import torch
from torch import nn

import rso
from conftest import lm_batch, tiny_llama
from rso.layers import SubspaceLinear

F64 = torch.float64


def snapshot(model):
    """What a failed wrap must leave as it was: every tensor, every module's type, every requires_grad flag."""
    return ({k: v.clone() for k, v in model.state_dict().items()}, [(n, type(m)) for n, m in model.named_modules()],
            {n: p.requires_grad for n, p in model.named_parameters()})


def assert_untouched(model, before):
    state, types, flags = snapshot(model)
    assert types == before[1] and flags == before[2] and state.keys() == before[0].keys()
    assert all(torch.equal(state[k], before[0][k]) for k in state)
    assert not rso.is_wrapped(model) and not hasattr(model, "_rso_wrap_notes")


def refused(model, exc, match, **kwargs):
    """rso.wrap(model, **kwargs) raises ``exc`` with a one-line message matching ``match``; the model is unchanged."""
    before = snapshot(model)
    with pytest.raises(exc, match=match) as err:
        rso.wrap(model, **kwargs)
    assert "\n" not in str(err.value) and str(err.value).startswith("rso.wrap: ")
    assert_untouched(model, before)
    return str(err.value)


def names_of(model, cls):
    return sorted(n for n, m in model.named_modules() if type(m) is cls)


def train(model, loss_of, steps=3, lr=0.05):
    """A few Adam steps on what requires grad (tau=None: B stays in the layers, unmerged); B must have moved."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss_of(model).backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.count_nonzero(layer.B) > 0 for _, layer in rso.subspace_layers(model))


MODES = ("train", "eval", "no_grad", "inference_mode")


def assert_same_in_every_mode(wrapped, call, compare=None):
    """``call(model)`` of the wrapped model equals that of its merged copy (``rso.unwrap`` of a deep copy) in
    train and eval mode, under no_grad and under inference_mode (float64: torch's default tolerances)."""
    merged = rso.unwrap(copy.deepcopy(wrapped))
    compare = compare or (lambda a, b: torch.testing.assert_close(a, b))
    for mode in MODES:
        for m in (wrapped, merged):
            m.train(mode == "train")
        context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(mode, torch.enable_grad)
        with context():
            compare(call(wrapped), call(merged))


# ------------------------------------------------------------------------------------- 1. frozen layers
def llama_batch_loss(model):
    return model(**lm_batch()).loss


def test_a_block_frozen_before_wrapping_stays_plain_and_frozen_and_unwrap_restores_every_flag():
    model = tiny_llama()
    model.model.layers[0].requires_grad_(False)
    frozen = dict(model.model.layers[0].named_modules())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    types = [(n, type(m)) for n, m in model.named_modules()]
    rso.wrap(model, rank=4, tau=None)
    assert all(dict(model.model.layers[0].named_modules())[n] is m for n, m in frozen.items())  # the same modules
    assert not any(isinstance(m, SubspaceLinear) for m in model.model.layers[0].modules())
    assert not any(p.requires_grad for p in model.model.layers[0].parameters())
    assert len(rso.subspace_layers(model)) == 7 and all(n.startswith("model.layers.1.") for n, _ in
                                                        rso.subspace_layers(model))
    text = rso.summary(model)
    assert "\nrso: left as they are: 7 frozen layers (weight.requires_grad=False): model.layers.0.self_attn.q_proj, " \
           "model.layers.0.self_attn.k_proj, model.layers.0.self_attn.v_proj, model.layers.0.self_attn.o_proj, " \
           "model.layers.0.mlp.gate_proj ..." in text
    block0 = {k: v.clone() for k, v in model.model.layers[0].state_dict().items()}
    train(model, llama_batch_loss)
    assert all(torch.equal(v, model.model.layers[0].state_dict()[k]) for k, v in block0.items())
    rso.unwrap(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert [(n, type(m)) for n, m in model.named_modules()] == types


def test_bias_flags_are_kept_as_they_were_and_restored_by_unwrap():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)).to(F64)
    model[0].weight.requires_grad_(False)  # frozen weight, trainable bias: left as it is, its bias still trains
    model[2].bias.requires_grad_(False)    # trainable weight, frozen bias: wrapped, its bias stays frozen
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    bias0 = model[0].bias.detach().clone()
    rso.wrap(model, rank=2, tau=None)
    assert [type(model[i]) for i in (0, 2, 4)] == [nn.Linear, SubspaceLinear, SubspaceLinear]
    assert model[0].bias.requires_grad and not model[2].bias.requires_grad and model[4].bias.requires_grad
    assert "left as they are: 1 frozen layers (weight.requires_grad=False): 0" in rso.summary(model)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1), dtype=F64)
    train(model, lambda m: m(x).pow(2).mean())
    assert not torch.equal(model[0].bias, bias0)
    assert_same_in_every_mode(model, lambda m: m(x))
    rso.unwrap(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert [type(model[i]) for i in (0, 2, 4)] == [nn.Linear] * 3


def test_target_modules_naming_a_frozen_layer_is_refused():
    model = tiny_llama()
    model.model.layers[0].requires_grad_(False)
    for targets in (["model.layers.0.self_attn.q_proj"], r".*\.q_proj"):
        refused(model, ValueError, r"^rso\.wrap: target_modules selects frozen layers \(weight\.requires_grad=False\)"
                r", which would not train: model\.layers\.0\.self_attn\.q_proj; unfreeze them "
                r"\(layer\.requires_grad_\(True\)\) or leave them out$", rank=4, target_modules=targets)
    rso.wrap(model, rank=4, target_modules=["model.layers.1.self_attn.q_proj"])  # the trainable one alone is fine


def test_a_model_frozen_whole_has_nothing_to_wrap_and_says_why():
    model = tiny_llama().requires_grad_(False)
    msg = refused(model, ValueError, r"^rso\.wrap: LlamaForCausalLM has no nn\.Linear / Conv1D layers to wrap ",
                  rank=4)
    assert msg.endswith("left as they are: 14 frozen layers (weight.requires_grad=False): "
                        "model.layers.0.self_attn.q_proj, model.layers.0.self_attn.k_proj, "
                        "model.layers.0.self_attn.v_proj, model.layers.0.self_attn.o_proj, "
                        "model.layers.0.mlp.gate_proj ...); unfreeze those to train (module.requires_grad_(True))")


# ------------------------------------------------------------------------------------- 2. PEFT models
def test_peft_models_are_refused_with_the_way_out():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    way_out = (r"merge them first, model = peft_model\.merge_and_unload\(\)\.requires_grad_\(True\) \(PEFT froze the "
               r"base\), then rso\.wrap\(model\)$")
    peft_model = peft.get_peft_model(tiny_llama(), config)
    refused(peft_model, ValueError, r"^rso\.wrap: PeftModel carries PEFT adapter layers \(it is a "
            r"PeftModel\); " + way_out, rank=4)
    injected = peft.inject_adapter_in_model(config, tiny_llama())  # LoRA layers in a plain transformers model
    refused(injected, ValueError, r"^rso\.wrap: LlamaForCausalLM carries PEFT adapter layers \('model\.layers\.0\."
            r"self_attn\.q_proj' is a Linear\); " + way_out, rank=4)
    merged = peft_model.merge_and_unload()
    refused(merged, ValueError, r"has no nn\.Linear / Conv1D layers to wrap \(.* 14 frozen layers .*\); unfreeze "
            r"those to train \(module\.requires_grad_\(True\)\)$", rank=4)  # as the way out says: unfreeze too
    rso.wrap(merged.requires_grad_(True), rank=4)
    assert len(rso.subspace_layers(merged)) == 14 and not any("lora" in n for n, _ in merged.named_modules())


# ------------------------------------------------------------------------------------- 3. modules that read .weight
def test_a_plain_mlp_wraps_every_linear_trains_and_matches_its_merged_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 3)).to(F64)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1), dtype=F64)
    rso.wrap(model, rank=2, tau=None)
    assert names_of(model, SubspaceLinear) == ["0", "2", "4"] and "left as they are" not in rso.summary(model)
    train(model, lambda m: m(x).pow(2).mean())
    assert_same_in_every_mode(model, lambda m: m(x))


class AttentionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(6, 8), nn.Linear(8, 3)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        h = self.inp(x)
        return self.out(self.attn(h, h, h, need_weights=False)[0])


def test_multihead_attention_out_proj_is_left_plain_and_the_outputs_match_in_every_mode():
    torch.manual_seed(0)
    model = AttentionNet().to(F64)
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(1), dtype=F64)
    rso.wrap(model, rank=2, tau=None)
    assert names_of(model, SubspaceLinear) == ["inp", "out"]
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert rso.summary(model).endswith("\nrso: left as they are: 1 layers whose weight their parent reads directly, "
                                       "where B would be ignored: attn.out_proj (MultiheadAttention)"
                                       "\nrso: left as they are: 1 packed projections the module reads as a raw "
                                       "parameter (nn.MultiheadAttention.in_proj_weight): attn.in_proj_weight")
    train(model, lambda m: m(x).pow(2).mean())
    assert_same_in_every_mode(model, lambda m: m(x))


def test_naming_a_layer_its_parent_reads_directly_is_refused():
    refused(AttentionNet(), ValueError, r"^rso\.wrap: target_modules selects layers whose weight their parent reads "
            r"directly instead of calling them, so B would be ignored: attn\.out_proj \(MultiheadAttention reads its "
            r"\.weight\); leave them out \(the default does\)$", rank=2, target_modules=["inp", "out_proj"])
    refused(nn.MultiheadAttention(8, 2), ValueError, r"^rso\.wrap: MultiheadAttention has no nn\.Linear / Conv1D "
            r"layers to wrap \(.*; left as they are: 1 layers whose weight their parent reads directly, where B "
            r"would be ignored: out_proj \(MultiheadAttention\)\)$", rank=2)


def padded_rows_equal(mask):
    """Compare the rows a padding mask keeps: torch's nested-tensor fast path (the merged model's) zeroes the others."""
    return lambda a, b: torch.testing.assert_close(a[~mask], b[~mask])


def test_transformer_encoder_linears_are_wrapped_with_the_fast_paths_kept_off():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, dtype=F64)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
    assert model.use_nested_tensor
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    rso.wrap(model, rank=2, tau=None)
    assert names_of(model, SubspaceLinear) == [f"layers.{i}.linear{j}" for i in (0, 1) for j in (1, 2)]
    assert "attn.out_proj (MultiheadAttention), layers.1.self_attn.out_proj (MultiheadAttention)" in rso.summary(model)
    train(model, lambda m: m(x, src_key_padding_mask=mask)[~mask].pow(2).mean())
    assert_same_in_every_mode(model, lambda m: m(x))
    assert_same_in_every_mode(model, lambda m: m(x, src_key_padding_mask=mask), padded_rows_equal(mask))
    rso.unwrap(model)
    assert model.use_nested_tensor and not any(m._forward_pre_hooks for m in model.modules())


def test_nn_transformer_with_its_decoder_matches_its_merged_model_in_every_mode():
    torch.manual_seed(0)
    model = nn.Transformer(8, 2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=16, dropout=0.0,
                           batch_first=True, dtype=F64)
    g = torch.Generator().manual_seed(1)
    src, tgt = torch.randn(2, 5, 8, generator=g, dtype=F64), torch.randn(2, 4, 8, generator=g, dtype=F64)
    rso.wrap(model, rank=2, tau=None)
    assert names_of(model, SubspaceLinear) == ["decoder.layers.0.linear1", "decoder.layers.0.linear2",
                                               "encoder.layers.0.linear1", "encoder.layers.0.linear2"]
    assert "left as they are: 3 layers whose weight their parent reads directly" in rso.summary(model)
    train(model, lambda m: m(src, tgt).pow(2).mean())
    assert_same_in_every_mode(model, lambda m: m(src, tgt))


def tiny_mamba():
    from transformers import MambaConfig, MambaForCausalLM
    torch.manual_seed(0)
    return MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=1, expand=2,
                                        conv_kernel=2, time_step_rank=4)).to(F64)


def tiny_bloom(**overrides):
    from transformers import BloomConfig, BloomForCausalLM
    torch.manual_seed(0)
    return BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=16, n_layer=1, n_head=2, **overrides)).to(F64)


HF_READERS = {  # model, the linear layers it reads by .weight (left plain), the ones it calls (wrapped)
    "mamba": (tiny_mamba, ["x_proj (MambaMixer)", "dt_proj (MambaMixer)", "out_proj (MambaMixer)"], ["in_proj"]),
    "bloom-sliced": (lambda: tiny_bloom(pretraining_tp=2, slow_but_exact=True),
                     ["dense (BloomAttention)", "dense_4h_to_h (BloomMLP)"], ["query_key_value", "dense_h_to_4h"]),
    "bloom": (tiny_bloom, [], ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
}


@pytest.mark.parametrize("name", HF_READERS)
def test_transformers_modules_that_read_a_linear_weight_keep_it_plain(name):
    build, read, called = HF_READERS[name]
    model = build()
    rso.wrap(model, rank=2, tau=None)
    assert sorted(n.rpartition(".")[2] for n, _ in rso.subspace_layers(model)) == sorted(called)
    text = rso.summary(model)
    assert all(re.search(r"[.\w]+\." + re.escape(r), text) for r in read) and ("left as they are" in text) == bool(read)
    ids = lm_batch(seq=6)["input_ids"]
    train(model, lambda m: m(input_ids=ids, labels=ids).loss)
    assert_same_in_every_mode(model, lambda m: m(input_ids=ids).logits)


# ------------------------------------------------------------------------------------- 4. not materialized
def test_models_on_the_meta_device_or_with_lazy_layers_are_refused():
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4)
    with torch.device("meta"):
        on_meta = LlamaForCausalLM(cfg)
    with init_empty_weights():
        empty = LlamaForCausalLM(cfg)
    for model in (on_meta, empty):
        types = [(n, type(m)) for n, m in model.named_modules()]
        with pytest.raises(ValueError, match=r"^rso\.wrap: 'model\.embed_tokens\.weight' of LlamaForCausalLM is on the "
                                             r"meta device; wrap after the weights are materialized \(from_pretrained, "
                                             r"load_state_dict\(\.\.\., assign=True\), or to_empty\(\) \+ load\), or "
                                             r"each P would be drawn on meta and be garbage after to_empty\(\)$"):
            rso.wrap(model, rank=4)
        assert [(n, type(m)) for n, m in model.named_modules()] == types and not rso.is_wrapped(model)
    lazy = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"^rso\.wrap: '0\.weight' of Sequential is an uninitialized lazy tensor "
                                         r"\(nn\.LazyLinear\.\.\.\); run one forward pass first, then rso\.wrap$"):
        rso.wrap(lazy, rank=2)
    assert type(lazy[0]) is nn.LazyLinear and not rso.is_wrapped(lazy)
    lazy(torch.randn(3, 5))  # materialized: now it wraps
    rso.wrap(lazy, rank=2)
    assert names_of(lazy, SubspaceLinear) == ["0", "2"]


# ------------------------------------------------------------------------------------- 5. values that do nothing
class Sampler(rso.StiefelSampler):
    pass


BAD = [  # (arguments, exception, the whole message after "rso.wrap: ")
    (dict(total_steps=100), ValueError, "total_steps=100 applies to projection='hybrid' only (here "
     "projection='stiefel'); drop it, or use projection='hybrid'"),
    (dict(projection="svd", random_fraction=0.5), ValueError, "random_fraction=0.5 applies to projection='hybrid' "
     "only (here projection='svd'); drop it, or use projection='hybrid'"),
    (dict(projection=Sampler(), total_steps=10), ValueError, "total_steps=10 applies to projection='hybrid' only "
     "(here projection=Sampler()); drop it, or use projection='hybrid'"),
    (dict(share_projections=[("q_proj", "kk_proj")]), ValueError, "share_projections names ['kk_proj'], which match "
     "no wrapped layer (wrapped: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj); fix or drop them"),
    (dict(share_projections=[("q_proj", "q_proj")]), ValueError, "share_projections set ('q_proj', 'q_proj') names "
     "fewer than two layers, so it shares nothing; name siblings that read one input, e.g. ('q_proj', 'k_proj', "
     "'v_proj')"),
    (dict(target_modules=["q_proj", "qq_proj"]), ValueError, "target_modules entries ['qq_proj'] match no module of "
     "LlamaForCausalLM; fix or drop them"),
    (dict(target_modules=r"model\.layers\.\d+\.mlp"), TypeError, "target_modules selects modules that are not "
     "nn.Linear / Conv1D: model.layers.0.mlp (LlamaMLP), model.layers.1.mlp (LlamaMLP)"),
    (dict(scale=1e-39), ValueError, "scale=1e-39 is outside the range of layer 'model.layers.0.self_attn.q_proj' "
     "(torch.float32: 1.18e-38 ≤ |scale| ≤ 3.4e+38), where s·B P would be 0 or inf"),
    (dict(scale=-1e39), ValueError, "scale=-1e+39 is outside the range of layer 'model.layers.0.self_attn.q_proj' "
     "(torch.float32: 1.18e-38 ≤ |scale| ≤ 3.4e+38), where s·B P would be 0 or inf"),
    (dict(scale=float("inf")), ValueError, "scale must be a finite non-zero number, got inf"),
    (dict(scale=0.0), ValueError, "scale must be a finite non-zero number, got 0.0"),
    (dict(tau=0), ValueError, "tau (optimizer steps per cycle) must be an int ≥ 1 or None (merge only on explicit "
     "rso.outer_step), got 0"),
    (dict(tau=True), ValueError, "tau (optimizer steps per cycle) must be an int ≥ 1 or None (merge only on "
     "explicit rso.outer_step), got True"),
]


@pytest.mark.parametrize("kwargs,exc,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_arguments_that_would_do_nothing_are_refused_before_anything_changes(kwargs, exc, message):
    refused(tiny_llama(), exc, "^" + re.escape("rso.wrap: " + message) + "$", **{"rank": 4, **kwargs})


def test_hybrid_needs_total_steps_and_a_real_fraction():
    for kwargs, match in ((dict(), r"needs total_steps=N"), (dict(total_steps=10, random_fraction=True), "got True"),
                          (dict(total_steps=10, random_fraction="0.5"), "got '0.5'")):
        model = tiny_llama()
        before = snapshot(model)
        with pytest.raises(ValueError, match=match):
            rso.wrap(model, rank=4, projection="hybrid", **kwargs)
        assert_untouched(model, before)
    rso.wrap(tiny_llama(), rank=4, projection="hybrid", total_steps=10, random_fraction=0.5)


def test_a_bare_linear_layer_is_refused_and_edge_values_that_work_do():
    refused(nn.Linear(4, 4), TypeError, r"^rso\.wrap: the model is itself a Linear \(rso\.wrap replaces child modules "
            r"in place\); wrap a module that holds it, e.g\. nn\.Sequential\(layer\)$", rank=2)
    half = nn.Sequential(nn.Linear(8, 8)).half()
    refused(half, ValueError, r"^rso\.wrap: scale=100000\.0 is outside the range of layer '0' \(torch\.float16: "
            r"6\.1e-05 ≤ \|scale\| ≤ 6\.55e\+04\)", rank=2, scale=1e5)
    # tau=1 merges after every step; a negative scale is a valid reparameterization; a fraction of at least half a
    # channel gives rank 1 (documented: max(1, round(f·in_features))).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 2)).to(F64)
    rso.wrap(model, rank=0.0625, tau=1, scale=-0.5)
    assert [layer.rank for _, layer in rso.subspace_layers(model)] == [4, 1]  # round(4.0), round(0.5) → 1
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1), dtype=F64)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert rso.state(model)["cycle"] == 2 and all(torch.count_nonzero(m.B) == 0 for _, m in rso.subspace_layers(model))


# ------------------------------------------------------------------ found by the architecture zoo
class Router(nn.Linear):
    """An nn.Linear subclass with a forward of its own (as Llama4's and PhiMoE's routers): B would not reach it."""

    def forward(self, x):
        return super().forward(x).softmax(-1)


def test_linear_subclasses_with_their_own_forward_tied_weights_and_narrow_layers_are_left_out_and_listed():
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    model = nn.ModuleDict(dict(a=nn.Linear(8, 8), router=Router(8, 8), tied=nn.Linear(8, 8), gate=nn.Linear(8, 2)))
    model.tied.weight = shared.weight
    model.add_module("other", shared)
    rso.wrap(model, rank=4)
    assert sorted(n for n, _ in rso.subspace_layers(model)) == ["a"]
    text = rso.summary(model)
    assert "router (Router)" in text and "nn.Linear subclasses with a forward of their own" in text
    assert "tied" in text and "other" in text and "(tied)" in text
    assert "gate (8×2)" in text and "narrower than the rank (kept trainable in full)" in text
    assert model.gate.weight.requires_grad and model.router.weight.requires_grad
    rso.unwrap(model)
    for name, why in (("router", "its own forward"), ("tied", "a tied weight")):
        with pytest.raises(ValueError, match=rf"^rso\.wrap: target_modules selects layers that B would not reach: "
                                             rf"{name} \(\w+: {why}\); leave them out"):
            rso.wrap(model, rank=4, target_modules=[name])


def test_a_layer_output_may_be_modified_in_place_by_the_model():
    torch.manual_seed(0)
    layer = rso.SubspaceLinear.from_module(nn.Linear(16, 16).to(F64), 4)
    x = torch.randn(2, 5, 16, dtype=F64, requires_grad=True)
    y = layer(x)
    y /= 2  # roc_bert, longformer, swinv2 do this
    y.sum().backward()
    torch.testing.assert_close(x.grad, (layer.weight.sum(0) / 2).expand(2, 5, 16))


def test_layers_whose_keys_transformers_renames_on_load_are_left_out(tmp_path):
    """Inkling2's load renames ``sconv.weight_proj`` → ``sconv.weight_proj.weight``: a wrapped layer there would have
    its B and P renamed away from it on reload, so it is left out (listed); the rest round-trips."""
    from rso.train import zoo
    model = zoo.build("inkling2_text", "Inkling2ForCausalLM")
    rso.wrap(model, rank=4, tau=2)
    names = [n for n, _ in rso.subspace_layers(model)]
    assert names and not any(n.endswith("sconv.weight_proj") for n in names)
    assert "sconv.weight_proj" in rso.summary(model)
    batch = zoo.make_batch("causal-lm", model.config)
    model.eval().save_pretrained(tmp_path)
    back = rso.from_pretrained(type(model), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, model(**batch).logits)

"""rso.wrap / rso.unwrap on HF models and a plain MLP: targets, equal outputs, merges, errors."""
import copy
import re

import pytest
import torch
from torch import nn

import rso
from conftest import assert_close_hf, lm_batch, tiny_bert, tiny_gpt2, tiny_llama
from rso.layers import SubspaceLinear


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3))


def wrapped_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, SubspaceLinear))


def run(model, batch):
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    return out.logits if hasattr(out, "logits") else out


CASES = {
    "llama": (tiny_llama, lambda: lm_batch(), 8),
    "gpt2": (tiny_gpt2, lambda: lm_batch(), 8),
    "bert": (tiny_bert, lambda: {"input_ids": lm_batch()["input_ids"], "labels": torch.tensor([0, 1])}, 8),
    "mlp": (mlp, lambda: torch.randn(4, 10, generator=torch.Generator().manual_seed(0)), 3),
}


@pytest.mark.parametrize("name", CASES)
def test_wrap_keeps_outputs_and_training_lowers_loss(name):
    build, batch_fn, rank = CASES[name]
    model, batch = build(), batch_fn()
    model.eval()
    ref = run(model, batch).detach()
    assert rso.wrap(model, rank=rank, tau=4) is model
    torch.testing.assert_close(run(model, batch), ref)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)

    def loss_of():
        out = model(**batch) if isinstance(batch, dict) else model(batch)
        return out.loss if hasattr(out, "loss") else out.pow(2).mean()

    first = loss_of().item()
    for _ in range(12):
        loss = loss_of()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert rso.state(model)["cycle"] == 3
    assert loss_of().item() < 0.9 * first


def test_default_targets():
    llama = rso.wrap(tiny_llama(), rank=8)
    names = wrapped_names(llama)
    assert len(names) == 2 * 7 and not any("lm_head" in n for n in names)
    assert {n.rsplit(".", 1)[1] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                   "up_proj", "down_proj"}
    bert = rso.wrap(tiny_bert(), rank=8)
    names = wrapped_names(bert)
    assert "bert.pooler.dense" in names and not any("classifier" in n for n in names)
    gpt2 = rso.wrap(tiny_gpt2(), rank=8)
    names = wrapped_names(gpt2)
    assert {n.rsplit(".", 1)[1] for n in names} == {"c_attn", "c_proj", "c_fc"} and "lm_head" not in names


def test_target_modules_names_suffixes_and_regex():
    m = rso.wrap(tiny_llama(), rank=8, target_modules=["q_proj", "model.layers.0.mlp.down_proj"])
    assert wrapped_names(m) == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj",
                                "model.layers.1.self_attn.q_proj"]
    m = rso.wrap(tiny_llama(), rank=8, target_modules=r".*\.1\.mlp\.(gate|up)_proj")
    assert wrapped_names(m) == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    # An explicit choice alone decides, output head included.
    m = rso.wrap(tiny_llama(), rank=8, target_modules=["lm_head"])
    assert wrapped_names(m) == ["lm_head"]


def test_fractional_rank_and_shared_groups():
    m = rso.wrap(tiny_llama(), rank=0.25)
    ranks = {n.rsplit(".", 1)[1]: l.rank for n, l in rso.subspace_layers(m)}
    assert ranks["q_proj"] == 8 and ranks["down_proj"] == 12  # 0.25 × in_features (32, 48)
    s = rso.state(m)
    assert s["layers"] == 14 and s["projection_groups"] == 2 * 4  # qkv, o, gate/up, down per block
    attn = m.model.layers[0].self_attn
    assert torch.equal(attn.q_proj.P, attn.k_proj.P) and torch.equal(attn.q_proj.P, attn.v_proj.P)
    assert not torch.equal(attn.q_proj.P, attn.o_proj.P[:, :32])


def randomize_B(model, batch):
    """Give every B random values; return the outputs and the effective weights they imply."""
    with torch.no_grad():
        for _, layer in rso.subspace_layers(model):
            layer.B.normal_(std=0.5)
    return run(model, batch), {n: layer.effective_weight().clone() for n, layer in rso.subspace_layers(model)}


def test_merge_with_scale_keeps_outputs_and_unwrap_restores_plain_modules():
    for build in (tiny_llama, tiny_gpt2):
        model = build(dtype=torch.float64)
        model.eval()
        batch = lm_batch()
        rso.wrap(model, rank=8, scale=0.25, tau=None)
        before, expected = randomize_B(model, batch)
        rso.outer_step(model)
        assert_close_hf(run(model, batch), before)
        for n, layer in rso.subspace_layers(model):
            assert torch.count_nonzero(layer.B) == 0
            torch.testing.assert_close(layer.weight, expected[n])
        before, expected = randomize_B(model, batch)
        rso.unwrap(model)
        assert not rso.is_wrapped(model)
        assert_close_hf(run(model, batch), before)
        for n, w in expected.items():
            module = model.get_submodule(n)
            assert type(module).__name__ in ("Linear", "Conv1D") and module.weight.requires_grad
            torch.testing.assert_close(module.weight, w if type(module).__name__ == "Linear" else w.T)


def test_summary_and_state():
    m = rso.wrap(tiny_llama(), rank=8, tau=5)
    text = rso.summary(m)
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert f"trainable params: {trainable:,}" in text and "14 subspace layers" in text and "tau 5" in text
    assert rso.state(m) == {"step": 0, "cycle": 0, "tau": 5, "steps_to_merge": 5, "projection": "stiefel",
                            "layers": 14, "projection_groups": 8, "state_on_merge": "reset"}


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


BAD = [
    (dict(rank=0), ValueError, "rank"),
    (dict(rank=-3), ValueError, "rank"),
    (dict(rank=17, target_modules=["k_proj"]), ValueError, "k_proj"),  # k/v are 32 → 16: rank 17 does not fit
    (dict(rank=1.5), ValueError, r"\(0, 1\)"),
    (dict(rank="8"), TypeError, "rank"),
    (dict(projection="random"), ValueError, "stiefel"),
    (dict(tau=0), ValueError, "tau"),
    (dict(tau=2.5), ValueError, "tau"),
    (dict(target_modules=["nothing_here"]), ValueError, "matches no module"),
    (dict(target_modules=["mlp"]), TypeError, "not nn.Linear"),
    (dict(projection="hybrid"), ValueError, "total_steps"),
    (dict(scale=float("nan")), ValueError, "scale"),
    (dict(state_on_merge="drop"), ValueError, "reset"),
    (dict(proximal=-1.0), ValueError, "proximal"),
    # found by mutation testing: each bound and type check at its edge
    (dict(rank=0.0), ValueError, r"must be in \(0, 1\), got 0\.0$"),
    (dict(rank=1.0), ValueError, r"must be in \(0, 1\), got 1\.0$"),
    (dict(scale=True), ValueError, r"^rso\.wrap: scale must be a finite non-zero number, got True$"),
    (dict(seed=True), TypeError, r"^rso\.wrap: seed must be an int, got True$"),
    (dict(proximal=True), ValueError, r"proximal .* must be a positive number or None, got True$"),
    (dict(proximal=0), ValueError, r"proximal .* must be a positive number or None, got 0$"),
    (dict(share_projections={("q_proj", "k_proj")}), TypeError, r"share_projections must be a bool or a list"),
    (dict(share_projections=["q_proj"]), TypeError, r"^rso\.wrap: share_projections must be a bool or a list of "
     r"tuples of sibling layer names, e\.g\. \[\('q_proj', 'k_proj', 'v_proj'\)\]; got \['q_proj'\]$"),
    (dict(share_projections=[(1, 2)]), TypeError, r"share_projections must be a bool .* got \[\(1, 2\)\]$"),
    (dict(chunked_head=0), ValueError, r"^rso\.wrap: chunked_head must be None or a positive int \(tokens per "
     r"chunk\), got 0$"),
    (dict(chunked_head=True), ValueError, r"chunked_head must be None or a positive int .* got True$"),
    (dict(chunked_head=1.5), ValueError, r"chunked_head must be None or a positive int .* got 1\.5$"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD)
def test_bad_arguments_leave_model_untouched(kwargs, exc, match):
    model = tiny_llama()
    state, types = snapshot(model)
    with pytest.raises(exc, match=match):
        rso.wrap(model, **{"rank": 8, **kwargs})
    after, after_types = snapshot(model)
    assert types == after_types and state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert all(p.requires_grad for p in model.parameters())


def test_wrap_twice_and_unwrap_plain_model():
    model = rso.wrap(tiny_llama(), rank=8)
    with pytest.raises(ValueError, match=r"^rso\.wrap: LlamaForCausalLM is already wrapped \(call rso\.unwrap first\)$"):
        rso.wrap(model, rank=8)
    with pytest.raises(ValueError, match="not wrapped"):
        rso.unwrap(tiny_llama())
    with pytest.raises(TypeError, match="nn.Module"):
        rso.wrap("model", rank=8)


def test_deepcopy_of_wrapped_model_is_independent():
    model = rso.wrap(tiny_llama(), rank=8, tau=None)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.model.layers[0].self_attn.q_proj.B.fill_(1.0)
    assert torch.count_nonzero(model.model.layers[0].self_attn.q_proj.B) == 0
    batch = lm_batch()
    twin = copy.deepcopy(model)
    torch.testing.assert_close(run(rso.unwrap(model), batch), run(rso.unwrap(twin), batch))
    # The copy has hooks of its own: stepping it advances only its counters, not the model's it came from.
    source = rso.wrap(tiny_llama(), rank=8, tau=1)
    copied = copy.deepcopy(source)
    opt = torch.optim.SGD([p for p in copied.parameters() if p.requires_grad], lr=0.1)
    copied(**batch).loss.backward()
    opt.step()
    assert rso.state(copied)["step"] == 1 and rso.state(copied)["cycle"] == 1
    assert rso.state(source)["step"] == 0 and rso.state(source)["cycle"] == 0
    assert torch.equal(source.model.layers[0].mlp.down_proj.P, rso.wrap(tiny_llama(), rank=8, tau=1).model.layers[0]
                       .mlp.down_proj.P)  # not resampled with the copy


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = rso.wrap(tiny_llama(dtype=torch.float64), rank=8, tau=None)
        with torch.no_grad():
            for _, layer in rso.subspace_layers(model):
                layer.B.normal_(std=0.1)
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        model(**lm_batch()).loss.backward()
        grads.append([layer.B.grad.clone() for _, layer in rso.subspace_layers(model)])
    for a, b in zip(*grads):
        assert_close_hf(a, b)


def test_chunked_head_option_keeps_the_loss_and_unwrap_restores_logits(monkeypatch):
    model = tiny_llama(dtype=torch.float64)
    batch = lm_batch(batch=2, seq=12)
    ref = model(**batch).loss
    rso.wrap(model, rank=8, chunked_head=5)
    chunks = []
    loss_of = rso.heads.causal_lm_loss
    monkeypatch.setattr(rso.heads, "causal_lm_loss", lambda *a, **kw: chunks.append(kw["chunk_size"]) or loss_of(*a, **kw))
    out = model(**batch)
    assert chunks == [5]
    monkeypatch.undo()
    assert out.logits is None
    assert_close_hf(out.loss, ref)
    rso.unwrap(model)
    assert model(**batch).logits is not None
    one_token = rso.wrap(tiny_llama(dtype=torch.float64), rank=8, chunked_head=1)  # the smallest chunk
    assert_close_hf(one_token(**batch).loss, ref)
    with pytest.raises(TypeError, match="causal LM"):
        rso.wrap(mlp(), rank=3, chunked_head=16)


def projection_storages(model):
    return {m.P.untyped_storage().data_ptr() for _, m in rso.subspace_layers(model)}


def assert_one_P_per_group(model):
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        assert attn.k_proj.P is attn.q_proj.P and attn.v_proj.P is attn.q_proj.P
        assert mlp.up_proj.P is mlp.gate_proj.P
        assert attn.o_proj.P is not attn.q_proj.P and mlp.down_proj.P is not mlp.gate_proj.P


def test_shared_projection_is_one_tensor_through_conversions_loads_and_cycles():
    model = rso.wrap(tiny_llama(), rank=4, tau=2)
    L = model.config.num_hidden_layers
    assert_one_P_per_group(model)
    assert len(projection_storages(model)) == 4 * L  # q/k/v, o, gate/up, down
    unshared = rso.wrap(tiny_llama(), rank=4, tau=2, share_projections=False)
    assert len(projection_storages(unshared)) == 7 * L
    saved = {n: b.clone() for n, b in model.state_dict().items()}

    model.to(torch.float64)  # a conversion copies every buffer: the group shares again
    assert_one_P_per_group(model)
    assert model.model.layers[0].self_attn.q_proj.P.dtype == torch.float64
    model.to(torch.float32)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0)

    copy_ = copy.deepcopy(model)
    assert_one_P_per_group(copy_)
    fresh = rso.wrap(tiny_llama(seed=3), rank=4, tau=2, seed=9)
    fresh.load_state_dict(saved, assign=True)  # assign replaces each member's buffer with its own copy
    assert_one_P_per_group(fresh)
    # on disk a group's P is stored once, under its first member
    assert "model.layers.1.mlp.up_proj.P" not in saved and "model.layers.1.self_attn.v_proj.P" not in saved
    torch.testing.assert_close(fresh.model.layers[1].mlp.up_proj.P, saved["model.layers.1.mlp.gate_proj.P"])

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = model.model.layers[0].self_attn.q_proj.P.clone()
    batch = lm_batch()
    for _ in range(2):  # the second step ends the cycle: merge + resample into the shared tensor
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    assert rso.state(model)["cycle"] == 1
    assert_one_P_per_group(model)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.P, before)


# --- found by mutation testing (docs/mutation.md) ------------------------------------------------------------------

def tied_toy():
    torch.manual_seed(0)
    m = nn.ModuleDict(dict(emb=nn.Embedding(10, 4), lin1=nn.Linear(4, 8), lin2=nn.Linear(8, 4),
                           head=nn.Linear(4, 10, bias=False)))
    m.head.weight = m.emb.weight  # tied: counted once
    return m


def test_summary_counts_each_parameter_once_and_names_ranks_and_position(capsys):
    m = tied_toy()
    # emb 40 (= head), lin1 32 + 8, lin2 32 + 4
    assert rso.summary(m) == "trainable params: 116 || all params: 116 || trainable%: 100.0000"
    rso.wrap(m, rank=0.5, target_modules=["lin1", "lin2"], tau=5)  # rank 0.5 of in = 4, 8: ranks 2 and 4
    # + B: 8×2 and 4×4; W₀ of lin1 / lin2 (32 each) frozen: trainable 40 + 8 + 16 + 4 + 16 = 84 of 148
    rso.print_trainable_parameters(m)
    assert capsys.readouterr().out == (
        "trainable params: 84 || all params: 148 || trainable%: 56.7568\n"
        "rso: 2 subspace layers in 2 projection groups, rank 2..4, projection stiefel, tau 5, step 0, cycle 0\n")
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    for _ in range(6):
        m.lin2(m.lin1(m.emb(torch.tensor([1, 2])))).sum().backward()
        opt.step()
        opt.zero_grad()
    one = nn.Sequential(nn.Linear(6, 6))
    rso.wrap(one, rank=3, tau=None, projection="gaussian")
    assert rso.summary(m).splitlines()[1].endswith("rank 2..4, projection stiefel, tau 5, step 6, cycle 1")
    assert rso.state(m) == {"step": 6, "cycle": 1, "tau": 5, "steps_to_merge": 4, "projection": "stiefel",
                            "layers": 2, "projection_groups": 2, "state_on_merge": "reset"}
    assert rso.summary(one).splitlines()[1] == (
        "rso: 1 subspace layers in 1 projection groups, rank 3, projection gaussian, tau None, step 0, cycle 0")
    three = nn.Sequential(nn.Linear(4, 12), nn.Linear(12, 8), nn.Linear(8, 8))
    rso.wrap(three, rank=0.5, tau=None)  # ranks 2, 6, 4: the range is smallest..largest
    assert ", rank 2..6, " in rso.summary(three)
    assert rso.summary(nn.Linear(1, 1, bias=False)) == "trainable params: 1 || all params: 1 || trainable%: 100.0000"


@pytest.mark.parametrize("caller", ["unwrap", "outer_step", "state"])
def test_functions_of_a_wrapped_model_name_themselves_when_it_is_not(caller):
    with pytest.raises(ValueError, match=rf"^rso\.{caller}: Linear is not wrapped by rso\.wrap$"):
        getattr(rso, caller)(nn.Linear(2, 2))


def test_custom_shared_input_sets_replace_the_defaults():
    def block():
        torch.manual_seed(0)
        return nn.ModuleDict({n: nn.Linear(8, 6) for n in ("a", "b", "q_proj", "k_proj")})

    custom = rso.wrap(block(), rank=2, tau=None, share_projections=[("a", "b")])
    assert custom["a"].P is custom["b"].P and custom["q_proj"].P is not custom["k_proj"].P
    assert rso.state(custom)["projection_groups"] == 3
    default = rso.wrap(block(), rank=2, tau=None)  # q/k/v share by default, a and b are not in any set
    assert default["q_proj"].P is default["k_proj"].P and default["a"].P is not default["b"].P
    assert rso.state(default)["projection_groups"] == 3


def test_fractional_rank_of_a_conv1d_counts_its_input_side():
    from transformers.pytorch_utils import Conv1D
    model = nn.Sequential(Conv1D(12, 4))  # GPT-2 layout: weight (in=4, out=12)
    rso.wrap(model, rank=0.5, tau=None, target_modules=["0"])
    assert model[0].rank == 2 and (model[0].in_features, model[0].out_features) == (4, 12)


def test_default_targets_skip_tied_heads_and_everything_under_an_excluded_name():
    torch.manual_seed(0)
    m = nn.ModuleDict(dict(emb=nn.Embedding(10, 4), out=nn.Linear(4, 10, bias=False), lin=nn.Linear(4, 4),
                           classifier=nn.ModuleDict(dict(dense=nn.Linear(4, 4))),
                           score=nn.Sequential(nn.Linear(4, 2))))
    m.out.weight = m.emb.weight  # a tied output layer, before another linear and not named like a head
    rso.wrap(m, rank=2, tau=None)
    assert [n for n, _ in rso.subspace_layers(m)] == ["lin"]
    assert type(m.out) is nn.Linear and type(m.classifier.dense) is nn.Linear and type(m.score[0]) is nn.Linear


def test_target_errors_name_the_model_class_and_the_modules():
    with pytest.raises(ValueError, match=r"^rso\.wrap: ModuleDict has no nn\.Linear / Conv1D layers to wrap "
                                         r"\(output heads \('lm_head', 'score', 'classifier', 'classification_head', "
                                         r"'sequence_summary', 'logits_proj', 'qa_outputs'\) are left out by default\)$"):
        rso.wrap(nn.ModuleDict(dict(lm_head=nn.Linear(2, 2), e=nn.Embedding(3, 2))), rank=1)
    for bad in ([1], 5):
        with pytest.raises(TypeError, match="^" + re.escape("rso.wrap: target_modules must be a regex string or a "
                                                            f"list of names/suffixes, got {bad!r}") + "$"):
            rso.wrap(nn.Sequential(nn.Linear(2, 2)), rank=1, target_modules=bad)
    with pytest.raises(ValueError, match=r"^rso\.wrap: target_modules=\['x'\] matches no module of Sequential$"):
        rso.wrap(nn.Sequential(nn.Linear(2, 2)), rank=1, target_modules=["x"])
    with pytest.raises(TypeError, match=r"not nn\.Linear / Conv1D: 1 \(ReLU\)$"):
        rso.wrap(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), rank=1, target_modules=["0", "1"])


def test_rank_one_and_a_fraction_that_rounds_to_zero_is_refused():
    model = nn.Sequential(nn.Linear(8, 8))
    rso.wrap(model, rank=1, tau=None)
    assert model[0].rank == 1
    with pytest.raises(ValueError, match=r"^rso\.wrap: rank=0\.01 rounds to 0 channels of layer '0' "
                                         r"\(in_features=8\); allowed: a fraction ≥ 0\.0625 here"):
        rso.wrap(nn.Sequential(nn.Linear(8, 8)), rank=0.01, tau=None)  # round(0.08) = 0
    other = nn.Sequential(nn.Linear(8, 8))
    rso.wrap(other, rank=0.0625, tau=None)  # half a channel: rounded up to one
    assert other[0].rank == 1 and tuple(other[0].P.shape) == (1, 8)
    assert rso.state(other) == {"step": 0, "cycle": 0, "tau": None, "steps_to_merge": None,
                                "projection": "stiefel", "layers": 1, "projection_groups": 1,
                                "state_on_merge": "reset"}


def test_wrap_errors_list_at_most_five_modules_and_name_a_non_module():
    listed = ", ".join(f"{i} (ReLU)" for i in range(5))
    for n, tail in ((5, ""), (6, " ..."), (7, " ...")):
        with pytest.raises(TypeError, match=rf"not nn\.Linear / Conv1D: {re.escape(listed + tail)}$"):
            rso.wrap(nn.Sequential(*[nn.ReLU() for _ in range(n)]), rank=1, target_modules="[0-9]")
    with pytest.raises(TypeError, match=r"^rso\.wrap: model must be a torch\.nn\.Module, got int$"):
        rso.wrap(5, rank=1)


def test_a_model_holding_a_subspace_layer_counts_as_wrapped():
    hand_built = nn.Sequential(SubspaceLinear(4, 4, rank=2))
    assert rso.is_wrapped(hand_built)
    with pytest.raises(ValueError, match="already wrapped"):
        rso.wrap(hand_built, rank=2)


def test_defaults_are_the_documented_ones():
    """rso.wrap(model) is rank 128, τ = 200, Stiefel, scale 1, seed 0, shared projections, state reset."""
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256))
    default = rso.wrap(build())
    explicit = rso.wrap(build(), rank=128, tau=200, projection="stiefel", scale=1.0, seed=0, share_projections=True,
                        state_on_merge="reset")
    assert [default[i].rank for i in (0, 2)] == [128, 128]
    assert rso.state(default) == rso.state(explicit) == {
        "step": 0, "cycle": 0, "tau": 200, "steps_to_merge": 200, "projection": "stiefel", "layers": 2,
        "projection_groups": 2, "state_on_merge": "reset"}
    for i in (0, 2):
        assert default[i].scale == 1.0
        assert torch.equal(default[i].P, explicit[i].P)


def test_the_seed_sets_every_projection_and_coordinate_mode_starts_at_wrap():
    P = lambda model: [m.P for _, m in rso.subspace_layers(model)]  # noqa: E731
    three, again, four = (rso.wrap(mlp(), rank=3, tau=None, seed=s) for s in (3, 3, 4))
    assert all(torch.equal(a, b) for a, b in zip(P(three), P(again)))
    assert not any(torch.equal(a, b) for a, b in zip(P(three), P(four)))
    coordinate = rso.wrap(mlp(), rank=3, tau=None, projection="coordinate")
    assert [m.coordinate for _, m in rso.subspace_layers(coordinate)] == [True, True, True]


def test_the_readme_api_names_resolve_after_a_plain_import_rso():
    """The README's API table names ``rso.optim.*``, ``rso.memory.*``, ``rso.heads.*`` and ``rso.distributed``:
    each resolves after ``import rso`` alone, in a fresh interpreter (so no earlier import can hide a gap)."""
    import subprocess
    import sys

    names = ["rso.optim.SubspaceAdamW", "rso.optim.GoLoreSGD", "rso.memory.measure_step", "rso.memory.estimate",
             "rso.heads.use_chunked_head", "rso.distributed.ddp", "rso.from_pretrained", "rso.outer_step"]
    code = "import rso\n" + "".join(f"assert callable({n}), {n!r}\n" for n in names)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]

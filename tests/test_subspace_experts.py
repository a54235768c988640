"""SubspaceExperts: transformers' stacked expert weights as W₀[e] + s·B[e] P, checked against autograd on the
unwrapped model in float64 (the experts in transformers' eager loop)."""
import copy

import pytest
import torch

import rso
from rso.layers.subspace_experts import ExpertSubspace, SubspaceExperts
from rso.layers.functional import SubspaceLinearFunction
from rso.train import zoo

FAMILIES = {  # concatenated gate/up; transposed + biased + interleaved custom gate; no gate (up_proj only)
    "mixtral": "MixtralForCausalLM", "gpt_oss": "GptOssForCausalLM", "nemotron_h": "NemotronHForCausalLM"}


def build(model_type):
    model = zoo.build(model_type, FAMILIES[model_type]).double()
    model.config._experts_implementation = "eager"  # the reference loop (grouped_mm has no float64)
    return model


def batch(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (2, 7), generator=g)


def loss_of(model, ids):
    return model(ids, labels=ids).loss


def experts_of(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SubspaceExperts)]


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_gradients_equal_autograd_on_the_unwrapped_model(model_type):
    """∂B[e] = s·G[e] Pᵀ (G[e] the gradient of expert e's out×in weight), and every other gradient unchanged."""
    torch.manual_seed(0)
    plain = build(model_type)
    with torch.no_grad():  # the routers and experts of a random init: make every expert count
        for n, p in plain.named_parameters():
            if "experts" in n:
                p.normal_(0, 0.1)
    wrapped = rso.wrap(copy.deepcopy(plain), rank=3, tau=None, scale=1.5)
    ids = batch(plain)
    loss_of(plain, ids).backward()
    loss_of(wrapped, ids).backward()
    grads = dict(plain.named_parameters())
    members = [(f"{n}.{m.name}", m) for n, layer in experts_of(wrapped) for m in layer.subspaces]
    assert members
    for name, sub in members:
        G = grads[name].grad
        G = G.transpose(1, 2) if sub.transposed else G
        assert torch.allclose(sub.B.grad, 1.5 * G @ sub.P.T, rtol=1e-10, atol=1e-12), name
    for name, p in wrapped.named_parameters():
        if p.requires_grad and not name.endswith(".B"):
            assert torch.allclose(p.grad, grads[name].grad, rtol=1e-10, atol=1e-12), name


def test_only_the_r_wide_projection_of_each_routed_token_is_saved():
    torch.manual_seed(0)
    model = rso.wrap(build("mixtral"), rank=3)
    inputs, saved = [], []
    apply = SubspaceLinearFunction.apply

    def recording(x, *args):
        inputs.append(x)
        return apply(x, *args)

    experts = experts_of(model)[0][1]
    hidden = torch.randn(5, model.config.hidden_size, dtype=torch.float64)
    index = torch.tensor([[0, 1], [1, 2], [0, 3], [2, 3], [1, 0]])
    weights = torch.rand(5, 2, dtype=torch.float64)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        SubspaceLinearFunction.apply = recording
        try:
            experts(hidden, index, weights)
        finally:
            SubspaceLinearFunction.apply = apply
    assert len(inputs) == 8  # 4 experts hit, two maps each
    pointers = {t.untyped_storage().data_ptr() for t in saved}
    assert not any(x.untyped_storage().data_ptr() in pointers for x in inputs)
    assert any(t.shape == (3, 3) or t.shape[-1] == 3 for t in saved)  # the z's are there


def test_a_merge_keeps_the_model_and_moves_to_a_new_subspace():
    torch.manual_seed(0)
    model = rso.wrap(build("gpt_oss"), rank=3, tau=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = batch(model)
    for _ in range(3):  # a merge after step 2, then B moves again
        loss_of(model, ids).backward()
        opt.step(), opt.zero_grad()
    sub = experts_of(model)[0][1].subspaces[0]
    before_P = sub.P.clone()
    assert sub.B.any() and int(sub.cycle) == 1
    with torch.no_grad():
        expected = model(ids).logits
    rso.outer_step(model, opt)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, expected, rtol=1e-12, atol=1e-12)
    assert not sub.B.any() and not torch.equal(sub.P, before_P) and int(sub.cycle) == 2


def test_svd_projection_takes_the_stacked_expert_gradient():
    torch.manual_seed(0)
    model = rso.wrap(build("mixtral"), rank=3, tau=5, projection="svd")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    loss_of(model, batch(model)).backward()
    sub = experts_of(model)[0][1].subspaces[0]
    G = sub._capture.grad.clone()  # (E·out)×in
    opt.step()
    top = torch.linalg.svd(G, full_matrices=False).Vh[:3]
    assert G.shape == (sub.num_experts * sub.out_features, sub.in_features)
    assert torch.allclose((sub.P @ top.T).abs(), torch.eye(3, dtype=torch.float64), atol=1e-8)


def test_a_plain_state_dict_makes_the_layer_exactly_those_weights():
    torch.manual_seed(0)
    plain = build("mixtral")
    model = rso.wrap(copy.deepcopy(plain), rank=3)
    sub = experts_of(model)[0][1].subspaces[0]
    with torch.no_grad():
        sub.B.normal_()
    model.load_state_dict(plain.state_dict(), strict=False)
    assert not sub.B.any()
    with torch.no_grad():
        assert torch.equal(model(batch(model)).logits, plain(batch(model)).logits)


def test_effective_state_dict_unwrap_and_copies():
    torch.manual_seed(0)
    model = rso.wrap(build("gpt_oss"), rank=3)
    for layer in (m for _, m in experts_of(model)):
        for sub in layer.subspaces:
            with torch.no_grad():
                sub.B.normal_(0, 0.1)
    ids = batch(model)
    with torch.no_grad():
        expected = model(ids).logits
    state = rso.effective_state_dict(model)
    assert not any(".rso." in k for k in state)
    twin = copy.deepcopy(model)
    layer = experts_of(twin)[0][1]
    assert layer._experts._parameters["down_proj"] is layer.down_proj  # one W₀ in the copy, not two
    plain = rso.unwrap(twin)
    assert not experts_of(plain) and not any(isinstance(m, ExpertSubspace) for m in plain.modules())
    assert plain.model.layers[0].mlp.experts.down_proj.requires_grad
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, expected, rtol=1e-12, atol=1e-12)
    plain.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, expected, rtol=1e-12, atol=1e-12)


def test_target_parameters_selects_expert_weights_and_refuses_others():
    model = rso.wrap(build("mixtral"), rank=3, target_parameters=["down_proj"])
    assert {m.name for _, layer in experts_of(model) for m in layer.subspaces} == {"down_proj"}
    assert all(layer.gate_up_proj.requires_grad for _, layer in experts_of(model))
    none = rso.wrap(build("mixtral"), rank=3, target_parameters=[])
    assert not experts_of(none)
    for entries, match in ((["o_proj.weight"], "names 'model.layers.0.self_attn.o_proj.weight'"),
                           (["nothing_here"], "names no parameter"), ("down_proj", "must be None or a list")):
        model = build("mixtral")
        with pytest.raises((ValueError, TypeError), match=match):
            rso.wrap(model, rank=3, target_parameters=entries)
        assert not rso.is_wrapped(model)
    model = build("mixtral")
    model.model.layers[0].mlp.experts.down_proj.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen layers"):
        rso.wrap(model, rank=3, target_parameters=["layers.0.mlp.experts.down_proj"])
    assert "frozen layers (weight.requires_grad=False): model.layers.0.mlp.experts.down_proj" in rso.summary(
        rso.wrap(model, rank=3))


def test_defaults_cover_a_moe_model_and_list_what_cannot_take_the_rank():
    model = zoo.build("qwen2_moe", "Qwen2MoeForCausalLM")
    rso.wrap(model, rank=8)
    text = rso.summary(model)
    assert "stacked expert weights" in text
    assert "layers narrower than the rank (kept trainable in full): model.layers.0.mlp.shared_expert_gate" in text
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    full = [n for n in trainable if not n.endswith((".B", "bias")) and "norm" not in n and "embed" not in n
            and "lm_head" not in n]
    assert all("gate" in n for n in full), full  # routers and the 1-output shared-expert gate only


def test_the_experts_module_refuses_unknown_arguments():
    model = rso.wrap(build("mixtral"), rank=3)
    experts = experts_of(model)[0][1]
    with pytest.raises(TypeError, match="routed expert indices"):
        experts(torch.zeros(2, model.config.hidden_size, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.long))


def test_a_non_finite_B_is_refused_before_any_merge():
    model = rso.wrap(build("mixtral"), rank=3, tau=1)
    sub = experts_of(model)[0][1].subspaces[1]
    W0 = sub.weight.detach().clone()
    with torch.no_grad():
        sub.B[0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="nothing was merged"):
        rso.outer_step(model)
    assert torch.equal(sub.weight, W0)


def test_the_captured_gradient_is_reduced_in_place_and_fsdp2_is_refused():
    """rso.distributed averages ``_capture.grad`` across ranks in place: it must be the capture's own storage."""
    model = rso.wrap(build("mixtral"), rank=3, tau=5, projection="svd")
    loss_of(model, batch(model)).backward()
    capture = experts_of(model)[0][1].subspaces[0]._capture
    before = capture.grad.clone()
    capture.grad.mul_(0.5)
    assert torch.equal(capture.grad, before * 0.5)
    with pytest.raises(NotImplementedError, match="FSDP2 does not shard SubspaceExperts"):
        rso.distributed.fully_shard_model(model)
    assert rso.distributed.projection_fingerprints(model).keys() >= {"model.layers.0.mlp.experts.rso.down_proj"}


def test_packed_attention_projections_train_in_full_listed_and_are_refused_by_name():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True))
    rso.wrap(model, rank=2)
    assert "packed projections the module reads as a raw parameter (nn.MultiheadAttention.in_proj_weight): " \
           "1.self_attn.in_proj_weight" in rso.summary(model)
    assert model[1].self_attn.in_proj_weight.requires_grad
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True))
    with pytest.raises(ValueError, match=r"target_parameters entry 'in_proj_weight' names '1.self_attn.in_proj_weight'.*"
                                         r"allowed: the stacked expert weights"):
        rso.wrap(fresh, rank=2, target_parameters=["in_proj_weight"])
    assert not rso.is_wrapped(fresh)


@pytest.mark.parametrize("projection", ["coordinate", "gaussian"])
def test_other_projections_give_the_subspace_gradient(projection):
    torch.manual_seed(0)
    plain = build("mixtral")
    wrapped = rso.wrap(copy.deepcopy(plain), rank=3, tau=None, projection=projection)
    ids = batch(plain)
    loss_of(plain, ids).backward()
    loss_of(wrapped, ids).backward()
    grads = dict(plain.named_parameters())
    for name, layer in experts_of(wrapped):
        for sub in layer.subspaces:
            assert torch.allclose(sub.B.grad, grads[f"{name}.{sub.name}"].grad @ sub.P.T, rtol=1e-10, atol=1e-12)


def test_project_maps_the_experts_adam_moments_into_the_new_subspace():
    torch.manual_seed(0)
    model = rso.wrap(build("mixtral"), rank=3, tau=None, state_on_merge="project")
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss_of(model, batch(model)).backward()
    opt.step()
    sub = experts_of(model)[0][1].subspaces[0]
    m, v, old = opt.state[sub.B]["exp_avg"].clone(), opt.state[sub.B]["exp_avg_sq"].clone(), sub.P.clone()
    rso.outer_step(model, opt)
    R = old @ sub.P.T
    assert torch.allclose(opt.state[sub.B]["exp_avg"], m @ R, rtol=1e-10, atol=1e-14)
    assert torch.allclose(opt.state[sub.B]["exp_avg_sq"], v @ (R * R), rtol=1e-10, atol=1e-14)

"""rso.train.bench.moe's one-P-per-expert variant: each expert e trains W₀[e] + s·B[e] P[e] with its own Haar P[e],
checked against autograd on the unwrapped Qwen3-MoE in float64; a merge keeps the function and draws new P's."""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

import rso
from rso.train.bench.moe import PerExpertExperts, _experts_class, install_methods


def plain_model():
    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=64, hidden_size=16, moe_intermediate_size=8, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4,
                            num_experts_per_tok=2, max_position_embeddings=32)
    model = AutoModelForCausalLM.from_config(config).double()
    model.config._experts_implementation = "eager"  # the reference loop (grouped_mm has no float64)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "experts" in n:
                p.normal_(0, 0.1)
    return model


def wrap_per_expert(model, tau=None, scale=1.5):
    with _experts_class(PerExpertExperts):
        return rso.wrap(model, rank=3, tau=tau, scale=scale)


def subspaces(model):
    return [(f"{n}.{s.name}", s) for n, m in model.named_modules() if isinstance(m, PerExpertExperts)
            for s in m.subspaces]


def loss_of(model, seed=0):
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(seed))
    return model(ids, labels=ids).loss


def test_each_expert_trains_in_its_own_subspace_as_autograd_on_the_unwrapped_model_says():
    """With B ≠ 0: the loss is the plain model's at W₀[e] + s·B[e] P[e], and ∂B[e] = s·G[e] P[e]ᵀ."""
    plain = plain_model()
    wrapped = wrap_per_expert(copy.deepcopy(plain))
    loss_of(wrapped)  # the first forward draws cycle 0's projections
    members = subspaces(wrapped)
    assert len(members) == 4
    params = dict(plain.named_parameters())
    with torch.no_grad():
        for name, sub in members:
            sub.B.normal_(0, 0.3)
            P = sub.P
            assert P.shape == (4, 3, sub.in_features)
            assert torch.allclose(P @ P.transpose(1, 2), torch.eye(3, dtype=P.dtype).expand(4, 3, 3), atol=1e-12)
            assert (P[0] - P[1]).abs().max() > 0.1  # not one P broadcast to every expert
            params[name].add_(1.5 * sub.B @ P)
    expected, got = loss_of(plain), loss_of(wrapped)
    assert torch.allclose(got, expected, rtol=1e-12)
    expected.backward()
    got.backward()
    for name, sub in members:
        assert torch.allclose(sub.B.grad, 1.5 * params[name].grad @ sub.P.transpose(1, 2), rtol=1e-10, atol=1e-12)


def test_a_merge_keeps_the_function_and_the_next_cycle_draws_new_projections():
    """τ = 1 and a zero learning rate: the step's merge W₀[e] ← W₀[e] + s·B[e] P[e] leaves the loss as it was."""
    model = wrap_per_expert(plain_model(), tau=1)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    loss_of(model).backward()
    with torch.no_grad():
        for _, sub in subspaces(model):
            sub.B.normal_(0, 0.3)
        reference = loss_of(model, seed=5)
    before = {n: s.P.clone() for n, s in subspaces(model)}
    optimizer.step()  # ends cycle 0: merge, then the outer loop's one (broadcast) draw
    with torch.no_grad():
        after = loss_of(model, seed=5)  # the new cycle's first forward draws its per-expert P's
    assert torch.allclose(after, reference, rtol=1e-12)
    for name, sub in subspaces(model):
        assert int(sub.cycle) == 1 and sub.drawn_cycle == 1
        assert sub.B.abs().max() == 0
        assert (sub.P - before[name]).abs().max() > 0.1
        assert (sub.P[0] - sub.P[1]).abs().max() > 0.1


@pytest.fixture
def bench_methods(monkeypatch):
    """The bench's two methods registered for one test only: the registries are copies, restored afterwards (other
    tests list every registered method in their messages)."""
    from rso.train import methods
    monkeypatch.setattr(methods, "METHODS", dict(methods.METHODS))
    monkeypatch.setattr(methods, "METHOD_OPTIONS", dict(methods.METHOD_OPTIONS))
    install_methods()


def test_per_expert_projections_other_than_stiefel_are_refused(bench_methods):
    from rso.train.methods import MethodError, MethodOptions, setup_method
    with pytest.raises(MethodError, match="stiefel"):
        setup_method("rso-per-expert", plain_model(), MethodOptions(rank=3, tau=2, projection="gaussian"))


def test_galore_torch_projects_the_2d_block_weights_and_leaves_the_3d_experts_to_plain_adam(bench_methods):
    from rso.train.methods import MethodOptions, setup_method
    model = plain_model()
    _, optimizer = setup_method("galore-torch", model, MethodOptions(rank=3, tau=2))
    projected, plain = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert projected["rank"] == 3 and "rank" not in plain
    assert sorted({names[id(p)].split(".")[-2] for p in projected["params"]}) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert {names[id(p)] for p in plain["params"] if p.dim() == 3} == {n for n, p in model.named_parameters()
                                                                      if "experts" in n}

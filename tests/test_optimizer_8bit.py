"""bitsandbytes' 8-bit AdamW with RSO: what each state_on_merge policy does to B's quantized states, and
``--optimizer adamw8bit`` / ``--activation-checkpointing`` in the training command lines."""
import pytest
import torch

import rso
from rso.state_policy import _cannot_project

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

CFG = dict(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_key_value_heads=2,
           num_hidden_layers=2, vocab_size=512)


def wrapped(policy, optimizer_cls=None):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CFG, attn_implementation="sdpa"))
    rso.wrap(model, rank=32, tau=None, state_on_merge=policy)  # merges only when asked (rso.outer_step)
    cls = optimizer_cls or bnb.optim.AdamW8bit
    opt = cls([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    return model, opt, ids


def train(model, opt, ids, steps):
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return float(loss)


def moments(state, i):
    """A moment of bitsandbytes' state in fp32 (dequantized if it is 8-bit)."""
    v = state[f"state{i}"]
    if v.dtype == torch.uint8:
        return F.dequantize_blockwise(v, absmax=state[f"absmax{i}"], code=state[f"qmap{i}"], blocksize=256).float()
    return v.float().clone()


def test_reset_and_keep_with_8bit_states():
    for policy in ("reset", "keep"):
        model, opt, ids = wrapped(policy)
        train(model, opt, ids, 2)
        layers = [layer for _, layer in rso.subspace_layers(model)]
        before = {id(layer.B): {k: v.clone() for k, v in opt.state[layer.B].items() if torch.is_tensor(v)}
                  for layer in layers}
        rso.outer_step(model, opt)
        for layer in layers:
            if policy == "reset":
                assert layer.B not in opt.state or not opt.state[layer.B]
            else:  # the codes and scales are carried unchanged
                for k, v in before[id(layer.B)].items():
                    assert torch.equal(opt.state[layer.B][k], v), k
        assert torch.isfinite(torch.tensor(train(model, opt, ids, 2)))
        assert any(opt.state[layer.B]["state1"].dtype == torch.uint8 for layer in layers)


def test_project_maps_8bit_states_within_their_quantization():
    """'project' on uint8 states: dequantize, map (first moment by R, second by R∘R), quantize again with the
    same map; equal to the fp32 mapping within the 8-bit blockwise quantization (< 1% of the largest value),
    32-bit states (tensors under 4096 elements) exactly; second moments stay ≥ 0."""
    model, opt, ids = wrapped("project")
    train(model, opt, ids, 3)
    layers = [layer for _, layer in rso.subspace_layers(model)]
    before = {id(layer.B): (moments(opt.state[layer.B], 1), moments(opt.state[layer.B], 2), layer.P.clone())
              for layer in layers}
    rso.outer_step(model, opt)
    kinds = set()
    for layer in layers:
        m1, m2, P_old = before[id(layer.B)]
        R = P_old.float() @ layer.P.float().T
        want1, want2 = m1 @ R, m2 @ (R * R)
        got1, got2 = moments(opt.state[layer.B], 1), moments(opt.state[layer.B], 2)
        eight = opt.state[layer.B]["state1"].dtype == torch.uint8
        kinds.add(eight)
        tol = 0.01 if eight else 1e-6
        assert (got1 - want1).abs().max() <= tol * want1.abs().max()
        assert (got2 - want2).abs().max() <= tol * want2.abs().max()
        assert got2.min() >= 0
        # mapping back with Rᵀ gives the old moment (P_new has orthonormal rows): the map is not a no-op
        assert not torch.allclose(got1, m1)
    assert kinds == {True, False}  # both 8-bit and (small) 32-bit states were mapped
    assert torch.isfinite(torch.tensor(train(model, opt, ids, 2)))


def test_project_refused_for_bitsandbytes_states_it_cannot_map():
    from rso.outer_loop import check_state_policy
    model, opt, ids = wrapped("project", bnb.optim.Lion8bit)
    train(model, opt, ids, 1)
    with pytest.raises(ValueError, match=r"Lion8bit.*'reset' or 'keep'.*reset, keep, project"):
        rso.outer_step(model, opt)
    with pytest.raises(ValueError, match="Lion8bit"):
        check_state_policy(opt, "project")
    check_state_policy(opt, "keep")
    check_state_policy(bnb.optim.AdamW8bit([torch.nn.Parameter(torch.zeros(2))]), "project")


# ---------------------------------------------------------------- found by mutation testing (docs/mutation.md)
# The way out the refusal gives (the known optimizers depend on the installed torch: read from the module).
PROJECT_HINT = _cannot_project(None, "").split("; ", 1)[1]


def adam8bit_state(shape=(130, 32)):
    """A real AdamW8bit state for one tensor of ``shape`` (≥ 4096 elements: 8-bit blockwise) after one step."""
    p = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    opt = bnb.optim.AdamW8bit([p], lr=1e-3)
    p.grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    opt.step()
    return opt, opt.state[p]


def test_project_refuses_a_bitsandbytes_optimizer_that_is_not_adam_with_the_full_message():
    """AdEMAMix8bit keeps state1 and state2 like Adam, but state1 holds two EMAs: 'project' must refuse it (at
    check time and at the merge), naming the optimizer, its kind and the policies that work."""
    from rso.outer_loop import check_state_policy
    model, opt, ids = wrapped("project", bnb.optim.AdEMAMix8bit)
    train(model, opt, ids, 1)
    want = ("rso: state_on_merge='project' cannot map the optimizer state of AdEMAMix8bit: its states (ademamix) are "
            "not Adam's first and second moments; " + PROJECT_HINT)
    with pytest.raises(ValueError) as err:
        check_state_policy(opt, "project")
    assert str(err.value) == want
    layers = [layer for _, layer in rso.subspace_layers(model)]
    before = [(layer.weight.clone(), layer.B.detach().clone(), layer.P.clone()) for layer in layers]
    with pytest.raises(ValueError) as err:
        rso.outer_step(model, opt)
    assert str(err.value) == want
    for layer, (W, B, P) in zip(layers, before):  # refused before anything changed
        assert torch.equal(layer.weight, W) and torch.equal(layer.B, B) and torch.equal(layer.P, P)
    assert rso.state(model)["cycle"] == 0
    check_state_policy(opt, "reset")

    class Stand_in:  # a bitsandbytes-module optimizer without optimizer_name
        __module__ = "bitsandbytes.optim.custom"
    with pytest.raises(ValueError, match=r"of Stand_in: its states \(\?\) are not Adam's"):
        check_state_policy(Stand_in(), "project")


@pytest.mark.parametrize("corrupt, why", [
    (lambda s: s.pop("state2"), "its state has no state1/state2 (keys ['absmax1', 'absmax2', 'qmap1', 'qmap2', "
                                "'state1', 'step'])"),
    (lambda s: s.pop("state1"), "its state has no state1/state2 (keys ['absmax1', 'absmax2', 'qmap1', 'qmap2', "
                                "'state2', 'step'])"),
    (lambda s: s.update(state1=s["state1"].half()), "its state1 is torch.float16 without blockwise scales (keys "
                                                   "['absmax1', 'absmax2', 'qmap1', 'qmap2', 'state1', 'state2', 'step'])"),
    (lambda s: s.pop("absmax1"), "its state1 is torch.uint8 without blockwise scales (keys ['absmax2', 'qmap1', "
                                 "'qmap2', 'state1', 'state2', 'step'])"),
    (lambda s: s.pop("qmap2"), "its state2 is torch.uint8 without blockwise scales (keys ['absmax1', 'absmax2', "
                               "'qmap1', 'state1', 'state2', 'step'])"),
    (lambda s: s.update(absmax1=s["absmax1"][:-1]), "16 scales for 4160 elements are not blocks of 256"),
    (lambda s: s.update(state1=torch.zeros(130, 32), state2=s["state2"].half()),  # state1 fine (fp32), state2 not
     "its state2 is torch.float16 without blockwise scales (keys ['absmax1', 'absmax2', 'qmap1', 'qmap2', 'state1', "
     "'state2', 'step'])"),
], ids=["no_state2", "no_state1", "fp16_state1", "no_absmax1", "no_qmap2", "wrong_block_count", "fp16_state2"])
def test_project_refuses_a_state_layout_it_does_not_know(corrupt, why):
    from rso.state_policy import _check_bitsandbytes_state
    opt, state = adam8bit_state()
    corrupt(state)
    with pytest.raises(ValueError) as err:
        _check_bitsandbytes_state(opt, state)
    assert str(err.value) == ("rso: state_on_merge='project' cannot map the optimizer state of AdamW8bit: "
                              f"{why}; {PROJECT_HINT}")


@pytest.mark.parametrize("where", ["last layer", "second member of a shared group"])
def test_a_merge_with_an_unknown_state_layout_is_refused_before_anything_changes(where):
    """The last layer's (every earlier one would be merged first otherwise), or layer 0's k_proj, which shares
    one P with q_proj and v_proj (every member of a group is checked, not only its first)."""
    model, opt, ids = wrapped("project")
    train(model, opt, ids, 1)
    layers = [layer for _, layer in rso.subspace_layers(model)]
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.P is attn.k_proj.P
    del opt.state[(layers[-1] if where == "last layer" else attn.k_proj).B]["state2"]
    before = [(layer.weight.clone(), layer.B.detach().clone(), layer.P.clone(),
               {k: v.clone() for k, v in opt.state[layer.B].items() if torch.is_tensor(v)}) for layer in layers]
    with pytest.raises(ValueError, match="AdamW8bit: its state has no state1/state2"):
        rso.outer_step(model, opt)
    for layer, (W, B, P, state) in zip(layers, before):
        assert torch.equal(layer.weight, W) and torch.equal(layer.B, B) and torch.equal(layer.P, P)
        assert all(torch.equal(opt.state[layer.B][k], v) for k, v in state.items())


def test_project_maps_8bit_states_whose_size_is_not_a_whole_number_of_blocks():
    """4160 = 16¼ blocks of 256: 17 scales (the last block partial), mapped like any other."""
    from rso.state_policy import _project_bitsandbytes_state
    opt, state = adam8bit_state()
    assert state["state1"].dtype == torch.uint8 and state["absmax1"].numel() == 17
    m1, m2 = moments(state, 1), moments(state, 2)
    R, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(2)))
    _project_bitsandbytes_state(opt, state, R)
    assert (moments(state, 1) - m1 @ R).abs().max() <= 0.01 * (m1 @ R).abs().max()
    assert (moments(state, 2) - m2 @ (R * R)).abs().max() <= 0.01 * (m2 @ (R * R)).abs().max()

"""Wrapped models serialize like HF models: save_pretrained, plain from_pretrained, rso.from_pretrained, checks."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

import rso
from conftest import lm_batch, tiny_llama


def trained(projection="stiefel", steps=4, **kw):
    """A tiny LLaMA wrapped (tau 3) and trained ``steps`` AdamW steps (weight decay on: B ≠ 0 mid-cycle)."""
    model = rso.wrap(tiny_llama(), rank=8, tau=3, projection=projection, **kw)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    train(model, opt, 0, steps)
    return model, opt


def train(model, opt, start, steps):
    losses = []
    for i in range(start, start + steps):
        loss = model(**lm_batch(seed=i)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def logits(model, seed=50):
    return model(**lm_batch(seed=seed)).logits


def test_save_pretrained_writes_the_effective_weight_and_plain_from_pretrained_loads_it(tmp_path):
    model, _ = trained()
    layer = model.model.layers[0].self_attn.q_proj
    assert torch.count_nonzero(layer.B) > 0
    effective = layer.effective_weight().clone()
    before = logits(model)
    model.save_pretrained(tmp_path)  # shared q/k/v and gate/up P: safetensors refuses shared tensors

    # saving merged B into W₀ without moving the subspace: same function, B = 0, P kept
    assert torch.count_nonzero(layer.B) == 0 and torch.equal(layer.weight, effective)
    torch.testing.assert_close(logits(model), before)
    saved = load_file(tmp_path / "model.safetensors")
    assert torch.equal(saved["model.layers.0.self_attn.q_proj.weight"], effective)
    assert "model.layers.0.self_attn.q_proj.P" in saved and "model.layers.0.self_attn.k_proj.P" not in saved
    assert json.loads((tmp_path / "rso_config.json").read_text())["rank"] == 8
    assert "rso" not in json.loads((tmp_path / "config.json").read_text())  # a plain re-save carries nothing stale

    plain = LlamaForCausalLM.from_pretrained(tmp_path)
    assert not rso.is_wrapped(plain)
    torch.testing.assert_close(logits(plain), logits(model))


def test_merge_on_save_changes_nothing_a_resumed_run_would_not_also_see():
    """A run saved at step 4 and resumed from that state continues bit for bit like the saving run."""
    model, opt = trained(steps=4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    optim_state = copy.deepcopy(opt.state_dict())
    reference = train(model, opt, 4, 5)

    other = rso.wrap(tiny_llama(seed=7), rank=8, tau=3, seed=5)
    other_opt = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    other.load_state_dict(state)
    other_opt.load_state_dict(optim_state)
    assert train(other, other_opt, 4, 5) == reference
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("projection", ["stiefel", "svd"])
def test_rso_from_pretrained_restores_the_wrapped_model_exactly(tmp_path, projection):
    model, _ = trained(projection)
    model.save_pretrained(tmp_path)
    for source in (LlamaForCausalLM, tiny_llama(seed=11)):  # a class, or an unwrapped instance
        back = rso.from_pretrained(source, tmp_path)
        assert rso.state(back) == rso.state(model)
        attn = back.model.layers[1].self_attn
        assert attn.k_proj.P is attn.q_proj.P and attn.v_proj.P is attn.q_proj.P  # shared storage re-tied
        for (k, a), b in zip(model.state_dict().items(), back.state_dict().values()):
            assert torch.equal(a, b), k
        assert rso.get_config(back) == rso.get_config(model)


def test_rso_from_pretrained_wraps_the_saved_target_modules_only(tmp_path):
    model, _ = trained(target_modules=["q_proj", "v_proj"])
    assert rso.get_config(model).target_modules == ["q_proj", "v_proj"]
    model.save_pretrained(tmp_path)
    back = rso.from_pretrained(LlamaForCausalLM, tmp_path)
    assert [n for n, _ in rso.subspace_layers(back)] == [n for n, _ in rso.subspace_layers(model)] == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    for (k, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k


def test_the_saved_settings_are_the_wrap_arguments():
    model = rso.wrap(tiny_llama(), rank=4, tau=7, projection="hybrid", target_modules=["q_proj", "v_proj"],
                     scale=2.0, seed=3, share_projections=[("q_proj", "v_proj")], total_steps=50,
                     random_fraction=0.3, state_on_merge="keep", proximal=0.5, chunked_head=9)
    assert rso.get_config(model).to_dict() == {
        "rank": 4, "tau": 7, "projection": "hybrid", "custom_projection": False, "target_modules": ["q_proj", "v_proj"],
        "target_parameters": None,
        "scale": 2.0, "seed": 3, "share_projections": [["q_proj", "v_proj"]], "total_steps": 50,
        "random_fraction": 0.3, "state_on_merge": "keep", "proximal": 0.5, "chunked_head": 9, "quantize": None,
        "requantize": "nearest"}


def test_older_checkpoints_with_a_P_per_member_and_no_settings_still_load():
    model, _ = trained()
    state = model.state_dict()
    state["model.layers.0.self_attn.k_proj.P"] = state["model.layers.0.self_attn.q_proj.P"].clone()
    for key in [k for k in state if k.endswith("_extra_state")]:  # nor the settings of each layer
        del state[key]
    fresh = rso.wrap(tiny_llama(), rank=8, tau=3)
    fresh.load_state_dict(state)  # strict: the follower's copy is accepted and dropped
    assert fresh.model.layers[0].self_attn.k_proj.P is fresh.model.layers[0].self_attn.q_proj.P


@pytest.mark.parametrize("other, message", [
    (dict(rank=4), "rank 8 in the checkpoint, 4 here"),
    (dict(projection="coordinate"), "projection='coordinate' here, 'stiefel' in the checkpoint"),
    (dict(tau=5), "tau=5 here, 3 in the checkpoint"),
    (dict(scale=0.5), "scale=0.5 here, 1.0 in the checkpoint"),
    (dict(target_modules=["q_proj", "k_proj", "v_proj"]), "wrapped in the checkpoint but is a plain layer here"),
    (dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
          share_projections=False), "shared a P in the checkpoint but has its own here"),
])
def test_loading_a_checkpoint_wrapped_otherwise_names_the_mismatch_and_changes_nothing(other, message):
    model, _ = trained()
    state = model.state_dict()
    target = rso.wrap(tiny_llama(seed=4), **{"rank": 8, "tau": 3, **other})
    before = {k: v.clone() for k, v in target.state_dict().items()}
    for strict in (True, False):  # Trainer's resume loads with strict=False
        with pytest.raises(ValueError, match=f"rso: .*{message}"):
            target.load_state_dict(state, strict=strict)
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_checkpoint_with_own_P_per_layer_into_shared_model_is_refused():
    model, _ = trained(share_projections=False)
    target = rso.wrap(tiny_llama(), rank=8, tau=3)
    with pytest.raises(ValueError, match="has its own P in the checkpoint but shares one here"):
        target.load_state_dict(model.state_dict())


def test_a_plain_state_dict_loads_into_a_wrapped_model_as_W0():
    plain = tiny_llama(seed=2)
    model = rso.wrap(tiny_llama(), rank=8, tau=3)
    model.load_state_dict(plain.state_dict(), strict=False)  # no rso keys: the weights become W₀
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, plain.model.layers[0].mlp.down_proj.weight)
    torch.testing.assert_close(logits(model), logits(plain))


def test_from_pretrained_errors(tmp_path):
    plain = tiny_llama()
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="has no rso_config.json: it was not saved from a model wrapped by rso.wrap"):
        rso.from_pretrained(LlamaForCausalLM, tmp_path / "plain")
    model, _ = trained()
    model.save_pretrained(tmp_path / "wrapped")
    with pytest.raises(ValueError, match=r"rank=4 here, 8 saved"):
        rso.from_pretrained(rso.wrap(tiny_llama(), rank=4, tau=3), tmp_path / "wrapped")
    with pytest.raises(FileNotFoundError, match="nothing has no rso_config.json"):
        rso.from_pretrained(LlamaForCausalLM, tmp_path / "nothing")


def test_unwrap_removes_the_saved_settings(tmp_path):
    model = rso.wrap(tiny_llama(), rank=8)
    assert rso.get_config(model).projection == "stiefel" and rso.get_config(model).share_projections is True
    rso.unwrap(model)
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "rso_config.json").exists() and "rso" not in json.loads((tmp_path / "config.json").read_text())

"""``rso.RSOConfig``: the one definition of the wrap arguments, its JSON round trip and ``rso_config.json``."""
import dataclasses
import json

import pytest
import torch
from transformers import LlamaForCausalLM

import rso
from conftest import tiny_llama
from rso.projections import StiefelSampler


class Tilted(StiefelSampler):
    """A custom sampler: saved by its class name, passed back to load."""
    name = "tilted"


def trained(model, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, ids


def test_wrap_takes_a_config_keywords_or_both():
    config = rso.RSOConfig(rank=4, tau=7, seed=3)
    a = rso.wrap(tiny_llama(), config)
    b = rso.wrap(tiny_llama(), rank=4, tau=7, seed=3)
    c = rso.wrap(tiny_llama(), rso.RSOConfig(rank=8, tau=7, seed=3), rank=4)  # keywords replace fields
    assert rso.get_config(a) == rso.get_config(b) == rso.get_config(c) == config
    for (k, x), y, z in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(x, y) and torch.equal(x, z), k
    assert rso.get_config(c) is not config  # the caller's config is never changed


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(rank=0), ValueError, r"^rso\.wrap: rank must be ≥ 1, got 0$"),
    (dict(projection="qr"), ValueError, r"projection must be one of"),
    (dict(total_steps=10), ValueError, r"total_steps=10 applies to projection='hybrid' only"),
    (dict(state_on_merge="drop"), ValueError, r"state_on_merge must be one of \('reset', 'keep', 'project'\)"),
])
def test_a_config_is_validated_when_it_is_made(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        rso.RSOConfig(**kwargs)


def test_wrap_refuses_unknown_keywords_and_other_configs_before_changing_anything():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"^rso\.wrap: unknown argument\(s\) \['ranks'\]; allowed: \["):
        rso.wrap(model, ranks=4)
    with pytest.raises(TypeError, match=r"^rso\.wrap: config must be an rso\.RSOConfig .* got dict$"):
        rso.wrap(model, {"rank": 4})
    assert not rso.is_wrapped(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("config", [
    rso.RSOConfig(),
    rso.RSOConfig(rank=0.25, tau=None, projection="hybrid", total_steps=50, random_fraction=0.3,
                  target_modules=["q_proj", "v_proj"], share_projections=[("q_proj", "v_proj")], scale=2,
                  seed=5, state_on_merge="project", proximal=0.5, chunked_head=16),
    rso.RSOConfig(target_modules=r".*mlp\..*", share_projections=False),
])
def test_json_round_trip(tmp_path, config):
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "rso_config.json").read_text())
    assert data == config.to_dict()
    assert rso.RSOConfig.from_pretrained(tmp_path) == config


def test_a_custom_sampler_is_saved_by_name_and_passed_back(tmp_path):
    config = rso.RSOConfig(projection=Tilted())
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "rso_config.json").read_text())["projection"] == "Tilted"
    with pytest.raises(ValueError, match=r"saved with a custom sampler \(Tilted\); pass projection="):
        rso.RSOConfig.from_pretrained(tmp_path)
    assert isinstance(rso.RSOConfig.from_pretrained(tmp_path, projection=Tilted()).projection, Tilted)


def test_save_pretrained_writes_rso_config_json_and_a_plain_resave_carries_nothing_stale(tmp_path):
    model, ids = trained(rso.wrap(tiny_llama(), rank=4, tau=2))
    model.save_pretrained(tmp_path / "wrapped")
    assert rso.RSOConfig.from_pretrained(tmp_path / "wrapped") == rso.get_config(model)
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "wrapped")
    plain.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / "rso_config.json").exists()
    # the plain copy wraps afresh and rso.from_pretrained still reads the wrapped folder
    back = rso.from_pretrained(LlamaForCausalLM, tmp_path / "wrapped")
    torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits)  # fp32 (sdpa vs eager)
    rso.wrap(plain, rso.get_config(back))


def test_checkpoints_written_with_the_config_in_config_json_still_load(tmp_path):
    """Before rso_config.json, the config was the "rso" entry of config.json (hybrid's entries for any projection)."""
    model, ids = trained(rso.wrap(tiny_llama(), rank=4, tau=2))
    model.save_pretrained(tmp_path)
    legacy = {**rso.get_config(model).to_dict(), "total_steps": 100}  # written by older training CLIs
    (tmp_path / "rso_config.json").unlink()
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "rso": legacy}))
    back = rso.from_pretrained(LlamaForCausalLM, tmp_path)
    assert rso.get_config(back) == rso.get_config(model) and rso.state(back) == rso.state(model)
    torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits)  # fp32 (sdpa vs eager)
    back.save_pretrained(tmp_path / "again")  # the stale entry is not carried over
    assert "rso" not in json.loads((tmp_path / "again" / "config.json").read_text())


def test_a_model_with_frozen_layers_reloads_with_the_same_wrapped_layers(tmp_path):
    model = tiny_llama()
    model.model.layers[0].requires_grad_(False)
    model, ids = trained(rso.wrap(model, rank=4, tau=2))
    model.save_pretrained(tmp_path)
    back = rso.from_pretrained(LlamaForCausalLM, tmp_path)  # freshly loaded: nothing is frozen
    assert [n for n, _ in rso.subspace_layers(back)] == [n for n, _ in rso.subspace_layers(model)]
    assert rso.get_config(back) == dataclasses.replace(rso.get_config(model), target_modules=sorted(
        n for n, _ in rso.subspace_layers(model)))
    torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits)  # fp32 (sdpa vs eager)

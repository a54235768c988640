"""Float64 gradients of a wrapped LLaMA against autograd on the unwrapped model."""
import copy

import torch

import rso
from conftest import assert_close_hf, lm_batch, tiny_llama


def test_B_and_input_gradients_match_the_unwrapped_model():
    model = rso.wrap(tiny_llama(dtype=torch.float64), rank=8, scale=0.5, tau=None)
    with torch.no_grad():
        for _, layer in rso.subspace_layers(model):
            layer.B.normal_(std=0.1)
    plain = rso.unwrap(copy.deepcopy(model))
    batch = lm_batch(batch=2, seq=6)
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach()

    x1 = embeds.clone().requires_grad_(True)
    model(inputs_embeds=x1, labels=batch["labels"]).loss.backward()
    x2 = embeds.clone().requires_grad_(True)
    plain(inputs_embeds=x2, labels=batch["labels"]).loss.backward()

    assert_close_hf(x1.grad, x2.grad)
    for name, layer in rso.subspace_layers(model):
        dW = plain.get_submodule(name).weight.grad
        assert_close_hf(layer.B.grad, layer.scale * dW @ layer.P.T, msg=name)
        assert layer.weight.grad is None
    # Parameters outside the wrapped layers get the same gradients as in the plain model.
    assert_close_hf(model.lm_head.weight.grad, plain.lm_head.weight.grad)
    assert_close_hf(model.model.norm.weight.grad, plain.model.norm.weight.grad)

"""``torch.compile`` of a wrapped model: same trajectory as eager, no graph breaks, one z per group.

The ``aot_eager`` backend runs Dynamo and AOTAutograd (graph capture, the joint forward/backward
graph and its common-subexpression elimination) without a C++ compiler, so CI can run it.
"""
import pytest
import torch
from torch._dynamo.utils import counters

import rso
from conftest import assert_close_hf, lm_batch, tiny_llama


def train(model, steps, compiled):
    step_model = torch.compile(model, backend="aot_eager") if compiled else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for i in range(steps):
        loss = step_model(**lm_batch(seed=i)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("projection", ["stiefel", "coordinate", "svd"])
def test_compiled_training_matches_eager_through_a_cycle(projection):
    torch._dynamo.reset()
    counters.clear()
    eager = rso.wrap(tiny_llama(torch.float64), rank=4, tau=2, projection=projection)
    compiled = rso.wrap(tiny_llama(torch.float64), rank=4, tau=2, projection=projection)
    expected = train(eager, 3, compiled=False)
    got = train(compiled, 3, compiled=True)
    assert rso.state(compiled)["cycle"] == 1
    assert_close_hf(torch.tensor(got), torch.tensor(expected))  # float64 LLaMA with float32 RMSNorm / rotary (see conftest)
    for (name, a), (_, b) in zip(eager.state_dict().items(), compiled.state_dict().items()):
        if a.is_floating_point():
            assert_close_hf(b, a, msg=name)
        else:
            assert torch.equal(b, a), name
    assert counters["aot_autograd"]["ok"] >= 1 and counters["stats"]["unique_graphs"] >= 1  # it did compile
    breaks = sum(counters["graph_break"].values())
    if projection == "svd":  # the step that captures the full gradient for the SVD runs in pieces
        assert breaks > 0
    else:
        assert breaks == 0, dict(counters["graph_break"])


@pytest.mark.parametrize("share, per_layer", [(True, 4), (False, 7)])
def test_compiled_graph_saves_one_projection_per_group(share, per_layer):
    torch._dynamo.reset()
    model = rso.wrap(tiny_llama(), rank=4, tau=None, share_projections=share)
    loss = torch.compile(model, backend="aot_eager")(**lm_batch(batch=3, seq=5)).loss
    saved = [tuple(t.shape) for t in loss.grad_fn.saved_tensors]
    # z = x Pᵀ is (15 tokens, rank 4); no weight has 15 rows. Shared: q/k/v's three identical x Pᵀ on
    # one P tensor (and gate/up's two) are merged into one, as the eager group cache does.
    assert saved.count((15, 4)) == per_layer * model.config.num_hidden_layers, saved
    loss.backward()

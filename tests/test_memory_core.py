"""Exact byte counts: stored projections, whole-model activation savings, optimizer state of B."""
import pytest
import torch
from torch import nn

import rso
from conftest import lm_batch, tiny_llama
from rso.memory import measure_step


def test_each_wrapped_layer_saves_batch_seq_rank_elements():
    model = tiny_llama()
    rso.wrap(model, rank=8, share_projections=False)
    params = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    per_layer = {}

    def hook(name):
        def fn(module, args, output):
            function = output.grad_fn.next_functions[0][0]  # the layer's output is a view of the function's
            saved = function.saved_tensors  # z, W₀, B
            per_layer[name] = [t.numel() for t in saved if t.untyped_storage().data_ptr() not in params]
        return fn

    for name, layer in rso.subspace_layers(model):
        layer.register_forward_hook(hook(name))
    model(**lm_batch(batch=3, seq=7))
    assert len(per_layer) == 14
    assert all(v == [3 * 7 * 8] for v in per_layer.values())


def llama_activation_bytes(wrap_kwargs=None, batch=2, seq=8):
    model = tiny_llama()
    if wrap_kwargs is not None:
        rso.wrap(model, **wrap_kwargs)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, measure_step(model, lm_batch(batch=batch, seq=seq), opt)


def test_llama_activations_fall_by_the_shapes_prediction():
    b, s, r = 2, 8, 8
    _, full = llama_activation_bytes(None, b, s)
    cfg = tiny_llama().config
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    # Unwrapped, each block keeps the linear inputs: x for q/k/v (one tensor), attention output for o,
    # x for gate/up (one tensor), act(gate)·up for down. Wrapped, each of those is an r-wide z.
    _, shared = llama_activation_bytes(dict(rank=r, share_projections=True), b, s)
    assert full.activations - shared.activations == 4 * L * b * s * ((d - r) * 3 + (f - r))
    # Without sharing q/k/v and gate/up each store their own z: 3 + 2 projections instead of 2.
    _, unshared = llama_activation_bytes(dict(rank=r, share_projections=False), b, s)
    assert unshared.activations - shared.activations == 4 * L * b * s * r * 3


def test_adamw_state_bytes_of_the_wrapped_model():
    model, report = llama_activation_bytes(dict(rank=8))
    wrapped = sum(layer.out_features * layer.rank for _, layer in rso.subspace_layers(model))
    wrapped_ids = {id(layer.B) for _, layer in rso.subspace_layers(model)}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in wrapped_ids]
    n_params = len(wrapped_ids) + len(others)
    # exp_avg + exp_avg_sq per element, plus AdamW's fp32 scalar step per parameter.
    assert report.optimizer_state == 2 * (wrapped + sum(p.numel() for p in others)) * 4 + 4 * n_params
    assert report.gradients == (wrapped + sum(p.numel() for p in others)) * 4
    full_model, full = llama_activation_bytes(None)
    assert report.optimizer_state < full.optimizer_state and report.gradients < full.gradients
    assert report.parameters == full.parameters + 4 * wrapped  # B is added, W₀ stays


def test_peak_tracker_sees_a_large_temporary():
    model = nn.Sequential(nn.Linear(64, 64))
    x = torch.randn(16, 64)

    def loss_fn(m, batch):
        big = torch.ones(1000, 1000)  # 4 MB temporary, freed right away
        del big
        return m(batch).sum()

    report = measure_step(model, x, None, loss_fn=loss_fn)
    assert report.peak >= 4_000_000
    assert report.activations == 16 * 64 * 4  # x, saved for the weight gradient; sum saves nothing
    print(report.table())


def test_live_tensor_tracker_counts_each_baseline_storage_once_then_what_ops_make():
    from rso.memory import LiveTensorTracker
    a, b = torch.zeros(10), torch.zeros(3, dtype=torch.float64)
    tracker = LiveTensorTracker([a, a[2:], b])            # a view shares a's storage
    assert (tracker.live, tracker.peak) == (40 + 24, 40 + 24)
    with tracker:
        c = a + 1                                         # 40 new bytes
        del c
        d = b * 2                                         # 24 new bytes, after c was freed
    assert tracker.peak == 40 + 24 + 40 and tracker.live == 40 + 24 + 24
    del d


@pytest.mark.parametrize("track_peak", [True, False])
def test_measure_step_lets_the_loss_functions_error_through(track_peak):
    def broken(model, batch):
        raise KeyError("no such input")
    with pytest.raises(KeyError, match="no such input"):
        measure_step(nn.Linear(4, 4), torch.randn(2, 4), None, loss_fn=broken, track_peak=track_peak)


def test_default_loss_is_the_models_loss_or_the_mean_square_of_its_output():
    from rso.memory.measure import _default_loss
    torch.manual_seed(0)
    model, x = nn.Linear(4, 3), torch.randn(2, 4)
    assert torch.equal(_default_loss(model, x), model(x).float().pow(2).mean())
    report = measure_step(model, x)                       # a tensor batch, no loss_fn: the mean square
    assert report.gradients == 4 * (4 * 3 + 3) and report.peak_source == "tracked tensors" and report.peak > 0
    report = measure_step(model, x, track_peak=False)
    assert (report.peak, report.peak_source) == (0, "not tracked")
    with pytest.raises(TypeError, match=r"^rso\.memory\.measure_step: pass loss_fn=\(model, batch\) -> scalar loss; "
                                        r"the model's output tuple has no \.loss$"):
        _default_loss(lambda t: (t, t), x)


def test_tensors_in_walks_containers_and_three_levels_of_objects():
    from types import SimpleNamespace as NS
    from rso.memory.measure import tensors_in
    t = [torch.zeros(1) for _ in range(5)]
    deep = NS(a=NS(b=NS(c=t[3], d=NS(e=t[4]))))           # t[4] is one level too deep
    found = list(tensors_in({"x": [t[0], (t[1],)], "obj": NS(p=t[2]), "deep": deep}))
    assert [id(x) for x in found] == [id(t[0]), id(t[1]), id(t[2]), id(t[3])]
    loop = NS(t=t[0])
    loop.me = loop                                        # a cycle ends at the depth limit
    assert [id(x) for x in tensors_in(loop)] == [id(t[0])] * 3   # the object and two levels below it
    # containers between the objects keep the depth: only objects count as levels
    nested = NS(a={"k": NS(b=[NS(c=t[1], d=NS(e=t[4]))])})
    assert [id(x) for x in tensors_in(nested)] == [id(t[1])]
    nested = NS(a=[NS(b={"k": NS(c=t[1], d=NS(e=t[4]))})])
    assert [id(x) for x in tensors_in(nested)] == [id(t[1])]


def test_measure_step_lets_an_error_in_backward_through():
    class Fails(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            raise ArithmeticError("backward failed")

    model = nn.Linear(4, 4)
    with pytest.raises(ArithmeticError, match="backward failed"):
        measure_step(model, torch.randn(2, 4), None, loss_fn=lambda m, x: Fails.apply(m(x)).sum())


def test_peak_counts_the_optimizer_state_held_before_the_step():
    """State that exists before the step (here 1 MB that step() leaves alone) is part of the peak from the start."""
    class Holding(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})
            for group in self.param_groups:
                for p in group["params"]:
                    self.state[p]["held"] = torch.zeros(2 ** 18)

        def step(self, closure=None):
            return None

    model = nn.Linear(16, 16)
    report = measure_step(model, torch.randn(2, 16), Holding(model.parameters()))
    assert report.optimizer_state == 2 * 2 ** 20
    assert report.gradients > 0 and all(p.grad is None for p in model.parameters())  # zero_grad(set_to_none)
    assert report.peak >= report.parameters + report.optimizer_state


def test_peak_counts_gradients_held_before_the_step():
    """Without an optimizer the gradients stay; they are live from the next step's start, so a large temporary in
    its forward (before backward touches them) peaks on top of them."""
    model = nn.Linear(512, 512, bias=False)
    size = 512 * 512 * 4

    def loss_with_a_temporary(model, x):
        big = torch.ones(4 * 512 * 512)      # 4 MiB, freed before backward
        return (model(x) * big[:512].sum()).square().mean()

    first = measure_step(model, torch.randn(1, 512), loss_fn=loss_with_a_temporary)
    assert first.gradients == size and model.weight.grad is not None
    second = measure_step(model, torch.randn(1, 512), loss_fn=loss_with_a_temporary)
    assert second.peak >= first.parameters + first.gradients + 4 * size


def test_recomputation_counting_restores_torchs_hook_and_tolerates_its_absence(monkeypatch):
    """measure_step wraps torch.utils.checkpoint's _recomputation_hook for the step only; under a torch without
    that class it measures the step and counts nothing as recomputed."""
    import torch.utils.checkpoint as tuc
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64))

    def checkpointed(model, x):
        return tuc.checkpoint(model, x, use_reentrant=False).square().mean()

    original = tuc._recomputation_hook
    report = measure_step(model, torch.randn(8, 64), loss_fn=checkpointed)
    assert report.recomputed > 0 and tuc._recomputation_hook is original
    monkeypatch.delattr(tuc, "_recomputation_hook")  # (torch's own checkpoint needs it: the step runs without)
    report = measure_step(model, torch.randn(8, 64), loss_fn=lambda m, x: m(x).square().mean(), track_peak=False)
    assert report.recomputed == 0 and report.gradients > 0
    assert not hasattr(tuc, "_recomputation_hook")


def test_storage_bytes_skips_meta_and_sparse_tensors_and_buffers_that_view_a_parameter():
    from rso.memory import storage_bytes
    dense = torch.zeros(8)
    assert storage_bytes([dense, dense[2:], torch.zeros(8, device="meta"), torch.eye(3).to_sparse()]) == 32
    assert storage_bytes([torch.zeros(1, dtype=torch.uint8), torch.tensor(True), torch.zeros(0)]) == 2  # 1 byte each
    model = nn.Linear(4, 4, bias=False)
    model.register_buffer("row", model.weight.data[0])      # a buffer sharing the weight's storage
    report = measure_step(model, torch.randn(2, 4), track_peak=False)
    assert (report.parameters, report.buffers) == (64, 0)


def test_format_bytes_picks_the_unit_at_each_power_of_1024():
    from rso.memory.measure import format_bytes
    cases = {0: "0 B", 1023: "1,023 B", 1024: "1.00 KiB", -2048: "-2.00 KiB", 1536 * 1024: "1.50 MiB",
             1024 ** 3 - 1: "1,024.00 MiB", 3 * 1024 ** 3: "3.00 GiB", 1024 ** 4: "1.00 TiB",
             5000 * 1024 ** 4: "5,000.00 TiB"}
    assert {n: format_bytes(n) for n in cases} == cases

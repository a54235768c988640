"""layers/chunked_ce.py: loss and gradients against float64 (bf16 on the CPU, bias, ignored targets, frozen input,
reductions and divisors), what each mode saves, and the column-major g of its CPU GEMM."""
import pytest
import torch

import rso.layers.chunked_ce as chunked_ce
from conftest import OpRecorder
from rso.layers.chunked_ce import chunked_linear_cross_entropy


def float64_reference(h, W, t):
    h, W = h.detach().double(), W.detach().double()
    logits = h @ W.T
    loss = torch.nn.functional.cross_entropy(logits, t)
    d = (logits.softmax(-1) - torch.nn.functional.one_hot(t, W.shape[0]).double()) / t.numel()
    return loss, d @ W, d.T @ h


def fp32_head(seed, tokens, hidden=8, vocab=12):
    """Trainable fp32 hidden, head weight and bias, and targets (seeded)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g, requires_grad=True)
    W = torch.randn(vocab, hidden, generator=g, requires_grad=True)
    b = torch.randn(vocab, generator=g, requires_grad=True)
    return h, W, b, torch.randint(0, vocab, (tokens,), generator=g)


@pytest.mark.parametrize("mode", ["recompute", "fused"])
def test_bf16_loss_and_gradients_match_float64_and_hand_a_column_major_g(mode, monkeypatch):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(40, 24, generator=g).to(torch.bfloat16).requires_grad_(True)
    W = (torch.randn(96, 24, generator=g) / 24 ** 0.5).to(torch.bfloat16).requires_grad_(True)
    t = torch.randint(0, 96, (40,), generator=g)
    seen = []
    real = chunked_ce.gemm_lhs
    monkeypatch.setattr(chunked_ce, "gemm_lhs", lambda x: seen.append(real(x).stride()) or real(x))
    loss = chunked_linear_cross_entropy(h, W, t, chunk_size=16, mode=mode)
    loss.backward()
    assert seen and all(s[0] == 1 for s in seen)  # every chunk's g W is formed from a column-major g
    ref_loss, ref_h, ref_W = float64_reference(h, W, t)
    # Logits rounded to bf16 (relative u, |logit| ≤ ~4 here) move each probability by ≤ ~4u·p; g and the
    # product are rounded once more each: the norm-wise error stays within 4u (measured 0.5–0.9u).
    u = torch.finfo(torch.bfloat16).eps / 2
    assert abs(float(loss.detach()) - float(ref_loss)) <= 4 * u * float(ref_loss)
    for got, want, what in ((h.grad, ref_h, "h"), (W.grad, ref_W, "W")):
        rel = float((got.double() - want).norm() / want.norm()) / u
        assert rel <= 4, f"{what}.grad: norm-wise error {rel:.2f}u"


@pytest.mark.filterwarnings("error")  # e.g. torch resizing a wrongly sliced out= buffer (values may still be right)
@pytest.mark.parametrize("mode", ["recompute", "fused"])
def test_with_bias_ignored_targets_and_several_chunks_equals_float64_autograd(mode):
    # fp32 (logits are reduced in fp32, as Hugging Face's loss upcasts them); hidden width 8 ≤ chunk 16 < 40
    # tokens: the single-chunk test must count tokens, not features
    h, W, b, t = fp32_head(seed=3, tokens=40)
    t[::7] = -100
    leaves = [x.detach().double().requires_grad_(True) for x in (h, W, b)]
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(*leaves), t, ignore_index=-100)
    want = torch.autograd.grad(ref, leaves)
    u = torch.finfo(torch.float32).eps / 2

    def close(got, exp, what):  # norm-wise, a few fp32 roundings per entry
        rel = float((got.double() - exp).norm() / exp.norm())
        assert rel <= 16 * u, f"{what}: relative error {rel / u:.1f}u"

    loss = chunked_linear_cross_entropy(h, W, t, b, chunk_size=16, mode=mode)
    close(loss.detach(), ref.detach(), "loss")
    for got, exp, what in zip(torch.autograd.grad(loss, (h, W, b)), want, "hWb"):
        close(got, exp, what + ".grad")
    # only the weight and bias train (a frozen input): the same W and b gradients
    loss = chunked_linear_cross_entropy(h.detach(), W, t, b, chunk_size=16, mode=mode)
    for got, exp, what in zip(torch.autograd.grad(loss, (W, b)), want[1:], "Wb"):
        close(got, exp, what + ".grad (frozen input)")


@pytest.mark.parametrize("mode", ["recompute", "fused"])
def test_weight_only_gradient_without_bias(mode):
    # a frozen input and no bias: the fused pass must still form the weight's gradient
    g = torch.Generator().manual_seed(4)
    h = torch.randn(30, 8, generator=g, dtype=torch.float64)
    W = torch.randn(12, 8, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 12, (30,), generator=g)
    got, = torch.autograd.grad(chunked_linear_cross_entropy(h, W, t, chunk_size=7, mode=mode), (W,))
    want, = torch.autograd.grad(torch.nn.functional.cross_entropy(h @ W.T, t), (W,))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)  # logits reduced in fp32


def test_what_each_mode_saves_for_backward():
    """recompute: h, W, the int64 targets and one fp32 log-sum-exp per token; fused: the gradients only."""
    g = torch.Generator().manual_seed(5)
    h = torch.randn(20, 8, generator=g, requires_grad=True)
    W = torch.randn(12, 8, generator=g, requires_grad=True)
    t = torch.randint(0, 12, (20,), generator=g)
    for mode, want in (("recompute", [((20, 8), torch.float32), ((12, 8), torch.float32), ((20,), torch.int64),
                                      ((20,), torch.float32)]),
                       ("fused", [((20, 8), torch.float32), ((12, 8), torch.float32)])):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append((tuple(x.shape), x.dtype)) or x,
                                                      lambda x: x):
            chunked_linear_cross_entropy(h, W, t, chunk_size=8, mode=mode)
        assert saved == want, mode


@pytest.mark.parametrize("mode", ["recompute", "fused"])
def test_sum_reduction_a_given_divisor_and_a_single_valid_target(mode):
    g = torch.Generator().manual_seed(6)
    h = torch.randn(10, 8, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(5, 8, generator=g, dtype=torch.float64)
    t = torch.randint(0, 5, (10,), generator=g)
    logits = h @ W.T
    summed = torch.nn.functional.cross_entropy(logits, t, reduction="sum")
    for kw, want in ((dict(reduction="sum"), summed), (dict(reduction="sum", divisor=7), summed / 7),
                     (dict(divisor=7), summed / 7), (dict(divisor=torch.tensor(7)), summed / 7)):
        got = chunked_linear_cross_entropy(h, W, t, chunk_size=4, mode=mode, **kw)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0, msg=str(kw))
        gh, = torch.autograd.grad(got, h)
        wh, = torch.autograd.grad(want, h, retain_graph=True)
        torch.testing.assert_close(gh, wh, rtol=1e-5, atol=1e-8, msg=str(kw))
    one = torch.full_like(t, -100)
    one[3] = t[3]  # a single valid target: the mean divides by 1
    got = chunked_linear_cross_entropy(h, W, one, chunk_size=4, mode=mode)
    torch.testing.assert_close(got.double(), torch.nn.functional.cross_entropy(logits, one), rtol=1e-6, atol=0)


@pytest.mark.parametrize("mode", ["recompute", "fused"])
def test_each_pass_allocates_only_the_gradients_it_returns(mode):
    """Recompute: the forward makes no gradient buffer and a single chunk's backward writes W's gradient in its
    own dtype (no fp32 W-sized buffer). Fused: the forward makes a buffer only for what trains. A frozen hidden
    or bias gets none in either pass."""
    g = torch.Generator().manual_seed(5)
    N, H, V = 6, 16, 48  # distinct sizes: a shape names its tensor
    h = torch.randn(N, H, generator=g).to(torch.bfloat16)
    W = torch.randn(V, H, generator=g).to(torch.bfloat16).requires_grad_(True)
    b = torch.randn(V, generator=g).to(torch.bfloat16)
    t = torch.randint(0, V, (N,), generator=g)
    for h_grad in (True, False):
        x = h.clone().requires_grad_(h_grad)
        with OpRecorder() as fwd:
            loss = chunked_linear_cross_entropy(x, W, t, b, chunk_size=8, mode=mode)  # N ≤ chunk: one chunk
        fused = mode == "fused"
        if fused:  # the gradients are kept in their parameters' dtype between the passes, not in fp32
            assert [x.dtype for x in loss.grad_fn.saved_tensors if x is not None] == [torch.bfloat16] * (1 + h_grad)
        with OpRecorder() as bwd:
            loss.backward()
        assert (((N, H), torch.bfloat16) in fwd.made) == (fused and h_grad)
        assert (((V, H), torch.float32) in fwd.made) == fused and ((V,), torch.float32) not in fwd.made
        assert ((V, H), torch.float32) not in bwd.made and ((V,), torch.float32) not in bwd.made
        assert (((N, H), torch.bfloat16) in bwd.made) == h_grad  # the gradient itself (fused: scaled in backward)
        assert W.grad.dtype == torch.bfloat16 and (x.grad is not None) == h_grad
        W.grad = None


@pytest.mark.parametrize("mode", ["recompute", "fused"])
def test_fp32_buffers_stay_fp32_under_a_float64_default_dtype(mode):
    h, W, b, t = fp32_head(seed=6, tokens=20)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with OpRecorder() as seen:
            loss = chunked_linear_cross_entropy(h, W, t, b, chunk_size=8, mode=mode)
            loss.backward()
    finally:
        torch.set_default_dtype(old)
    assert loss.dtype == torch.float32 and not [m for m in seen.made if m[1] == torch.float64]
    assert all(x.grad.dtype == torch.float32 for x in (h, W, b))


def test_fused_keeps_a_trainable_bias_gradient_in_its_dtype():
    g = torch.Generator().manual_seed(8)
    h = torch.randn(6, 16, generator=g).to(torch.bfloat16).requires_grad_(True)
    W = torch.randn(48, 16, generator=g).to(torch.bfloat16).requires_grad_(True)
    b = torch.randn(48, generator=g).to(torch.bfloat16).requires_grad_(True)
    t = torch.randint(0, 48, (6,), generator=g)
    loss = chunked_linear_cross_entropy(h, W, t, b, chunk_size=4, mode="fused")
    assert [x.dtype for x in loss.grad_fn.saved_tensors if x is not None] == [torch.bfloat16] * 3
    loss.backward()
    assert b.grad.dtype == torch.bfloat16


def test_arguments_defaults_and_their_errors():
    import inspect
    params = inspect.signature(chunked_linear_cross_entropy).parameters
    assert (params["chunk_size"].default, params["mode"].default, params["reduction"].default) == \
        (1024, "recompute", "mean")
    with OpRecorder() as seen:  # the default chunk, seen in the logits' shapes: 1025 tokens are 1024 + 1
        chunked_linear_cross_entropy(torch.zeros(1025, 4), torch.zeros(3, 4), torch.zeros(1025, dtype=torch.long))
    assert ((1024, 3), torch.float32) in seen.made and ((1, 3), torch.float32) in seen.made
    h, W, t = torch.zeros(6, 4), torch.zeros(3, 4), torch.zeros(6, dtype=torch.long)
    assert float(chunked_linear_cross_entropy(h, W, t, chunk_size=1)) == pytest.approx(float(torch.log(torch.tensor(3.))))
    pre = r"^chunked_linear_cross_entropy: "
    for kw, msg in ((dict(mode="fast"), r"mode must be one of \('recompute', 'fused'\), got 'fast'$"),
                    (dict(reduction="none"), r"reduction must be 'mean' or 'sum', got 'none'$"),
                    (dict(chunk_size=0), r"chunk_size must be a positive int, got 0$"),
                    (dict(chunk_size=True), r"chunk_size must be a positive int, got True$"),
                    (dict(chunk_size=2.0), r"chunk_size must be a positive int, got 2\.0$")):
        with pytest.raises(ValueError, match=pre + msg):
            chunked_linear_cross_entropy(h, W, t, **kw)
    with pytest.raises(ValueError, match=pre + r"6 tokens of hidden but 5 targets$"):
        chunked_linear_cross_entropy(h, W, t[:5])
    with pytest.raises(ValueError, match=pre + r"weight \(3, 5\) does not take hidden size 4$"):
        chunked_linear_cross_entropy(h, torch.zeros(3, 5), t)

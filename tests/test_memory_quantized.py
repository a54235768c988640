"""``rso.memory.estimate(..., quantize="int8" | "nf4")``: RSO's frozen W₀ stored as bitsandbytes stores it, checked
against bitsandbytes' own tensors, against ``measure_step`` on a small quantized LLaMA, and the LLaMA-7B goals."""
import dataclasses
import re

import pytest
import torch

from rso.memory import estimate, fit, llama_dims, main, measure_step, quantized_bytes

CFG = dict(hidden_size=64, intermediate_size=112, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
           vocab_size=512)
RANK, BATCH, SEQ = 16, 2, 24
#: the issue's LLaMA-7B recipe: RSO rank 256, 16 × 256 tokens, bf16, checkpointing, 8-bit states, chunked head
RECIPE_7B = dict(rank=256, batch=16, seq=256, dtype="bf16", activation_checkpointing=True, optimizer_bits=8,
                 chunked_ce=True)
SHAPES = [(48, 64), (7, 9), (112, 64), (1, 3), (64, 112)]  # odd sizes: a partial last block, an odd byte count


@pytest.mark.parametrize("out_f,in_f", SHAPES)
def test_nf4_bytes_are_bitsandbytes_quantize_4bit(out_f, in_f):
    """Packed uint8 codes (two a byte) and one fp32 absmax per block of 64, as quantize_4bit stores them."""
    F = pytest.importorskip("bitsandbytes.functional")
    W = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0))
    packed, state = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert (packed.dtype, state.absmax.dtype) == (torch.uint8, torch.float32)
    assert quantized_bytes(out_f, in_f, "nf4") == packed.nbytes + state.absmax.nbytes


@pytest.mark.parametrize("out_f,in_f", SHAPES)
def test_int8_bytes_are_row_absmax_codes(out_f, in_f):
    """int8 codes and one fp32 absmax per output row: bitsandbytes' int8_vectorwise_quant (LLM.int8's CB, SCB), and
    the same by hand (q = round(127·w / max|row|))."""
    F = pytest.importorskip("bitsandbytes.functional")
    W = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0))
    codes, scb, _ = F.int8_vectorwise_quant(W.half())
    assert (codes.dtype, scb.dtype, tuple(scb.shape)) == (torch.int8, torch.float32, (out_f,))
    by_hand = torch.round(127 * W / W.abs().amax(1, keepdim=True)).to(torch.int8), W.abs().amax(1)
    assert quantized_bytes(out_f, in_f, "int8") == codes.nbytes + scb.nbytes == sum(t.nbytes for t in by_hand)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_the_quantized_layers_storage_is_the_formula(kind):
    quantized = pytest.importorskip("rso.layers.quantized", reason="rso.layers.quantized is not there yet")
    for out_f, in_f in SHAPES:
        W = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0))
        assert quantized.quantize(W, kind).nbytes() == quantized_bytes(out_f, in_f, kind)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_quantize_changes_only_w0_and_adds_one_layers_dequantized_copy(kind, dtype):
    """Against the unquantized estimate: parameters lose W₀ in dtype and gain its codes, buffers gain its scales;
    gradients, states and activations are the same; total adds the largest layer's W₀ in dtype (gate/up: 112 × 64;
    int8 in bf16 through fp32: 4 + 2 bytes an element)."""
    kw = dict(rank=RANK, batch=BATCH, seq=SEQ, dtype=dtype)
    plain, quant = estimate(CFG, "rso", **kw), estimate(CFG, "rso", quantize=kind, **kw)
    wb, lin, L = (4 if dtype == "fp32" else 2), llama_dims(CFG).linears, CFG["num_hidden_layers"]
    stored = L * sum(quantized_bytes(o, n, kind) for _, o, n, _ in lin)
    assert quant["quantized_weights"] == stored
    assert plain["weights"] - quant["weights"] == L * wb * sum(o * n for _, o, n, _ in lin) - stored > 0
    assert quant["dequantize_transient"] == (wb + (4 if (kind, dtype) == ("int8", "bf16") else 0)) * 112 * 64
    for key in ("gradients", "optimizer", "activations", "n_parameters", "n_trainable"):
        assert quant[key] == plain[key], key
    assert quant["total"] == sum(quant[k] for k in ("weights", "gradients", "optimizer", "activations")) + \
        quant["dequantize_transient"]
    assert (plain["quantize"], plain["quantized_weights"], plain["dequantize_transient"]) == (None, 0, 0)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_transient_is_what_dequantizing_the_largest_layer_holds(kind, dtype):
    """The peak of live tensors while the quantized layers' dequantization runs on the largest W₀ (112 × 64) is the
    estimate's transient (plus at most a code table and a constant: 128 bytes)."""
    quantized = pytest.importorskip("rso.layers.quantized", reason="rso.layers.quantized is not there yet")
    from rso.memory import LiveTensorTracker
    q = quantized.quantize(torch.randn(112, 64, generator=torch.Generator().manual_seed(0)), kind)
    with LiveTensorTracker() as tracker:
        quantized.dequantize(q, dtype)
    est = estimate(CFG, "rso", rank=RANK, dtype="fp32" if dtype == torch.float32 else "bf16", quantize=kind)
    assert 0 <= tracker.peak - est["dequantize_transient"] <= 128


def quantized_llama(kind, dtype, share):
    """A small LLaMA whose linear layers are RSO layers with W₀ quantized: ``rso.wrap(quantize=)`` when it takes
    it (``share``: its projection groups), else each nn.Linear replaced by ``SubspaceLinear.from_module(quantize=)``
    (each layer its own P: ``share_projections=False``)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    import rso
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CFG, attn_implementation="sdpa")).to(dtype)
    if share:
        if "quantize" not in {f.name for f in dataclasses.fields(rso.RSOConfig)}:
            pytest.skip("rso.wrap does not take quantize= yet")
        return rso.wrap(model, rank=RANK, quantize=kind)
    try:
        from rso.layers import QuantizedSubspaceLinear, SubspaceLinear  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"the quantized SubspaceLinear cannot be imported ({exc})")
    for module in list(model.model.layers.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(module, name, SubspaceLinear.from_module(child, RANK, quantize=kind))
    return model


@pytest.mark.parametrize("share", [False, True], ids=["layers", "wrap"])
@pytest.mark.parametrize("kind", ["int8", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_quantized_estimate_is_exact_against_measure_step(dtype, kind, share):
    """Codes as parameters, scales as buffers, B / P / counters, gradients, states and activations (the autograd
    function saves the codes, never a dequantized W₀) equal what one step of the quantized model holds."""
    model = quantized_llama(kind, dtype, share)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(0, CFG["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    r = measure_step(model, {"input_ids": ids, "labels": ids}, opt, track_peak=False)
    est = estimate(CFG, "rso", rank=RANK, batch=BATCH, seq=SEQ, dtype="fp32" if dtype == torch.float32 else "bf16",
                   quantize=kind, share_projections=share)
    assert (est["parameters"], est["buffers"], est["gradients"], est["optimizer"], est["activations"]) == \
        (r.parameters, r.buffers, r.gradients, r.optimizer_state, r.activations)


def test_llama_7b_goals():
    """The issue's recipe: 17.55 GiB with bf16 W₀ (12.06 GiB of it); int8 W₀ ≤ 12 GiB, NF4 ≤ 9 GiB."""
    gib = 2 ** 30
    plain = estimate("llama-7b", "rso", **RECIPE_7B)
    w0 = 32 * 2 * sum(o * n for _, o, n, _ in llama_dims("llama-7b").linears)
    assert (round(plain["total"] / gib, 2), round(w0 / gib, 2)) == (17.55, 12.06)
    int8, nf4 = (estimate("llama-7b", "rso", quantize=q, **RECIPE_7B) for q in ("int8", "nf4"))
    assert int8["total"] <= 12 * gib and nf4["total"] <= 9 * gib
    assert plain["total"] - int8["total"] == w0 - int8["quantized_weights"] - int8["dequantize_transient"]
    assert nf4["dequantize_transient"] == 2 * 11008 * 4096  # gate/up/down: the largest layer
    assert int8["dequantize_transient"] == (4 + 2) * 11008 * 4096  # through fp32


def test_fit_16gb_and_12gb_tables_have_the_quantized_recipes(capsys):
    rows = {r["method"]: r for r in fit("llama-7b", "16GB", rank=256, seqs=(256,), batch=16)}
    assert not rows["rso"]["fits"] and rows["rso-int8"]["fits"] and rows["rso-nf4"]["fits"]
    assert rows["rso-int8"]["estimate"]["quantize"] == "int8"
    rows = {r["method"]: r for r in fit("llama-7b", "12GB", rank=256, seqs=(256,))}
    assert rows["rso"]["batch"] == rows["rso-int8"]["batch"] == 0 < 16 <= rows["rso-nf4"]["batch"]
    assert rows["rso-nf4"]["recipe"] == {"activation_checkpointing": True, "optimizer_bits": 8, "chunked_ce": True,
                                         "per_layer_updates": False}
    for size in ("16GB", "12GB"):
        assert main(["--model", "llama-7b", "--fit", size, "--rank", "256", "--seq", "256"]) == 0
        out = capsys.readouterr().out
        assert re.search(r"^\| rso-int8 \| 256 \| ", out, re.M) and re.search(r"^\| rso-nf4 \| 256 \| ", out, re.M)


def test_cli_estimate_with_quantize(capsys):
    assert main(["--model", "llama-7b", "--method", "rso", "--rank", "256", "--batch", "16", "--seq", "256",
                 "--activation-checkpointing", "--optimizer-bits", "8", "--chunked-ce", "--quantize", "nf4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("llama-7b · rso · rank 256 · batch 16 × seq 256 · bf16 · chunked CE · checkpointing · "
                          "8-bit states · nf4 W₀")
    assert "(    8.96 GiB)" in out and "of W₀ stored nf4; total includes 0.09 GB for one layer's W₀ dequantized" in out


@pytest.mark.parametrize("argv,message", [
    (["--method", "adamw", "--quantize", "nf4"], "rso.memory.estimate: quantize='nf4' stores RSO's frozen W₀ "
                                                 "quantized, it goes with method='rso', got method='adamw'; leave "
                                                 "quantize=None for adamw"),
    (["--fit", "16GB", "--quantize", "int8"], "--fit chooses the recipe itself; leave out --quantize"),
])
def test_cli_refusals(argv, message, capsys):
    assert main(["--model", "llama-tiny", *argv]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_cli_refuses_an_unknown_kind(capsys):
    with pytest.raises(SystemExit):
        main(["--model", "llama-tiny", "--quantize", "int4"])
    err = capsys.readouterr().err
    assert "argument --quantize: invalid choice: 'int4'" in err and re.search(r"int8'?, '?nf4", err)


def test_quantized_bytes_refuses_an_unknown_kind():
    with pytest.raises(ValueError, match=r"^rso\.memory\.quantized_bytes: quantize must be 'int8' or 'nf4', got "
                                         r"'fp4'$"):
        quantized_bytes(4, 4, "fp4")

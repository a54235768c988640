"""``rso.train.bench.memory_frontier``'s quantized cases (``+int8`` / ``+nf4``): the lean build (no float W₀ per
layer), the worker's step against ``rso.memory.estimate(..., quantize=)``, the table, and the refusals."""
import pytest
import torch

from rso.train.bench.memory_frontier import (_build_lean, _held, _measured_terms, estimate_case, format_table, main,
                                             parse_case, run_case)

MODEL = dict(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
             vocab_size=512, tie_word_embeddings=False, max_position_embeddings=2048)
TERMS = ("gradients", "optimizer", "activations_kept", "activations_recompute")


def _spec(case):
    return {"case": case, "model": MODEL, "rank": 32, "batch": 2, "seq": 16, "threads": 1}


@pytest.fixture(scope="module")
def unquantized():
    """The bf16-W₀ case: its measured weights less the estimate's (RoPE's fp32 buffers, which the estimator
    counts in bf16) is the one difference the quantized cases may show too."""
    spec = _spec("rso+ckpt+ce")
    rec = run_case(spec)
    return _measured_terms(rec["measured"])["weights"] - estimate_case(spec)["weights"]


@pytest.mark.parametrize("case", ["rso+ckpt+ce+int8", "rso+ckpt+ce+8bit+nf4"])
def test_quantized_case_is_the_estimate_to_the_byte(case, unquantized):
    pytest.importorskip("bitsandbytes")
    spec = _spec(case)
    rec = run_case(spec)
    assert "error" not in rec, rec.get("error")
    m, e = _measured_terms(rec["measured"]), estimate_case(spec)
    assert e["quantize"] == parse_case(case)["quantize"] and e["dequantize_transient"] > 0
    assert {k: m[k] for k in TERMS} == {k: e[k] for k in TERMS}
    assert m["weights"] - e["weights"] == m["total"] - _held(e) == unquantized
    assert rec["rss_after_setup"] >= rec["rss_after_build"] > 0


def test_table_compares_the_held_terms_and_names_the_transient():
    e = {"weights": 600, "gradients": 100, "optimizer": 200, "activations": 100, "activations_kept": 60,
         "activations_recompute": 40, "total": 1050, "quantize": "nf4", "quantized_weights": 300,
         "dequantize_transient": 50}
    measured = {"parameters": 590, "buffers": 10, "gradients": 100, "optimizer_state": 200, "activations": 60,
                "recomputed": 40, "peak": 1040}
    rec = {"case": "rso+nf4", "batch": 1, "seq": 8, "estimate": e, "measured": measured, "rss_peak": 2 ** 30,
           "step_s": 1.0}
    text = format_table([rec], {"model": "tiny", "batch": 1, "seq": 8, "rank": 4, "threads": 1, "host": "here"})
    assert "| 1.0000 |" in text and "total 1.0000 (measured − estimated: +0 bytes)" in text
    assert "W₀ stored nf4, the estimate's total 0.000 GiB adds one layer's W₀ dequantized (0.0 MiB)" in text


def test_lean_build_is_the_model_without_a_float_w0_per_layer():
    """Same names, shapes, dtypes and buffers as ``from_config(dtype=bf16)``; nothing on meta; the decoder's
    linear weights of one shape share one storage (here q/o, k/v, gate/up, down: four)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(**MODEL, attn_implementation="sdpa")
    lean = _build_lean(config, "cpu")
    plain = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    shapes = lambda m: {n: (t.shape, t.dtype) for n, t in [*m.named_parameters(), *m.named_buffers()]}  # noqa: E731
    assert shapes(lean) == shapes(plain)
    assert not any(t.is_meta for t in [*lean.parameters(), *lean.buffers()])
    for (name, b), (_, b0) in zip(lean.named_buffers(), plain.named_buffers()):
        assert torch.equal(b, b0), name
    block = [p for n, p in lean.named_parameters() if n.endswith("proj.weight")]
    assert len(block) == 7 * MODEL["num_hidden_layers"] and len({p.data_ptr() for p in block}) == 4
    assert all(p.requires_grad for p in block) and len({id(p) for p in block}) == len(block)
    assert lean.model.norm.weight.eq(1).all() and lean.model.embed_tokens.weight.float().std() > 0


@pytest.mark.parametrize("case,message", [
    ("adamw+nf4", "case 'adamw+nf4': +int8 / +nf4 store RSO's W₀ quantized: one of them, with method rso"),
    ("rso+int8+nf4", "case 'rso+int8+nf4': +int8 / +nf4 store RSO's W₀ quantized: one of them, with method rso"),
    ("rso+int4", "case 'rso+int4': write <method>[+ckpt][+ce][+8bit][+int8|+nf4]"),
])
def test_refusals(case, message, capsys):
    with pytest.raises(ValueError, match=f"^{message}".replace("[", r"\[").replace("|", r"\|").replace("+", r"\+")):
        parse_case(case)
    assert main(["--config", "llama-tiny", "--cases", case]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1


def test_parse_case_reads_the_storage():
    assert parse_case("rso+ckpt+ce+8bit+nf4") == {"case": "rso+ckpt+ce+8bit+nf4", "method": "rso",
                                                  "checkpointing": True, "chunked_ce": True, "eight_bit": True,
                                                  "quantize": "nf4"}
    assert parse_case("rso+ckpt")["quantize"] is None

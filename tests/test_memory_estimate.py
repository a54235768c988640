"""``rso.memory.estimate`` against ``rso.memory.measure_step`` on models small enough to run here,
the textbook LLaMA-7B numbers, and the ``python -m rso.memory`` command line."""
import subprocess
import sys

import pytest
import torch

from conftest import measure_method
from rso.memory import estimate
from train.benchmark_methods import available

CFG = dict(hidden_size=64, intermediate_size=112, num_attention_heads=4, num_key_value_heads=2,
           num_hidden_layers=2, vocab_size=512)
RANK, BATCH, SEQ = 16, 2, 24

#: benchmark method -> (estimator method, estimator options)
AS_ESTIMATED = {
    "adamw": ("adamw", {}),
    "frozen": ("frozen", {}),
    "rso-stiefel": ("rso", {}),
    "galore-torch": ("galore", {"galore_projector": "peer"}),
    "galore": ("galore", {"galore_projector": "rank"}),
    "lora": ("lora", {"lora_train_other": True}),
    "rso-stiefel+ce": ("rso", {"chunked_ce": "recompute"}),
}


def measured(method, dtype, attn):
    r, _ = measure_method(method, CFG, RANK, BATCH, SEQ, attn, dtype, seed=1)
    return {"weights": r.parameters + r.buffers, "gradients": r.gradients,
            "optimizer": r.optimizer_state,
            "activations": r.activations}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", list(AS_ESTIMATED))
def test_estimate_agrees_with_measure_step(method, dtype, attn):
    reason = available(method)
    if reason:
        pytest.skip(reason)
    meas = measured(method, dtype, attn)
    est_method, options = AS_ESTIMATED[method]
    step_tensors = method not in ("galore-torch", "galore")  # torch.optim.AdamW's 4-byte step tensors
    est = estimate(CFG, method=est_method, rank=RANK, batch=BATCH, seq=SEQ,
                   dtype="fp32" if dtype == torch.float32 else "bf16", attn=attn, step_tensors=step_tensors,
                   **options)
    for key, value in meas.items():
        assert est[key] == pytest.approx(value, rel=0.05), (key, value, est[key])
    assert est["total"] == pytest.approx(sum(meas.values()), rel=0.05)
    # In fact the model is exact here: every byte is accounted for.
    assert {k: est[k] for k in meas} == meas


def test_textbook_llama_7b_bf16_adam():
    est = estimate("llama-7b", method="adamw", batch=1, seq=2048, dtype="bf16")
    # The textbook rounds 6.74e9 parameters to 7e9: 14 GB weights and gradients, 28 GB of Adam states.
    assert est["weights"] == pytest.approx(14e9, rel=0.05)
    assert est["gradients"] == pytest.approx(14e9, rel=0.05)
    assert est["optimizer"] == pytest.approx(28e9, rel=0.05)
    assert est["n_parameters"] == 6_738_415_616  # LLaMA-7B, untied 32k head
    assert est["total"] == est["weights"] + est["gradients"] + est["optimizer"] + est["activations"]


def test_methods_order_and_options():
    kw = dict(rank=1024, batch=16, seq=2048, dtype="bf16")
    adamw, galore, rso_, lora = (estimate("llama-7b", method=m, **kw) for m in ("adamw", "galore", "rso", "lora"))
    assert rso_["optimizer"] < galore["optimizer"] < adamw["optimizer"]
    assert rso_["gradients"] < galore["gradients"] == adamw["gradients"]
    assert rso_["activations"] < galore["activations"] == adamw["activations"]
    assert lora["gradients"] < adamw["gradients"]
    master = estimate("llama-7b", method="adamw", master_weights=True, fp32_states=True, **kw)
    assert master["weights"] - adamw["weights"] == 4 * adamw["n_trainable"]
    assert master["optimizer"] == pytest.approx(2 * adamw["optimizer"], rel=1e-6)
    ce = estimate("llama-7b", method="rso", chunked_ce=True, **kw)
    assert rso_["activations"] - ce["activations"] == 16 * 2048 * (4 * 32000 - 4) + 4
    with pytest.raises(ValueError, match="method"):
        estimate("llama-7b", method="sgd")
    with pytest.raises(ValueError, match="unknown config"):
        estimate("llama-3000b")
    with pytest.raises(ValueError, match="LLaMA-family"):
        estimate({"n_embd": 64})
    with pytest.raises(ValueError, match="batch"):
        estimate("llama-60m", batch=0)


def test_hf_config_object_and_preset_aliases():
    from transformers import LlamaConfig
    cfg = LlamaConfig(**CFG)
    assert estimate(cfg, rank=8, batch=1, seq=16) == estimate(dict(CFG), rank=8, batch=1, seq=16)
    assert estimate("60m", seq=256)["total"] == estimate("llama-60m", seq=256)["total"]


def test_cli_prints_breakdown_and_fit(capsys):
    from rso.memory import main
    assert main(["--model", "llama-7b", "--method", "rso", "--rank", "1024", "--batch", "16", "--seq", "2048",
                 "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    for word in ("weights", "gradients", "optimizer", "activations", "total", "24 GB", "80 GB"):
        assert word in out
    assert "does NOT fit on 80 GB GPU" in out  # 16 × 2048 tokens of activations do not fit
    assert main(["--model", "llama-7b", "--method", "adamw", "--batch", "1", "--seq", "2048"]) == 0
    out = capsys.readouterr().out
    assert "fits on 80 GB GPU" in out and "does NOT fit on 24 GB GPU" in out
    assert main(["--model", "nope"]) == 2
    assert "unknown config" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "rso.memory", "--model", "llama-60m", "--method", "all",
                          "--batch", "8", "--seq", "256", "--dtype", "fp32", "--json"],
                         capture_output=True, text=True, check=True).stdout
    import json
    rows = json.loads(out)
    assert [r["method"] for r in rows] == ["adamw", "galore", "rso", "lora", "frozen"]
    assert all(r["total"] == r["weights"] + r["gradients"] + r["optimizer"] + r["activations"] for r in rows)

"""``rso.memory.estimate`` on mixture-of-experts configs (transformers 5's Mixtral, Qwen2-MoE and Qwen3-MoE with
the eager experts loop) against ``rso.memory.measure_step``, to the byte; the real shapes as presets; the CLI and
the planner on them; and the refusals."""
import json
import re
import warnings

import pytest
import torch

from rso.memory import PRESETS, estimate, fit, main, measure_step

BATCH, SEQ, RANK = 2, 24, 8
#: tiny configs of each family: 4 experts, top-2; Qwen3 with q/k norms and renormalized top-k, Qwen2 with a shared
#: expert and its gate (and q/k/v biases)
FAMILIES = {
    "mixtral": dict(model_type="mixtral", hidden_size=64, intermediate_size=48, num_attention_heads=4,
                    num_key_value_heads=2, num_hidden_layers=2, vocab_size=512, num_local_experts=4,
                    num_experts_per_tok=2),
    "qwen2_moe": dict(model_type="qwen2_moe", hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
                      shared_expert_intermediate_size=80, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=512, num_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
                      vocab_size=512, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True),
}


def classes(model_type):
    import transformers as tf
    return {"mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM),
            "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM),
            "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM)}[model_type]


def hf_config(cfg, attn="sdpa"):
    config_class, _ = classes(cfg["model_type"])
    return config_class(**{k: v for k, v in cfg.items() if k != "model_type"}, attn_implementation=attn,
                        experts_implementation="eager")


def build(cfg, dtype=torch.float32, attn="sdpa"):
    _, model_class = classes(cfg["model_type"])
    torch.manual_seed(0)
    return model_class(hf_config(cfg, attn)).to(dtype)


def set_up(method, model, rank=RANK):
    """The optimizer of ``method`` on ``model`` (changed in place): adamw; frozen (the 2-D block linear weights and
    the experts frozen); galore (galore-torch on the 2-D block linear weights, the rest plain AdamW: the 3-D experts
    cannot be projected); rso (``rso.wrap`` with its defaults: experts wrapped by SubspaceExperts)."""
    from rso.train.bench.recipes import block_linear_weights, import_peer
    mats, others = block_linear_weights(model)
    if method == "frozen":
        for p in mats + [p for n, p in model.named_parameters() if ".experts." in n]:
            p.requires_grad_(False)
    elif method == "galore":
        cls = import_peer("galore_torch", "adamw", "AdamW")
        return cls([{"params": others}, {"params": mats, "rank": rank, "update_proj_gap": 200, "scale": 0.25,
                                         "proj_type": "std"}], no_deprecation_warning=True)
    elif method == "rso":
        import rso
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rso.wrap(model, rank=rank)
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])


def skip_unavailable(method):
    if method == "rso":
        try:
            from rso.layers import SubspaceExperts  # noqa: F401
        except ImportError as exc:
            pytest.skip(f"rso.layers.SubspaceExperts cannot be imported ({exc}): RSO does not wrap experts yet")
    if method == "galore":
        from rso.train.bench.recipes import available
        reason = available("galore-torch")
        if reason:
            pytest.skip(reason)


def measured(cfg, method, dtype=torch.float32, attn="sdpa", rank=RANK, checkpointing=False, eight_bit=False):
    """One training step of ``method`` on the tiny ``cfg`` model, measured (a first step creates 8-bit states)."""
    skip_unavailable(method)
    model = build(cfg, dtype, attn)
    optimizer = set_up(method, model, rank)
    if eight_bit:
        bnb = pytest.importorskip("bitsandbytes")
        optimizer = bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad])
    if checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, cfg["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    if eight_bit:
        measure_step(model, batch, optimizer, track_peak=False)
    return measure_step(model, batch, optimizer, track_peak=False), model


def terms(report):
    return {"parameters": report.parameters, "buffers": report.buffers, "gradients": report.gradients,
            "optimizer": report.optimizer_state, "kept": report.activations, "recompute": report.recomputed}


def estimated(cfg, method, dtype, **options):
    est = estimate(cfg, method, rank=RANK if "rank" not in options else options.pop("rank"), batch=BATCH, seq=SEQ,
                   dtype="fp32" if dtype == torch.float32 else "bf16",
                   step_tensors=False if method == "galore" else None, **options)
    return {"parameters": est["parameters"], "buffers": est["buffers"], "gradients": est["gradients"],
            "optimizer": est["optimizer"], "kept": est["activations_kept"], "recompute": est["activations_recompute"]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", ["adamw", "frozen", "galore", "rso"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_moe_estimate_is_exact(family, method, dtype):
    """Weights (experts, router, RSO's B / P / counters of each stacked weight), gradients, optimizer states and
    the activations of the eager experts loop (per routed pair; RSO: z of width r) equal what the step holds."""
    cfg = FAMILIES[family]
    report, _ = measured(cfg, method, dtype)
    assert estimated(cfg, method, dtype) == terms(report)
    assert report.activations > 0 and report.recomputed == 0


@pytest.mark.parametrize("variant", ["eager", "checkpointing", "8-bit"])
@pytest.mark.parametrize("method", ["adamw", "rso"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_moe_with_eager_attention_checkpointing_and_8bit_states(family, method, variant):
    cfg = FAMILIES[family]
    report, _ = measured(cfg, method, torch.bfloat16, attn="eager" if variant == "eager" else "sdpa",
                         checkpointing=variant == "checkpointing", eight_bit=variant == "8-bit")
    est = estimated(cfg, method, torch.bfloat16, attn="eager" if variant == "eager" else "sdpa",
                    activation_checkpointing=variant == "checkpointing",
                    optimizer_bits=8 if variant == "8-bit" else None)
    assert est == terms(report)
    assert (report.recomputed > 0) == (variant == "checkpointing")


@pytest.mark.parametrize("method", ["adamw", "rso"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_moe_parameter_counts_are_the_models(family, method):
    cfg = FAMILIES[family]
    _, model = measured(cfg, method)
    est = estimate(cfg, method, rank=RANK, batch=BATCH, seq=SEQ, dtype="fp32")
    params = list(model.parameters())
    assert est["n_parameters"] == sum(p.numel() for p in params)
    assert est["n_trainable"] == sum(p.numel() for p in params if p.requires_grad)


@pytest.mark.parametrize("rank", [1, 0.02, 2])
def test_the_shared_expert_gate_is_wrapped_only_at_rank_one(rank):
    """rso.wrap wraps Qwen2-MoE's 1-output shared_expert_gate when the rank is 1 (0.02 of 64 inputs rounds to 1)
    and leaves it to train in full above; the estimate follows it both ways."""
    cfg = FAMILIES["qwen2_moe"]
    report, model = measured(cfg, "rso", rank=rank)
    gate = model.model.layers[0].mlp.shared_expert_gate
    assert hasattr(gate, "B") == (rank != 2)
    assert estimated(cfg, "rso", torch.float32, rank=rank) == terms(report)


def test_qwen3_without_renormalized_top_k():
    cfg = dict(FAMILIES["qwen3_moe"], norm_topk_prob=False)
    report, _ = measured(cfg, "adamw", torch.bfloat16)
    assert estimated(cfg, "adamw", torch.bfloat16) == terms(report)
    per_token = estimate(FAMILIES["qwen3_moe"], "adamw", batch=1, seq=SEQ)["activations"] - \
        estimate(cfg, "adamw", batch=1, seq=SEQ)["activations"]
    assert per_token == SEQ * 2 * (4 * 2 + 4)  # two layers: the top-2 values and their sum, fp32


@pytest.mark.parametrize("name,n_parameters", [("mixtral-8x7b", 46_702_792_704), ("qwen3-30b-a3b", 30_532_122_624),
                                               ("moe-tiny", None)])
def test_presets_have_the_real_shapes(name, n_parameters):
    """Each preset's parameter count is the HF model's built from it (on the meta device), and the two real ones
    Mixtral-8x7B's 46.7B and Qwen3-30B-A3B's 30.5B."""
    cfg = PRESETS[name]
    _, model_class = classes(cfg["model_type"])
    with torch.device("meta"):
        model = model_class(hf_config(cfg))
    est = estimate(name, "adamw", batch=1, seq=16)
    assert est["n_parameters"] == sum(p.numel() for p in model.parameters())
    if n_parameters is not None:
        assert est["n_parameters"] == n_parameters


def test_presets_agree_with_the_config_classes_defaults():
    """Mixtral-8x7B is MixtralConfig's default; Qwen3-30B-A3B is Qwen3MoeConfig's but for what its config.json
    sets (48 layers, head_dim 128, renormalized top-k)."""
    from transformers import MixtralConfig, Qwen3MoeConfig
    mixtral, qwen = MixtralConfig(), Qwen3MoeConfig()
    assert all(getattr(mixtral, k) == v for k, v in PRESETS["mixtral-8x7b"].items())
    differ = {k for k, v in PRESETS["qwen3-30b-a3b"].items() if getattr(qwen, k, None) != v}
    assert differ == {"num_hidden_layers", "head_dim", "norm_topk_prob"}


def test_an_hf_config_object_reads_as_its_dict():
    for cfg in FAMILIES.values():
        assert estimate(hf_config(cfg), "rso", rank=RANK, seq=16) == estimate(cfg, "rso", rank=RANK, seq=16)


def test_the_preset_estimates_in_step():
    """RSO's weights are the model's plus B (E·out·r per expert weight), P (r·in) and the counters; at rank 128 it
    stores far less optimizer state than AdamW and than GaLore (whose 3-D experts keep full moments)."""
    for name in ("mixtral-8x7b", "qwen3-30b-a3b"):
        kw = dict(rank=128, batch=1, seq=2048)
        adamw, galore, rso_ = (estimate(name, m, **kw) for m in ("adamw", "galore", "rso"))
        assert rso_["optimizer"] < galore["optimizer"] < adamw["optimizer"]
        assert galore["optimizer"] > 0.9 * adamw["optimizer"]  # the experts are most of the model
        assert rso_["activations"] < adamw["activations"]
        assert rso_["total"] < adamw["total"] / 2


@pytest.mark.parametrize("cfg,options,message", [
    (FAMILIES["mixtral"], dict(method="lora"), "method='lora' is not modelled on a mixture of experts"),
    (FAMILIES["qwen3_moe"], dict(method="rso", quantize="nf4"), "quantize='nf4' quantizes 2-D linear layers"),
    (dict(FAMILIES["qwen3_moe"], model_type="olmoe"), {}, "mixture-of-experts configs of model_type mixtral, "
                                                          "qwen2_moe, qwen3_moe are modelled, this one has model_type "
                                                          "'olmoe'"),
    ({k: v for k, v in FAMILIES["qwen3_moe"].items() if k != "model_type"}, {}, "model_type None"),
    (dict(FAMILIES["mixtral"], output_router_logits=True), {}, "output_router_logits=True is not modelled"),
    (dict(FAMILIES["mixtral"], router_jitter_noise=0.1), {}, "router_jitter_noise=0.1 is not modelled"),
    (dict(FAMILIES["qwen3_moe"], mlp_only_layers=[0]), {}, "mlp_only_layers=[0] is not modelled"),
    (dict(FAMILIES["qwen2_moe"], decoder_sparse_step=2), {}, "decoder_sparse_step=2 is not modelled"),
    (dict(FAMILIES["qwen3_moe"], num_key_value_heads=4), dict(method="rso", rank=49),
     "rank 49 gives experts.down_proj (48 → 64) rank 49, more than its smaller dimension 48; the widest rank this "
     "config allows is 48"),
    (FAMILIES["qwen3_moe"], dict(method="rso", rank=0.01), "rank 0.01 rounds to 0 channels of a layer with "
                                                           "in_features=48 (rso.wrap refuses it); allowed: a fraction "
                                                           "≥ 0.0104 here, or an int rank"),
])
def test_refusals_are_one_line_and_name_the_way_out(cfg, options, message):
    with pytest.raises(ValueError, match=f"^rso\\.memory\\.estimate: .*{re.escape(message)}") as info:
        estimate(cfg, **{"method": "adamw", "rank": RANK, "seq": 16, **options})
    assert "\n" not in str(info.value)


def test_a_dense_qwen3_counts_its_qk_norms():
    """A dense Qwen3 (model_type qwen3) has the q/k norms too: exact against the model."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from rso.memory import measure_step as step
    cfg = dict(model_type="qwen3", hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, num_hidden_layers=2, vocab_size=512)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**{k: v for k, v in cfg.items() if k != "model_type"},
                                        attn_implementation="sdpa")).to(torch.bfloat16)
    ids = torch.randint(0, 512, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    report = step(model, {"input_ids": ids, "labels": ids}, torch.optim.AdamW(model.parameters()), track_peak=False)
    assert estimated(cfg, "adamw", torch.bfloat16) == terms(report)
    assert estimated(cfg, "adamw", torch.bfloat16) != estimated(dict(cfg, model_type="llama"), "adamw", torch.bfloat16)


# ----------------------------------------------------------------------------- the command line and the planner
def test_cli_fit_prints_the_table_for_the_moe_presets(capsys):
    assert main(["--model", "mixtral-8x7b", "--fit", "24GB"]) == 0
    out = capsys.readouterr().out
    rows = [line.split(" | ")[0].lstrip("| ") for line in out.splitlines() if line.startswith("| ")]
    assert rows[1:] == ["adamw"] * 2 + ["galore"] * 2 + ["galore-8bit-per-layer"] * 2 + ["rso"] * 2
    assert "mixtral-8x7b · bf16 · fits in 24 GiB" in out and "does not fit at seq 256" in out  # 87 GiB of bf16 weights
    assert main(["--model", "qwen3-30b-a3b", "--fit", "80GB", "--rank", "64", "--seq", "256", "--json"]) == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"adamw", "galore", "galore-8bit-per-layer", "rso"}
    assert rows["adamw"]["batch"] == 0 and rows["rso"]["batch"] > 16 and rows["rso"]["rank"] == 64


def test_cli_estimates_a_moe_preset_and_all_its_methods(capsys):
    assert main(["--model", "qwen3-30b-a3b", "--method", "rso", "--rank", "64", "--batch", "2", "--seq", "256"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("qwen3-30b-a3b · rso · rank 64 · batch 2 × seq 256 · bf16")
    assert "does NOT fit on 24 GB GPU" in out and "\nfits on 80 GB GPU" in out
    assert "on a 24 GB GPU: 0 (the model state alone does not fit)" in out
    # at seq 8192 the 71 GiB model state fits in 78 GiB, batch 1's routed activations do not
    assert main(["--model", "qwen3-30b-a3b", "--method", "rso", "--rank", "64", "--seq", "8192"]) == 0
    assert "on a 80 GB GPU: 0 (batch 1's activations do not fit beside the model state at seq 8192)" in \
        capsys.readouterr().out
    assert main(["--model", "moe-tiny", "--method", "all", "--seq", "64", "--json"]) == 0
    assert [r["method"] for r in json.loads(capsys.readouterr().out)] == ["adamw", "galore", "rso", "frozen"]


@pytest.mark.parametrize("argv,message", [
    (["--model", "moe-tiny", "--fit", "24GB", "--method", "lora,rso-nf4"],
     "rso.memory.fit: not planned for a mixture of experts: lora, rso-nf4 (LoRA does not reach"),
    (["--model", "moe-tiny", "--method", "lora"], "rso.memory.estimate: method='lora' is not modelled"),
    (["--model", "moe-tiny", "--quantize", "int8"], "rso.memory.estimate: quantize='int8' quantizes 2-D linear"),
])
def test_cli_refusals(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1


def test_fit_on_a_moe_leaves_out_lora_and_the_quantized_rows():
    rows = fit("moe-tiny", "1GiB", seqs=(64,), reserve=0)
    assert [r["method"] for r in rows] == ["adamw", "galore", "galore-8bit-per-layer", "rso"]
    assert all(r["batch"] > 0 for r in rows)

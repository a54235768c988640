"""The architecture zoo (``rso.train.zoo``): a fast subset of families through RSO's whole lifecycle, and the
harness itself (its checks go red on a broken model, its worker pool survives crashes and hangs)."""
import json
import os
import time

import pytest

from rso.train import zoo

#: (task, model_type): about ten families over the five tasks; each must end PASS (or a clear REFUSED).
FAST = [("causal-lm", "llama"), ("causal-lm", "gpt2"), ("causal-lm", "mistral"), ("causal-lm", "qwen2"),
        ("causal-lm", "gemma"), ("causal-lm", "opt"), ("sequence-classification", "bert"),
        ("sequence-classification", "roberta"), ("masked-lm", "roberta"), ("seq2seq-lm", "t5"),
        ("seq2seq-lm", "bart"), ("image-classification", "vit"), ("causal-lm", "mixtral")]
#: families of FAST that fail today, with the bug (the lead removes an entry when the bug is fixed)
KNOWN_BUGS = {}  # (task, model_type) → the bug it names, marked xfail(strict) until fixed


def _class(task, model_type):
    return next(c for t, m, c in zoo.entries([task], {model_type}))


@pytest.mark.parametrize("task, model_type", [
    pytest.param(t, m, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[(t, m)])) if (t, m) in KNOWN_BUGS
    else (t, m) for t, m in FAST])
def test_fast_families_pass_the_lifecycle(task, model_type):
    record = zoo.run_one(task, model_type, _class(task, model_type))
    assert record["status"] in ("PASS", "REFUSED"), (record["step"], record["reason"])
    if record["status"] == "PASS":
        assert list(record["timings"]) == list(zoo.STEPS) and record["wrapped"] > 0
        assert record["signal"] > 100 * zoo.TOL  # training moved the logits far beyond the tolerance


def _wrapped(model_type="llama", class_name="LlamaForCausalLM"):
    run = zoo._Run("causal-lm", model_type, class_name, {"failures": []})
    for step in (zoo._step_build, zoo._step_plain, zoo._step_wrap):
        step(run)
    return run


def test_wraps_check_catches_a_layer_that_reads_its_weight_directly():
    import torch.nn.functional as F
    import rso
    run = _wrapped()
    zoo._step_wraps(run)  # a correctly wrapped model passes
    name, layer = rso.subspace_layers(run.model)[3]
    layer.forward = lambda x: F.linear(x, layer.weight, layer.bias)  # W₀ only: B silently ignored
    with pytest.raises(zoo.Mismatch, match=f"W₀ of 1 of 14 wrapped layers is read outside their forward.*{name}"):
        zoo._step_wraps(run)


def test_the_checks_see_stacked_expert_weights():
    """Mixtral's experts are wrapped members: the probe counts them, and an experts module whose forward reads its
    W₀ directly (the original module's loop: B ignored) is caught by name."""
    import rso
    run = _wrapped("mixtral", "MixtralForCausalLM")
    assert run.record["wrapped"] == 12 and run.record["experts"] == 4 and run.record["rank"] == zoo.RANK
    zoo._step_wraps(run)
    name, layer = rso.expert_layers(run.model)[1]
    layer.forward = layer._experts.forward
    with pytest.raises(zoo.Mismatch, match=f"W₀ of 2 of 12 wrapped layers is read outside their forward.*{name}.rso"):
        zoo._step_wraps(run)


def test_the_unwrap_check_catches_an_experts_module_left_wrapped(monkeypatch):
    import rso.wrapping
    run = _wrapped("mixtral", "MixtralForCausalLM")
    zoo._step_unwrap(run)  # a correct unwrap passes
    monkeypatch.setattr(rso.wrapping, "expert_layers", lambda model: [])
    with pytest.raises(zoo.Mismatch, match="2 SubspaceLinear / SubspaceExperts left .e.g. model.layers.0.mlp.experts"):
        zoo._step_unwrap(run)


def test_rank_is_4_unless_no_layer_takes_it():
    from torch import nn
    assert zoo._rank(nn.Sequential(nn.Linear(8, 1), nn.Linear(1, 8), nn.Linear(8, 8))) == zoo.RANK
    assert zoo._rank(nn.Sequential(nn.Linear(8, 3), nn.Linear(3, 2))) == 3  # the widest one's min(in, out)


def test_run_one_refuses_steps_without_their_prerequisites():
    with pytest.raises(ValueError, match="steps rso_load needs save; allowed"):
        zoo.run_one("causal-lm", "llama", "LlamaForCausalLM", steps=("build", "plain", "wrap", "train", "rso_load"))
    assert not zoo.uses_experts_interface("NoSuchModelForCausalLM")


def test_lifecycle_catches_a_save_that_does_not_merge_B(monkeypatch):
    from torch import nn
    from rso.layers.subspace_linear import SubspaceLinear
    monkeypatch.setattr(SubspaceLinear, "_save_to_state_dict", nn.Module._save_to_state_dict)  # W₀ and B apart
    record = zoo.run_one("causal-lm", "llama", "LlamaForCausalLM")
    assert record["status"] == "FAIL" and record["step"] == "plain_load", record["failures"]
    assert "plain LlamaForCausalLM.from_pretrained logits" in record["reason"]


def test_an_unbuildable_architecture_is_not_built_and_a_wrap_refusal_is_refused(monkeypatch):
    record = zoo.run_one("causal-lm", "llama", "NoSuchModelForCausalLM")
    assert record["status"] == "NOT_BUILT" and record["step"] == "build" and list(record["timings"]) == ["build"]
    monkeypatch.setattr(zoo, "RANK", 10 ** 6)
    monkeypatch.setattr(zoo, "_rank", lambda model: zoo.RANK)
    record = zoo.run_one("causal-lm", "llama", "LlamaForCausalLM")
    assert (record["status"], record["step"]) == ("REFUSED", "wrap")
    assert record["reason"].startswith("ValueError: rso.wrap")


def test_shrink_sets_small_sizes_keeps_layer_kinds_and_recurses_into_sub_configs():
    from transformers import Gemma3Config, LlamaConfig, Qwen3NextConfig
    small = zoo.shrink(LlamaConfig().to_dict())
    assert (small["hidden_size"], small["num_hidden_layers"], small["num_attention_heads"], small["vocab_size"]) == \
        (64, 2, 4, 128) and small["attention_dropout"] == 0.0
    hybrid = zoo.shrink(Qwen3NextConfig().to_dict())
    assert hybrid["layer_types"] == ["linear_attention", "full_attention"] and hybrid["num_hidden_layers"] == 2
    composite = zoo.shrink(Gemma3Config().to_dict())
    assert composite["text_config"]["hidden_size"] == 64 and composite["vision_config"]["image_size"] == zoo.IMAGE
    per_layer = zoo.shrink({"num_hidden_layers": 10, "num_attention_heads": 32, "num_key_value_heads": 32,
                            "mlp_only_layers": [0, 1, 2], "per_layer_config": {"01": {"num_attention_heads": 64},
                                                                               "05": {"num_attention_heads": 64}}})
    assert per_layer == {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,  # MHA stays
                         "mlp_only_layers": [0], "per_layer_config": {"01": {"num_attention_heads": 4}}}


def _behave(kind, model_type, class_name, progress=None):
    """A job for run_all's worker: crash, hang, or return a record."""
    progress("build")
    if kind == "crash":
        os._exit(3)
    if kind == "hang":
        time.sleep(60)
    return {"task": kind, "model_type": model_type, "class": class_name, "status": "PASS", "failures": []}


def test_run_all_survives_a_crash_and_a_hang_and_keeps_the_order():
    jobs = [("crash", "a", "A"), ("hang", "b", "B"), ("ok", "c", "C")]
    records = zoo.run_all(jobs, timeout=1.5, workers=1, job_function=_behave)
    assert [r["model_type"] for r in records] == ["a", "b", "c"]
    assert records[0]["status"] == "NOT_BUILT" and "died (exit code 3)" in records[0]["reason"]
    assert records[1]["status"] == "NOT_BUILT" and "timed out after 1.5 s" in records[1]["reason"]
    assert records[2]["status"] == "PASS"


def test_summary_counts_pass_rate_over_built_and_the_files(tmp_path):
    records = [{"task": "causal-lm", "model_type": m, "class": "C", "status": s, "step": None, "reason": None,
                "failures": [] if s == "PASS" else [{"step": "train", "reason": f"Mismatch {m} 1.5"}]}
               for m, s in (("a", "PASS"), ("b", "PASS"), ("c", "FAIL"), ("d", "NOT_BUILT"), ("e", "FAIL"))]
    row = zoo.summary(records)[0]
    assert (row["entries"], row["built"], row["PASS"], row["FAIL"], row["NOT_BUILT"]) == (5, 4, 2, 2, 1)
    assert row["pass_rate"] == 0.5
    assert zoo.causes(records) == [("train: Mismatch c N", ["causal-lm/c"]), ("train: Mismatch e N", ["causal-lm/e"])]
    meta = {"command": "python -m rso.train.zoo", "date": "d", "transformers": "t", "torch": "t", "seconds": 6.0}
    zoo.write_results(tmp_path, meta, records)
    assert json.loads((tmp_path / "zoo.json").read_text())["summary"][0]["pass_rate"] == 0.5
    assert "| causal-lm | 5 | 4 | 2 | 0 | 2 | 0 | 1 | 50.0% |" in (tmp_path / "README.md").read_text()


def test_command_line_refuses_an_unknown_task():
    with pytest.raises(SystemExit):
        zoo.parse_args(["--tasks", "causal-lm,speech"])
    assert zoo.parse_args(["--only", "llama, gpt2"]).only == ["llama", "gpt2"]

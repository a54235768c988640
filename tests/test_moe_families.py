"""Every mixture-of-experts family of the installed transformers through RSO's lifecycle with the default targets.

The families are generated, not picked: every causal-LM model type of the auto mappings whose modeling file uses
transformers' experts interface (``rso.train.zoo.entries(moe=True)``) and whose tiny zoo model has an experts module
(``is_experts_module``). Each runs the zoo's lifecycle (``rso.train.zoo.run_one``: wrap with rank 4 and the default
targets, the probe that each B reaches the logits, 3 AdamW steps across a merge, save_pretrained, plain
from_pretrained equal, rso.from_pretrained with the same B / P / counters continuing equal, unwrap equal with no
SubspaceExperts left). Four representatives (Mixtral; Qwen2-MoE: shared expert and a 1-output gate; GPT-OSS:
transposed, biased, its own gate; NemotronH: no gate) also check the expert B gradients against autograd on the
unwrapped model in float64 and resume an HF Trainer run from its checkpoint exactly.
"""
import copy
import functools

import pytest
import torch

import rso
from rso.layers.subspace_experts import ExpertSubspace, is_experts_module
from rso.train import zoo

FAMILIES = [(model_type, class_name) for _, model_type, class_name in zoo.entries(["causal-lm"], moe=True)]
#: model_type → the experts-module traits it stands for (checked, so a changed family cannot pass as another)
REPRESENTATIVES = {"mixtral": dict(has_gate=True, is_transposed=False, has_bias=False),
                   "qwen2_moe": dict(has_gate=True, is_transposed=False, has_bias=False),
                   "gpt_oss": dict(has_gate=True, is_transposed=True, has_bias=True),
                   "nemotron_h": dict(has_gate=False, is_transposed=False, has_bias=False)}
#: the lifecycle steps run here (the zoo's grad-mode and checkpointing steps are left to the zoo)
STEPS = ("build", "plain", "wrap", "wraps", "train", "save", "plain_load", "rso_load", "unwrap")
#: families whose lifecycle fails today, with the bug (the lead removes an entry when the bug is fixed)
KNOWN_BUGS = {}


def _class(model_type):
    return dict(FAMILIES)[model_type]


def _params(families):
    return [pytest.param(m, c, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[m])) if m in KNOWN_BUGS
            else (m, c) for m, c in families]


def test_the_family_list_is_generated_and_holds_the_representatives():
    assert set(REPRESENTATIVES) <= {m for m, _ in FAMILIES} and len(FAMILIES) >= 20
    assert [m for _, m, _ in zoo.entries(["causal-lm"], only={"llama", "mixtral"}, moe=True)] == ["mixtral"]


@pytest.mark.parametrize("model_type, class_name", _params(FAMILIES))
def test_family_lifecycle_with_the_default_targets(model_type, class_name):
    record = zoo.run_one("causal-lm", model_type, class_name, steps=STEPS)
    if record["status"] == "NOT_BUILT":
        pytest.skip(f"the zoo cannot build a tiny {model_type}: {record['reason']}")
    if not record["experts_modules"]:
        pytest.skip(f"the tiny {model_type} has no experts module rso wraps (its default config turns the experts off, "
                    f"or its experts run a loop of their own: see the Ergo test)")
    assert record["status"] == "PASS", (record["step"], record["reason"], record["failures"][1:])
    assert record["rank"] == zoo.RANK and record["experts"] >= record["experts_modules"] > 0
    assert record["signal"] > 100 * zoo.TOL  # training moved the logits far beyond the tolerance


def test_qwen2_moe_wraps_with_the_defaults_and_lists_its_one_output_gate():
    """Rank 4 wraps attention, the shared expert and the stacked experts; the 1-output shared_expert_gate stays
    trainable in full and is listed as narrower than the rank."""
    run = zoo._Run("causal-lm", "qwen2_moe", _class("qwen2_moe"), {"failures": []})
    for step in (zoo._step_build, zoo._step_plain, zoo._step_wrap):
        step(run)
    mlp = "model.layers.0.mlp"
    assert run.record["rank"] == zoo.RANK and {f"{mlp}.shared_expert.gate_proj", f"{mlp}.experts.rso.gate_up_proj",
                                               f"{mlp}.experts.rso.down_proj"} <= set(zoo.members(run.model))
    assert run.model.get_submodule(f"{mlp}.shared_expert_gate").weight.requires_grad
    narrow = [line for line in run.record["left_out"] if "narrower than the rank" in line]
    assert len(narrow) == 1 and f"{mlp}.shared_expert_gate (64×1)" in narrow[0], run.record["left_out"]


def _wrapped(model_type, dtype=torch.float32, tau=zoo.TAU):
    """The zoo's tiny model of ``model_type`` (experts on transformers' eager loop), wrapped with the defaults."""
    model = zoo.eager_experts(zoo.build(model_type, _class(model_type)).to(dtype))
    experts = next(m for m in model.modules() if is_experts_module(m))
    assert {k: getattr(experts, k) for k in REPRESENTATIVES[model_type]} == REPRESENTATIVES[model_type]
    return rso.wrap(model, rank=zoo.RANK, tau=tau, seed=zoo.SEED)


@pytest.mark.parametrize("model_type", REPRESENTATIVES)
def test_expert_B_gradients_are_the_projected_weight_gradients_in_float64(model_type):
    """∂L/∂B[e] = s · ∂L/∂W[e] · Pᵀ (W[e] out×in) with W = W₀ + s·B P, the unwrapped model's autograd gradient."""
    model = _wrapped(model_type, torch.float64)
    g = torch.Generator().manual_seed(zoo.SEED)
    subs = {n: m for n, m in zoo.members(model).items() if isinstance(m, ExpertSubspace)}
    with torch.no_grad():
        for sub in subs.values():
            sub.B.copy_(zoo._noise(sub.B, sub.weight / sub.scale, g) * 0.1)  # W ≠ W₀
    plain = rso.unwrap(copy.deepcopy(model))
    batch = zoo.make_batch("causal-lm", model.config)
    for m in (model, plain):
        m(**batch).loss.backward()
    rtol = 1e6 * torch.finfo(torch.float64).eps  # ~1e3 float64 roundings per entry, far below any missing term
    for name, sub in subs.items():
        W = plain.get_parameter(name.replace(f".{rso.layers.subspace_experts.EXPERTS_CHILD}.", "."))
        grad = W.grad.transpose(1, 2) if sub.transposed else W.grad
        expected = sub.scale * grad @ sub.P.T
        assert (sub.B.grad - expected).abs().max() <= rtol * expected.abs().max() and expected.abs().max() > 0, name


class _Tokens(torch.utils.data.Dataset):
    """8 random token sequences (the zoo's batch recipe) as the dicts a Trainer expects."""

    def __init__(self, config):
        g = torch.Generator().manual_seed(zoo.SEED + 3)
        self.ids = torch.randint(4, config.vocab_size - 16, (8, zoo.SEQ), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer_run(model_type, folder, resume=None, original_format=True):
    """3 Trainer steps, a checkpoint at step 2, tau 3 (the merge after the resume point). ``original_format``
    False: checkpoints keep the model's own keys (``save_pretrained(save_original_format=False)``)."""
    from transformers import Trainer, TrainingArguments
    model = _wrapped(model_type, tau=3)
    if not original_format:
        model.save_pretrained = functools.partial(model.save_pretrained, save_original_format=False)
    args = TrainingArguments(output_dir=str(folder), max_steps=3, save_steps=2, per_device_train_batch_size=2,
                             learning_rate=zoo.LR, lr_scheduler_type="linear", report_to=[], use_cpu=True,
                             seed=zoo.SEED, logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=_Tokens(model.config)).train(resume_from_checkpoint=resume)
    return model


@pytest.mark.parametrize("model_type, original_format", [
    ("gpt_oss", True), ("mixtral", False), ("qwen2_moe", False), ("nemotron_h", False)])
def test_trainer_resumes_from_its_checkpoint_exactly(model_type, original_format, tmp_path):
    """Resumed from checkpoint-2 = the uninterrupted run, bit for bit: rso.state, each B and P, the effective
    weights."""
    full = _trainer_run(model_type, tmp_path / "full", original_format=original_format)
    resumed = _trainer_run(model_type, tmp_path / "resumed", str(tmp_path / "full" / "checkpoint-2"), original_format)
    assert rso.state(full)["cycle"] == 1
    mine, theirs = zoo.members(resumed), zoo.members(full)
    assert any(isinstance(m, ExpertSubspace) for m in theirs.values()) and set(mine) == set(theirs)
    for name in theirs:
        assert (mine[name].step, mine[name].cycle) == (theirs[name].step, theirs[name].cycle), name
        assert torch.equal(mine[name].B, theirs[name].B) and torch.equal(mine[name].P, theirs[name].P), name
    a, b = rso.effective_state_dict(resumed), rso.effective_state_dict(full)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)


def test_a_trainer_resume_from_the_original_checkpoint_format_is_refused(tmp_path):
    """transformers' Trainer resumes with ``load_state_dict(strict=False)`` of checkpoint-N/model.safetensors, which
    save_pretrained writes in the family's original format (Mixtral: block_sparse_moe.experts.N.w1...): the experts
    would silently keep their weights (huggingface/transformers#48805, unwrapped models too); a wrapped model refuses
    in one line, and rso.from_pretrained reads the same folder right."""
    _trainer_run("mixtral", tmp_path / "full")
    with pytest.raises(ValueError, match=r"original checkpoint format .*rso.from_pretrained\(ModelClass, folder\)"):
        _trainer_run("mixtral", tmp_path / "resumed", str(tmp_path / "full" / "checkpoint-2"))
    from transformers import MixtralForCausalLM
    loaded = rso.from_pretrained(MixtralForCausalLM, tmp_path / "full" / "checkpoint-2")
    assert rso.state(loaded)["step"] == 2


def test_experts_with_a_forward_of_their_own_train_in_full_and_are_listed():
    """ErgoExperts overrides the interface's dispatched forward (a row per route, a per-expert RMSNorm, a weighted
    sum): the generic loop would compute another model, so its stacked weights are left as they are and listed."""
    model = zoo.build("ergo", _class("ergo")).eval()
    batch = zoo.make_batch("causal-lm", model.config)
    with torch.no_grad():
        expected = model(**batch).logits
    rso.wrap(model, rank=zoo.RANK)
    assert not rso.expert_layers(model)
    assert "experts modules with a loop of their own" in rso.summary(model) and "(ErgoExperts)" in rso.summary(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, expected)

"""QLoRA, the baseline RSO on a quantized W₀ is measured against: PEFT LoRA on a base read by transformers'
bitsandbytes loader (``--method lora --quantize nf4|int8``), which is the base ``rso.wrap(quantize=)`` stores."""
import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

import rso  # noqa: E402
from rso.layers.quantized import from_bnb, is_quantized_linear, quantize  # noqa: E402
from rso.layers import QuantizedSubspaceLinear  # noqa: E402
from rso.train.checkpoint import CHECKPOINT_NAME, CheckpointError  # noqa: E402
from rso.train.finetune import build_parser, run  # noqa: E402
from rso.train.methods import MethodError, MethodOptions, setup_method  # noqa: E402

#: widths that are multiples of bitsandbytes' 64-value blocks (its CPU 4-bit kernels need them)
CONFIG = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
MICRO_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
               "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 512, "max_position_embeddings": 128,
               "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "training": {"tokenizer": "gpt2"}}


def tiny():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG))


def qlora(model, kind):
    return setup_method("lora", model, MethodOptions(rank=4, lr=1e-2, quantize=kind, train_embeddings=False))


def test_the_nf4_qlora_base_is_the_base_rso_quantizes_to():
    """Every block linear of the NF4 QLoRA model is a bitsandbytes Linear4bit holding exactly the codes and scales
    that ``rso.wrap(quantize="nf4")`` stores for W₀; the head stays float; at step 0 both give the same loss."""
    float_model = tiny()
    peft_model, _ = qlora(copy.deepcopy(float_model), "nf4")
    wrapped = rso.wrap(copy.deepcopy(float_model), rank=4, quantize="nf4")
    base = peft_model.get_base_model()
    layers = {n: m for n, m in wrapped.named_modules() if isinstance(m, QuantizedSubspaceLinear)}
    assert len(layers) == 14
    for name, layer in layers.items():
        theirs, ours = from_bnb(base.get_submodule(name).base_layer)[0], layer.quantized()
        assert theirs.kind == ours.kind == "nf4" and torch.equal(theirs.data.flatten(), ours.data.flatten()), name
        assert torch.equal(theirs.absmax.flatten(), ours.absmax.flatten()), name
    assert not is_quantized_linear(base.lm_head) and base.lm_head.weight.dtype == torch.float32
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    a, b = peft_model(input_ids=ids, labels=ids).loss, wrapped(input_ids=ids, labels=ids).loss
    assert abs(a.item() - b.item()) <= 64 * torch.finfo(torch.float32).eps * abs(b.item())


def test_the_int8_qlora_base_is_bitsandbytes_rounding_through_float16():
    """bitsandbytes' loader quantizes LLM.int8 rows from the weight cast to float16 (rso.wrap's int8 quantizes
    the float32 weight itself): the same format, codes that differ where the float16 cast moved a value."""
    float_model = tiny()
    base = qlora(copy.deepcopy(float_model), "int8")[0].get_base_model()
    moved = 0
    for name, m in float_model.named_modules():
        if isinstance(m, nn.Linear) and name != "lm_head":
            theirs = from_bnb(base.get_submodule(name).base_layer)[0]
            assert torch.equal(theirs.data, quantize(m.weight.detach().half().float(), "int8").data), name
            moved += int((theirs.data != quantize(m.weight.detach(), "int8").data).sum())
    assert moved > 0


def test_qlora_trains_only_its_adapters():
    model, optimizer = qlora(tiny(), "nf4")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    before = copy.deepcopy({k: v for k, v in model.state_dict().items() if "lora_" not in k})
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    model.train()(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_qlora_needs_a_transformers_model():
    with pytest.raises(MethodError, match="--quantize reads the base through transformers' bitsandbytes loader, "
                                          "which ModuleDict is not a model of"):
        qlora(nn.ModuleDict({"q_proj": nn.Linear(64, 64), "up_proj": nn.Linear(64, 128)}), "nf4")


def _argv(tmp_path, out, *extra):
    cfg = tmp_path / "micro-llama.json"
    cfg.write_text(json.dumps(MICRO_LLAMA))
    return ["--model", str(cfg), "--task", "xsum", "--method", "lora", "--quantize", "nf4", "--rank", "4",
            "--max-steps", "4", "--batch-size", "2", "--max-length", "64", "--max-train", "12", "--max-eval", "4",
            "--lr", "1e-2", "--save-every", "2", "--eval-every", "2", "--output-dir", str(tmp_path / out),
            "--no-progress", "--threads", "1", *extra]


def _losses(folder):
    return [{k: v for k, v in json.loads(line).items() if k == "step" or "loss" in k}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_qlora_finetuning_resumes_exactly_with_its_base_checked(tmp_path):
    """A QLoRA run stopped after an evaluation and resumed gives the uninterrupted run's losses (bitsandbytes'
    CPU inference would have repacked the base with bf16 scales at that evaluation); a checkpoint whose base is
    not the one the run loads is refused."""
    full = run(build_parser().parse_args(_argv(tmp_path, "a", "--no-save-model")))
    widths = 4 * (64 + 64) + 3 * (64 + 128)  # q, k, v, o: 64 → 64; gate, up: 64 → 128; down: 128 → 64
    assert full["steps"] == 4 and full["trainable_params"] == 2 * 4 * widths  # 2 blocks, rank 4: only the adapters
    assert run(build_parser().parse_args(_argv(tmp_path, "b", "--no-save-model", "--stop-after", "2"))) == {"stopped_at": 2}
    ckpt_path = tmp_path / "b" / CHECKPOINT_NAME
    good = torch.load(ckpt_path, weights_only=False)
    bad = copy.deepcopy(good)
    key = next(k for k in bad["model"] if k.endswith("q_proj.base_layer.weight.absmax"))
    bad["model"][key] = bad["model"][key] * 2
    torch.save(bad, ckpt_path)
    with pytest.raises(CheckpointError, match=r"--resume: the checkpoint's quantized base differs from the one "
                                              r"this run loaded \(.*q_proj.base_layer.weight.absmax\)"):
        run(build_parser().parse_args(["--output-dir", str(tmp_path / "b"), "--resume", "--no-progress"]))
    torch.save(good, ckpt_path)
    resumed = run(build_parser().parse_args(["--output-dir", str(tmp_path / "b"), "--resume", "--no-progress"]))
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b") and resumed["final_eval_loss"] == full["final_eval_loss"]

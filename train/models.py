"""Models: LLaMA configs as data files, and the packaged pretrained models (offline).

``train/configs/<name>.json`` holds a ``transformers`` config (``model_type`` picks the class) plus a
``training`` section with that size's defaults (tokenizer, sequence length, batch size, rank, steps).
"""
from __future__ import annotations

import json
import pathlib
import re
import tempfile

import torch

from .packages import SMOLLM2_GGUF, smollm2_dir

__all__ = ["ConfigError", "CONFIG_DIR", "available_configs", "load_config", "build_model", "load_smollm2",
           "load_quantized"]

CONFIG_DIR = pathlib.Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A model config that does not exist or cannot be read."""


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(spec: str) -> dict:
    """The JSON dict of a config name (``tiny``, ``60m``, …) or of a path to a JSON file."""
    path = pathlib.Path(spec).expanduser()
    if not (path.suffix == ".json" and path.exists()):
        named = CONFIG_DIR / f"{spec.lower()}.json"
        if not named.exists():
            if path.suffix == ".json" or "/" in spec:
                raise ConfigError(f"config file {spec!r} does not exist")
            raise ConfigError(f"unknown config {spec!r}; available: {', '.join(available_configs())} "
                              "(or a path to a JSON config file)")
        path = named
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read config {str(path)!r}: {e}") from e
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise ConfigError(f"config {str(path)!r} must be a JSON object with a 'model_type' key")
    cfg.setdefault("training", {})
    cfg["training"]["_name"] = path.stem
    return cfg


def build_model(cfg: dict, vocab_size: int | None = None, bos_token_id=None, eos_token_id=None,
                pad_token_id=None, **overrides):
    """A randomly initialized model from a config dict (``training`` keys are not model fields).

    ``vocab_size`` is raised (never lowered) to fit the tokenizer, rounded up to a multiple of 64.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    fields = {k: v for k, v in cfg.items() if k != "training" and not k.startswith("_")}
    model_type = fields.pop("model_type")
    if vocab_size is not None and vocab_size > fields.get("vocab_size", 0):
        fields["vocab_size"] = (vocab_size + 63) // 64 * 64
    for key, value in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id),
                       ("pad_token_id", pad_token_id)):
        if value is not None:
            fields[key] = value
    fields.update(overrides)
    config = AutoConfig.for_model(model_type, **fields)
    if model_type in ("bert", "roberta", "distilbert") or "num_labels" in overrides:
        return AutoModelForSequenceClassification.from_config(config)
    return AutoModelForCausalLM.from_config(config)


def count_parameters(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ----------------------------------------------------------------------------- packaged models
def load_smollm2(dtype=torch.float32):
    """SmolLM2-135M-Instruct dequantized from its Q4_1 GGUF into a plain ``LlamaForCausalLM``.

    A GGUF-loaded model refuses ``save_pretrained``; rebuilding it from its config (without the
    quantization entry) and copying the state dict gives an ordinary model that saves and reloads.
    """
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    gguf_model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir()), gguf_file=SMOLLM2_GGUF, dtype=dtype)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config).to(dtype)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


# ----------------------------------------------------------------------------- a quantized base (QLoRA)
def load_quantized(model, kind: str, targets: list[str]):
    """``model`` as a QLoRA user holds it: saved, then read back by ``from_pretrained(…, quantization_config=
    BitsAndBytesConfig(…))`` so that exactly the linear layers named in ``targets`` become bitsandbytes
    ``Linear4bit`` (``kind="nf4"``: blocks of 64, fp32 absmax, as ``rso.wrap(quantize="nf4")`` stores W₀) or
    ``Linear8bitLt`` (``"int8"``); everything else keeps its dtype. Returned on the model's device, in its mode."""
    from torch import nn
    from rso.layers.quantized import bitsandbytes_config, is_quantized_linear

    if not hasattr(model, "save_pretrained") or not hasattr(type(model), "from_pretrained"):
        raise ConfigError(f"--quantize reads the base through transformers' bitsandbytes loader, which "
                          f"{type(model).__name__} is not a model of: use a transformers model or leave --quantize out")
    wanted = set(targets)
    skip = [re.escape(n) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in wanted]
    device, dtype, training = next(model.parameters()).device, model.dtype, model.training
    with tempfile.TemporaryDirectory(prefix="rso-quantized-base-") as folder:
        model.save_pretrained(folder)
        loaded = type(model).from_pretrained(folder, dtype=dtype,
                                             quantization_config=bitsandbytes_config(kind, dtype, skip))
    for m in loaded.modules():  # bitsandbytes' CPU inference repacks a Linear4bit in place on its first no-grad
        if hasattr(m, "support_avx512bf16_for_cpu"):  # forward, rounding absmax to bf16: keep the base as loaded
            m.support_avx512bf16_for_cpu = False
    got = {n for n, m in loaded.named_modules() if is_quantized_linear(m)}
    if got != wanted:
        raise ConfigError(f"--quantize {kind}: bitsandbytes' loader quantized {sorted(got ^ wanted)[:3]} "
                          "against the layers asked for; leave --quantize out for this model")
    return loaded.to(device).train(training)

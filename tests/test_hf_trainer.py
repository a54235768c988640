"""RSO under the unmodified transformers.Trainer: merges every tau optimizer steps with grad accumulation."""
import importlib.util
import json
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from conftest import micro_llama_config  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
MICRO = micro_llama_config(training={"tokenizer": "bpe512"})


def _example():
    spec = importlib.util.spec_from_file_location("hf_trainer_example", REPO / "examples" / "hf_trainer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trainer_merges_every_tau_optimizer_steps(tmp_path, monkeypatch):
    monkeypatch.setenv("RSO_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "micro.json"
    cfg.write_text(json.dumps(MICRO))
    res = _example().run(config=str(cfg), max_steps=7, tau=3, rank=8, grad_accum=3, batch_size=2, seq_len=16,
                         max_docs=100, output_dir=str(tmp_path / "out"))
    assert res["global_step"] == 7 and res["merges"] == 2
    # (trainer step, rso step, rso cycle) after every optimizer step: 3 micro-batches count once
    assert res["seen"] == [(s, s, s // 3) for s in range(1, 8)]
    assert torch.isfinite(torch.tensor(res["eval_loss"]))
    # default checkpointing (save_steps = 3): the folders load as plain models with the trained weights
    assert (tmp_path / "out" / "checkpoint-3" / "model.safetensors").is_file()
    assert res["plain_eval_loss"] == pytest.approx(res["eval_loss"], rel=1e-5)


def test_example_resumes_from_a_trainer_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("RSO_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "micro.json"
    cfg.write_text(json.dumps(MICRO))
    kw = dict(config=str(cfg), tau=3, rank=8, grad_accum=2, batch_size=2, seq_len=16, max_docs=100, save_steps=4)
    full = _example().run(max_steps=8, output_dir=str(tmp_path / "full"), **kw)
    more = _example().run(max_steps=8, output_dir=str(tmp_path / "resumed"), resume=str(tmp_path / "full" / "checkpoint-4"),
                          **kw)
    assert more["seen"] == [(s, s, s // 3) for s in range(5, 9)]  # the resumed session starts at step 5
    assert more["eval_loss"] == pytest.approx(full["eval_loss"], rel=1e-6)

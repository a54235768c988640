"""``--activation-checkpointing`` and ``--optimizer adamw8bit`` in the training command lines: the same run
with checkpointing, 8-bit states that train and resume exactly, one-line errors before any data."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from conftest import micro_llama_config  # noqa: E402
from rso.train.pretrain import build_parser, main, run  # noqa: E402

MICRO = micro_llama_config(hidden_size=64, intermediate_size=128)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("memflags")
    config = root / "micro.json"
    config.write_text(json.dumps(MICRO))
    return {"config": str(config), "cache": str(root / "cache"), "root": root}


def _argv(env, out, *extra):
    return ["--config", env["config"], "--max-docs", "200", "--cache-dir", env["cache"], "--output-dir", str(out),
            "--eval-batches", "2", "--no-progress", "--threads", "1", *extra]


def _run(env, out, *extra):
    return run(build_parser().parse_args(_argv(env, out, *extra)))


def test_checkpointing_trains_the_same_run(env, tmp_path, capsys):
    for method, tau in (("rso", ["--tau", "2"]), ("lora", [])):  # lora has no τ
        plain = _run(env, tmp_path / f"{method}-plain", "--method", method, "--max-steps", "3", *tau)
        capsys.readouterr()
        ckpt = _run(env, tmp_path / f"{method}-ckpt", "--method", method, "--max-steps", "3", *tau,
                    "--activation-checkpointing")
        assert "activation checkpointing" in capsys.readouterr().out
        assert ckpt["final_eval_loss"] == pytest.approx(plain["final_eval_loss"], rel=1e-5)
        assert ckpt["final_train_loss"] == pytest.approx(plain["final_train_loss"], rel=1e-5)


def test_adamw8bit_trains_merges_and_resumes_exactly(env, tmp_path):
    pytest.importorskip("bitsandbytes")
    common = ("--method", "rso", "--optimizer", "adamw8bit", "--tau", "2", "--activation-checkpointing")
    full = _run(env, tmp_path / "full", *common, "--max-steps", "4")
    assert full["steps"] == 4 and torch.isfinite(torch.tensor(full["final_eval_loss"]))
    assert full["final_eval_loss"] < 7.0
    _run(env, tmp_path / "part", *common, "--max-steps", "4", "--stop-after", "3")  # a checkpoint at step 3
    assert main(["--output-dir", str(tmp_path / "part"), "--resume", "--no-progress", "--cache-dir", env["cache"],
                 "--threads", "1", "--activation-checkpointing"]) == 0
    resumed = json.loads((tmp_path / "part" / "results.json").read_text())
    assert resumed["final_eval_loss"] == pytest.approx(full["final_eval_loss"], rel=1e-6)
    saved = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)
    assert saved["args"]["optimizer"] == "adamw8bit"


def _error(capsys, argv, entry=main):
    assert entry(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_one_line_errors_before_any_data(env, tmp_path, capsys):
    base = ["--config", env["config"], "--output-dir", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "nocache"),
            "--no-progress", "--dataset", str(tmp_path / "missing.jsonl")]  # reading data would fail differently
    err = _error(capsys, base + ["--method", "galore", "--optimizer", "adamw8bit"])
    assert "--optimizer" in err and "galore" in err
    err = _error(capsys, base + ["--optimizer", "adamw9bit"])
    assert "unknown optimizer 'adamw9bit'" in err and "adamw8bit" in err
    from rso.train.distributed import main as dist_main
    err = _error(capsys, base + ["--method", "rso", "--optimizer", "adamw8bit", "--parallel", "fsdp"], dist_main)
    assert "FSDP2" in err and "--parallel ddp" in err
    from rso.train.finetune import main as ft_main
    err = _error(capsys, ["--model", "tiny-bert", "--method", "galore", "--optimizer", "adamw8bit",
                          "--output-dir", str(tmp_path / "f")], ft_main)
    assert "--optimizer" in err
    assert not (tmp_path / "nocache").exists()


def test_checkpointing_support_is_checked_from_the_config():
    from rso.train.loop import UsageError, check_checkpointing
    from rso.train.methods import MethodError, enable_activation_checkpointing, supports_activation_checkpointing
    assert supports_activation_checkpointing("llama") and supports_activation_checkpointing("bert")
    assert supports_activation_checkpointing("no-such-model") is None

    from rso.train.config import RunConfig
    args = RunConfig()
    args.runtime.activation_checkpointing = True

    check_checkpointing(args, {"model_type": "llama"})
    check_checkpointing(args, None)  # unknown before the model is built: checked then
    import transformers.models.auto.modeling_auto as auto
    auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES["nockpt"] = "NoSuchClassAnywhere"
    try:
        assert supports_activation_checkpointing("nockpt") is None
    finally:
        del auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES["nockpt"]
    with pytest.raises(MethodError, match="does not support activation checkpointing"):
        enable_activation_checkpointing(torch.nn.Linear(2, 2))
    assert UsageError  # the CLI turns the MethodError into a one-line UsageError (apply_activation_checkpointing)


def test_finetune_with_checkpointing_and_8bit(tmp_path):
    pytest.importorskip("bitsandbytes")
    from rso.train.finetune import build_parser as ft_parser, run as ft_run
    res = ft_run(ft_parser().parse_args(
        ["--model", "tiny-bert", "--max-train", "32", "--max-eval", "16", "--batch-size", "8", "--max-length", "32",
         "--max-steps", "3", "--tau", "2", "--rank", "4", "--output-dir", str(tmp_path), "--no-progress",
         "--threads", "1", "--method", "rso", "--task", "rotten_tomatoes", "--activation-checkpointing",
         "--optimizer", "adamw8bit"]))
    assert res["steps"] == 3 and res["reload_same_predictions"]


def test_distributed_entry_point_with_checkpointing(tmp_path):
    """rso.train.distributed on a one-process gloo group: DDP with 8-bit states and FSDP2, each with checkpointing,
    train the same losses as without."""
    import torch.distributed as dist
    from rso.train.distributed import build_parser as dist_parser, run as dist_run
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({**{k: v for k, v in MICRO.items() if k != "training"}, "training": {"lr": 1e-3}}))

    def go(name, *more):
        return dist_run(dist_parser().parse_args([
            "--config", str(cfg), "--method", "rso", "--dataset", "synthetic", "--synthetic-tokens", "20000",
            "--batch-size", "2", "--grad-accum", "1", "--seq-len", "16", "--max-steps", "3", "--rank", "4",
            "--tau", "2", "--warmup", "0", "--log-every", "1", "--eval-every", "3", "--save-every", "3",
            "--eval-batches", "1", "--output-dir", str(tmp_path / name), *more]))

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        runs = {"ddp": go("ddp", "--parallel", "ddp"), "ddp-ckpt": go("ddp-ckpt", "--parallel", "ddp",
                                                                      "--activation-checkpointing")}
        try:
            import bitsandbytes  # noqa: F401
            runs["ddp-8bit-ckpt"] = go("ddp8", "--parallel", "ddp", "--activation-checkpointing",
                                       "--optimizer", "adamw8bit")
        except ImportError:
            pass
        from rso.distributed import fully_shard_model  # noqa: F401
        runs["fsdp"] = go("fsdp", "--parallel", "fsdp")
        runs["fsdp-ckpt"] = go("fsdp-ckpt", "--parallel", "fsdp", "--activation-checkpointing")
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(torch.tensor(runs["ddp-ckpt"]["train_losses"]), torch.tensor(runs["ddp"]["train_losses"]),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(runs["fsdp-ckpt"]["train_losses"]),
                               torch.tensor(runs["fsdp"]["train_losses"]), rtol=1e-5, atol=1e-6)
    if "ddp-8bit-ckpt" in runs:
        assert all(torch.isfinite(torch.tensor(runs["ddp-8bit-ckpt"]["train_losses"])))


def test_benchmark_worker_with_checkpointing_and_8bit(capsys):
    """rso.train.bench.step's worker: --activation-checkpointing and --optimizer adamw8bit measured as the estimator
    predicts them (kept + one block's recomputation; bitsandbytes' state layout), and the one-line error."""
    pytest.importorskip("bitsandbytes")
    from rso.memory import estimate
    from rso.train.bench.step import main as bench_main, run_worker
    cfg = {k: v for k, v in MICRO.items() if k != "training"}
    cfg.update(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_key_value_heads=2)
    spec = {"method": "rso-stiefel", "config_name": "micro", "config": cfg, "rank": 32, "batch": 2, "seq": 16,
            "dtype": "bf16", "device": "cpu", "attn": "sdpa", "threads": 1, "steps": 0, "warmup": 0, "seed": 0,
            "cores": None, "chunk_size": 1024, "ce_mode": "recompute", "compile": False, "flops": False,
            "track_peak": False, "sweep": False, "max_seq": 16, "activation_checkpointing": True,
            "optimizer": "adamw8bit"}
    mem = run_worker(spec)["memory"]
    est = estimate({k: v for k, v in cfg.items() if k != "model_type"}, "rso", rank=32, batch=2, seq=16, dtype="bf16",
                   activation_checkpointing=True, optimizer_bits=8)
    assert (mem["activations"], mem["recomputed"]) == (est["activations_kept"], est["activations_recompute"])
    assert mem["optimizer_state"] == est["optimizer"]
    capsys.readouterr()
    assert bench_main(["--configs", "tiny", "--methods", "galore", "--optimizer", "adamw8bit"]) == 2
    assert capsys.readouterr().err.startswith("error: --optimizer adamw8bit: only for")


def test_memory_frontier_case_matches_the_estimate():
    """rso.train.bench.memory_frontier's worker on a small LLaMA: bf16 parameters straight from the build, one measured step
    with checkpointing, the chunked head and 8-bit states, term by term equal to the estimate."""
    pytest.importorskip("bitsandbytes")
    from rso.train.bench.memory_frontier import _measured_terms, estimate_case, parse_case, run_case
    model = {k: v for k, v in MICRO.items() if k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                       "num_key_value_heads", "num_hidden_layers", "vocab_size",
                                                       "tie_word_embeddings", "max_position_embeddings")}
    model.update(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_key_value_heads=2)
    spec = {"case": "rso+ckpt+ce+8bit", "model": model, "rank": 32, "batch": 2, "seq": 16, "threads": 1}
    rec = run_case(spec)
    assert rec["parameter_dtypes"] == ["torch.bfloat16"]
    measured, est = _measured_terms(rec["measured"]), estimate_case(spec)
    for key in ("weights", "gradients", "optimizer", "activations_kept", "activations_recompute"):
        assert measured[key] == pytest.approx(est[key], rel=0.05), key
    assert measured["total"] == pytest.approx(est["total"], rel=0.05)
    assert parse_case("adamw")["checkpointing"] is False
    with pytest.raises(ValueError, match="method"):
        parse_case("sgd+ckpt")

"""The entry points' command line: one-line argument errors before any data, the options given
explicitly, the LR schedule stretched on resume, and --resume under rso.train.distributed (one process)."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from rso.train import data, distributed, finetune, pretrain  # noqa: E402
from rso.train.loop import UsageError, check_rank, given_options  # noqa: E402
from rso.train.schedule import CosineWithWarmup, cosine_schedule, resize  # noqa: E402

RANK_FORMS = ("--rank: give an integer ≥ 1, or (rso only) a fraction in (0, 1) of each layer's input width: "
              "0.25 or 1/4; got ")
BAD = [(["--rank", "0"], RANK_FORMS + "'0'"),
       (["--rank", "1.5"], RANK_FORMS + "'1.5'"),
       (["--rank", "1/0"], RANK_FORMS + "'1/0'"),
       (["--rank", "4/3"], RANK_FORMS + "'4/3'"),
       (["--method", "galore", "--rank", "1/4"],
        "--rank 0.25: a fraction of each layer's input width is for --method rso only; galore takes an integer rank"),
       (["--tau", "0"], "--tau must be ≥ 1, got 0"),
       (["--max-steps", "-5"], "--max-steps must be ≥ 1, got -5"),
       (["--lr", "-1"], "--lr must be > 0, got -1.0"),
       (["--lr", "nan"], "--lr must be a finite number, got nan"),
       (["--projection", "bogus"], "--projection: unknown projection 'bogus'; choose one of: coordinate, gaussian, "),
       (["--method", "bogus"], "--method: unknown method 'bogus'; choose one of: adamw, "),
       (["--rank", "abc"], RANK_FORMS + "'abc'"),
       (["--optimizer", "adamx"], "--optimizer: unknown optimizer 'adamx'"),
       (["--method", "galore", "--optimizer", "sgd"], "--optimizer: the galore/golore methods run their own"),
       (["--optimizer-args", "{momentum: 1}"], "--optimizer-args: not valid JSON"),
       (["--optimizer-args", "[1]"], "--optimizer-args: must be a JSON object"),
       (["--dtype", "fp16"], "--dtype: invalid choice: 'fp16'")]


@pytest.fixture
def no_data(monkeypatch):
    """Reading or tokenizing any data (or starting a process group) fails the test."""
    def touched(*args, **kwargs):
        raise AssertionError("data was touched before the arguments were checked")

    monkeypatch.setattr(pretrain, "build_pretraining_data", touched)
    monkeypatch.setattr(data, "build_pretraining_data", touched)  # rso.train.distributed imports it in run()
    monkeypatch.setattr(finetune, "load_task", touched)
    monkeypatch.setattr(distributed, "_init_distributed", touched)


def _one_line_error(capsys, main, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and err.endswith("\n"), err
    return err[len("error: "):-1]


@pytest.mark.parametrize("entry", [pretrain, finetune, distributed], ids=["pretrain", "finetune", "distributed"])
@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_argument_errors_are_one_line_before_any_data(entry, argv, message, tmp_path, capsys, no_data):
    assert _one_line_error(capsys, entry.main, [*argv, "--output-dir", str(tmp_path)]).startswith(message)


@pytest.mark.parametrize("entry,argv,message", [
    (pretrain, ["--config", "tiny", "--rank", "300"],
     "--rank 300 is larger than the model's smallest linear layer dimension (hidden_size 256)"),
    (finetune, ["--model", "tiny-bert", "--rank", "65"],
     "--rank 65 is larger than the model's smallest linear layer dimension (hidden_size 64)"),
    (finetune, ["--model", "minilm", "--rank", "385"],
     "--rank 385 is larger than the model's smallest linear layer dimension (hidden_size 384)"),
    (finetune, ["--model", "minilm", "--rank", "0.3"],  # the FFN down-projection 1536 → 384 would get 461
     "--rank 0.3 gives rank 461 to the model's 1536 → 384 linear layers, more than their smaller dimension 384"),
    (pretrain, ["--config", "tiny", "--method", "rso", "--rank", "1/2"],
     "--rank 0.5 gives rank 344 to the model's 688 → 256 linear layers, more than their smaller dimension 256")])
def test_rank_larger_than_the_model_is_refused_before_any_data(entry, argv, message, tmp_path, capsys, no_data):
    assert _one_line_error(capsys, entry.main, [*argv, "--output-dir", str(tmp_path)]) == message


def test_given_options_are_those_on_the_command_line():
    argv = ["--max-step", "5", "--resume", "--lr", "1e-3", "--no-progress"]  # an abbreviation counts too
    assert given_options(pretrain.build_parser(), argv) == ("lr", "max_steps", "no_progress", "resume")
    assert pretrain.build_parser().parse_args(argv).given == ("lr", "max_steps", "no_progress", "resume")
    args = distributed.build_parser().parse_args(["--output-dir", "x"])
    assert args.given == ("output_dir",) and args.no_progress  # set_defaults() is not "given"
    assert finetune.build_parser().parse_args([]).optimizer_args == {}


def test_resize_continues_the_saved_step_on_the_new_cosine():
    def scheduler(total):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
        return opt, cosine_schedule(opt, warmup=2, total=total, min_ratio=0.1)

    _, saved = scheduler(10)
    for _ in range(6):
        saved.optimizer.step()
        saved.step()
    opt, restored = scheduler(20)
    restored.load_state_dict(saved.state_dict())
    assert restored.lr_lambdas[0].total == 10  # load_state_dict brings the old length back
    old, new = CosineWithWarmup(2, 10, 0.1), CosineWithWarmup(2, 20, 0.1)
    assert resize(restored, 20) == (10, pytest.approx(0.5 * old(6)), pytest.approx(0.5 * new(6)))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * new(6))
    opt.step()
    restored.step()
    assert restored.get_last_lr()[0] == pytest.approx(0.5 * new(7))
    assert resize(restored, 20) is None


def test_distributed_resume_extends_and_keeps_identity(tmp_path, capsys):
    import torch.distributed as dist

    (tmp_path / "cfg.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
        "num_hidden_layers": 1, "vocab_size": 64, "max_position_embeddings": 64, "tie_word_embeddings": False,
        "training": {"lr": 1e-3}}))
    out = tmp_path / "run"

    def session(*argv):
        args = distributed.build_parser().parse_args(["--output-dir", str(out), "--threads", "1", *argv])
        return distributed.run(args)

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        first = session("--config", str(tmp_path / "cfg.json"), "--method", "rso", "--dataset", "synthetic",
                        "--synthetic-tokens", "4000", "--batch-size", "2", "--seq-len", "16", "--max-steps", "2",
                        "--rank", "4", "--tau", "2", "--eval-batches", "1")
        assert first["steps"] == 2
        capsys.readouterr()
        with pytest.raises(UsageError, match=r"^--method adamw differs from the saved run's method 'rso' \("):
            session("--resume", "--method", "adamw")
        with pytest.raises(UsageError, match=r"^--synthetic-tokens 8000 differs .* synthetic_tokens 4000 \("):
            session("--resume", "--synthetic-tokens", "8000")
        assert session("--resume", "--max-steps", "4", "--stop-after", "1")["steps"] == 3
        printed = capsys.readouterr().out
        assert "--resume: the run extends from 2 to 4 steps; the cosine LR schedule is rebuilt" in printed
        assert json.loads((out / "args.json").read_text())["max_steps"] == 4
        assert session("--resume")["steps"] == 4  # args.json holds the new length
        assert "the cosine LR schedule" not in capsys.readouterr().out
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("text,value", [("64", 64), ("+8", 8), ("0.25", 0.25), ("1/4", 0.25), ("1/6", 1 / 6)])
def test_rank_is_an_integer_or_a_fraction_of_the_input_width(text, value):
    parsed = finetune.build_parser().parse_args(["--rank", text]).rank
    assert parsed == value and type(parsed) is type(value)
    cfg = finetune.model_config("minilm")  # 1/6 gives the 1536 → 384 down-projections 256 ≤ 384: allowed
    check_rank(finetune.build_parser().parse_args(["--model", "minilm", "--rank", text]), cfg)

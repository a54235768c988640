"""Typed run configs (rso.train.config): flags -> RunConfig in one place, the TOML file a run writes beside its
checkpoint and ``--config-file`` reads, and --resume's identity read from the fields' sections."""
import tomllib

import pytest

pytest.importorskip("transformers")

from conftest import write_micro_llama_config  # noqa: E402
from rso.train import finetune, pretrain  # noqa: E402
from rso.train.config import FIELDS, RunConfig, to_toml  # noqa: E402
from rso.train.loop import UsageError  # noqa: E402

FLAGS = ["--method", "rso", "--rank", "1/6", "--tau", "7", "--no-share-projections", "--optimizer-args",
         '{"betas": [0.8, 0.9], "eps": 1e-07}', "--dataset", 'a "quoted" \\path.txt', "--lr", "0.003",
         "--grad-clip", "0", "--max-steps", "12", "--seed", "3", "--activation-checkpointing"]


def test_flags_become_sections():
    c = RunConfig.from_namespace(pretrain.build_parser().parse_args(FLAGS))
    assert (c.rso.rank, c.rso.tau, c.rso.share_projections) == (1 / 6, 7, False)
    assert c.optimizer.optimizer_args == {"betas": [0.8, 0.9], "eps": 1e-07} and c.optimizer.lr == 0.003
    assert c.training.max_steps == 12 and c.runtime.activation_checkpointing and c.data.dataset.startswith("a \"")
    assert set(c.given) >= {"rank", "tau", "share_projections"}
    # every field is in one section; the run's identity is read from the fields, not a list of names
    assert {s for s, _ in FIELDS.values()} == {"model", "data", "optimizer", "rso", "training", "checkpoint",
                                               "logging", "runtime"}
    assert "rank" in c.names("identity") and "lr" in c.names("saved") and "lr" not in c.names("identity")
    assert "task" not in c.saved()  # a flag pretrain does not have is not part of its run


def test_toml_round_trip_through_config_file(tmp_path):
    parser = pretrain.build_parser()
    c = RunConfig.from_namespace(parser.parse_args(FLAGS))
    text = to_toml(c)
    assert tomllib.loads(text)["rso"]["rank"] == 1 / 6  # plain TOML: any reader gets the values back
    path = tmp_path / "run.toml"
    path.write_text(text)
    again = RunConfig.from_namespace(parser.parse_args(["--config-file", str(path)]))
    assert again.saved() == c.saved()
    assert again.given == ()  # the file's values replace the defaults; they are not flags given
    flag_wins = RunConfig.from_namespace(parser.parse_args(["--config-file", str(path), "--tau", "9"]))
    assert flag_wins.rso.tau == 9 and flag_wins.given == ("tau",)


@pytest.mark.parametrize("text,message", [
    ("[rso]\nrank = 4\nranks = 5\n", r"\[rso\] ranks is not an option of this command; \[rso\] takes method, "),
    ("[data]\ntask = 'boolq'\n", r"\[data\] task is not an option of this command; \[data\] takes dataset"),
    ("[optim]\nlr = 1\n", r"unknown section \[optim\]; sections are model, data, optimizer, rso"),
    ("[rso\n", r"--config-file .*run.toml: "),
])
def test_config_file_refusals_are_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message):
        pretrain.build_parser().parse_args(["--config-file", str(path)])
    assert pretrain.main(["--config-file", str(path), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --config-file") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_config_file_value_is_checked_like_a_flag(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[rso]\nmethod = 'adamw'\n")
    assert finetune.build_parser().parse_args(["--config-file", str(path)]).lr == 2e-4  # the method's defaults
    path.write_text("[data]\nbatch_size = 0\n")
    with pytest.raises(UsageError, match=r"^--batch-size must be ≥ 1, got 0$"):
        finetune.build_parser().parse_args(["--config-file", str(path)])


def test_a_run_writes_run_toml_that_reproduces_it(tmp_path):
    config = write_micro_llama_config(tmp_path / "micro.json")
    out = tmp_path / "run"
    argv = ["--config", config, "--max-docs", "200", "--cache-dir", str(tmp_path / "cache"), "--eval-batches", "1",
            "--no-progress", "--threads", "1", "--method", "rso", "--rank", "4", "--tau", "2", "--max-steps", "2"]
    pretrain.run(pretrain.build_parser().parse_args([*argv, "--output-dir", str(out)]))
    import torch
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["args"]
    again = pretrain.resolve_args(pretrain.build_parser().parse_args(["--config-file", str(out / "run.toml")]),
                                  pretrain.load_config(config))
    flags = again.names("identity", "saved")  # what the run computes (global batch...) is not a flag
    assert {k: again.get(k) for k in flags} == {k: saved[k] for k in flags}


def test_distributed_refuses_an_old_checkpoint_folder_in_one_line(tmp_path):
    """rso.train.distributed wrote torch.distributed.checkpoint folders before the one format (checkpoint.pt)."""
    from rso.train import distributed
    from rso.train.checkpoint import CheckpointError
    (tmp_path / "checkpoints" / "step_2").mkdir(parents=True)
    c = RunConfig.from_namespace(distributed.build_parser().parse_args(["--output-dir", str(tmp_path), "--resume"]))
    with pytest.raises(CheckpointError, match=r"^--resume: .*checkpoints holds torch.distributed.checkpoint folders "
                                              r"of an older rso.train.distributed, which now writes checkpoint.pt; "):
        distributed.settle(c, 1, print)


def test_a_pretrain_checkpoint_resumes_under_distributed_and_back_only_where_the_batch_fits(tmp_path, capsys):
    """One checkpoint format: rso.train.pretrain's run, stopped, goes on under rso.train.distributed (one process:
    the same loop and data, so the same losses); a checkpoint whose global batch one process cannot keep (saved
    by more processes) is refused by rso.train.pretrain in one line, before any data is read."""
    import json

    import torch
    import torch.distributed as dist

    from rso.train import distributed
    config = write_micro_llama_config(tmp_path / "micro.json")
    base = ["--config", config, "--max-docs", "200", "--cache-dir", str(tmp_path / "cache"), "--eval-batches", "1",
            "--no-progress", "--threads", "1", "--method", "rso", "--rank", "4", "--tau", "2", "--max-steps", "4",
            "--log-every", "1", "--save-every", "2"]
    pretrain.run(pretrain.build_parser().parse_args([*base, "--output-dir", str(tmp_path / "full")]))
    part = tmp_path / "part"
    pretrain.run(pretrain.build_parser().parse_args([*base, "--output-dir", str(part), "--stop-after", "2"]))
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        resumed = distributed.run(distributed.build_parser().parse_args(
            ["--output-dir", str(part), "--resume", "--threads", "1", "--cache-dir", str(tmp_path / "cache")]))
    finally:
        dist.destroy_process_group()
    assert resumed["steps"] == 4 and resumed["world_size"] == 1

    def losses(folder):
        return [r["loss"] for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    assert len(losses(part)) == 4
    torch.testing.assert_close(torch.tensor(losses(part)), torch.tensor(losses(tmp_path / "full")), rtol=0, atol=0)
    ckpt = torch.load(part / "checkpoint.pt", weights_only=True)
    ckpt["args"].update(global_batch=2 * ckpt["args"]["global_batch"])  # as 2 processes of 4 rows each save it
    ckpt["world_size"] = 2
    torch.save(ckpt, part / "checkpoint.pt")
    capsys.readouterr()
    assert pretrain.main(["--output-dir", str(part), "--resume", "--max-steps", "6", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: the run's global batch is 8 sequences (saved by 2 processes of "
                          "rso.train.distributed); one process here takes 4 x 1: resume it with")
    assert err.count("\n") == 1

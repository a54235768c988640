"""Values that are accepted but do nothing, refused: a training flag given for a ``--method`` that does not read it
(every (method, flag) pair: applies or refused, parsing only), ``rso.train.distributed``'s flags for another
``--parallel`` / ``--dataset``, a fractional rank that rounds to 0 channels, the comparison runners passing their
``--rank`` / ``--tau`` only to the methods that read them, and ``python -m rso.memory --rank`` wider than the model."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json  # noqa: E402

import pytest  # noqa: E402

from rso.memory import cli as memory_cli  # noqa: E402
from rso.memory import estimate, fit  # noqa: E402
from rso.train import compare, compare_finetune, distributed, finetune, pretrain  # noqa: E402
from rso.train.loop import UsageError, check_rank, resume_args  # noqa: E402
from rso.train.methods import METHOD_OPTIONS, METHODS, OPTION_PURPOSE  # noqa: E402
from rso.train.models import load_config  # noqa: E402

METHOD_SPECS = ("adamw", "galore", "golore", "golore@20", "rso", "lora")
SUBSPACE = ("galore", "golore", "golore@20", "rso")
#: flag (with a value) -> the methods that read it: the specification, written out here apart from the code's table
APPLIES = {("--rank", "8"): SUBSPACE + ("lora",), ("--tau", "5"): SUBSPACE, ("--scale", "2"): SUBSPACE + ("lora",),
           ("--scale", "1.0"): SUBSPACE + ("lora",),  # the default value, given explicitly: still refused
           ("--projection", "svd"): ("rso",), ("--projection", "stiefel"): ("rso",),
           ("--subspace-state", "keep"): SUBSPACE, ("--share-projections",): ("rso",),
           ("--no-share-projections",): ("rso",)}
FINETUNE_ONLY = {("--freeze-embeddings",): ("adamw",) + SUBSPACE, ("--no-freeze-embeddings",): ("adamw",) + SUBSPACE}
#: flags every method reads
EVERY_METHOD = [("--lr", "1e-3"), ("--weight-decay", "0.1"), ("--optimizer", "adamw"), ("--optimizer-args", "{}"),
                ("--seed", "3"), ("--activation-checkpointing",)]


def _listed(methods) -> str:
    """The methods as a refusal lists them (``golore@X`` for any golore@N), in the order of ``METHOD_SPECS``."""
    return ", ".join(m.replace("golore@20", "golore@X") for m in METHOD_SPECS if m in methods)


def _pairs(flags):
    return [(method, flag, method in methods) for flag, methods in flags.items() for method in METHOD_SPECS]


def _pair_id(value):
    return " ".join(value) if isinstance(value, tuple) else str(value)


def _check_pair(parser, method, flag, applies):
    argv = ["--method", method, *flag]
    if applies:
        parser.parse_args(argv)
        return
    with pytest.raises(UsageError) as refused:
        parser.parse_args(argv)
    message = str(refused.value)
    assert message.startswith(flag[0] + " ") and "\n" not in message, message
    assert f"not to {method}" in message or f"; {method} has none to set" in message, message
    assert f"({_listed(APPLIES.get(flag) or FINETUNE_ONLY[flag])})" in message or \
        f"--method {_listed(APPLIES.get(flag) or FINETUNE_ONLY[flag])} only" in message, message


@pytest.mark.parametrize("method,flag,applies", _pairs(APPLIES), ids=_pair_id)
@pytest.mark.parametrize("entry", [pretrain, finetune, distributed], ids=["pretrain", "finetune", "distributed"])
def test_a_flag_is_accepted_by_the_methods_that_read_it_and_refused_by_the_others(entry, method, flag, applies):
    _check_pair(entry.build_parser(), method, flag, applies)


@pytest.mark.parametrize("method,flag,applies", _pairs(FINETUNE_ONLY), ids=_pair_id)
def test_freeze_embeddings_is_refused_for_lora_which_keeps_them_frozen(method, flag, applies):
    _check_pair(finetune.build_parser(), method, flag, applies)


@pytest.mark.parametrize("method", METHOD_SPECS)
def test_defaults_and_common_flags_are_accepted_by_every_method(method):
    for entry in (pretrain, finetune, distributed):
        entry.build_parser().parse_args(["--method", method])  # no flag given: the defaults never count
        entry.build_parser().parse_args(["--method", method, *(word for flag in EVERY_METHOD for word in flag)])


def test_the_table_has_a_row_for_every_method_and_only_parser_options():
    assert set(METHOD_OPTIONS) == set(METHODS)
    dests = {a.dest for p in (pretrain.build_parser(), finetune.build_parser()) for a in p._actions}
    options = {option for row in METHOD_OPTIONS.values() for option in row}
    assert options <= dests and options == set(OPTION_PURPOSE)


def test_a_refusal_is_one_line_with_status_2_before_any_data(monkeypatch, tmp_path, capsys):
    def touched(*args, **kwargs):
        raise AssertionError("data was touched before the arguments were checked")

    monkeypatch.setattr(pretrain, "build_pretraining_data", touched)
    assert pretrain.main(["--method", "adamw", "--rank", "8", "--output-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("error: --rank 8 is for --method galore, golore, golore@X, rso, lora only (the "
                                       "rank of a subspace or adapter); adamw has none to set: leave it out\n")
    assert not any(tmp_path.iterdir())


def test_resume_checks_the_given_flags_against_the_saved_method():
    """With ``--resume`` and no ``--method``, parsing assumes the default (rso); the saved run's method decides."""
    from rso.train.config import RunConfig
    args = RunConfig.from_namespace(pretrain.build_parser().parse_args(["--resume", "--rank", "64"]))
    saved = {"method": "adamw", "rank": 64, "max_steps": 10}
    with pytest.raises(UsageError, match=r"^--rank 64 is for --method .* only .*; adamw has none to set"):
        resume_args(args, saved, 5, log=lambda line: None)
    args = RunConfig.from_namespace(pretrain.build_parser().parse_args(["--resume", "--rank", "64"]))
    resume_args(args, {**saved, "method": "rso"}, 5, log=lambda line: None)
    assert args.rso.method == "rso" and args.rso.rank == 64


@pytest.mark.parametrize("argv,message", [
    (["--parallel", "ddp", "--reshard-after-forward", "0"], "--reshard-after-forward is for --parallel fsdp only"),
    (["--parallel", "fsdp", "--method", "golore@20"], "--method golore@20 projects whole weight gradients"),
    (["--parallel", "fsdp", "--method", "galore"], "--method galore projects whole weight gradients"),
    (["--parallel", "fsdp", "--quantize", "nf4"], "--quantize nf4: FSDP2 does not shard a quantized base"),
    (["--parallel", "fsdp", "--method", "lora", "--quantize", "int8"], "--quantize int8: FSDP2 does not shard"),
    (["--requantize", "stochastic"], "--requantize stochastic rounds a quantized W₀ at each merge: give --quantize"),
    (["--method", "lora", "--quantize", "nf4", "--requantize", "nearest"], "--requantize nearest is for --method rso only"),
    (["--synthetic-tokens", "4000"], "--synthetic-tokens is for --dataset synthetic only; --dataset embedded"),
    (["--resume", "--dataset", "c4", "--synthetic-tokens", "4000"], "--synthetic-tokens is for --dataset synthetic")])
def test_distributed_flags_for_another_parallel_or_dataset_are_refused(argv, message):
    with pytest.raises(UsageError, match="^" + message.replace("(", r"\(")):
        distributed.build_parser().parse_args(argv)


def test_distributed_flags_where_they_apply_are_accepted():
    parse = distributed.build_parser().parse_args
    assert parse(["--parallel", "fsdp", "--reshard-after-forward", "0"]).reshard_after_forward == 0
    assert parse(["--dataset", "synthetic", "--synthetic-tokens", "4000"]).synthetic_tokens == 4000
    assert parse(["--resume", "--synthetic-tokens", "4000"]).synthetic_tokens == 4000  # the saved dataset decides


def test_a_fractional_rank_that_rounds_to_no_channel_is_refused():
    cfg = load_config("tiny")  # hidden 256: 0.001 · 256 = 0.256 channels
    args = pretrain.build_parser().parse_args(["--rank", "0.001"])
    with pytest.raises(UsageError, match=r"^--rank 0.001 gives the model's 256 → 256 linear layers 0.256 channels, "
                                         r"which rounds to 0; give a fraction ≥ 0.0039"):
        check_rank(args, cfg)
    check_rank(pretrain.build_parser().parse_args(["--rank", "0.004"]), cfg)  # 1.02 channels: rank 1


def test_pretrain_comparison_passes_rank_and_tau_only_to_the_methods_that_read_them(tmp_path):
    args = type("Args", (), dict(config="tiny", max_steps=3, rank=8, tau=5, lr=None, threads_per_job=None))
    commands = {m: compare.command(compare.parse_entry(m), 0, args, [], tmp_path) for m in METHOD_SPECS}
    for method, cmd in commands.items():
        assert ("--rank" in cmd) == (method != "adamw") and ("--tau" in cmd) == (method in SUBSPACE), (method, cmd)
        pretrain.build_parser().parse_args(cmd[3:])  # every run's command line is one pretrain accepts


def test_pretrain_comparison_refuses_an_entry_flag_its_method_does_not_read(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        compare.main(["--methods", "rso,adamw:svd", "--output-dir", str(tmp_path / "x")])
    assert e.value.code == 2
    assert "error: --methods entry 'adamw-svd': --projection svd is for --method rso only" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_finetune_comparison_passes_its_rank_tau_scale_only_to_the_methods_that_read_them():
    args = compare_finetune.build_parser().parse_args(["--rank", "8", "--tau", "5", "--scale", "2"])
    for method in METHOD_SPECS:
        entry = compare_finetune.parse_ft_entry(method, [1.0])
        cmd = compare_finetune.job_command(entry, 1e-3, 0, args, [], "x")
        flags = {flag for flag in ("--rank", "--tau", "--scale") if flag in cmd}
        expected = {"adamw": set(), "lora": {"--rank", "--scale"}}.get(method, {"--rank", "--tau", "--scale"})
        assert flags == expected, (method, cmd)
        finetune.build_parser().parse_args(cmd[3:])


@pytest.mark.parametrize("methods,message", [
    ("adamw[rank=8]", "--methods entry 'adamw[rank=8]': --rank 8 is for --method galore, golore, golore@X, rso, lora"),
    ("lora[tau=5]", "--methods entry 'lora[tau=5]': --tau 5 is for --method galore, golore, golore@X, rso only"),
    ("lora[embeddings=frozen]",
     "--methods entry 'lora[embeddings=frozen]': --freeze-embeddings is for --method adamw")])
def test_finetune_comparison_refuses_an_entry_option_its_method_does_not_read(methods, message, tmp_path, capsys):
    def spawn(*a, **k):
        raise AssertionError("a run started")

    assert compare_finetune.main(["--methods", methods, "--output-dir", str(tmp_path / "x")], spawn=spawn) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + message) and err.count("\n") == 1, err


# ----------------------------------------------------------------------------- python -m rso.memory --rank
def _memory(capsys, *argv):
    code = memory_cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err


@pytest.mark.parametrize("argv,message", [
    (["--model", "llama-tiny", "--rank", "257"], "--rank 257 gives q_proj (256 → 256) rank 257, more than its smaller "
     "dimension 256; the widest rank this config allows is 256, or a fraction of in_features up to 0.372"),
    (["--model", "llama-7b", "--method", "all", "--rank", "0.5"],
     "--rank 0.5 gives down_proj (11008 → 4096) rank 5504"),
    (["--model", "llama-tiny", "--method", "galore", "--rank", "300"], "--rank 300 gives q_proj (256 → 256) rank 300"),
    (["--model", "llama-tiny", "--fit", "24GB", "--rank", "64,300"], "--rank 300 gives q_proj (256 → 256) rank 300"),
    (["--model", "llama-tiny", "--method", "adamw", "--rank", "8"], "--rank: adamw has no rank (it is for galore, "
     "rso, lora): leave it out"),
    (["--model", "llama-tiny", "--fit", "24GB", "--method", "adamw", "--rank", "8"], "--rank: adamw has no rank")])
def test_memory_rank_wider_than_the_model_or_for_a_method_without_one_is_refused(argv, message, capsys):
    code, err = _memory(capsys, *argv)
    assert code == 2 and err.startswith("error: " + message) and err.count("\n") == 1, err


def test_memory_rank_up_to_the_widest_is_estimated(capsys):
    code, err = _memory(capsys, "--model", "llama-tiny", "--rank", "256", "--seq", "64", "--json")
    assert (code, err) == (0, "")
    assert estimate("llama-tiny", method="rso", rank=0.372, seq=64)["rank"] == 0.372


@pytest.mark.parametrize("text", ["64.5", "nan", "inf", "0", "-3", "abc"])
def test_memory_rank_that_is_not_an_int_or_a_fraction_is_refused(text, capsys):
    with pytest.raises(SystemExit) as e:
        memory_cli.main(["--model", "llama-tiny", "--rank", text])
    assert e.value.code == 2
    assert f"--rank: give an int ≥ 1 or a fraction in (0, 1) of in_features, got '{text}'" in capsys.readouterr().err


def test_memory_api_refuses_what_rso_wrap_refuses_and_caps_galore_as_its_optimizer_does():
    for method in ("rso", "lora"):
        with pytest.raises(ValueError, match=r"^rso\.memory\.estimate: rank 257 gives q_proj .* allows is 256"):
            estimate("llama-tiny", method=method, rank=257, seq=8)
    with pytest.raises(ValueError, match=r"^rso\.memory\.fit: rank 257 gives q_proj"):
        fit("llama-tiny", "24GB", methods=["rso"], seqs=(8,), rank=257)
    assert estimate("llama-tiny", method="galore", rank=257, seq=8) == estimate("llama-tiny", method="galore",
                                                                                rank=256, seq=8) | {"rank": 257}
    narrow = dict(hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=1,
                  num_hidden_layers=1, vocab_size=64)  # k/v 64 → 8: hidden/4 = 16 would not fit
    assert estimate(narrow, method="rso", seq=8)["rank"] == 8


@pytest.mark.parametrize("key, flag", [("lr", "--lr"), ("weight_decay", "--weight-decay")])
def test_optimizer_args_may_not_set_what_has_a_flag_of_its_own(key, flag):
    """Before: '{"lr": 1}' trained at lr 1 while the run printed and recorded --lr's 0.003."""
    with pytest.raises(UsageError, match=rf"^--optimizer-args: sets {key} \(use {flag}\): those have flags of their own$"):
        pretrain.build_parser().parse_args(["--optimizer-args", json.dumps({key: 1.0})])

"""Pre-training pipeline: a few steps per method, exact resume, --resume's rules (extension, identity, saved
settings), atomic checkpoints, clear errors.

Everything runs offline (HF_HUB_OFFLINE=1) on a micro LLaMA built from a config, a 512-token BPE
trained on 200 documents of the embedded corpus, and a handful of steps.
"""
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from conftest import write_micro_llama_config  # noqa: E402
from rso.train import checkpoint as ckpt_mod  # noqa: E402
from rso.train.loop import UsageError  # noqa: E402
from rso.train.pretrain import build_parser, main, run  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    config = write_micro_llama_config(root / "micro.json")
    return {"config": config, "cache": str(root / "cache"), "root": root}


def _args(env, out, *extra):
    return build_parser().parse_args(
        ["--config", env["config"], "--max-docs", "200", "--cache-dir", env["cache"], "--output-dir", str(out),
         "--eval-batches", "2", "--no-progress", "--threads", "1", *extra])


METHODS = [("adamw", []), ("galore", []), ("golore", []), ("golore@20", []), ("rso", ["--projection", "stiefel"]),
           ("rso", ["--projection", "svd"]), ("rso", ["--projection", "hybrid"]), ("rso", ["--projection", "gaussian"]),
           ("lora", [])]


@pytest.mark.parametrize("method,extra", METHODS, ids=[m + "".join(e[1:]) for m, e in METHODS])
def test_few_steps_per_method(env, tmp_path, method, extra):
    tau = [] if method in ("adamw", "lora") else ["--tau", "2"]  # the methods that change subspace read it
    res = run(_args(env, tmp_path, "--method", method, "--max-steps", "4", *tau, *extra))
    assert res["steps"] == 4 and res["tokens"] == 4 * 4 * 16
    assert torch.isfinite(torch.tensor(res["final_eval_loss"]))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_ppl" in r for r in records) and any("tokens_per_s" in r for r in records)
    # It trains: the held-out loss (evaluated after every step here) falls at each step, by 0.0088-0.0120
    # from step 1 to 4 for these methods (measured), from about ln(512) = 6.24.
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 4 and all(b < a for a, b in zip(evals, evals[1:])), evals
    assert evals[-1] < evals[0] - 0.004 and res["final_eval_loss"] == evals[-1]
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "results.json").exists()


def test_rso_merges_every_tau_steps(env, tmp_path):
    import rso

    run(_args(env, tmp_path, "--method", "rso", "--max-steps", "5", "--tau", "2"))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
    cycles = {int(v) for k, v in state.items() if k.endswith(".cycle")}
    steps = {int(v) for k, v in state.items() if k.endswith(".step")}
    assert cycles == {2} and steps == {5}
    assert rso is not None


def test_subspace_state_sets_what_a_merge_does_to_the_optimizer_state(env, tmp_path):
    """--subspace-state reaches rso.wrap: after a merge at step 2, 'reset' restarts B's Adam state (its step
    count is 1 at step 3), 'keep' and 'project' carry it on (3), and 'project' maps the moments (they differ
    from 'keep''s); the policy is part of the run's identity."""
    states = {}
    for policy in ("reset", "keep", "project"):
        out = tmp_path / policy
        run(_args(env, out, "--method", "rso", "--max-steps", "3", "--tau", "2", "--subspace-state", policy))
        states[policy] = torch.load(out / "checkpoint.pt", weights_only=False)["optimizer"]["state"]
    steps = {policy: sorted({int(s["step"]) for s in state.values()}) for policy, state in states.items()}
    assert steps == {"reset": [1, 3], "keep": [3], "project": [3]}
    moved = [k for k, s in states["keep"].items() if not torch.equal(s["exp_avg"], states["project"][k]["exp_avg"])]
    restarted = [k for k, s in states["reset"].items() if int(s["step"]) == 1]
    assert sorted(moved) == sorted(restarted)  # exactly the Bs
    with pytest.raises(UsageError, match=r"--subspace-state: invalid choice: 'zero' \(choose from 'reset', 'keep', 'project'\)"):
        build_parser().parse_args(["--subspace-state", "zero"])
    base = ["--config", env["config"], "--max-docs", "200", "--eval-batches", "2", "--threads", "1"]
    assert _resume(env, tmp_path / "keep", *base, "--subspace-state", "reset") == 2


def test_subspace_state_reaches_the_galore_family_and_is_refused_elsewhere():
    import transformers

    from rso.train.methods import MethodError, MethodOptions, setup_method
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    for spec, default in (("galore", "keep"), ("golore", "keep"), ("golore@20", "keep")):
        for policy in (None, "reset", "project"):
            opts = MethodOptions(rank=4, tau=2, subspace_state=policy, total_steps=10)
            _, optimizer = setup_method(spec, transformers.LlamaForCausalLM(config), opts)
            assert optimizer.param_groups[0]["state_on_switch"] == (policy or default), (spec, policy)
    for spec in ("adamw", "lora"):
        with pytest.raises(MethodError, match=rf"--subspace-state keep applies to the subspace methods "
                                              rf"\(galore, golore, golore@X, rso\), not to {spec}"):
            setup_method(spec, transformers.LlamaForCausalLM(config), MethodOptions(rank=4, subspace_state="keep"))
    with pytest.raises(UsageError, match=r"^--subspace-state project applies to the subspace methods .*, not to lora$"):
        build_parser().parse_args(["--method", "lora", "--subspace-state", "project"])  # before any loading


def test_no_share_projections_gives_each_sibling_layer_its_own_projection(env, tmp_path):
    """--no-share-projections reaches rso.wrap: with svd, q/k/v (and gate/up) each get P from their own gradient,
    where by default the siblings share one P; it is part of the run's identity and refused for other methods."""
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")

    def projections(out, *extra):  # the checkpoint holds a shared P once, under its group's first layer
        run(_args(env, out, "--method", "rso", "--projection", "svd", "--max-steps", "2", "--tau", "2", *extra))
        state = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
        return {name: state.get(f"model.layers.0.{name}.P") for name in names}
    shared, own = projections(tmp_path / "shared"), projections(tmp_path / "own", "--no-share-projections")
    assert [name for name in names if shared[name] is not None] == ["self_attn.q_proj", "mlp.gate_proj"]
    assert all(own[name] is not None for name in names)
    assert not any(torch.equal(own[a], own[b]) for a, b in ((names[0], names[1]), (names[0], names[2]),
                                                             (names[1], names[2]), (names[3], names[4])))
    base = ["--config", env["config"], "--max-docs", "200", "--eval-batches", "2", "--threads", "1"]
    assert _resume(env, tmp_path / "own", *base, "--share-projections") == 2
    with pytest.raises(UsageError, match=r"^--no-share-projections is for --method rso only .*; galore has none"):
        build_parser().parse_args(["--method", "galore", "--no-share-projections"])


def _model_state(path):
    return torch.load(path, weights_only=False)["model"]


@pytest.mark.parametrize("method,extra", [("adamw", []), ("rso", ["--projection", "stiefel"]),
                                          ("rso", ["--projection", "svd"]), ("galore", []),
                                          ("rso", ["--quantize", "nf4"]), ("rso", ["--quantize", "int8"]),
                                          ("rso", ["--quantize", "nf4", "--requantize", "stochastic+feedback"])])
def test_resume_continues_identically(env, tmp_path, method, extra):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--method", method, "--max-steps", "6", *([] if method == "adamw" else ["--tau", "2"]), "--save-every",
              "3", "--eval-every", "3", "--log-every", "2", "--grad-accum", "2", *extra]
    run(_args(env, straight, *common))
    assert run(_args(env, split, *common, "--stop-after", "3")) == {"stopped_at": 3}
    run(build_parser().parse_args(["--output-dir", str(split), "--resume", "--no-progress", "--cache-dir", env["cache"]]))

    def losses(folder):
        return [(r["step"], r.get("loss"), r.get("eval_loss"))
                for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())]

    assert losses(straight) == losses(split)
    a, b = _model_state(straight / "checkpoint.pt"), _model_state(split / "checkpoint.pt")
    assert a.keys() == b.keys()
    if "--quantize" in extra:  # the run wrapped with a quantized W₀: bitsandbytes' keys in the checkpoint
        assert any(k.endswith((".weight.absmax", ".SCB")) for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("argv, expected", [(["--quantize", "nf4"], "nearest"),
                                            (["--quantize", "int8", "--requantize", "stochastic+feedback"],
                                             "stochastic+feedback")])
def test_requantize_reaches_the_wrapped_model(argv, expected):
    """``--requantize`` is rso.wrap's ``requantize`` (its default when not given)."""
    import rso
    from transformers import LlamaConfig, LlamaForCausalLM
    from rso.train.config import RunConfig
    from rso.train.loop import method_options
    from rso.train.methods import setup_method

    c = RunConfig.from_namespace(build_parser().parse_args(["--rank", "4", "--tau", "2", "--lr", "1e-3", *argv]))
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4))
    model, _ = setup_method("rso", model, method_options(c))
    assert rso.get_config(model).requantize == expected and rso.get_config(model).quantize == argv[1]


def test_a_new_run_never_overwrites_an_earlier_runs_checkpoint(env, tmp_path, capsys):
    out = tmp_path / "run"
    run(_args(env, out, "--method", "rso", "--max-steps", "2", "--tau", "2"))
    saved = (out / "checkpoint.pt").read_bytes()
    err = _error(capsys, *map(str, ["--config", env["config"], "--output-dir", out, "--cache-dir", env["cache"],
                                    "--no-progress", "--max-steps", "1"]))
    assert "holds the checkpoint of an earlier run, which this run would overwrite: --resume continues it" in err
    assert (out / "checkpoint.pt").read_bytes() == saved


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    ckpt_mod.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def broken_save(obj, f, *a, **k):
        f.write(b"partial bytes of a checkpoint")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt_mod.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert ckpt_mod.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left behind


def test_torch_optimizer_by_name(env, tmp_path, monkeypatch):
    import torch_optimizer
    calls = []
    step = torch_optimizer.Lamb.step
    monkeypatch.setattr(torch_optimizer.Lamb, "step", lambda self, *a, **k: calls.append(1) or step(self, *a, **k))
    res = run(_args(env, tmp_path, "--method", "rso", "--optimizer", "lamb", "--max-steps", "2"))
    assert res["steps"] == 2 and len(calls) == 2  # the steps were LAMB's


def _error(capsys, *argv):
    assert main(list(argv)) == 2
    return capsys.readouterr().err


def test_clear_errors(env, tmp_path, capsys):
    base = ["--config", env["config"], "--output-dir", str(tmp_path / "o"), "--cache-dir", env["cache"],
            "--no-progress"]
    assert "does not exist" in _error(capsys, *base, "--dataset", str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "corrupt.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    err = _error(capsys, *base, "--dataset", str(bad))
    assert "corrupt.jsonl, line 2: not valid JSON" in err
    assert "unknown method 'sgdx'" in _error(capsys, *base, "--method", "sgdx")
    assert "golore@X" in _error(capsys, *base, "--method", "nope")
    err = _error(capsys, "--config", "13b", "--output-dir", str(tmp_path / "o"))
    assert "unknown config '13b'" in err and "tiny" in err and "60m" in err
    assert "does not exist" in _error(capsys, "--config", str(tmp_path / "nope.json"))
    assert "unknown optimizer 'adamx'" in _error(capsys, *base, "--optimizer", "adamx", "--max-docs", "50",
                                                 "--max-steps", "1")
    assert "no checkpoint" in _error(capsys, "--output-dir", str(tmp_path / "empty"), "--resume")
    assert "unknown dataset" in _error(capsys, *base, "--dataset", "wikipedia")


#: Only a guard against a hung child: the run takes about 15 s on an idle 2-core machine, and several times
#: that when the machine is busy (imports and tokenizing dominate), so no tighter bound holds under load.
HANG_TIMEOUT_S = 1800


def test_offline_default_cli(env, tmp_path):
    """The console entry point on the embedded default corpus, in a fresh process, with HF_HUB_OFFLINE=1."""
    env_vars = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": REPO}
    try:
        out = subprocess.run(
            [sys.executable, "-m", "rso.train.pretrain", "--config", env["config"], "--method", "rso", "--rank", "8",
             "--tau", "2", "--max-steps", "3", "--max-docs", "200", "--eval-batches", "2", "--cache-dir",
             env["cache"], "--output-dir", str(tmp_path), "--no-progress", "--threads", "1"],
            cwd=REPO, env=env_vars, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"rso.train.pretrain hung for {HANG_TIMEOUT_S} s; stderr tail: {(e.stderr or b'')[-2000:]!r}")
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["steps"] == 3 and res["method"] == "rso"
    # what it prints is the run's result, and the files it names exist
    assert (f"final eval loss {res['final_eval_loss']:.4f}, perplexity {res['final_eval_ppl']:.2f} after 3 steps"
            in out.stdout), out.stdout
    assert f"plot: {res['plot']}" in out.stdout and f"metrics: {res['metrics']}" in out.stdout
    assert os.path.getsize(res["plot"]) > 1000 and os.path.getsize(res["metrics"]) > 0


def test_compile_flag_trains_the_same_run(env, tmp_path, monkeypatch):
    # aot_eager: Dynamo + AOTAutograd without a C++ compiler; the flag itself picks the default (inductor)
    compiled_with = []
    real = torch.compile

    def aot_eager(model, **kw):
        compiled_with.append(type(model).__name__)
        return real(model, backend="aot_eager")

    eager = run(_args(env, tmp_path / "eager", "--method", "rso", "--max-steps", "3", "--tau", "2"))
    monkeypatch.setattr(torch, "compile", aot_eager)
    torch._dynamo.reset()
    compiled = run(_args(env, tmp_path / "compiled", "--method", "rso", "--max-steps", "3", "--tau", "2", "--compile"))
    assert compiled_with == ["LlamaForCausalLM"]
    assert compiled["final_eval_loss"] == pytest.approx(eager["final_eval_loss"], rel=1e-5)


# ----------------------------------------------------------------------------- --resume: length, identity, settings
def _resume(env, out, *extra):
    return main(["--output-dir", str(out), "--resume", "--no-progress", "--cache-dir", env["cache"], *extra])


def _lrs(out):
    return {r["step"]: r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "lr" in r}


def test_resume_with_a_larger_max_steps_extends_the_run(env, tmp_path, capsys, monkeypatch):
    from rso.train import pretrain
    from rso.train.schedule import CosineWithWarmup

    run(_args(env, tmp_path, "--method", "rso", "--projection", "hybrid", "--max-steps", "4", "--log-every", "1"))
    capsys.readouterr()
    switch_lengths, setup = [], pretrain.setup_method
    monkeypatch.setattr(pretrain, "setup_method",
                        lambda spec, model, opts: switch_lengths.append(opts.total_steps) or setup(spec, model, opts))
    assert _resume(env, tmp_path, "--max-steps", "8", "--stop-after", "1") == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "steps; the cosine" in line]
    assert lines == ["--resume: the run extends from 4 to 8 steps; the cosine LR schedule is rebuilt for 8 steps: "
                     "LR at step 4 0.0003 on the old schedule, 0.00165 on the new one; the switch from SVD to random "
                     "projections stays at step 3, placed in the original 4 steps"]
    assert _resume(env, tmp_path) == 0  # the new length is saved: a plain --resume goes on to step 8
    assert "the cosine LR schedule" not in capsys.readouterr().out
    assert switch_lengths == [4, 4]
    old, new = CosineWithWarmup(0, 4, 0.1), CosineWithWarmup(0, 8, 0.1)
    lrs = _lrs(tmp_path)
    assert list(lrs) == list(range(1, 9))
    assert [lrs[s] for s in range(1, 5)] == pytest.approx([3e-3 * old(s - 1) for s in range(1, 5)])
    assert [lrs[s] for s in range(5, 9)] == pytest.approx([3e-3 * new(s - 1) for s in range(5, 9)])
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert saved["step"] == 8 and saved["args"]["max_steps"] == 8 and saved["args"]["subspace_total_steps"] == 4


def test_resume_refuses_a_new_identity_and_keeps_saved_settings(env, tmp_path, capsys):
    base = ["--config", env["config"], "--max-docs", "200", "--eval-batches", "2", "--threads", "1"]
    run(_args(env, tmp_path, "--method", "rso", "--max-steps", "2"))
    capsys.readouterr()
    refused = {("--method", "adamw"): "--method adamw differs from the saved run's method 'rso'",
               ("--rank", "4"): "--rank 4 differs from the saved run's rank 8",
               ("--seq-len", "8"): "--seq-len 8 differs from the saved run's seq_len 16",
               ("--max-docs", "100"): "--max-docs 100 differs from the saved run's max_docs 200",
               ("--max-steps", "1"): "--max-steps 1 is below the saved run's step 2"}
    for flag, message in refused.items():
        assert _resume(env, tmp_path, *base, *flag) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message} (") and err.count("\n") == 1, err
    assert _resume(env, tmp_path, *base, "--method", "RSO", "--rank", "8", "--lr", "0.1", "--warmup", "1") == 0
    out = capsys.readouterr().out
    assert out.count("--resume: continuing at step 2 with the saved settings: config ") == 1
    assert "--resume: the saved settings win over --lr 0.1 (kept 0.003), --warmup 1 (kept 0)\n" in out
    assert "cosine" not in out and "after 2 steps" in out


def test_tiny_default_lr_is_the_sweeps_best_per_method():
    """``tiny``'s lr per method family (its ``training.lr`` mapping): AdamW 2e-3 and the subspace methods 3e-3,
    the 300-step sweep's best (docs/training.md); ``--lr`` wins; a plain number applies to every method."""
    from rso.train.models import load_config
    from rso.train.pretrain import resolve_args

    cfg = load_config("tiny")
    for method, lr in (("adamw", 2e-3), ("rso", 3e-3), ("galore", 3e-3), ("golore@20", 3e-3), ("lora", 3e-3)):
        assert resolve_args(build_parser().parse_args(["--method", method]), cfg).optimizer.lr == lr, method
    assert resolve_args(build_parser().parse_args(["--method", "adamw", "--lr", "5e-4"]), cfg).optimizer.lr == 5e-4
    flat = {**cfg, "training": {**cfg["training"], "lr": 1e-3}}
    assert resolve_args(build_parser().parse_args(["--method", "adamw"]), flat).optimizer.lr == 1e-3

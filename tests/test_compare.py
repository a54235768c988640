"""The comparison runners: the shared job runner (pinned processes, failures, follow-up jobs), the
fine-tuning runner (methods × LRs × seeds; the LR chosen on the validation split, never the held-out set), and
the pre-training runner (methods × seeds, mean ± std; an interrupted comparison resumed from its checkpoints)."""
import contextlib
import importlib
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from rso.train import compare_finetune as cf  # noqa: E402
from rso.train import finetune  # noqa: E402
from rso.train.compare import run_jobs  # noqa: E402
from rso.train.finetune import command_settings  # noqa: E402


class InProcess:
    """``subprocess.Popen`` for ``python -m <module> ...``, run in this process (the imports are warm): the
    runner's scheduling, results and tables are the same, without a new interpreter per run."""

    def __init__(self, cmd, stdout, stderr):
        cmd = cmd[cmd.index(sys.executable):]  # without taskset
        module = importlib.import_module(cmd[cmd.index("-m") + 1])
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stdout):
            self.returncode = module.main(cmd[cmd.index("-m") + 2:])

    def poll(self):
        return self.returncode


def test_run_jobs_pins_reports_failures_and_queues_follow_ups(tmp_path):
    def job(name, code):
        return {"name": name, "output": tmp_path / name,
                "cmd": [sys.executable, "-c", f"import json, os, pathlib; {code}"]}

    write = ("p = pathlib.Path({!r}); p.mkdir(); "
             "(p / 'results.json').write_text(json.dumps({{'cores': sorted(os.sched_getaffinity(0))}}))")
    first = [job("a", write.format(str(tmp_path / "a"))), job("bad", "print('boom'); raise SystemExit(3)")]
    follow = job("c", write.format(str(tmp_path / "c")))
    done = run_jobs(first, tmp_path, n_jobs=2, threads_per_job=1, poll_s=0.05,
                    on_done=lambda j: [follow] if j["name"] == "a" else [])
    by = {j["name"]: j for j in done}
    assert set(by) == {"a", "bad", "c"}
    assert by["bad"]["error"] == "exit 3: boom" and "error" not in by["a"] and "error" not in by["c"]
    if (os.cpu_count() or 1) >= 2 and len(os.sched_getaffinity(0)) >= 2:
        assert len(by["a"]["cores"]) == 1 and len(by["c"]["cores"]) == 1  # taskset: one core per slot
    assert by["a"]["command"].startswith("python -c ") and (tmp_path / "bad.log").read_text() == "boom\n"


def _sweep_run(lr, val, held_out, seed=0, higher=True):
    key = "accuracy" if higher else "loss"
    return {"run_lr": lr, "run_seed": seed,
            "headline": {"metric": key, "higher_is_better": higher, "eval_key": f"final_{'eval_' if not higher else ''}{key}",
                         "val_key": f"final_val_{key}"},
            f"final_val_{key}": val, f"final_{'eval_' if not higher else ''}{key}": held_out}


def test_lr_choice_reads_only_the_validation_split():
    # the held-out set prefers 1e-3, the validation split 3e-4: the validation split decides
    runs = [_sweep_run(1e-4, 0.70, 0.75), _sweep_run(3e-4, 0.80, 0.70), _sweep_run(1e-3, 0.60, 0.90)]
    assert cf.choose_lr(runs) == 3e-4
    for r in runs:  # any held-out numbers: the same choice
        r["final_accuracy"] = 1.0 - r["final_accuracy"]
    assert cf.choose_lr(runs) == 3e-4
    # no validation metric: no choice (never a fall-back to the held-out metric)
    assert cf.choose_lr([{k: v for k, v in r.items() if k != "final_val_accuracy"} for r in runs]) is None
    # failed runs are passed over; a loss is minimised; ties go to the smaller LR
    assert cf.choose_lr([_sweep_run(1e-4, 0.5, 0.9), {**_sweep_run(1e-3, 0.9, 0.9), "error": "exit 1"}]) == 1e-4
    assert cf.choose_lr([_sweep_run(1e-4, 2.0, 1.0, higher=False), _sweep_run(1e-3, 1.5, 3.0, higher=False)]) == 1e-3
    assert cf.choose_lr([_sweep_run(1e-3, 0.8, 0.1), _sweep_run(1e-4, 0.8, 0.2)]) == 1e-4


class FakeFinetune:
    """A ``rso.train.finetune`` run that only writes its results (with the settings its command means, as the real
    one does, or ``ran_with``'s): validation accuracy peaks at lr 3e-4, held-out accuracy at 1e-3 (and differs
    by seed). ``evaluations[seed]``, where given, is written to ``metrics.jsonl`` as (step, val, held-out) rows."""

    calls, resumed, ran_with, evaluations = [], [], {}, {}

    def __init__(self, cmd, stdout, stderr):
        args = cmd[cmd.index("-m") + 2:]
        value = {k: args[args.index(k) + 1] for k in ("--lr", "--seed", "--output-dir", "--method")}
        lr, seed = float(value["--lr"]), int(value["--seed"])
        FakeFinetune.calls.append((value["--method"], lr, seed))
        if "--resume" in args:
            FakeFinetune.resumed.append((value["--method"], lr, seed))
        out = os.path.join(value["--output-dir"])
        os.makedirs(out, exist_ok=True)
        results = {"model": "fake", "eval_split": "held-out", "train_examples": 40, "val_examples": 8,
                   "eval_examples": 24, **command_settings(args), **FakeFinetune.ran_with, "trainable_params": 1000,
                   "peak_rss_mb": 100.0 + seed, "median_step_s": 0.1, "final_eval_loss": 0.5,
                   "headline": {"metric": "accuracy", "higher_is_better": True, "eval_key": "final_accuracy",
                                "val_key": "final_val_accuracy"},
                   "final_val_accuracy": {1e-4: 0.6, 3e-4: 0.8, 1e-3: 0.5}[lr],
                   "final_accuracy": {1e-4: 0.6, 3e-4: 0.7, 1e-3: 0.9}[lr] + 0.1 * seed}
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f)
        if seed in FakeFinetune.evaluations:
            with open(os.path.join(out, "metrics.jsonl"), "w") as f:
                for step, val, held_out in FakeFinetune.evaluations[seed]:
                    f.write(json.dumps({"step": step, "loss": 0.5}) + "\n")  # a training row: no evaluation
                    f.write(json.dumps({"step": step, "accuracy": held_out, "val_accuracy": val}) + "\n")
        self.returncode = 0

    def poll(self):
        return 0


def test_runner_sweeps_with_the_first_seed_then_runs_the_others_at_the_validation_choice(tmp_path):
    FakeFinetune.calls = []
    out = tmp_path / "cmp"
    assert cf.main(["--methods", "rso=1e-4/3e-4/1e-3,adamw=1e-4", "--seeds", "0,1,2", "--val-from-train", "8",
                    "--model", "tiny-bert", "--output-dir", str(out), "--", "--max-steps", "2"], spawn=FakeFinetune) == 0
    assert sorted(FakeFinetune.calls) == sorted([("rso", 1e-4, 0), ("rso", 3e-4, 0), ("rso", 1e-3, 0),
                                                 ("rso", 3e-4, 1), ("rso", 3e-4, 2),
                                                 ("adamw", 1e-4, 0), ("adamw", 1e-4, 1), ("adamw", 1e-4, 2)])
    rows = {r["name"]: r for r in json.loads((out / "table.json").read_text())["methods"]}
    rso = rows["rso"]
    assert rso["chosen_lr"] == 3e-4 and rso["seeds"] == [0, 1, 2]  # not 1e-3, the held-out set's best
    assert rso["values"] == pytest.approx([0.7, 0.8, 0.9]) and rso["mean"] == pytest.approx(0.8)
    assert rso["std"] == pytest.approx(0.1) and rso["val_at_chosen"] == 0.8 and rso["peak_memory_mb"] == 102.0
    assert [s["val_metric"] for s in rso["sweep"]] == [0.6, 0.8, 0.5]
    assert rows["adamw"]["chosen_lr"] == 1e-4 and not rows["adamw"]["swept"] and rows["adamw"]["sweep"] == []
    text = (out / "table.md").read_text()
    assert "| rso (stiefel) | 64 | 0.0003 of 0.0001/0.0003/0.001 | 80.00% | 80.00 ± 10.00% |" in text
    sweep_table = text[text.index("LR sweep"):text.index("Command:")]
    assert "**0.0003**" in sweep_table and "90.00" not in sweep_table  # the sweep shows validation numbers only
    assert f"LR sweep plot: {out / 'sweep.png'}" in text and (out / "sweep.png").stat().st_size > 10_000


def test_an_entry_with_seeds_n_runs_only_the_first_n_seeds(tmp_path):
    FakeFinetune.calls = []
    out = tmp_path / "cmp"
    assert cf.main(["--methods", "rso[seeds=1]=1e-4/3e-4/1e-3,adamw[seeds=2]=1e-4", "--seeds", "0,1,2",
                    "--val-from-train", "8", "--model", "tiny-bert", "--output-dir", str(out), "--", "--max-steps", "2"],
                   spawn=FakeFinetune) == 0
    assert sorted(FakeFinetune.calls) == sorted([("rso", 1e-4, 0), ("rso", 3e-4, 0), ("rso", 1e-3, 0),
                                                 ("adamw", 1e-4, 0), ("adamw", 1e-4, 1)])
    rows = {r["name"]: r for r in json.loads((out / "table.json").read_text())["methods"]}
    assert rows["rso"]["chosen_lr"] == 3e-4 and rows["rso"]["seeds"] == [0] and rows["rso"]["std"] is None
    assert rows["adamw"]["seeds"] == [0, 1] and rows["adamw"]["mean"] == pytest.approx(0.65)
    assert "| rso (stiefel) | 64 | 0.0003 of 0.0001/0.0003/0.001 | 80.00% | 70.00% | 0.5000 | 1 |" in \
        (out / "table.md").read_text()


def test_early_stopping_reports_each_seeds_evaluation_with_the_best_validation_metric(tmp_path):
    # seed 0: validation best at step 2 (held-out there 0.55, not its best 0.9); seed 1: a tie, the earlier wins
    FakeFinetune.calls, FakeFinetune.evaluations = [], {0: [(2, 0.9, 0.55), (4, 0.7, 0.9), (6, 0.8, 0.6)],
                                                        1: [(2, 0.6, 0.5), (4, 0.8, 0.65), (6, 0.8, 0.95)]}
    out = tmp_path / "cmp"
    try:
        assert cf.main(["--methods", "rso=1e-4/3e-4/1e-3", "--seeds", "0,1", "--val-from-train", "8", "--model",
                        "tiny-bert", "--output-dir", str(out), "--", "--max-steps", "6"], spawn=FakeFinetune) == 0
    finally:
        FakeFinetune.evaluations = {}
    row = json.loads((out / "table.json").read_text())["methods"][0]
    assert row["chosen_lr"] == 3e-4  # the lr is chosen as before: the final validation metric
    stop = row["early_stop"]
    assert stop["values"] == [0.55, 0.65] and stop["steps"] == [2, 4] and stop["evaluations"] == 3
    assert stop["mean"] == pytest.approx(0.6) and stop["std"] == pytest.approx(0.0707107, abs=1e-6)
    text = (out / "table.md").read_text()
    assert "| rso (stiefel) | 60.00 ± 7.07% | 55.00% (2), 65.00% (4) |" in text
    # one evaluation per run: nothing to stop early on, no section
    FakeFinetune.evaluations = {0: [(6, 0.8, 0.6)], 1: [(6, 0.8, 0.7)]}
    try:
        assert cf.main(["--methods", "rso=3e-4", "--seeds", "0,1", "--val-from-train", "8", "--model",
                        "tiny-bert", "--output-dir", str(tmp_path / "one"), "--", "--max-steps", "6"],
                       spawn=FakeFinetune) == 0
    finally:
        FakeFinetune.evaluations = {}
    one = (tmp_path / "one" / "table.md").read_text()
    assert "Early stopping" not in one
    assert "LR sweep" not in one  # one given lr: nothing was swept, no empty sweep table


def test_sweep_plot_draws_validation_metric_against_lr_and_rings_the_choice(tmp_path, monkeypatch):
    import matplotlib.axes
    from rso.train.metrics import plot_sweep
    drawn = []
    plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, x, y, *a, **k:
                        drawn.append((list(x), list(y))) or plot(self, x, y, *a, **k))
    rows = [{"label": "rso", "chosen_lr": 3e-4, "sweep": [{"lr": 1e-4, "val_metric": 0.6}, {"lr": 3e-4, "val_metric": 0.8},
                                                          {"lr": 1e-3, "val_metric": None, "error": "crashed"}]},
            {"label": "adamw", "chosen_lr": 1e-4, "sweep": []}]
    assert plot_sweep(rows, tmp_path / "s.png", "accuracy") == tmp_path / "s.png"
    assert drawn == [([1e-4, 3e-4], [0.6, 0.8]), ([3e-4], [0.8])]  # the failed lr left out; one ring, on the choice
    assert plot_sweep(rows[1:], tmp_path / "none.png", "accuracy") is None and not (tmp_path / "none.png").exists()


def test_resume_reads_the_finished_runs_and_runs_the_rest(tmp_path):
    out = tmp_path / "cmp"
    argv = ["--methods", "rso=1e-4/3e-4/1e-3", "--seeds", "0,1", "--val-from-train", "8", "--model", "tiny-bert",
            "--output-dir", str(out), "--", "--max-steps", "2"]
    FakeFinetune.calls = []
    assert cf.main(argv, spawn=FakeFinetune) == 0
    first = json.loads((out / "table.json").read_text())["methods"][0]
    # an interrupted comparison: one sweep run never started, the seed-1 run stopped after a checkpoint
    (out / "rso_lr0.001_s0" / "results.json").unlink()
    (out / "rso_lr0.001_s0").rmdir()
    (out / "rso_lr0.0003_s1" / "results.json").unlink()
    (out / "rso_lr0.0003_s1" / "checkpoint.pt").write_bytes(b"")
    (out / "rso_lr0.0001_s0.cmd").write_text("python -m rso.train.finetune --other-args")  # other arguments: rerun
    (out / "rso_lr0.0001_s0" / "checkpoint.pt").write_bytes(b"")  # ... from the start, though it has a checkpoint
    FakeFinetune.calls, FakeFinetune.resumed = [], []
    assert cf.main(["--resume", *argv], spawn=FakeFinetune) == 0
    assert sorted(FakeFinetune.calls) == [("rso", 1e-4, 0), ("rso", 3e-4, 1), ("rso", 1e-3, 0)]
    assert FakeFinetune.resumed == [("rso", 3e-4, 1)]  # continued from its checkpoint
    again = json.loads((out / "table.json").read_text())["methods"][0]
    assert again["chosen_lr"] == first["chosen_lr"] == 3e-4 and again["values"] == first["values"]
    assert [s["val_metric"] for s in again["sweep"]] == [0.6, 0.8, 0.5]
    FakeFinetune.calls = []
    assert cf.main(["--resume", *argv], spawn=FakeFinetune) == 0 and FakeFinetune.calls == []  # all finished: none run


def test_resume_reruns_a_finished_run_whose_settings_the_command_no_longer_means(tmp_path, monkeypatch):
    """The same command text under a changed default (here RSO's rank) means another run: --resume runs it
    again rather than reading its results; one continued from a checkpoint of other settings is a failure."""
    out = tmp_path / "cmp"
    argv = ["--methods", "rso=3e-4,adamw=1e-4", "--seeds", "0", "--val-from-train", "8", "--model", "tiny-bert",
            "--output-dir", str(out), "--", "--max-steps", "2"]
    FakeFinetune.calls = []
    assert cf.main(argv, spawn=FakeFinetune) == 0
    rank = json.loads((out / "rso_lr0.0003_s0" / "results.json").read_text())["rank"]
    assert rank == finetune.method_defaults("rotten_tomatoes", "rso").rank  # the real settings were written
    old = dict(finetune.DEFAULTS["classification"])
    monkeypatch.setitem(finetune.DEFAULTS, "classification", {**old, "rso": old["rso"]._replace(rank=rank // 2)})
    FakeFinetune.calls = []
    assert cf.main(["--resume", *argv], spawn=FakeFinetune) == 0
    assert FakeFinetune.calls == [("rso", 3e-4, 0)]  # adamw's settings are unchanged: read, not run
    rows = {r["name"]: r for r in json.loads((out / "table.json").read_text())["methods"]}
    assert rows["rso"]["rank"] == rank // 2 and "error" not in rows["rso"]
    # stopped part-way under the old default: continued from its checkpoint, it ends with the saved rank
    (out / "rso_lr0.0003_s0" / "results.json").unlink()
    (out / "rso_lr0.0003_s0" / "checkpoint.pt").write_bytes(b"")
    monkeypatch.setattr(FakeFinetune, "ran_with", {"rank": rank})
    FakeFinetune.calls, FakeFinetune.resumed = [], []
    assert cf.main(["--resume", *argv], spawn=FakeFinetune) == 1
    assert FakeFinetune.resumed == [("rso", 3e-4, 0)]
    text = (out / "table.md").read_text()
    assert f"it ran with rank {rank} where the command now means {rank // 2}, continued from a checkpoint" in text


def test_an_entry_state_sets_the_runs_subspace_state(tmp_path):
    FakeFinetune.calls = []
    out = tmp_path / "cmp"
    assert cf.main(["--methods", "rso[state=project]=1e-4,rso=1e-4", "--seeds", "0", "--val-from-train", "8",
                    "--model", "tiny-bert", "--output-dir", str(out), "--", "--max-steps", "2"], spawn=FakeFinetune) == 0
    runs = json.loads((out / "table.json").read_text())["runs"]
    cmds = {r["name"]: r["command"] for r in runs}
    assert "--subspace-state project" in cmds["rso-stateproject_lr0.0001_s0"]
    assert "--subspace-state" not in cmds["rso_lr0.0001_s0"]
    labels = [r["label"] for r in json.loads((out / "table.json").read_text())["methods"]]
    assert labels == ["rso (stiefel), state project", "rso (stiefel)"]


def test_an_entry_rank_may_be_a_fraction_of_each_layers_input_width(tmp_path):
    """``rank=1/6`` reaches rso.train.finetune as exactly 1/6 (not 0.166667) and reads as 1/6 in the label, the
    table's rank column and a file-safe run name; a fraction with a short decimal keeps it."""
    FakeFinetune.calls = []
    out = tmp_path / "cmp"
    assert cf.main(["--methods", "rso[rank=1/6]=1e-4,rso:hybrid[rank=0.25]=1e-4", "--seeds", "0", "--val-from-train",
                    "8", "--model", "tiny-bert", "--output-dir", str(out), "--", "--max-steps", "2"], spawn=FakeFinetune) == 0
    table = json.loads((out / "table.json").read_text())
    ranks = {r["name"]: finetune.build_parser().parse_args(r["command"].split()[3:]).rank for r in table["runs"]}
    assert ranks == {"rso-rank1of6_lr0.0001_s0": 1 / 6, "rso-hybrid-rank0.25_lr0.0001_s0": 0.25}
    assert [r["label"] for r in table["methods"]] == ["rso (stiefel), rank 1/6", "rso (hybrid), rank 0.25"]
    text = (out / "table.md").read_text()
    assert "| rso (stiefel), rank 1/6 | 1/6 |" in text and "| rso (hybrid), rank 0.25 | 0.25 |" in text


def test_an_entry_embeddings_freezes_or_trains_the_token_embeddings_of_its_runs(tmp_path):
    """``embeddings=frozen|trained`` sets ``--[no-]freeze-embeddings`` for that entry's runs only; an entry
    without it passes no flag (the method's default holds), so one table can hold frozen and trained rows."""
    FakeFinetune.calls = []
    out = tmp_path / "cmp"
    assert cf.main(["--methods", "rso[embeddings=frozen]=1e-4,adamw[embeddings=trained]=1e-4,rso=1e-4", "--seeds", "0",
                    "--val-from-train", "8", "--model", "tiny-bert", "--output-dir", str(out), "--", "--max-steps", "2"],
                   spawn=FakeFinetune) == 0
    table = json.loads((out / "table.json").read_text())
    cmds = {r["name"]: r["command"] for r in table["runs"]}
    freeze = {name: finetune.build_parser().parse_args(cmd.split()[3:]).freeze_embeddings for name, cmd in cmds.items()}
    assert freeze == {"rso-embeddingsfrozen_lr0.0001_s0": True, "adamw-embeddingstrained_lr0.0001_s0": False,
                      "rso_lr0.0001_s0": False}  # the last: rso's classification default, no flag given
    assert "freeze-embeddings" not in cmds["rso_lr0.0001_s0"]
    assert [r["label"] for r in table["methods"]] == ["rso (stiefel), embeddings frozen", "adamw, embeddings trained",
                                                      "rso (stiefel)"]


def test_runner_refuses_bad_arguments_before_any_run(tmp_path, capsys):
    def spawn(*a, **k):
        raise AssertionError("a run started")

    for argv, message in [(["--methods", "rso:bogus"], "--methods entry 'rso:bogus': --projection: unknown projection"),
                          (["--methods", "lora[rnk=4]"], "--methods entry 'lora[rnk=4]': unknown option 'rnk=4'"),
                          (["--methods", "rso[state=zero]"],
                           "--methods entry 'rso[state=zero]': state 'zero' is not one of reset, keep, project"),
                          (["--methods", "adamw[state=keep]"], "--methods entry 'adamw[state=keep]': --subspace-state "
                           "keep applies to the subspace methods (galore, golore, golore@X, rso), not to adamw"),
                          (["--methods", "rso[embeddings=yes]"],
                           "--methods entry 'rso[embeddings=yes]': embeddings 'yes' is not one of frozen, trained"),
                          (["--methods", "rso[embeddings=frozen]", "--", "--no-freeze-embeddings"],
                           "--methods entry 'rso[embeddings=frozen]' sets embeddings= and the arguments passed to "
                           "every run set --freeze-embeddings (or --no-freeze-embeddings) too: give it in one place"),
                          (["--methods", "rso[rank=8]", "--", "--rank", "4"],
                           "--methods entry 'rso[rank=8]' sets rank= and the arguments passed to every run set --rank too"),
                          (["--methods", "rso[rank=3/2]"], "--methods entry 'rso[rank=3/2]': rank: give an integer ≥ 1"),
                          (["--methods", "lora[rank=1/4]"], "--methods entry 'lora[rank=1/4]': --rank 0.25: a fraction "
                           "of each layer's input width is for --method rso only; lora takes an integer rank"),
                          (["--methods", "lora[seeds=0]"], "--methods entry 'lora[seeds=0]': seeds must be ≥ 1, got 0"),
                          (["--methods", "lora[seeds=4]", "--seeds", "0,1,2"],
                           "--methods entry 'lora[seeds=4]': seeds=4 but --seeds gives 3"),
                          (["--methods", "adamw=0"], "--methods entry 'adamw=0': each value must be a finite number > 0"),
                          (["--seeds", "1,1"], "--seeds: give distinct integer seeds"),
                          (["--task", "squad"], "unknown task 'squad'; offline: rotten_tomatoes, boolq, xsum"),
                          (["--jobs", "0"], "--jobs must be ≥ 1, got 0"),
                          (["--val-from-train", "0"], "--val-from-train must be ≥ 1, got 0"),
                          (["--", "--lr", "1e-3"], "--lr: the runner sets it"),
                          (["--", "--max-train", "0"], "--max-train must be ≥ 1, got 0"),
                          (["--model", "tiny-bert", "--rank", "65"], "--methods entry 'galore': --rank 65 is larger")]:
        assert cf.main(["--output-dir", str(tmp_path / "x"), *argv], spawn=spawn) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: " + message) and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_two_methods_two_seeds_few_steps_write_table_and_json(tmp_path, capsys, restore_threads, monkeypatch):
    out = tmp_path / "cmp"
    plotted = {}
    real_plot = cf.plot_comparison
    monkeypatch.setattr(cf, "plot_comparison", lambda runs, *a, **k: plotted.update(runs) or real_plot(runs, *a, **k))
    rc = cf.main(["--model", "tiny-bert", "--methods", "rso[rank=4,tau=2]=1e-3/3e-3,adamw=1e-3",
                  "--seeds", "0,1", "--val-from-train", "8", "--jobs", "2", "--threads-per-job", "1",
                  "--output-dir", str(out), "--",
                  "--max-train", "16", "--max-eval", "8", "--batch-size", "8", "--max-length", "16",
                  "--max-steps", "4", "--eval-every", "2", "--keep-best"], spawn=InProcess)
    assert rc == 0, capsys.readouterr().out
    data = json.loads((out / "table.json").read_text())
    assert data["val_examples"] == 8 and data["train_examples"] == 16 and data["eval_examples"] == 8
    assert len(data["runs"]) == 5 and not any(r.get("error") for r in data["runs"])  # 2 sweep + 1 seed + 2 seeds
    rows = {r["name"]: r for r in data["methods"]}
    rso, adamw = rows["rso-rank4-tau2"], rows["adamw"]
    sweep = [r for r in data["runs"] if r["entry_name"] == "rso-rank4-tau2" and r["phase"] == "sweep"]
    assert rso["chosen_lr"] == cf.choose_lr(sweep) and rso["seeds"] == [0, 1] and adamw["seeds"] == [0, 1]
    for row in (rso, adamw):
        assert row["n"] == 2 and 0 <= row["mean"] <= 1 and row["std"] is not None
        assert row["trainable_params"] > 0 and row["peak_memory_mb"] > 0 and row["median_step_s"] > 0
    assert not list(out.glob("*/checkpoint.pt")) and (out / "adamw_lr0.001_s1" / "metrics.jsonl").exists()
    # --keep-best passed on to every run: each ends with its best-validation evaluation, the early-stopping one
    assert not list(out.glob("*/best.pt")) and all("best_step" in r for r in data["runs"])
    assert all(row["early_stop"]["steps"] == [r["best_step"] for r in data["runs"] if r["name"] in row["runs"]]
               for row in (rso, adamw))
    assert rso["label"] == "rso (stiefel), rank 4, tau 2" and adamw["trainable_params"] > rso["trainable_params"]
    text = (out / "table.md").read_text()
    assert "| rso (stiefel), rank 4, tau 2 | 4 |" in text and "| adamw | — | 0.001 (not swept) |" in text
    assert "python -m rso.train.compare_finetune --model tiny-bert" in text
    # the loss curves: each method's seed runs at its chosen lr, never a sweep run at another lr
    chosen = f"rso-rank4-tau2_lr{rso['chosen_lr']:g}"
    assert sorted(map(str, plotted[rso["label"]])) == [str(out / f"{chosen}_s{s}" / "metrics.jsonl") for s in (0, 1)]
    assert len(plotted["adamw"]) == 2 and "curves.png" in text and (out / "curves.png").stat().st_size > 10_000


# ----------------------------------------------------------------------------- pre-training: rso.train.compare
@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    from conftest import write_micro_llama_config
    root = tmp_path_factory.mktemp("compare")
    return {"config": write_micro_llama_config(root / "micro.json"), "cache": str(root / "cache")}


def _pretrain_argv(micro, out, *extra):
    return ["--config", micro["config"], "--max-steps", "4", "--jobs", "2", "--threads-per-job", "1",
            "--output-dir", str(out), *extra, "--max-docs", "200", "--cache-dir", micro["cache"],
            "--eval-batches", "2"]


def test_pretrain_comparison_over_seeds_writes_mean_std_table_and_json(micro, tmp_path, capsys, restore_threads):
    from rso.train import compare
    out = tmp_path / "cmp"
    rc = compare.main(_pretrain_argv(micro, out, "--methods", "adamw=2e-3,rso:svd=3e-3", "--seeds", "0,1",
                                     "--rank", "4", "--tau", "2", "--eval-every", "2"), spawn=InProcess)
    assert rc == 0, capsys.readouterr().out
    data = json.loads((out / "table.json").read_text())
    assert data["seeds"] == [0, 1] and len(data["runs"]) == 4
    rows = {r["name"]: r for r in data["methods"]}
    adamw, rso = rows["adamw_lr2e-3"], rows["rso-svd_lr3e-3"]
    for row, method in ((adamw, "adamw"), (rso, "rso")):
        runs = [r for r in data["runs"] if r["entry_name"] == row["name"]]
        assert sorted(r["run_seed"] for r in runs) == [0, 1] and all(r["method"] == method for r in runs)
        by_seed = {r["run_seed"]: r["final_eval_loss"] for r in runs}
        assert row["seeds"] == [0, 1] and row["eval_losses"] == [by_seed[0], by_seed[1]]
        assert by_seed[0] != by_seed[1]  # the seed reaches the run: other initial weights and data order
        assert row["mean"] == pytest.approx((by_seed[0] + by_seed[1]) / 2, rel=1e-12)
        assert row["std"] == pytest.approx(abs(by_seed[0] - by_seed[1]) / 2 ** 0.5, rel=1e-9)  # n − 1
        assert (out / f"{row['name']}_s1" / "results.json").exists()
        for run in runs:  # every evaluation (--eval-every 2 of 4 steps), the last one the final eval loss
            assert [step for step, _ in run["evals"]] == [2, 4] and run["evals"][-1][1] == run["final_eval_loss"]
            assert run["evals"][0][1] != run["evals"][1][1]  # two evaluations, not one read twice
    assert rso["trainable_params"] < adamw["trainable_params"] and rso["projection"] == "svd"
    text = (out / "table.md").read_text()
    delta = 100 * (rso["mean"] / adamw["mean"] - 1)
    assert (f"| rso (svd) | 0.003 | {rso['eval_losses'][0]:.4f} | {rso['eval_losses'][1]:.4f} | "
            f"{rso['mean']:.4f} ± {rso['std']:.4f} | {delta:+.2f}% | — |") in text
    assert "| seed 0 | seed 1 | mean ± std | vs best AdamW | vs best GaLore |" in text
    assert "--seeds 0,1" in data["command"] and "--seed 1 " in text
    assert f"Loss curves: {out / 'curves.png'}" in text and (out / "curves.png").stat().st_size > 20_000


def test_pretrain_comparison_resume_continues_a_run_stopped_part_way(micro, tmp_path, capsys, restore_threads):
    """An interrupted comparison: --resume reads what finished, continues a run from its checkpoint
    (``rso.train.pretrain --resume``) to the loss an uninterrupted run reaches, and runs a changed command anew."""
    from rso.train import compare
    whole, out = tmp_path / "whole", tmp_path / "cmp"
    methods = ("--methods", "adamw=2e-3,rso:stiefel=3e-3", "--rank", "4", "--tau", "2")
    assert compare.main(_pretrain_argv(micro, whole, *methods), spawn=InProcess) == 0
    # the first session ends (as if killed) after 2 of the 4 steps, each run checkpointed at step 2
    argv = _pretrain_argv(micro, out, *methods, "--save-every", "2", "--stop-after", "2")
    assert compare.main(argv, spawn=InProcess) == 1  # no run finished
    assert all((out / n / "checkpoint.pt").exists() and not (out / n / "results.json").exists()
               for n in ("adamw_lr2e-3_s0", "rso-stiefel_lr3e-3_s0"))
    (out / "rso-stiefel_lr3e-3_s0.cmd").write_text("python -m rso.train.pretrain --other-args")  # not this command
    calls = []

    def spawn(cmd, stdout, stderr):
        calls.append(cmd[cmd.index("--output-dir") + 1:])
        return InProcess(cmd, stdout, stderr)

    capsys.readouterr()
    assert compare.main(["--resume", *argv], spawn=spawn) == 1  # the run started anew stops at step 2 again
    printed = capsys.readouterr().out
    assert "continue adamw_lr2e-3_s0: " in printed and "start rso-stiefel_lr3e-3_s0: " in printed
    resumed, fresh = sorted(calls, key=lambda c: "rso" in c[0])
    assert resumed[-1] == "--resume" and "--resume" not in fresh
    log = (out / "adamw_lr2e-3_s0.log").read_text()
    assert "stopped after 2 steps at step 2" in log and "--resume: continuing at step 2" in log  # appended
    calls.clear()
    assert compare.main(["--resume", *argv], spawn=spawn) == 0  # adamw read, rso continued
    assert len(calls) == 1 and "rso" in calls[0][0] and calls[0][-1] == "--resume"
    done = {r["name"]: r for r in json.loads((out / "table.json").read_text())["methods"]}
    ref = {r["name"]: r for r in json.loads((whole / "table.json").read_text())["methods"]}
    # resumed: the same runs as uninterrupted ones, up to fp32 rounding. Not bit for bit: on an AVX-512 CPU, MKL's
    # kernels in the resumed process may round differently (seen: weights and optimizer states equal at step 3,
    # the eval loss after step 4 off by 4e-8 relative; MKL_CBWR=COMPATIBLE makes it exact). A resume that loses
    # any state (optimizer moments, P, the data position or the RNG) moves the loss by far more.
    tol = 8 * torch.finfo(torch.float32).eps
    for name in ("adamw_lr2e-3", "rso-stiefel_lr3e-3"):
        assert done[name]["eval_losses"] == pytest.approx(ref[name]["eval_losses"], rel=tol, abs=0), name
    # the resumed runs' evaluations (steps and losses) are the uninterrupted runs'
    curves = [{r["entry_name"]: r["evals"] for r in json.loads((d / "table.json").read_text())["runs"]} for d in (out, whole)]
    for name in ("adamw_lr2e-3", "rso-stiefel_lr3e-3"):
        assert [step for step, _ in curves[0][name]] == [step for step, _ in curves[1][name]], name
        assert [loss for _, loss in curves[0][name]] == pytest.approx([loss for _, loss in curves[1][name]], rel=tol, abs=0)
    calls.clear()
    assert compare.main(["--resume", *argv], spawn=spawn) == 0 and calls == []  # all finished: none run


def test_eval_curve_keeps_a_resumed_runs_last_record_of_each_step(tmp_path):
    """A run killed after step 3's evaluation and resumed from its step-2 checkpoint logs step 3 again: the curve
    has it once, from the resumed run; training records and a line cut by the kill are skipped."""
    from rso.train.compare import eval_curve
    rows = [{"step": 1, "loss": 9.0}, {"step": 2, "eval_loss": 8.0}, {"step": 3, "eval_loss": 7.5},
            {"step": 3, "eval_loss": 7.0}, {"step": 4, "eval_loss": 6.5}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[:3]) + '\n{"step": 4, "eval_l\n'
                    + "\n".join(json.dumps(r) for r in rows[3:]) + "\n")
    assert eval_curve(path) == [[2, 8.0], [3, 7.0], [4, 6.5]]


def test_comparison_plot_averages_the_seeds_over_the_steps_each_reached(tmp_path, monkeypatch):
    import matplotlib.axes
    from rso.train.metrics import plot_comparison
    drawn, bands = [], []
    plot, fill = matplotlib.axes.Axes.plot, matplotlib.axes.Axes.fill_between
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, x, y, *a, **k:
                        drawn.append((list(x), list(y))) or plot(self, x, y, *a, **k))
    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between", lambda self, x, lo, hi, **k:
                        bands.append((list(x), list(lo), list(hi))) or fill(self, x, lo, hi, **k))
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(json.dumps(r) for r in [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0, "eval_loss": 2.5},
                                                    {"step": 3, "loss": 1.0}]))
    b.write_text("\n".join(json.dumps(r) for r in [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0, "eval_loss": 3.5}]))
    assert plot_comparison({"m": [a, b]}, tmp_path / "c.png") == tmp_path / "c.png"
    assert drawn[0] == ([1, 2], [4.0, 3.0]) and drawn[1] == ([2], [3.0])  # step 3: one seed only, left out
    assert bands[-1] == ([2], [2.5], [3.5])
    (tmp_path / "empty.jsonl").write_text("")
    assert plot_comparison({"m": [tmp_path / "empty.jsonl"], "n": []}, tmp_path / "d.png") is None
    assert not (tmp_path / "d.png").exists()


def test_pretrain_comparison_refuses_bad_seeds_before_any_run(tmp_path, capsys):
    from rso.train import compare
    for seeds in ("1,1", "a", ","):
        with pytest.raises(SystemExit) as e:
            compare.main(["--seeds", seeds, "--output-dir", str(tmp_path / "x")])
        assert e.value.code == 2 and "--seeds: give distinct integer seeds" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_pretrain_comparison_resume_reruns_a_run_the_config_now_sets_otherwise(tmp_path, capsys, restore_threads):
    """Rank, τ and lr left to the config: a finished run is read under --resume while the config says what it
    ran with, and run again once the config's default changes (the command text is the same)."""
    from conftest import micro_llama_config, write_micro_llama_config
    from rso.train import compare
    config = tmp_path / "micro.json"
    write_micro_llama_config(config)
    argv = ["--config", str(config), "--max-steps", "2", "--methods", "rso:stiefel", "--output-dir", str(tmp_path / "cmp"),
            "--resume", "--max-docs", "200", "--cache-dir", str(tmp_path / "cache"), "--eval-batches", "1"]
    calls = []

    def spawn(cmd, stdout, stderr):
        calls.append(cmd)
        return InProcess(cmd, stdout, stderr)

    assert compare.main(argv, spawn=spawn) == 0 and len(calls) == 1
    first = json.loads((tmp_path / "cmp" / "table.json").read_text())["runs"][0]
    assert first["rank"] == micro_llama_config()["training"]["rank"] and first["tau"] == 2
    assert compare.main(argv, spawn=spawn) == 0 and len(calls) == 1  # the same settings: read, not run
    write_micro_llama_config(config, training={**micro_llama_config()["training"], "rank": 4})
    capsys.readouterr()
    assert compare.main(argv, spawn=spawn) == 0 and len(calls) == 2 and calls[0] == calls[1]
    assert f"rerun rso-stiefel_s0: its results.json has rank {first['rank']} where the command now means 4" \
        in capsys.readouterr().out
    assert json.loads((tmp_path / "cmp" / "table.json").read_text())["runs"][0]["rank"] == 4


def test_60m_400_step_runs_hold_every_evaluation():
    """docs/results/pretrain-60m/pretrain_60m_400.json: each run's evaluations, every 50 steps to step 400, end
    at its final eval loss."""
    import pathlib

    root = pathlib.Path(__file__).parents[1]
    data = json.loads((root / "docs" / "results" / "pretrain-60m" / "pretrain_60m_400.json").read_text())
    assert len(data["runs"]) == 4
    for run in data["runs"]:
        evals = dict(run["evals"])
        assert evals[400] == run["final_eval_loss"] and sorted(evals) == list(range(50, 401, 50))


class Refused:
    """A run that exits 1 at once: the runner's commands, names and table without training."""
    returncode = 1

    def __init__(self, cmd, stdout, stderr):
        stdout.write("refused\n")

    def poll(self):
        return self.returncode


def test_pretrain_entry_quantize_option_reaches_each_runs_command_and_names_its_row(tmp_path):
    from rso.train import compare
    out = tmp_path / "cmp"
    rc = compare.main(["--config", "tiny", "--max-steps", "2", "--rank", "8", "--output-dir", str(out),
                       "--methods", "rso:stiefel[quantize=nf4]=3e-3,rso[quantize=int8],rso"], spawn=Refused)
    assert rc == 1  # every run refused by the fake: the commands and the table are what is checked
    data = json.loads((out / "table.json").read_text())
    assert [r["name"] for r in data["methods"]] == ["rso-stiefel-quantizenf4_lr3e-3", "rso-quantizeint8", "rso"]
    cmds = {r["name"]: r["command"] for r in data["runs"]}
    assert "--projection stiefel --quantize nf4 --lr 0.003" in cmds["rso-stiefel-quantizenf4_lr3e-3_s0"]
    assert "--quantize int8" in cmds["rso-quantizeint8_s0"] and "--quantize" not in cmds["rso_s0"]
    assert "| rso (stiefel) [quantize=nf4] | 0.003 | failed |" in (out / "table.md").read_text()


@pytest.mark.parametrize("methods, message", [
    ("rso[rank=4]", "--methods entry 'rso[rank=4]': cannot read 'rank=4'; write method[:projection][[key=value,...]]"),
    ("rso[quantize=nf4", "--methods entry 'rso[quantize=nf4': cannot read 'rso[quantize=nf4'"),
    ("adamw[quantize=nf4]", "--quantize nf4 is for --method rso, lora only"),
    ("rso[quantize=fp8]", "--quantize: invalid choice: 'fp8'")])
def test_pretrain_entry_options_are_refused_before_any_run(tmp_path, capsys, methods, message):
    from rso.train import compare

    def spawn(*a, **k):
        raise AssertionError("a run started")

    with pytest.raises(SystemExit) as e:
        compare.main(["--config", "tiny", "--methods", methods, "--output-dir", str(tmp_path / "x")], spawn=spawn)
    assert e.value.code == 2 and message in capsys.readouterr().err and not (tmp_path / "x").exists()

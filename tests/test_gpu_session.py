"""rso.train.bench.gpu_session, the one-call GPU session of issue 14 item 5, tested here without a GPU: the plan the
device runs, the runner (timeouts, failures, the fallback's condition, the budget, JSON after every part), and the
worker paths it adds (memory_frontier's timed steps and planned batch, step's merge timing under torch.compile),
plus one real part of the CPU dry run end to end. The whole dry run (all parts, a few minutes on two busy cores)
is ``python -m rso.train.bench.gpu_session --device cpu --dry-run --out DIR``."""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from rso.train.bench import gpu_session
from rso.train.bench.gpu_session import Part, plan, run_parts


def _arg(cmd, flag):
    return cmd[cmd.index(flag) + 1]


def test_the_device_plan_runs_the_7b_step_first_and_fits_one_call(tmp_path):
    parts = plan(tmp_path, "cuda")
    assert [p.name for p in parts] == ["7b-16x256", "7b-1x128", "7b-max", "step-eager", "step-compile"]
    goal = parts[0].cmd
    assert _arg(goal, "-m") == "rso.train.bench.memory_frontier" and _arg(goal, "--device") == "cuda"
    assert (_arg(goal, "--config"), _arg(goal, "--rank"), _arg(goal, "--batch"), _arg(goal, "--seq")) == \
        ("llama-7b", "256", "16", "256")
    assert _arg(goal, "--memory-limit-gb") == "24" and _arg(goal, "--cases") == "rso+ckpt+ce,rso+ckpt"
    fallback = parts[1].cmd
    assert (_arg(fallback, "--batch"), _arg(fallback, "--seq")) == ("1", "128")
    assert _arg(parts[2].cmd, "--batch") == "max"
    for part in parts[3:]:
        cmd = part.cmd
        assert _arg(cmd, "-m") == "rso.train.bench.step" and _arg(cmd, "--dtype") == "bf16"
        assert set(_arg(cmd, "--methods").split(",")) == {"rso-stiefel", "adamw", "galore-torch"}
        assert set(_arg(cmd, "--configs").split(",")) == {"350m", "1b"}
        assert int(_arg(cmd, "--merge-every")) >= 3  # cycles with ordinary steps between the merges
    assert "--compile" in parts[4].cmd and "--compile" not in parts[3].cmd
    assert _arg(parts[4].cmd, "--configs") == "1b,350m"  # 1B compiled first
    # the default budget leaves a 10-minute call room for the wheels and the summary; each part has its own
    # timeout below it, and each case / method inside a part an inner timeout
    assert gpu_session.DEFAULT_BUDGET_S + gpu_session.SLACK_S <= 500
    for part in parts:
        assert part.timeout < gpu_session.DEFAULT_BUDGET_S and "--timeout" in part.cmd
    # the device tool returns at most 8 files from $OUT, two folders down, named in [A-Za-z0-9._-]
    files = {p.result for p in parts} | {"gpu_session.json", "gpu_session.md", "gpu_session.log"}
    assert len(files) <= 8 and all(re.fullmatch(r"([A-Za-z0-9._-]+/){0,2}[A-Za-z0-9._-]+", f) for f in files)


def test_the_fallback_runs_only_without_a_measured_goal_step(tmp_path):
    fallback = plan(tmp_path, "cuda")[1]
    measured = {"7b-16x256": {"data": {"results": [{"case": "rso+ckpt+ce", "measured": {}}]}}}
    failed = {"7b-16x256": {"data": {"results": [{"case": "rso+ckpt+ce", "error": "out of memory under the cap"}]}}}
    assert "not needed" in fallback.skip_if(measured)
    assert fallback.skip_if(failed) is None
    assert fallback.skip_if({}) is None  # the goal part wrote nothing (it timed out): run the fallback


def test_runner_goes_on_past_failures_timeouts_and_the_budget(tmp_path):
    py = sys.executable
    ok_script = textwrap.dedent(f"""
        import json, pathlib
        pathlib.Path({str(tmp_path / 'a.json')!r}).write_text(json.dumps({{"results": [{{"case": "x"}}]}}))
        print("part a ran")""")
    parts = [
        Part("a", "writes its JSON", [py, "-c", ok_script], 30, "a.json", "frontier"),
        Part("b", "fails", [py, "-c", "import sys; print('boom'); sys.exit(3)"], 30),
        Part("c", "sleeps past its timeout",
             [py, "-c", "import time; print('sleeping', flush=True); time.sleep(60)"], 2),
        Part("d", "skipped by its condition", [py, "-c", "pass"], 30,
             skip_if=lambda rec: "a ran" if rec["a"]["status"] == "ok" else None),
        Part("e", "a step part: its results.md is folded into the record", [py, "-c", textwrap.dedent(f"""
            import pathlib
            d = pathlib.Path({str(tmp_path / 'e')!r}); d.mkdir()
            (d / "results.json").write_text('{{"results": []}}'); (d / "results.md").write_text("table e")
            print('e ran')""")], 30, "e/results.json", "step"),
    ]
    seen = []
    log = gpu_session._Log(tmp_path / "log.txt", echo=False)
    records = run_parts(parts, tmp_path, dict(os.environ), budget_s=120, log=log,
                        on_record=lambda rec: seen.append(list(rec)))
    log.close()
    assert [records[n]["status"] for n in "abcde"] == ["ok", "failed", "timeout", "skipped", "ok"]
    assert records["a"]["data"] == {"results": [{"case": "x"}]} and records["a"]["result_file"] == "a.json"
    assert records["b"]["rc"] == 3 and records["c"]["wall_s"] < 20 and records["d"]["reason"] == "a ran"
    assert seen == [list("a"), list("ab"), list("abc"), list("abcd"), list("abcde")]  # written after every part
    assert records["e"]["markdown"] == "table e" and not (tmp_path / "e" / "results.md").exists()
    assert records["e"]["data"] == {"results": []}
    text = (tmp_path / "log.txt").read_text()
    for line in ("part a ran", "boom", "sleeping", "=== d: skipped (a ran)", "e ran", "=== c: timeout"):
        assert line in text
    # without budget left, a part is recorded as skipped, not dropped
    log = gpu_session._Log(tmp_path / "log2.txt", echo=False)
    records = run_parts(parts[4:], tmp_path, dict(os.environ), budget_s=gpu_session.SLACK_S + 1, log=log)
    log.close()
    assert records["e"]["status"] == "skipped" and records["e"]["reason"].startswith("out of budget")


@pytest.fixture
def _affinity():
    """run_worker pins this process to its CPU threads on CPU; put the affinity back."""
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    yield
    if cores is not None:
        os.sched_setaffinity(0, cores)


def test_worker_paths_of_the_session_on_cpu(_affinity):
    """memory_frontier: the planned batch and the cap's arithmetic; step: the merge timing under torch.compile (no
    recompile after a merge); the summary of such records, an out-of-memory case among them."""
    from rso.train.bench import memory_frontier as mf
    from rso.train.bench.step import run_worker
    model = {k: v for k, v in gpu_session.DRY_RUN_MODEL.items() if k not in ("model_type", "training", "rms_norm_eps")}
    usable = mf.estimate_case({"case": "rso+ckpt+ce", "model": model, "rank": 16, "batch": 3, "seq": 16})["total"]
    assert mf.largest_batch("rso+ckpt+ce", model, 16, 16, usable) == 3
    assert mf.largest_batch("rso+ckpt+ce", model, 16, 16, 1000) == 0
    assert mf.memory_fraction(24 * 2 ** 30, 80 * 2 ** 30, 79 * 2 ** 30) == (0.3, None)
    assert "free" in mf.memory_fraction(24 * 2 ** 30, 80 * 2 ** 30, 20 * 2 ** 30)[1]
    assert "above the device" in mf.memory_fraction(100 * 2 ** 30, 80 * 2 ** 30, 80 * 2 ** 30)[1]

    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    cfg = dict(gpu_session.DRY_RUN_MODEL)
    spec = {"method": "rso-stiefel", "config_name": "micro", "config": cfg, "rank": 16, "batch": 2, "seq": 16,
            "dtype": "fp32", "device": "cpu", "attn": "sdpa", "threads": 1, "steps": 2, "warmup": 1, "seed": 0,
            "cores": None, "chunk_size": 1024, "ce_mode": "recompute", "compile": True, "compile_backend": "eager",
            "flops": False, "track_peak": False, "sweep": False, "max_seq": 16, "merge_every": 3, "merge_cycles": 2}
    try:
        out = run_worker(spec)
    finally:
        torch._dynamo.reset()
    merge = out["merge"]
    assert merge["cycles"] == 2 and merge["every"] == 3 and merge["ordinary_from"] == "merge phase"
    assert len(merge["merge_step_s"]["all"]) == 2 and len(merge["outer_step_s"]["all"]) == 2
    assert merge["merge_over_ordinary"] > 0 and out["cycle_step_s"] == merge["merge_step_s"]["median"]
    assert out["compile_backend"] == "eager" and out["dynamo"]["unique_graphs"] == 1  # merges did not recompile

    m = {"parameters": 600, "buffers": 0, "gradients": 100, "optimizer_state": 200, "activations": 90, "recomputed": 10,
         "peak": 1100, "peak_source": "CUDA allocator"}
    rec = {"case": "rso+ckpt+ce", "batch": 3, "seq": 16, "estimate": {"total": 1000}, "measured": m, "step_s": 0.5,
           "timed_steps_s": [0.2, 0.3], "tokens_per_s": 160.0,
           "cuda": {"name": "GPU", "limit": 2000, "cap_respected": True,
                    "peaks": {"build": {"allocated": 600, "reserved": 700}, "measured step": {"allocated": 1100,
                                                                                             "reserved": 1500}}}}
    records = {"7b-16x256": {"name": "7b-16x256", "kind": "frontier", "status": "ok",
                             "data": {"results": [rec, {"case": "rso+ckpt", "batch": 3, "seq": 16, "estimate":
                                                        {"total": 1100}, "error": "out of memory under the cap"}]}},
               "step-compile": {"name": "step-compile", "kind": "step", "status": "ok",
                                "data": {"results": [{**out, "config": "/x/dry_run_config.json"}]}}}
    summary = gpu_session.summarize(records)
    ok, oom = summary["frontier"]
    assert (ok["measured_total"], ok["measured_over_estimate"], ok["peak_reserved"]) == (1000, 1.0, 1500)
    assert oom["error"].startswith("out of memory") and "measured_total" not in oom
    assert summary["steps"][0]["config"] == "dry_run_config"
    assert summary["merge"][0]["compile"] is True and summary["merge"][0]["cycles"] == 2
    meta = {"dry_run": True, "device": "cpu", "command": "x", "started": "now", "host": "h", "versions": {}}
    md = gpu_session.format_summary(meta, records, summary)
    assert "RSO's merge step against an ordinary step" in md and "| 3 × 16 |" in md and "out of memory" in md


def test_dry_run_cli_runs_a_part_end_to_end(tmp_path):
    """The CLI as the device runs it, on this CPU: one part of the dry run (7b-max: the planned batch of the micro
    stand-in, one measured and one timed step), its JSON, the session JSON and Markdown, and the one-line errors."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(gpu_session.ROOT), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "rso.train.bench.gpu_session", "--device", "cpu", "--dry-run",
                           "--only", "7b-max", "--out", str(out), "--budget-s", "200"],
                          capture_output=True, text=True, env=env, cwd=gpu_session.ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    session = json.loads((out / "gpu_session.json").read_text())
    assert [p["name"] for p in session["parts"]] == ["7b-max"] and session["parts"][0]["status"] == "ok"
    assert session["meta"]["dry_run"] is True and session["meta"]["versions"]["torch"] == torch.__version__
    row, = session["summary"]["frontier"]
    assert row["batch"] == 4 and row["seq"] == 16 and row["error"] is None  # the planned batch of the 0.001 GiB budget
    assert row["measured_over_estimate"] == pytest.approx(1.0, rel=0.05) and row["tokens_per_s"] > 0
    rec, = json.loads((out / "7b_max.json").read_text())["results"]
    assert rec["parameter_devices"] == ["cpu"] and rec["parameter_dtypes"] == ["torch.bfloat16"]
    assert len(rec["timed_steps_s"]) == 1 and rec["planned_batch"] is True
    assert (out / "7b_max.json").exists() and "=== 7b-max: ok" in (out / "gpu_session.log").read_text()
    assert "The 7B step under the cap" in (out / "gpu_session.md").read_text()



def test_cli_one_line_errors(tmp_path, capsys):
    for argv, message in ((["--device", "cpu"], "--device cpu runs only as --dry-run"),
                          (["--only", "7b-max,nope"], "unknown part(s) nope")):
        assert gpu_session.main(["--out", str(tmp_path / "bad")] + argv) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad" / "gpu_session.json").exists()

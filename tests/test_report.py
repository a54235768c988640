"""``python -m rso.train.report``: a results folder's README.md from its JSON, command.sh, plots and notes.md, on
fixture data; every committed results README holds the renderer's table of each JSON beside it."""
import json
import pathlib

import pytest

from rso.train import report
from rso.train.report import GENERATED, ReportError, main, plan, render, render_table, write

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "results"


def pretrain_table(seeds=(0, 1)):
    """A ``rso.train.compare`` table.json: AdamW and RSO over two seeds."""
    def row(method, projection, losses, params):
        mean = sum(losses) / len(losses)
        std = (sum((x - mean) ** 2 for x in losses) / (len(losses) - 1)) ** 0.5
        return {"name": method, "method": method, "projection": projection, "lr": 0.003, "seeds": list(seeds),
                "eval_losses": losses, "mean": mean, "std": std, "failed": {}, "trainable_params": params,
                "median_tokens_per_s": 2500.0, "peak_memory_mb": 800.0, "mean_wall_s": 280.0}
    return {"command": "python -m rso.train.compare --seeds 0,1", "seeds": list(seeds),
            "methods": [row("adamw", None, [6.0, 6.2], 7_360_000), row("rso", "stiefel", [5.7, 5.9], 4_880_000)],
            "runs": []}


def finetune_table():
    """A ``rso.train.compare_finetune`` table.json: one method, one swept lr of two, two seeds."""
    row = {"name": "rso", "label": "rso (stiefel)", "method": "rso", "projection": "stiefel", "options": {},
           "lrs": [4e-4, 8e-4], "swept": True, "chosen_lr": 8e-4, "runs": ["a", "b"], "failed": [],
           "sweep": [{"lr": 4e-4, "seed": 0, "val_metric": 0.79, "run": "x"},
                     {"lr": 8e-4, "seed": 0, "val_metric": 0.82, "run": "a"}],
           "metric": "accuracy", "higher_is_better": True, "seeds": [0, 1], "n": 2, "values": [0.81, 0.80],
           "mean": 0.805, "std": 0.00707, "secondary": "eval_loss", "secondary_mean": 0.41, "secondary_std": 0.01,
           "val_at_chosen": 0.82, "rank": 64, "trainable_params": 13_420_000, "memory_key": "peak_rss_mb",
           "peak_memory_mb": 1354.0, "median_step_s": 2.13}
    return {"task": "rotten_tomatoes", "model": "minilm", "eval_split": "held-out", "seeds": [0, 1],
            "train_examples": 4000, "val_examples": 500, "eval_examples": 2000,
            "command": "python -m rso.train.compare_finetune --task rotten_tomatoes", "methods": [row]}


def make_folder(root: pathlib.Path, notes: str | None = None, files: dict | None = None) -> pathlib.Path:
    folder = root / "exp"
    folder.mkdir(parents=True)
    (folder / "command.sh").write_text('#!/usr/bin/env bash\nset -euo pipefail\ncd "$(dirname "$0")/../../.."\n'
                                       ". .venv/bin/activate\npython -m rso.train.compare --seeds 0,1\n")
    for name, data in ({"pretrain.json": pretrain_table()} if files is None else files).items():
        path = folder / name
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(json.dumps(data))
    if notes is not None:
        (folder / "notes.md").write_text(notes)
    return folder


def test_pretrain_table_is_the_runners_table_with_mean_std_and_gap():
    text = render_table(pretrain_table())
    rows = [line for line in text.splitlines() if line.startswith("| adamw") or line.startswith("| rso")]
    assert len(rows) == 2
    # RSO: mean 5.8, sample std 0.1414, 3.33% below AdamW's 6.1
    assert rows[1].startswith("| rso (stiefel) | 0.003 | 5.7000 | 5.9000 | 5.8000 ± 0.1414 | -4.92% | — | 4.88M |")
    assert rows[0].startswith("| adamw | 0.003 | 6.0000 | 6.2000 | 6.1000 ± 0.1414 | — | — | 7.36M |")


def test_finetune_table_names_the_chosen_lr_and_bolds_it_in_the_sweep():
    text = render_table(finetune_table())
    assert text.startswith("Task rotten_tomatoes, model minilm: 4000 training examples, 500 validation")
    assert "| rso (stiefel) | 64 | 0.0008 of 0.0004/0.0008 | 82.00% | 80.50 ± 0.71% |" in text
    assert "| rso (stiefel) | **0.0008** | 82.00% |" in text and "| rso (stiefel) | 0.0004 | 79.00% |" in text


def test_fit_rows_are_rendered_by_the_planners_formatter():
    from rso.memory import fit, format_fit
    rows = json.loads(json.dumps(fit("llama-60m", "24GB", methods=["rso"], seqs=(256,)), default=str))
    assert render_table(rows) == format_fit(rows)


def test_other_json_gets_its_scalars_and_first_list_of_records():
    data = {"args": {"rank": 4}, "device": "cpu", "rows": [{"shape": "8x8", "ms": 1.23456, "nested": [1]},
                                                           {"shape": "4x4", "ms": 2.0, "extra": "a|b"}]}
    assert render_table(data) == ("- device: `cpu`\n\n| shape | ms | extra |\n|---|---|---|\n"
                                  "| 8x8 | 1.235 |  |\n| 4x4 | 2 | a/b |")
    assert render_table([{"a": 1}, {"a": None}]) == "| a |\n|---|\n| 1 |\n| None |"


def test_other_json_with_a_dict_of_records_gets_them_as_rows_named_by_their_keys():
    data = {"settings": {"steps": 3}, "results": {"fp32": {"loss": 6.5, "bytes": 16}, "nf4": {"loss": 6.25}}}
    assert render_table(data).strip() == ("| name | loss | bytes |\n|---|---|---|\n| fp32 | 6.5 | 16 |\n"
                                  "| nf4 | 6.25 |  |")


def test_readme_places_tables_at_markers_and_lists_the_rest(tmp_path):
    notes = "# My run\n\nSetting.\n\n<!-- table: b.json -->\n\nA miss.\n\n![shown](shown.png)\n"
    folder = make_folder(tmp_path, notes, {"a.json": pretrain_table(), "b.json": [{"x": 1}]})
    for png in ("shown.png", "other.png"):
        (folder / png).write_bytes(b"\x89PNG")
    text = render(folder)
    assert text.startswith(GENERATED + "\n\n# My run\n\nSetting.\n\n### [b.json](b.json)\n\n| x |\n|---|\n| 1 |\n\nA miss.")
    assert text.count("### [b.json]") == 1 and text.count("### [a.json]") == 1
    assert text.index("## Commands") < text.index("## Data") < text.index("### [a.json]") < text.index("## Plots")
    assert "```bash\npython -m rso.train.compare --seeds 0,1\n```" in text  # shebang, set, cd and venv lines dropped
    assert "![other.png](other.png)" in text and "![shown.png]" not in text  # shown in the notes: not again
    assert text.endswith("## Files\n\n- [a.json](a.json)\n- [b.json](b.json)\n- [command.sh](command.sh)\n"
                         "- [other.png](other.png)\n- [shown.png](shown.png)\n")


def test_without_notes_the_title_is_the_folder_name(tmp_path):
    assert render(make_folder(tmp_path)).startswith(GENERATED + "\n\n# exp\n\n## Commands")


@pytest.mark.parametrize("notes, files, message", [
    ("# t\n<!-- table: missing.json -->\n", None, "a table marker names missing.json, which is not in"),
    (None, {"bad.json": b'{"a": 1,\n}'}, "bad.json: not valid JSON (Expecting property name enclosed in double quotes, line 2)"),
    (None, {}, "no JSON and no notes.md to render"),
])
def test_a_folder_that_cannot_be_rendered_is_refused_naming_the_file(tmp_path, notes, files, message):
    folder = make_folder(tmp_path, notes, files)
    with pytest.raises(ReportError, match=message.replace("(", r"\(").replace(")", r"\)")):
        write(folder)
    assert not (folder / "README.md").exists()


def test_a_readme_not_written_by_the_renderer_is_never_overwritten(tmp_path, capsys):
    folder = make_folder(tmp_path)
    (folder / "README.md").write_text("# hand-written\n")
    assert main([str(folder)]) == 2
    assert capsys.readouterr().err == (f"error: {folder / 'README.md'}: not written by rso.train.report (no generated "
                                       f"line at the top); move its prose to {folder / 'notes.md'} or delete it, "
                                       "then rerun\n")
    assert (folder / "README.md").read_text() == "# hand-written\n"


def test_every_folder_is_checked_before_any_is_written(tmp_path):
    good = make_folder(tmp_path / "one")
    bad = make_folder(tmp_path / "two", "# t\n<!-- table: nope.json -->\n")
    assert main([str(good), str(bad)]) == 2
    assert not (good / "README.md").exists() and not (bad / "README.md").exists()


def test_check_reports_a_stale_readme_and_writes_nothing(tmp_path, capsys):
    folder = make_folder(tmp_path)
    assert main(["--check", str(folder)]) == 1 and not (folder / "README.md").exists()
    assert capsys.readouterr().out == f"out of date: {folder / 'README.md'}\n"
    assert main([str(folder)]) == 0 and plan(folder)[2]
    assert main(["--check", str(folder)]) == 0 and write(folder) is True
    (folder / "pretrain.json").write_text(json.dumps(pretrain_table(seeds=(0, 2))))
    assert main(["--check", str(folder)]) == 1


def _generated_folders():
    return sorted(p.parent for p in RESULTS.glob("*/README.md") if p.read_text().startswith(GENERATED))


def test_the_committed_results_are_rendered_by_this_renderer():
    assert len(_generated_folders()) >= 12


@pytest.mark.parametrize("folder", _generated_folders(), ids=lambda p: p.name)
def test_each_committed_results_readme_holds_the_table_of_each_json_beside_it(folder):
    """Not the prose: only that each table is what the JSON and the renderer give today (else rerun
    ``python -m rso.train.report docs/results/<folder>``)."""
    text = (folder / "README.md").read_text()
    for path in sorted(folder.glob("*.json")):
        assert report.render_table(json.loads(path.read_text())) in text, \
            f"{path.name}: its table in {folder.name}/README.md is stale; rerun python -m rso.train.report {folder}"

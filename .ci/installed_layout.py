#!/usr/bin/env python3
"""Run a checker (mypy, lint-imports) on the package laid out as it installs.

Our folders install through setuptools' package-dir mapping (``core/`` is ``outlierd.core``,
pyproject.toml [tool.setuptools.package-dir]). The editable install resolves that with an import
hook, which neither mypy nor import-linter (grimp walks a package's directory) can follow: both
would see ``outlierd`` as ``outlierd/`` alone. So this builds ``build/installed-layout/`` (git-ignored),
a tree of real folders and symlinked .py files laid out as installed (``outlierd/core/iforest.py`` ->
``core/iforest.py``), rebuilt on every run so added or removed files show, runs the command there
(cwd and PYTHONPATH/MYPYPATH), and rewrites paths in its output back to the checkout's
(``outlierd/core/iforest.py:12`` -> ``core/iforest.py:12``).

Usage: python .ci/installed_layout.py COMMAND [ARGS...]   (exit status: the command's)
COMMAND is looked up beside this Python first (the venv's bin/), then on PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGE = ROOT / "build" / "installed-layout"


def package_dirs() -> dict[str, str]:
    """Installed package name -> folder in the checkout, from pyproject.toml."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return dict(config["tool"]["setuptools"]["package-dir"])


def stage(mapping: dict[str, str]) -> None:
    """Symlink every .py/.pyi file of every mapped package into STAGE at its installed path."""
    shutil.rmtree(STAGE, ignore_errors=True)
    for package, folder in mapping.items():
        src = ROOT / folder
        target = STAGE.joinpath(*package.split("."))
        for path in sorted(src.rglob("*.py*")):
            if path.suffix not in (".py", ".pyi"):
                continue
            rel = path.relative_to(src)
            # a sub-folder mapped to a package of its own is staged from its own entry
            if len(rel.parts) > 1 and f"{package}.{rel.parts[0]}" in mapping:
                continue
            out = target / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.symlink_to(path)


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    mapping = package_dirs()
    stage(mapping)
    exe = Path(sys.executable).with_name(sys.argv[1])
    cmd = [str(exe) if exe.exists() else sys.argv[1], *sys.argv[2:]]
    env = dict(os.environ, PYTHONPATH=str(STAGE), MYPYPATH=str(STAGE))
    proc = subprocess.run(cmd, cwd=STAGE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # longest installed path first, so outlierd/core/ is rewritten before outlierd/
    prefixes = sorted(((package.replace(".", "/") + "/", folder.rstrip("/") + "/") for package, folder in mapping.items()),
                      key=lambda p: -len(p[0]))
    for line in proc.stdout.splitlines():
        line = line.replace(str(STAGE) + "/", "")
        for installed, folder in prefixes:
            if line.startswith(installed):
                line = folder + line[len(installed):]
                break
        print(line)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())

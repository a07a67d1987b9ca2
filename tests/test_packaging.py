"""The built distribution installs one top-level import name, ``outlierd``.

The wheel is built (not editable) from a clean copy of this checkout (its files under version
control, and new ones git does not ignore), installed into a fresh virtual environment
(its dependencies come from this environment's site-packages through a path entry, so nothing is
downloaded), and imported from a directory outside the checkout.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    files = subprocess.check_output(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT)
    for name in files.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    # no build isolation: setuptools comes from this environment, so the build needs no network
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "No module named" in proc.stderr and "setuptools" in proc.stderr:
        pytest.skip("setuptools is not installed in this environment: cannot build the wheel offline")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = out.glob("outlierd-*.whl")
    return whl


def test_wheel_holds_one_top_level_package(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        top_level = [z.read(n).decode().split() for n in names if n.endswith(".dist-info/top_level.txt")]
    name, version = wheel.name.split("-")[:2]
    assert {n.split("/", 1)[0] for n in names} == {"outlierd", f"{name}-{version}.dist-info"}
    assert top_level in ([], [["outlierd"]])
    for layer in ("core", "server", "training", "monitoring", "v1"):
        assert f"outlierd/{layer}/__init__.py" in names, layer
    assert "outlierd/monitoring/capture_proc.py" in names  # run as a module by the capture process


def test_installed_wheel_imports_from_outside_the_checkout(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    with zipfile.ZipFile(wheel) as z:  # a wheel installs by unpacking it into site-packages
        z.extractall(site)
    # the dependencies (numpy, numba, grpc, ...) from this environment, as a plain path entry: its
    # own .pth files (the editable install of this checkout among them) are not processed
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    code = """
import importlib.util, outlierd
from outlierd import load_model, export_sklearn
import outlierd.core, outlierd.server.plane, outlierd.training, outlierd.monitoring.store, outlierd.v1.scoring_pb2
print(outlierd.__file__)
print(outlierd.core.__file__)
for name in ("core", "server", "training", "monitoring", "proto"):
    print(name, importlib.util.find_spec(name) is not None)
"""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run([str(python), "-c", code], cwd=outside, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.split("\n")
    assert lines[0].startswith(str(site)) and lines[1].startswith(str(site / "outlierd" / "core"))
    assert lines[2:7] == [f"{n} False" for n in ("core", "server", "training", "monitoring", "proto")]
    bad = subprocess.run([str(python), "-c", "import core"], cwd=outside, env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "No module named 'core'" in bad.stderr

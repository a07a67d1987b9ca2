"""GPU benchmarks (marker gpu): the suite in benchmarks/gpu_suite.py, skipped without CUDA."""

import subprocess
import sys
from pathlib import Path

import pytest

import outlierd.core.backends

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not outlierd.core.backends.cuda_available(), reason="no CUDA device")]
ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite(tmp_path):
    out = tmp_path / "gpu.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--device", "cuda", "--json", str(out)],
                         cwd=ROOT, timeout=480)
    assert res.returncode == 0 and out.is_file()

"""The GPU suite's own logic, exercised on the CPU where no GPU is present (tiny sizes)."""

import json
import subprocess
import sys

from conftest import ROOT


def test_gpu_suite_runs_on_cpu(tmp_path):
    out = tmp_path / "suite.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--device", "cpu", "--max-rows", "4096",
                          "--budget-s", "30", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr + res.stdout
    data = json.loads(out.read_text())
    assert set(data["correctness"]) == {"onnx", "torch"} or set(data["correctness"]) == {"onnx"}
    assert all(diff <= 1e-5 for diff in data["correctness"].values())
    assert [r["rows"] for r in data["throughput"]] == [1, 16, 256, 4096]
    assert "| rows | numba cpu rec/s |" in res.stdout

"""``outlierd bench`` and ``outlierd bench compare``: the quick run writes a report whose numbers are
consistent with each other and whose plots exist; compare's ratios; clean errors; the GPU fallback.

Speed is not asserted (a shared machine is noisy): only that the report is built from same-run
measurements (every ratio is ours / peer of the numbers beside it, throughput is rows / time), that
each implementation's scores were checked before timing (the suite raises otherwise), and that
the quality numbers agree with a NumPy rank-statistic oracle.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from outlierd.bench import compare, gpu, quality
from outlierd.bench.common import Progress
from outlierd.cli import main

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One ``outlierd bench --quick`` run (every suite), through the CLI's main()."""
    out = tmp_path_factory.mktemp("bench") / "report"
    assert main(["bench", "--quick", "--quiet", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_quick_report_files(quick):
    out, r = quick
    assert set(r["suites"]) == {"kernels", "latency", "server", "quality", "gpu"}
    assert r["quick"] is True and r["schema"] == 1
    assert r["plots"], "no plot was written"
    html = (out / "report.html").read_text()
    for name in r["plots"]:
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, name   # a real image, not an empty canvas
    assert html.count("data:image/png;base64,") == len(r["plots"])  # self-contained
    assert {"kernels-throughput.png", "kernels-threads.png", "latency.png", "server.png", "quality.png"} <= set(r["plots"])
    m = r["machine"]
    assert m["cpu"] and m["logical_cpus"] >= 1 and "numpy" in m["versions"] and "sklearn" in m["versions"]
    assert r["wall_s"] > 0


def test_quick_kernel_numbers_are_same_run_ratios(quick):
    _, r = quick
    tp = r["kernels"]["throughput"]
    assert set(tp["detectors"]) == {"iforest", "robust_z", "hbos"}
    for name, d in tp["detectors"].items():
        assert [p["batch"] for p in d["points"]] == tp["batches"]
        for p in d["points"]:
            assert math.isclose(p["ours"], p["batch"] / p["ours_median_s"], rel_tol=1e-9)
            assert p["ours_min_s"] <= p["ours_median_s"]
            assert p["peers"], f"{name} @ {p['batch']}: no peer measured"
            for peer in p["peers"].values():
                assert math.isclose(peer["ratio"], p["ours"] / peer["records_per_s"], rel_tol=1e-9)
                assert math.isclose(peer["records_per_s"], p["batch"] / peer["median_s"], rel_tol=1e-9)
    sk = [n for n in tp["detectors"]["iforest"]["peers"] if n.startswith("scikit-learn")]
    assert sk and all(sk[0] in p["peers"] for p in tp["detectors"]["iforest"]["points"])
    th = r["kernels"]["threads"]["points"]
    assert [p["threads"] for p in th] == list(range(1, len(th) + 1))
    visits = r["kernels"]["threads"]["node_visits_per_record"]
    assert 100 * 6 <= visits <= 100 * 12   # 100 trees of max_samples=256 grow 8-9 levels deep
    for p in th:
        assert math.isclose(p["ratio"], p["ours"] / p["sklearn"], rel_tol=1e-9)
        assert math.isclose(p["ns_per_node_visit"], 1e9 * p["threads"] / (p["ours"] * visits), rel_tol=1e-9)


def test_quick_latency_and_server(quick):
    _, r = quick
    for det, per in r["latency"].items():
        assert set(per) == {"1", "64"}, det
        for res in per.values():
            for v in [res["ours"], *res["peers"].values()]:
                assert v["calls"] > 0 and 0 < v["min_us"] <= v["p50_us"] <= v["p99_us"] <= v["p99.9_us"]
    srv = r["server"]
    assert [s["scenario"] for s in srv["scenarios"]] == ["stream-256x1", "unary-1row-c1", "http-json-1"]  # the HTTP door too
    for s in srv["scenarios"]:
        assert s["ours"]["records_per_s"] > 0 and s["echo"]["records_per_s"] > 0
        assert math.isclose(s["ratio"], s["ours"]["records_per_s"] / s["echo"]["records_per_s"], rel_tol=1e-9)
    for unary in srv["scenarios"][1:]:
        assert unary["ours"]["p50_us"] <= unary["ours"]["p99_us"] <= unary["ours"]["p99.9_us"]


def test_quick_gpu_falls_back_cleanly(quick):
    _, r = quick
    if gpu.available() and any(gpu.available().values()):
        pytest.skip("a CUDA device is present: see test_gpu_suite_on_device")
    assert r["gpu"]["available"] is False and "no usable CUDA device" in r["gpu"]["reason"]
    assert any(n.startswith("GPU:") for n in r["notes"])
    assert r["machine"]["gpu"] is None


def test_compare_report_with_itself_and_a_changed_copy(quick, tmp_path, capsys):
    out, r = quick
    rows = compare.compare(r, r)
    assert rows and all(row["b_over_a"] == pytest.approx(1.0) for row in rows)
    names = {row["metric"] for row in rows}
    assert "iforest records/s @ 262144" in names and "server stream-256x1 ours/echo" in names
    b = json.loads(json.dumps(r))
    for p in b["kernels"]["throughput"]["detectors"]["iforest"]["points"]:
        p["ours"] *= 2.0
    bpath = tmp_path / "b.json"
    bpath.write_text(json.dumps(b))
    png = tmp_path / "cmp.png"
    assert main(["bench", "compare", str(out / "results.json"), str(bpath), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    line = next(ln for ln in text.splitlines() if ln.startswith("iforest records/s @ 1 "))
    assert "2.000" in line and "B better" in line
    assert png.read_bytes().startswith(PNG)


def test_compare_reads_the_pytest_benchmark_summary():
    """benchmarks/conftest.py's summary.json maps onto the same metric names as a bench report."""
    summary = {"machine": {}, "groups": [
        {"group": "iforest-throughput", "ours": {"name": "outlierd", "value": 3e6, "rows": 1_000_000},
         "peers": [{"name": "scikit-learn score_samples (threading, n_jobs=2)", "value": 5e5, "rows": 1_000_000, "ratio": 6.0}]},
        {"group": "iforest-latency-1row", "ours": {"name": "outlierd", "value": 3.5, "rows": 1}, "peers": []}]}
    report = {"kernels": {"throughput": {"detectors": {"iforest": {"points": [
        {"batch": 1_000_000, "ours": 2.7e6, "peers": {"scikit-learn score_samples (x)": {"records_per_s": 4.5e5, "ratio": 6.0}}}]}}}},
        "latency": {"iforest": {"1": {"ours": {"p50_us": 3.5, "p99_us": 5.0, "p99.9_us": 9.0}, "peers": {}}}}}
    rows = {r["metric"]: r for r in compare.compare(summary, report)}
    assert rows["iforest records/s @ 1000000"]["b_over_a"] == pytest.approx(0.9)
    assert rows["iforest sklearn records/s @ 1000000"]["b_over_a"] == pytest.approx(0.9)
    assert rows["iforest ours/sklearn @ 1000000"]["b_over_a"] == pytest.approx(1.0)
    assert rows["iforest p50 us @ 1 rec"]["b_over_a"] == pytest.approx(1.0)


@pytest.mark.parametrize("argv, msg", [
    (["bench", "--suite", "kernels,nope"], "outlierd: error: --suite: unknown suite(s) nope"),
    (["bench", "compare", "{missing}", "{missing}"], "outlierd: error: [Errno 2]"),
    (["bench", "compare", "{notjson}", "{notjson}"], "not JSON"),
    (["bench", "compare", "{other}", "{other}"], "not an outlierd bench results.json"),
    (["bench", "--suite", "quality", "--data", "{missing}"], "not a directory"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, msg):
    (tmp_path / "notjson").write_text("{")
    (tmp_path / "other").write_text('{"a": 1}')
    files = {"missing": tmp_path / "nope", "notjson": tmp_path / "notjson", "other": tmp_path / "other"}
    argv = [a.format(**files) for a in argv]
    if argv[1] != "compare":
        argv += ["--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def _auc_oracle(y: np.ndarray, s: np.ndarray) -> float:
    """ROC-AUC as the Mann-Whitney statistic (ties count one half)."""
    pos, neg = s[y == 1], s[y == 0]
    return float(((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (pos.size * neg.size))


def test_quality_on_a_data_folder_matches_an_oracle(tmp_path):
    """--data DIR: each CSV graded; the reported ROC-AUC equals the rank statistic of the same model's scores."""
    from outlierd.core import load_model
    from outlierd.core.registry import Registry

    X, y, names = quality.synthetic(seed=3, n=4000, d=6, rate=0.05)
    data = tmp_path / "data"
    data.mkdir()
    header = ",".join([*names, "label"])
    np.savetxt(data / "one.csv", np.column_stack([X, y]), delimiter=",", header=header, comments="", fmt="%.9g")
    res = quality.run(data, "label", tmp_path, Progress(quiet=True), detectors=("robust_z", "iforest"))
    d = res["datasets"][0]
    assert d["name"] == "one.csv" and d["rows"] == 4000 and d["features"] == 6
    Xf = np.loadtxt(data / "one.csv", delimiter=",", skiprows=1)
    tr, te = quality._split(Xf[:, -1].astype(np.int8), 0)
    for det in ("robust_z", "iforest"):
        r = d["results"][det]
        assert 0.75 < r["roc_auc"] <= 1.0, (det, r)   # displaced records: far better than chance
        assert r["pr_auc"] > 3 * r["base_rate"]
    s = load_model(Registry(tmp_path / "quality-registry").path("q0-robust_z", 1)).score(Xf[te, :-1])
    assert d["results"]["robust_z"]["roc_auc"] == pytest.approx(_auc_oracle(Xf[te, -1].astype(int), s), abs=1e-12)


def test_crossover_needs_the_gpu_ahead_from_there_on():
    pts = [{"batch": 1, "cpu": 10.0, "gpu": 1.0}, {"batch": 16, "cpu": 10.0, "gpu": 11.0},
           {"batch": 256, "cpu": 10.0, "gpu": 9.0}, {"batch": 4096, "cpu": 10.0, "gpu": 20.0},
           {"batch": 65536, "cpu": 10.0, "gpu": 80.0}]
    assert gpu.crossover(pts) == 4096
    assert gpu.crossover([{"batch": 1, "cpu": 2.0, "gpu": 1.0}]) is None


def test_old_script_paths_still_run():
    """benchmarks/loadgen.py and benchmarks/echo_server.py are kept (the pytest suites start them)."""
    for script in ("loadgen.py", "echo_server.py"):
        out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.startswith("usage:"), out.stderr


@pytest.mark.gpu
def test_gpu_suite_on_device(tmp_path):
    """With a CUDA device: device scores equal the Numba kernel's, a crossover is found, the report says so."""
    if not any(gpu.available().values()):
        pytest.skip("no usable CUDA device (torch.cuda / onnxruntime CUDAExecutionProvider)")
    assert main(["bench", "--suite", "gpu", "--quick", "--quiet", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "results.json").read_text())["gpu"]
    assert r["available"] and all(d <= gpu.GPU_ATOL for d in r["max_abs_diff_vs_cpu"].values())
    assert r["points"] and r["points"][-1]["batch"] >= 65_536


def test_json_only_quality_on_the_cardio_dataset(tmp_path):
    """`--suite quality --quick --data data/ --json-only`: the ODDS cardio set (data/cardio.csv) graded per
    detector, results.json alone written. Isolation Forest on cardio is known to reach ~0.9 ROC-AUC."""
    out = tmp_path / "r"
    assert main(["bench", "--suite", "quality", "--quick", "--data", str(ROOT / "data"), "--json-only", "--quiet", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]
    r = json.loads((out / "results.json").read_text())
    d = next(d for d in r["quality"]["datasets"] if d["name"] == "cardio.csv")
    assert d["rows"] == 1831 and d["features"] == 21 and d["train_rows"] + d["test_rows"] == 1831
    assert set(d["results"]) == set(quality.QUICK_DETECTORS)
    assert d["results"]["iforest"]["roc_auc"] > 0.85
    assert all(0.0 <= v["pr_auc"] <= 1.0 for v in d["results"].values())
    pq = d["prequential"]   # Half-Space Trees, score-then-learn over the file in order
    assert pq["records"] == 1831 and 0.5 < pq["roc_auc"] <= 1.0 and pq["records_per_s"] > 0
    if isinstance(pq["river"], dict):  # River's HalfSpaceTrees with the same seed: the same scores, checked before timing
        assert pq["river"]["records"] == 1831 and pq["river"]["max_abs_diff"] <= 1e-9
        assert math.isclose(pq["river"]["ratio"], pq["river"]["ours_records_per_s"] / pq["river"]["records_per_s"], rel_tol=1e-9)

"""``outlierd bench compare A.json B.json``: the ratio B / A of every number the two reports share.

A report is an ``outlierd bench`` results.json, or the ``.benchmarks/summary.json`` that the
pytest-benchmark suites (``make bench``) write: both are read into the same flat metric names, so a
bench report can be checked against the pytest suites run on the same machine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from outlierd.core.errors import InvalidInputError

SHORT_PEERS = {"scikit-learn": "sklearn", "ONNX Runtime": "onnxruntime", "NumPy": "numpy"}


def _peer(name: str) -> str:
    return next((v for k, v in SHORT_PEERS.items() if name.startswith(k)), name.split(" ")[0])


def metrics(report: dict[str, Any]) -> dict[str, tuple[float, bool]]:
    """Flat ``name -> (value, higher_is_better)``."""
    out: dict[str, tuple[float, bool]] = {}
    if "groups" in report and "machine" in report:  # pytest-benchmark summary.json (benchmarks/conftest.py)
        for g in report["groups"]:
            det, _, kind = g["group"].partition("-")
            ours = g.get("ours")
            if g["group"].startswith("server-") or ours is None:
                continue
            if kind == "throughput":
                out[f"{det} records/s @ {ours['rows']}"] = (ours["value"], True)
                for p in g["peers"]:
                    out[f"{det} {_peer(p['name'])} records/s @ {p['rows']}"] = (p["value"], True)
                    if p.get("ratio"):
                        out[f"{det} ours/{_peer(p['name'])} @ {p['rows']}"] = (p["ratio"], True)
            elif kind.startswith("latency"):
                out[f"{det} p50 us @ {ours['rows']} rec"] = (ours["value"], False)
                for p in g["peers"]:
                    out[f"{det} {_peer(p['name'])} p50 us @ {p['rows']} rec"] = (p["value"], False)
        return out
    k = report.get("kernels")
    if k:
        for det, d in k["throughput"]["detectors"].items():
            for p in d["points"]:
                out[f"{det} records/s @ {p['batch']}"] = (p["ours"], True)
                for name, v in p["peers"].items():
                    out[f"{det} {_peer(name)} records/s @ {p['batch']}"] = (v["records_per_s"], True)
                    out[f"{det} ours/{_peer(name)} @ {p['batch']}"] = (v["ratio"], True)
    for det, per in (report.get("latency") or {}).items():
        for size, r in per.items():
            for q in ("p50", "p99", "p99.9"):
                out[f"{det} {q} us @ {size} rec"] = (r["ours"][f"{q}_us"], False)
            for name, v in r["peers"].items():
                out[f"{det} {_peer(name)} p50 us @ {size} rec"] = (v["p50_us"], False)
    for s in (report.get("server") or {}).get("scenarios", []):
        out[f"server {s['scenario']} records/s"] = (s["ours"]["records_per_s"], True)
        out[f"server {s['scenario']} ours/echo"] = (s["ratio"], True)
        if "p99_us" in s["ours"]:
            out[f"server {s['scenario']} p99 us"] = (s["ours"]["p99_us"], False)
    for d in (report.get("quality") or {}).get("datasets", []):
        for det, r in d.get("results", {}).items():
            if "roc_auc" in r:
                out[f"quality {d['name']} {det} roc_auc"] = (r["roc_auc"], True)
                out[f"quality {d['name']} {det} pr_auc"] = (r["pr_auc"], True)
        pq = d.get("prequential")
        if pq:
            out[f"quality {d['name']} prequential hst roc_auc"] = (pq["roc_auc"], True)
            out[f"quality {d['name']} prequential hst records/s"] = (pq["records_per_s"], True)
    g = report.get("gpu") or {}
    for p in g.get("points", []):
        out[f"gpu records/s @ {p['batch']}"] = (p["gpu"], True)
    c = g.get("cuda")
    if c:
        out["gpu cuda device-resident records/s"] = (c["device_resident"]["records_per_s"], True)
        out["gpu cuda end-to-end records/s"] = (c["end_to_end"]["records_per_s"], True)
    return out


def load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InvalidInputError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or not ({"kernels", "latency", "server", "quality", "gpu", "groups"} & data.keys()):
        raise InvalidInputError(f"{path}: not an outlierd bench results.json nor a benchmarks summary.json")
    return data


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for every metric in both: A, B, B/A and whether B is better (by that metric's sense)."""
    ma, mb = metrics(a), metrics(b)
    rows = []
    for name in ma:
        if name not in mb:
            continue
        (va, hib), (vb, _) = ma[name], mb[name]
        ratio = vb / va if va else None
        rows.append({"metric": name, "a": va, "b": vb, "b_over_a": ratio,
                     "b_better": None if ratio is None else (ratio > 1) == hib})
    return rows


def text(rows: list[dict[str, Any]], a: str, b: str) -> str:
    if not rows:
        return f"no metric in common between {a} and {b}"
    w = max(len(r["metric"]) for r in rows)
    lines = [f"A = {a}", f"B = {b}", f"{'metric':<{w}}  {'A':>14}  {'B':>14}  {'B/A':>7}"]
    for r in rows:
        ratio = "-" if r["b_over_a"] is None else f"{r['b_over_a']:.3f}"
        lines.append(f"{r['metric']:<{w}}  {r['a']:>14,.4g}  {r['b']:>14,.4g}  {ratio:>7}" + ("" if r["b_better"] is None else
                                                                                          ("  B better" if r["b_better"] else "  A better")))
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    from .report import _pyplot

    plt = _pyplot()
    rows = [r for r in rows if r["b_over_a"] is not None]
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.28 * len(rows))))
    ys = range(len(rows))
    ax.barh(list(ys), [r["b_over_a"] for r in rows], color=["#4c72b0" if r["b_better"] else "#dd8452" for r in rows])
    ax.axvline(1.0, color="black", lw=1)
    ax.set_yticks(list(ys), [r["metric"] for r in rows], fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("B / A (blue: B better, orange: A better)")
    ax.invert_yaxis()
    ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

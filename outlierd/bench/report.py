"""results.json, a PNG per plot, a self-contained report.html (the PNGs inlined) and a text table."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any


def _fmt_rate(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1e6:,.2f} M/s" if v >= 1e5 else f"{v:,.0f} /s"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _log_log(ax: Any, xlabel: str, ylabel: str, title: str) -> None:
    """The set-up every throughput-against-size plot shares: log axes, labels, grid, legend."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def plots(results: dict[str, Any], out: Path) -> list[tuple[str, Path]]:
    """One PNG per suite that ran; returns (title, path) pairs. Needs matplotlib (the bench extra)."""
    plt = _pyplot()
    made: list[tuple[str, Path]] = []

    def save(fig: Any, name: str, title: str) -> None:
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append((title, path))

    k = results.get("kernels")
    gpu = results.get("gpu") or {}
    if k:
        dets = k["throughput"]["detectors"]
        fig, axes = plt.subplots(1, len(dets), figsize=(5.2 * len(dets), 4.2), squeeze=False)
        for ax, (name, d) in zip(axes[0], dets.items()):
            pts = d["points"]
            ax.plot([p["batch"] for p in pts], [p["ours"] for p in pts], "o-", lw=2, label="outlierd (Numba)")
            for peer in d["peers"]:
                xs = [p["batch"] for p in pts if peer in p["peers"]]
                ys = [p["peers"][peer]["records_per_s"] for p in pts if peer in p["peers"]]
                ax.plot(xs, ys, "s--", label=peer.split(",")[0].split(" (")[0])
            if name == "iforest" and gpu.get("available"):
                g = gpu["points"]
                ax.plot([p["batch"] for p in g], [p["gpu"] for p in g], "^-", label="GPU (best backend)")
                if gpu.get("crossover_batch"):
                    ax.axvline(gpu["crossover_batch"], color="grey", ls=":", label=f"CPU/GPU crossover {gpu['crossover_batch']:,}")
            _log_log(ax, "batch size (records per call)", "records/s", f"{name}: throughput vs batch size")
        save(fig, "kernels-throughput.png", "Throughput against batch size (same rows and model for every implementation)")
        th = k.get("threads")
        if th and th["points"]:
            fig, ax = plt.subplots(figsize=(5.5, 4))
            ts = [p["threads"] for p in th["points"]]
            ax.plot(ts, [p["ours"] for p in th["points"]], "o-", lw=2, label="outlierd (Numba)")
            ax.plot(ts, [p["sklearn"] for p in th["points"]], "s--", label="scikit-learn (threading)")
            ax.set_xticks(ts)
            ax.set_xlabel("threads")
            ax.set_ylabel("records/s")
            ax.set_yscale("log")
            ax.set_title(f"iforest, {th['rows']:,} rows: threads")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
            save(fig, "kernels-threads.png", "Isolation Forest throughput against threads")
    if gpu.get("available"):
        fig, axes = plt.subplots(1, 2 if gpu.get("cuda") else 1, figsize=(11 if gpu.get("cuda") else 5.8, 4.2), squeeze=False)
        ax = axes[0][0]
        g = gpu["points"]
        xs = [p["batch"] for p in g]
        ax.plot(xs, [p["cpu"] for p in g], "o-", lw=2, label="Numba kernel (CPU)")
        for b in gpu["backends"]:
            ax.plot(xs, [p[b] for p in g], "^-", label={"cuda": "CUDA kernel", "torch": "torch (CUDA)", "onnx": "ONNX Runtime CUDA"}.get(b, b))
        if gpu.get("crossover_batch"):
            ax.axvline(gpu["crossover_batch"], color="grey", ls=":", label=f"CPU/GPU crossover {gpu['crossover_batch']:,}")
        _log_log(ax, "batch size (records per call, from host memory)", "records/s", f"iforest on {gpu.get('device_name') or 'the GPU'}: end to end")
        c = gpu.get("cuda")
        if c:
            ax = axes[0][1]
            dr, e2e = c["device_resident"], c["end_to_end"]
            ax.plot([p["rows"] for p in dr["by_size"]], [p["records_per_s"] for p in dr["by_size"]], "o-", lw=2,
                    label=f"device-resident (block {dr['best']['block']}, ilp {dr['best']['ilp']})")
            ax.plot([e2e["rows"]], [e2e["records_per_s"]], "s", ms=9, label="end to end from host (best configuration)")
            ax.axhline(c["targets"]["device_resident_records_per_s"], color="C0", ls=":", label="target, device-resident")
            ax.axhline(c["targets"]["end_to_end_records_per_s"], color="C1", ls=":", label="target, end to end")
            _log_log(ax, "records per call", "records/s", f"CUDA kernel, {c['trees']} trees x {c['features']} features")
        save(fig, "gpu.png", "GPU: the forest on each GPU backend against the Numba kernel, and the CUDA kernel at large batches")
    lat = results.get("latency")
    if lat and "iforest" in lat:
        per = lat["iforest"]
        labels: list[str] = []
        series: dict[str, list[list[float]]] = {}
        for size, r in per.items():
            labels.append(f"{size} record{'s' if size != '1' else ''}")
            for name, v in [("outlierd", r["ours"]), *[(p.split(" (")[0].split(",")[0], v) for p, v in r["peers"].items()]]:
                series.setdefault(name, []).append([v["p50_us"], v["p99_us"], v["p99.9_us"]])
        fig, axes = plt.subplots(1, len(labels), figsize=(5.5 * len(labels), 4), squeeze=False)
        for i, (ax, label) in enumerate(zip(axes[0], labels)):
            w = 0.8 / max(1, len(series))
            for j, (name, vals) in enumerate(series.items()):
                ax.bar([q + j * w for q in range(3)], vals[i], w, label=name)
            ax.set_xticks([q + w * (len(series) - 1) / 2 for q in range(3)], ["p50", "p99", "p99.9"])
            ax.set_yscale("log")
            ax.set_ylabel("microseconds per call")
            ax.set_title(f"iforest latency, {label} per call")
            ax.grid(True, axis="y", which="both", alpha=0.3)
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=len(series))
        save(fig, "latency.png", "Per-call latency percentiles (each call timed on its own)")
    srv = results.get("server")
    if srv and srv.get("scenarios"):
        sc = srv["scenarios"]
        fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(sc)), 4.2))
        xs = list(range(len(sc)))
        ax.bar([x - 0.2 for x in xs], [s["echo"]["records_per_s"] for s in sc], 0.4, label="echo (same messages, no scoring)", color="#bbbbbb")
        ax.bar([x + 0.2 for x in xs], [s["ours"]["records_per_s"] for s in sc], 0.4, label="outlierd serve")
        for x, s in zip(xs, sc):
            ax.annotate(f"{s['ratio']:.2f}x", (x + 0.2, s["ours"]["records_per_s"]), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), [s["scenario"] for s in sc], rotation=20, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("records/s")
        ax.set_title("end to end (gRPC; http-*: the HTTP door) vs a bare echo of the same messages\n(label: ours / echo records/s)", fontsize=10)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "server.png", "Server: records/s through gRPC (and the HTTP door) against a bare echo of the same messages")
    q = results.get("quality")
    if q and q.get("datasets"):
        ds = [d for d in q["datasets"] if "results" in d]
        if ds:
            fig, axes = plt.subplots(1, 2, figsize=(11, 4))
            for ax, metric in zip(axes, ("roc_auc", "pr_auc")):
                w = 0.8 / len(ds)
                for j, d in enumerate(ds):
                    dets = q["detectors"]
                    vals = [d["results"].get(t, {}).get(metric, 0.0) for t in dets]
                    ax.bar([i + j * w for i in range(len(dets))], vals, w, label=d["name"])
                ax.set_xticks([i + w * (len(ds) - 1) / 2 for i in range(len(q["detectors"]))], q["detectors"])
                if metric == "pr_auc":  # a random ranking's PR-AUC is the anomaly rate
                    ax.axhline(ds[0]["anomaly_rate"], color="grey", ls=":", label="random ranking")
                else:
                    ax.axhline(0.5, color="grey", ls=":", label="random ranking")
                ax.set_ylim(0, 1)
                ax.set_title(metric.replace("_", "-").upper().replace("AUC", "AUC"))
                ax.grid(True, axis="y", alpha=0.3)
                ax.legend(fontsize=8)
            save(fig, "quality.png", "Detection quality on the graded half of each dataset")
    return made


def table(results: dict[str, Any]) -> str:
    """The readable summary printed at the end of a run."""
    lines = []
    m = results["machine"]
    lines.append(f"machine: {m.get('cpu')} ({m.get('usable_cpus', m.get('logical_cpus'))} usable CPUs, {m.get('memory_gib', '?')} GiB), "
                 f"GPU: {m.get('gpu') or 'none'}; load average {m.get('loadavg')}")
    k = results.get("kernels")
    if k:
        for name, d in k["throughput"]["detectors"].items():
            lines.append(f"\n{name} throughput ({d['ours']}); ratio = ours / peer, same run")
            head = f"  {'batch':>9}  {'outlierd':>12}" + "".join(f"  {p.split(' (')[0].split(',')[0][:22]:>22}" for p in d["peers"])
            lines.append(head)
            for p in d["points"]:
                row = f"  {p['batch']:>9,}  {_fmt_rate(p['ours']):>12}"
                for peer in d["peers"]:
                    v = p["peers"].get(peer)
                    cell = f"{_fmt_rate(v['records_per_s'])} ({v['ratio']:.1f}x)" if v else "-"
                    row += f"  {cell:>22}"
                lines.append(row)
        th = k.get("threads")
        if th:
            lines.append(f"\niforest threads at {th['rows']:,} rows: " + ", ".join(
                f"{p['threads']}: {_fmt_rate(p['ours'])} ({p['ratio']:.1f}x sklearn, {p['ns_per_node_visit']:.2f} ns per node visit per thread)"
                for p in th["points"]))
    lat = results.get("latency")
    if lat:
        lines.append("\nlatency per call, microseconds (p50 / p99 / p99.9)")
        for det, per in lat.items():
            for size, r in per.items():
                o = r["ours"]
                peers = "; ".join(f"{p.split(' (')[0].split(',')[0]} {v['p50_us']:,.0f} / {v['p99_us']:,.0f} / {v['p99.9_us']:,.0f}"
                                  for p, v in r["peers"].items())
                lines.append(f"  {det:>9} {size:>3} rec: outlierd {o['p50_us']:,.1f} / {o['p99_us']:,.1f} / {o['p99.9_us']:,.1f};  {peers}")
    srv = results.get("server")
    if srv:
        lines.append(f"\nserver ({srv['ours']} vs {srv['floor']}; median of {srv['rounds']} round(s), {srv['seconds']:g} s each)")
        for s in srv["scenarios"]:
            extra = ""
            if "p99_us" in s["ours"]:
                extra = f"  p50 {s['ours']['p50_us']:,.0f} us (echo {s['echo']['p50_us']:,.0f}), p99 {s['ours']['p99_us']:,.0f} us (echo {s['echo']['p99_us']:,.0f})"
            lines.append(f"  {s['scenario']:<20} outlierd {_fmt_rate(s['ours']['records_per_s']):>12}  echo {_fmt_rate(s['echo']['records_per_s']):>12}"
                         f"  ours/echo {s['ratio']:.2f}{extra}")
    q = results.get("quality")
    if q:
        lines.append("\nquality (ROC-AUC / PR-AUC on the graded half)")
        for d in q["datasets"]:
            if "results" not in d:
                lines.append(f"  {d['name']}: {d.get('error')}")
                continue
            cells = [f"{t} {r['roc_auc']:.3f}/{r['pr_auc']:.3f}" if "roc_auc" in r else f"{t} error: {r['error']}"
                     for t, r in d["results"].items()]
            lines.append(f"  {d['name']} (rate {d['anomaly_rate']:.3f}): " + "; ".join(cells))
            pq = d.get("prequential")
            if pq:
                rv = pq.get("river")
                peer = (f"; River {_fmt_rate(rv['records_per_s'])} on {rv['records']:,} records, ours {rv['ratio']:.0f}x faster, "
                        f"same scores (max diff {rv['max_abs_diff']:.1g})") if isinstance(rv, dict) else f"; {rv}"
                lines.append(f"    prequential {pq['detector']}: {pq['roc_auc']:.3f}/{pq['pr_auc']:.3f} over {pq['records']:,} records, "
                             f"{_fmt_rate(pq['records_per_s'])}{peer}")
    g = results.get("gpu")
    if g is not None:
        if not g.get("available"):
            lines.append(f"\ngpu: {g.get('reason')}")
        else:
            lines.append(f"\ngpu ({', '.join(g['backends'])}): crossover batch {g['crossover_batch']}"
                         + ("  [SIMULATED: Numba's CUDA simulator, not a GPU]" if g.get("simulated") else ""))
            for p in g["points"]:
                per = "  ".join(f"{b} {_fmt_rate(p.get(b))}" for b in g["backends"]) if len(g["backends"]) > 1 else ""
                lines.append(f"  {p['batch']:>9,}  cpu {_fmt_rate(p['cpu'])}  gpu {_fmt_rate(p['gpu'])}  gpu/cpu {p['gpu'] / p['cpu']:.2f}"
                             + (f"  ({per})" if per else ""))
            for b, why in (g.get("unavailable") or {}).items():
                lines.append(f"  {b}: not measured: {why}")
            c = g.get("cuda")
            if c:
                dr, e2e, t = c["device_resident"], c["end_to_end"], c["targets"]
                lines.append(f"  cuda kernel ({c['trees']} trees of depth {c['depth']}, {c['features']} {c['dtype']} features), "
                             f"device {g.get('device_name')}:")
                lines.append(f"    device-resident: {_fmt_rate(dr['records_per_s'])} (target {_fmt_rate(t['device_resident_records_per_s'])}: "
                             f"{'met' if t['device_resident_met'] else 'NOT met'}); block {dr['best']['block']}, "
                             f"{dr['best']['ilp']} trees per step; by rows: "
                             + ", ".join(f"{p['rows']:,} {_fmt_rate(p['records_per_s'])}" for p in dr["by_size"]))
                lines.append("    sweep: " + ", ".join(f"b{s['block']}/ilp{s['ilp']} {_fmt_rate(s['records_per_s'])}" for s in dr["sweep"]))
                b = e2e["best"]
                lines.append(f"    end to end from host memory, {e2e['rows']:,} rows: {_fmt_rate(e2e['records_per_s'])} (target "
                             f"{_fmt_rate(t['end_to_end_records_per_s'])}: {'met' if t['end_to_end_met'] else 'NOT met'}); chunks of "
                             f"{b['chunk_rows']:,}, {b['streams']} streams, {b['host_threads']} copy threads")
                lines.append("    sweep: " + ", ".join(f"{s['chunk_rows']:,}x{s['streams']}/t{s['host_threads']} {_fmt_rate(s['records_per_s'])}"
                                                     for s in e2e["sweep"]))
                cp = c["copies"]
                lines.append(f"    copies: host->pinned {cp['host_to_pinned_GBps']:.1f} GB/s, pinned->device {cp['pinned_to_device_GBps']:.1f} GB/s "
                             f"({cp['bytes_per_record']} bytes per record)")
    lines.append(f"\nwall time {results['wall_s']:.1f} s")
    return "\n".join(lines)


def write(results: dict[str, Any], out: Path, json_only: bool = False) -> list[Path]:
    """results.json always; with plots: a PNG per plot, report.html (PNGs inlined) and summary.txt."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json"]
    text = table(results)
    if not json_only:
        try:
            made = plots(results, out)
        except ImportError:
            made = []
            results.setdefault("notes", []).append("no plots: matplotlib is not installed (pip install 'outlierd[bench]')")
        results["plots"] = [p.name for _, p in made]
        figs = "\n".join(f"<h2>{html.escape(t)}</h2>\n<img alt='{html.escape(t)}' src='data:image/png;base64,"
                         f"{base64.b64encode(p.read_bytes()).decode()}'>" for t, p in made)
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in results.get("notes", []))
        page = (f"<!doctype html><html><head><meta charset='utf-8'><title>outlierd bench</title>"
                f"<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}img{{max-width:100%}}"
                f"pre{{background:#f4f4f4;padding:1em;overflow-x:auto}}</style></head><body>"
                f"<h1>outlierd bench: {html.escape(results['date'])}</h1><p>{html.escape(results['machine'].get('command', ''))}</p>"
                f"<ul>{notes}</ul>{figs}<h2>Numbers</h2><pre>{html.escape(text)}</pre>"
                f"<h2>Machine</h2><pre>{html.escape(json.dumps(results['machine'], indent=2))}</pre></body></html>")
        (out / "report.html").write_text(page, encoding="utf-8")
        (out / "summary.txt").write_text(text + "\n", encoding="utf-8")
        written += [p for _, p in made] + [out / "report.html", out / "summary.txt"]
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return written

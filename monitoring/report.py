"""The batch drift report behind ``outlierd drift report``.

One file against a registry model's reference profile (``reference.json``): load the model, take
the file's records (loaded by the caller with the model's feature columns), score them, observe every record into one
:class:`~monitoring.drift.Window` and evaluate it with the same tests as streaming monitoring (PSI,
Wasserstein and a state per feature; KS on scores; the alert rate against the calibrated rate with
an exact binomial p-value; data-quality counts). The result is written as one self-contained HTML
page (inline CSS and SVG, nothing fetched) and optionally as a JSON summary
(:meth:`DriftResult.summary` plus a header: features most-drifted first).

The same pass that scores the file explains its flagged records (``Model.score_explain`` with
``flagged_only``): the page and the summary list the most anomalous records with their top
features, and count, per feature, how often it is the top contributor among the flagged records
(why the model is alerting on this file).
"""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, UTC
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from outlierd.core.errors import ArtifactError, DataError, InvalidInputError
from outlierd.core.registry import CHAMPION, Registry

from .drift import QUALITY_REASONS, DriftConfig, DriftResult, Reference, Window, evaluate, observe, reference_for

STATES = ("ok", "warn", "drift")
STATE_COLOURS = {"ok": "#1a7f37", "warn": "#b7791f", "drift": "#c53030"}
REF_COLOUR = "#a0aec0"
QUALITY_LABELS = {"missing": "# NaN", "non_finite": "# ±inf", "out_of_range": "# out of range", "constant_break": "# constant break"}
CUR_COLOUR = "#2b6cb0"
TOP_RECORDS = 20   # records listed in "Most anomalous records" by default
EXPLAIN_TOP_K = 3  # features shown per record
# what a contribution is, per detector (core/explain.py); higher = pushes towards anomalous
CONTRIBUTION_MEANING = {
    "iforest": "the path-length reduction from the trees' splits on the feature",
    "robust_z": "|z| of the feature (robust z-score)",
    "hbos": "the feature's term of the HBOS sum (−log of its bin's relative density)",
    "knn": "the mean squared difference to the record's k nearest reference records on the feature",
    "lof": "the mean squared difference to the record's k nearest reference records on the feature",
    "autoencoder": "the feature's squared reconstruction error",
    "stacked": "the feature's term in the label model's logit",
}


class Records(Protocol):
    """The data a report tests: its records with the model's features in the model's order (NaN
    where missing), where they came from, and what loading them found (e.g. training's
    ``Dataset``, loaded by the caller)."""

    X: np.ndarray
    feature_names: list[str]
    path: Any
    warnings: list[str]


@dataclass
class DriftReport:
    """Everything the page and the JSON summary show."""

    model: str
    version: int
    ref: str
    data: str
    rows: int
    generated: str
    threshold: float
    result: DriftResult
    window: Window
    reference: Reference
    profile: dict[str, Any]
    config: DriftConfig
    unscored: int = 0
    published: str | None = None
    warnings: list[str] = field(default_factory=list)
    kind: str = ""
    # the highest-scoring records, highest first: {"row", "score", "flagged", "features": [{"name", "contribution"}]}
    top_records: list[dict[str, Any]] = field(default_factory=list)
    # per feature, among flagged records: {"name", "top1", "top1_share", "in_top_k"}, most often top-1 first
    alert_features: list[dict[str, Any]] = field(default_factory=list)
    flagged: int = 0
    explain_top_k: int = 0  # 0: the model has no explanations

    def summary(self) -> dict[str, Any]:
        """The JSON summary: the header, then :meth:`DriftResult.summary` (features most-drifted
        first), then ``top_records`` and ``alert_features`` (see :class:`DriftReport`)."""
        head = {"model": self.model, "version": self.version, "ref": self.ref, "data": self.data, "rows": self.rows,
                "generated": self.generated, "threshold": self.threshold, "unscored_rows": self.unscored}
        why = {"flagged_records": self.flagged, "top_k": self.explain_top_k, "features": self.alert_features}
        return _finite({**head, **self.result.summary(), "top_records": self.top_records, "alert_features": why})


def _finite(obj: Any) -> Any:
    """NaN / inf become null so the summary is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _records_explained(names: list[str], rows: np.ndarray, scores: np.ndarray, flagged: np.ndarray,
                       feat: np.ndarray, contrib: np.ndarray) -> list[dict[str, Any]]:
    out = []
    for r, sc, fl, fr, cr in zip(rows.tolist(), scores.tolist(), flagged.tolist(), feat.tolist(), contrib.tolist()):
        out.append({"row": r, "score": sc, "flagged": fl,
                    "features": [{"name": names[j], "contribution": c} for j, c in zip(fr, cr) if j >= 0]})
    return out


def alert_features(names: list[str], feat: np.ndarray) -> list[dict[str, Any]]:
    """Per feature, over the explained records ``feat`` ((n, top_k) indices, -1 rows skipped): how
    often it is the top contributor (``top1``, ``top1_share`` of the n) and how often among the
    top k (``in_top_k``); features that never appear are left out; most often top-1 first."""
    feat = np.asarray(feat, dtype=np.int64)
    feat = feat[feat[:, 0] >= 0]
    n, d = feat.shape[0], len(names)
    top1 = np.bincount(feat[:, 0], minlength=d)
    any_k = np.bincount(feat[feat >= 0], minlength=d)
    order = sorted(np.flatnonzero(any_k).tolist(), key=lambda j: (-top1[j], -any_k[j], j))
    return [{"name": names[j], "top1": int(top1[j]), "top1_share": float(top1[j] / n), "in_top_k": int(any_k[j])} for j in order]


def build_report(registry: str | os.PathLike, model: str, ds: Records, ref: str | int = CHAMPION,
                 config: DriftConfig = DriftConfig(), *, top_records: int = TOP_RECORDS) -> DriftReport:
    """Score the records ``ds`` with ``model`` at ``ref`` and test them for drift against the
    model's reference; explain the flagged records in the same pass and keep the ``top_records``
    highest-scoring ones. ``ds`` holds the model's features, in its order; the caller loads it
    (entirely missing columns are drift to report, not an error)."""
    if isinstance(top_records, bool) or not isinstance(top_records, (int, np.integer)) or top_records < 0:
        raise InvalidInputError(f"top_records (--top-records) must be an integer >= 0; got {top_records!r}")
    reg = Registry(registry)
    version = reg.resolve(model, ref)
    m = reg.load(model, version)
    reference = reference_for(m, config)  # ValueError when the artifact has no reference profile
    if reference.feature_names != m.feature_names:
        raise ArtifactError(f"model {model!r} version {version}: the reference profile's features "
                            f"{reference.feature_names[:5]} do not match the model's {m.feature_names[:5]}")
    data = ds.path
    if list(ds.feature_names) != m.feature_names:
        raise DataError(f"{data}: the records' features {list(ds.feature_names)[:5]} are not the features of {model!r} "
                        f"version {version}, {m.feature_names[:5]}, in that order")
    X = np.asarray(ds.X, dtype=np.float64)
    n_rows = int(X.shape[0])
    if n_rows == 0:
        raise DataError(f"{data}: no records to compare with the reference")
    rows = np.arange(n_rows)  # file row (0-based, header excluded) of each scored record
    window = Window.empty(reference)
    unscored = 0
    warnings = list(ds.warnings)
    if m.preprocessing.reject:
        # The model cannot score records with NaN / inf: their values still count in the feature
        # histograms and data quality, but not in the score histogram or the alert rate.
        ok = np.all(np.isfinite(X), axis=1)
        unscored = int((~ok).sum())
        if unscored:
            rest = Window.empty(reference)
            observe(rest, reference, X[~ok], np.zeros(unscored), math.inf)
            window.counts += rest.counts
            window.missing += rest.missing
            window.quality += rest.quality
            X, rows = X[ok], rows[ok]
    top_k = min(EXPLAIN_TOP_K, m.n_features)
    top: list[dict[str, Any]] = []
    why: list[dict[str, Any]] = []
    n_flagged = 0
    if X.shape[0]:
        try:
            # one pass: scores for every record, explanations for the flagged ones only
            scores, feat, contrib = m.score_explain(X, top_k, flagged_only=True)
        except NotImplementedError as e:
            warnings.append(f"no explanations: {e}")
            scores, feat, contrib, top_k = m.score(X), None, None, 0
        observe(window, reference, X, scores, m.threshold)
        flagged = scores >= m.threshold
        n_flagged = int(flagged.sum())
        pick = np.argsort(-scores, kind="stable")[:top_records]  # ties: earlier row first
        if feat is not None and contrib is not None:
            f_top, c_top = feat[pick], contrib[pick]
            unflagged = ~flagged[pick]
            if unflagged.any():  # fewer flagged records than asked for: explain the few others listed
                f_top[unflagged], c_top[unflagged] = m.explain(X[pick[unflagged]], top_k)
            why = alert_features(m.feature_names, feat[flagged])
        else:
            f_top = np.full((pick.size, 0), -1, dtype=np.int64)
            c_top = np.zeros((pick.size, 0))
        top = _records_explained(m.feature_names, rows[pick], scores[pick], flagged[pick], f_top, c_top)
    result = evaluate(window, reference, config)
    if unscored:
        warnings.append(f"{unscored} records with NaN or inf were not scored (the model's missing-value policy is 'reject')")
    return DriftReport(model, version, str(ref), str(data), n_rows,
                       datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
                       m.threshold, result, window, reference, m.reference, config, unscored,
                       m.manifest.get("published"), warnings, m.kind, top, why, n_flagged, top_k)


def _write_text(path: str | os.PathLike, text: str) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def drift_report(registry: str | os.PathLike, model: str, ds: Records, out: str | os.PathLike,
                 *, ref: str | int = CHAMPION, json_out: str | os.PathLike | None = None,
                 config: DriftConfig = DriftConfig(), top_records: int = TOP_RECORDS) -> DriftReport:
    """Build the report on ``ds`` and write the HTML page to ``out`` (and the JSON summary to ``json_out``)."""
    report = build_report(registry, model, ds, ref, config, top_records=top_records)
    _write_text(out, render_html(report))
    if json_out is not None:
        _write_text(json_out, json.dumps(report.summary(), indent=2, allow_nan=False) + "\n")
    return report


# ---------------------------------------------------------------------------------------- HTML

def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _num(v: float | None, fmt: str = ".3f") -> str:
    if v is None or not math.isfinite(v):
        return "–"
    return format(v, fmt)


def _pct(v: float | None, digits: int = 2) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{100 * v:.{digits}f}%"


def _edge(v: float) -> str:
    return format(v, ".3g").replace("e+0", "e").replace("e-0", "e-")


def _ticks(peak: float) -> tuple[float, float]:
    """A round tick step for proportions up to ``peak`` (at most 5 intervals) and the axis top."""
    peak = min(max(peak, 0.01), 1.0)
    exp = 10 ** math.floor(math.log10(peak / 4))
    step = next(m * exp for m in (1, 2, 2.5, 5, 10) if m * exp * 5 >= peak)
    return step, min(step * math.ceil(peak / step - 1e-9), 1.0)


def _histogram_svg(ref_p: np.ndarray, cur_p: np.ndarray | None, edges: np.ndarray, title: str,
                   marker: float | None = None, missing: tuple[float, float] | None = None,
                   width: int = 560, height: int = 190) -> str:
    """Bar pairs (reference grey, current blue) on the reference bins, drawn at equal widths; with
    ``missing`` (reference, current share of records with NaN) one more pair after a gap."""
    k = ref_p.size
    left, right, top, bottom = 44, 8, (26 if marker is not None else 10), 34
    pw, ph = width - left - right, height - top - bottom
    peak = max(float(ref_p.max(initial=0)), float(cur_p.max(initial=0)) if cur_p is not None else 0.0,
               max(missing) if missing else 0.0)
    step, ymax = _ticks(peak)
    slots = k + (1.5 if missing else 0)
    gw = pw / slots
    bw = min(gw * 0.38, 36.0)
    parts = [f'<svg class="hist" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
             f'aria-label="{_e(title)}"><title>{_e(title)}</title>']
    digits = next(n for n in (0, 1, 2, 3) if abs(round(step * 100, n) - step * 100) < 1e-9)
    for t in range(int(round(ymax / step)) + 1):
        v = step * t
        y = top + ph - ph * v / ymax
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 4}" y="{y + 3:.1f}" class="ylab">{_e(_pct(v, digits))}</text>')

    def rng(i: int) -> str:
        lo = "−∞" if i == 0 else _edge(edges[i - 1])
        hi = "+∞" if i == k - 1 else _edge(edges[i])
        return f"({lo}, {hi}]"

    groups: list[tuple[float, str, Any, Any]] = [(i, rng(i), ref_p[i], cur_p[i] if cur_p is not None else None) for i in range(k)]
    if missing:
        groups.append((k + 0.5, "missing (NaN, share of records)", missing[0], missing[1]))
        xm = left + (k + 1) * gw
        parts.append(f'<line x1="{left + (k + 0.25) * gw:.1f}" x2="{left + (k + 0.25) * gw:.1f}" y1="{top}" '
                     f'y2="{top + ph}" class="sep"/>')
        parts.append(f'<text x="{xm:.1f}" y="{top + ph + 15}" class="xlab">missing</text>')
    for i, label, rp, cp in groups:
        x0 = left + i * gw + (gw - 2 * bw) / 2
        for j, (p, cls) in enumerate(((rp, "ref"), (cp, "cur"))):
            if p is None:
                continue
            h = ph * float(p) / ymax
            tip = f"{'reference' if cls == 'ref' else 'current'} {label}: {_pct(float(p))}"
            parts.append(f'<rect x="{x0 + j * bw:.1f}" y="{top + ph - h:.1f}" width="{bw:.1f}" height="{max(h, 0):.1f}" '
                         f'class="{cls}"><title>{_e(tip)}</title></rect>')
    # edge labels at the bin boundaries, thinned so they never overlap
    stride = max(1, math.ceil((k - 1) * 34 / pw))
    for i in range(1, k, stride):
        x = left + i * gw
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + ph}" y2="{top + ph + 4}" class="axis"/>')
        parts.append(f'<text x="{x:.1f}" y="{top + ph + 15}" class="xlab">{_e(_edge(edges[i - 1]))}</text>')
    parts.append(f'<line x1="{left}" x2="{left + k * gw:.1f}" y1="{top + ph}" y2="{top + ph}" class="axis"/>')
    if marker is not None and math.isfinite(marker):
        b = int(np.searchsorted(edges, marker, side="left"))  # bin of the marker: #edges < marker
        if 0 < b < k - 1 and edges[b] > edges[b - 1]:
            frac = (marker - edges[b - 1]) / (edges[b] - edges[b - 1])
        else:
            frac = 0.5
        x = left + (b + frac) * gw
        anchor = "end" if x > left + pw * 0.8 else "start"
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top - 14}" y2="{top + ph}" class="marker">'
                     f'<title>{_e(f"alert threshold {marker:.6g}")}</title></line>')
        parts.append(f'<text x="{x + (-4 if anchor == "end" else 4):.1f}" y="{top - 6}" class="mlab" '
                     f'text-anchor="{anchor}">alert threshold {_e(_edge(marker))}</text>')
    parts.append(f'<text x="{left + k * gw / 2:.1f}" y="{height - 3}" class="xcap">reference bins (training quantiles, '
                 f'drawn at equal width){"; share of non-missing values" if missing else ""}</text>')
    parts.append("</svg>")
    return "".join(parts)


CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1a202c;background:#f7f8fa;margin:0}
main{max-width:1220px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:17px;margin:28px 0 10px;border-bottom:1px solid #e2e8f0;padding-bottom:4px}
.sub{color:#4a5568;margin:0 0 14px}
dl.meta{display:grid;grid-template-columns:max-content 1fr max-content 1fr;gap:4px 16px;margin:0;background:#fff;
  border:1px solid #e2e8f0;border-radius:6px;padding:12px 16px}
dl.meta dt{color:#718096}
dl.meta dd{margin:0;font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:13px;overflow-wrap:anywhere}
.banner{margin:16px 0 0;padding:10px 14px;border-radius:6px;border:1px solid;font-weight:600}
.banner.ok{background:#f0fff4;border-color:#9ae6b4;color:#1a7f37}
.banner.warn{background:#fffaf0;border-color:#fbd38d;color:#975a16}
.banner.drift{background:#fff5f5;border-color:#feb2b2;color:#c53030}
.banner.unjudged{background:#edf2f7;border-color:#cbd5e0;color:#4a5568}
.cards{display:grid;grid-template-columns:repeat(3,1fr);gap:12px}
.card{background:#fff;border:1px solid #e2e8f0;border-radius:6px;padding:12px 16px}
.card .k{color:#718096;font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.card .v{font-size:22px;font-weight:600;margin:2px 0}
.card .d{color:#4a5568;font-size:13px}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #e2e8f0}
th,td{padding:5px 10px;border-bottom:1px solid #edf2f7;text-align:right;white-space:nowrap}
th{background:#edf2f7;font-weight:600;font-size:12px;color:#4a5568}
th:nth-child(-n+3),td:nth-child(-n+3){text-align:left}
td.name{font-family:ui-monospace,"DejaVu Sans Mono",monospace;white-space:normal;overflow-wrap:anywhere}
td.name a{color:inherit}
td.zero{color:#a0aec0}
tr.drift td{background:#fffafa}
.pill{display:inline-block;min-width:46px;text-align:center;padding:1px 8px;border-radius:10px;color:#fff;font-size:12px;font-weight:600}
.pill.ok{background:#1a7f37}.pill.warn{background:#b7791f}.pill.drift{background:#c53030}.pill.na{background:#a0aec0}
.legend{font-size:12px;color:#4a5568;margin:0 0 8px}
.sw{display:inline-block;width:11px;height:11px;border-radius:2px;vertical-align:-1px;margin:0 4px 0 10px}
.grid2{display:grid;grid-template-columns:repeat(2,1fr);gap:12px}
.fig{background:#fff;border:1px solid #e2e8f0;border-radius:6px;padding:10px 12px}
.fig h3{font-size:14px;margin:0 0 4px;display:flex;gap:10px;align-items:center;flex-wrap:wrap}
.fig h3 code{font-size:14px;overflow-wrap:anywhere}
.fig .stats{color:#4a5568;font-size:12px;font-weight:400}
svg.hist{display:block;width:100%;height:auto;font-family:system-ui,"DejaVu Sans",sans-serif}
svg .grid{stroke:#edf2f7}svg .axis{stroke:#a0aec0}svg .sep{stroke:#cbd5e0;stroke-dasharray:2 2}
svg .ref{fill:#a0aec0}svg .cur{fill:#2b6cb0}
svg .ylab{font-size:10px;fill:#718096;text-anchor:end}
svg .xlab{font-size:10px;fill:#4a5568;text-anchor:middle}
svg .xcap{font-size:10px;fill:#a0aec0;text-anchor:middle}
svg .marker{stroke:#c53030;stroke-width:1.5;stroke-dasharray:5 3}
svg .mlab{font-size:11px;fill:#c53030}
ul.warn{margin:6px 0;padding-left:20px;color:#975a16}
td.why{text-align:left;white-space:normal}
td.why code{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:13px;overflow-wrap:anywhere}
td.why .c{color:#718096;font-size:12px}
.bar{display:inline-block;height:9px;background:#c53030;border-radius:2px;vertical-align:0}
footer{margin-top:28px;color:#a0aec0;font-size:12px}
@media (max-width:900px){.grid2,.cards{grid-template-columns:1fr}dl.meta{grid-template-columns:max-content 1fr}}
"""


def _pill(state: str | None) -> str:
    if state is None:
        return '<span class="pill na">n/a</span>'
    return f'<span class="pill {_e(state)}">{_e(state)}</span>'


def _anchor(i: int) -> str:
    return f"f{i}"


def _explanations_html(report: DriftReport, w: Any) -> None:
    """"Why are we alerting" (top-1 feature counts among flagged records) and "Most anomalous records"."""
    k = report.explain_top_k
    meaning = CONTRIBUTION_MEANING.get(report.kind, "the detector's per-feature attribution")
    w("<h2>Why are we alerting</h2>")
    if not k:
        w("<p class='legend'>This model has no explanations.</p>")
    elif not report.flagged:
        w(f"<p class='legend'>No record reached the alert threshold {_e(_edge(report.threshold))}.</p>")
    else:
        w(f"<p class='legend'>Among the {report.flagged:,} flagged records: how often each feature contributes most to "
          f"the score (top 1) and how often it is among the top {k}. Contribution ({_e(report.kind)}): {_e(meaning)}.</p>")
        w("<table><thead><tr><th>#</th><th>feature</th><th>share as top 1</th><th>top 1</th>"
          f"<th>in top {k}</th></tr></thead><tbody>")
        for rank, f in enumerate(report.alert_features, 1):
            width = max(1, round(120 * f["top1_share"])) if f["top1"] else 0
            w(f"<tr><td>{rank}</td><td class='name'>{_e(f['name'])}</td><td><span class='bar' style='width:{width}px'></span> "
              f"{_pct(f['top1_share'], 1)}</td><td>{f['top1']:,}</td><td>{f['in_top_k']:,}</td></tr>")
        w("</tbody></table>")
    if not report.top_records:
        return
    w(f"<h2>Most anomalous records</h2><p class='legend'>The {len(report.top_records)} highest-scoring records of the file; "
      "row: 0-based record index in the file (header excluded)"
      + (f"; top {k} features with their contributions ({_e(meaning)})" if k else "") + ".</p>")
    w("<table><thead><tr><th>#</th><th>row</th><th>flagged</th><th>score</th>"
      + (f"<th style='text-align:left'>top {k} features (contribution)</th>" if k else "") + "</tr></thead><tbody>")
    for rank, r in enumerate(report.top_records, 1):
        feats = ", ".join(f"<code>{_e(f['name'])}</code> <span class='c'>{_e(_num(f['contribution'], '.4g'))}</span>"
                          for f in r["features"])
        w(f"<tr class='{'drift' if r['flagged'] else ''}'><td>{rank}</td><td>{r['row']:,}</td>"
          + ("<td><span class='pill drift'>yes</span></td>" if r["flagged"] else "<td><span class='pill na'>no</span></td>")
          + f"<td>{_num(r['score'], '.6g')}</td>" + (f"<td class='why'>{feats}</td>" if k else "") + "</tr>")
    w("</tbody></table>")


def render_html(report: DriftReport) -> str:
    """The report as one self-contained HTML page (inline CSS and SVG; every text escaped)."""
    res, ref, win, cfg = report.result, report.reference, report.window, report.config
    summary = res.summary()
    index = {n: j for j, n in enumerate(ref.feature_names)}
    prof_feats = {f.get("name"): f for f in (report.profile.get("features") or [])}
    n_drift = sum(f["state"] == "drift" for f in summary["features"])
    n_warn = sum(f["state"] == "warn" for f in summary["features"])
    d = len(summary["features"])
    out: list[str] = []
    w = out.append
    title = f"Drift report: {report.model} v{report.version} on {Path(report.data).name}"
    w(f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
      f'<meta name="viewport" content="width=device-width,initial-scale=1"><title>{_e(title)}</title>'
      f"<style>{CSS}</style></head><body><main>")

    # header
    w(f"<header><h1>Drift report: {_e(report.model)} <span style='color:#718096'>version {_e(report.version)}</span></h1>")
    w(f'<p class="sub">{_e(report.data)} against the reference profile of the model\'s training data</p>')
    meta = [("model", report.model), ("version", f"{report.version} (requested as {report.ref})"),
            ("data file", report.data), ("rows", f"{report.rows:,}"),
            ("generated", report.generated), ("model published", report.published or "–"),
            ("reference rows", f"{report.profile.get('rows', '–'):,}" if isinstance(report.profile.get("rows"), int) else "–"),
            ("threshold", _edge(report.threshold))]
    w('<dl class="meta">' + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in meta) + "</dl>")
    if not res.judged:
        cls, text = "unjudged", (f"Not judged: {res.records:,} records is below the minimum of {cfg.min_records:,}; "
                                 "the statistics are shown but no state is set.")
    else:
        def named(state: str) -> str:  # the features in that state, most drifted first (as in the table)
            names = [str(f["name"]) for f in summary["features"] if f["state"] == state]
            return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")

        bits = [f"{n_drift} of {d} features drifted ({named('drift')})" if n_drift else "no feature drifted"]
        if n_warn:
            bits.append(f"{n_warn} in warn ({named('warn')})")
        bits.append("score distribution drifted" if res.score_drift else "score distribution stable")
        bits.append("alert rate shifted" if res.alert_rate_shift else "alert rate as calibrated")
        cls = "drift" if (n_drift or res.score_drift or res.alert_rate_shift) else "warn" if n_warn else "ok"
        text = "; ".join(bits) + "."
        text = text[0].upper() + text[1:]
    w(f'<div class="banner {cls}">{_e(text)}</div></header>')

    # score and alert cards
    w("<h2>Scores</h2><div class='cards'>")
    ks_state = None if not res.judged else ("drift" if res.score_drift else "ok")
    w(f"<div class='card'><div class='k'>Score KS distance</div><div class='v'>{_num(res.score_ks)} {_pill(ks_state)}</div>"
      f"<div class='d'>largest gap between the score CDFs at the reference score bins; drift at ≥ {_num(cfg.ks_drift, 'g')}</div></div>")
    al_state = None if not res.judged or res.expected_alert_rate is None else ("drift" if res.alert_rate_shift else "ok")
    w(f"<div class='card'><div class='k'>Alert rate</div><div class='v'>{_pct(res.alert_rate)} {_pill(al_state)}</div>"
      f"<div class='d'>{win.alerts:,} of {win.records:,} scored records at score ≥ {_e(_edge(report.threshold))}; "
      f"expected {_pct(res.expected_alert_rate)} (calibrated on the training data); "
      f"two-sided binomial p = {_num(res.alert_rate_p, '.3g')}, shifted below p = {_num(cfg.alert_rate_p, 'g')}</div></div>")
    totals = win.quality.sum(axis=0)
    q_text = ", ".join(f"{int(totals[q]):,} {r.replace('_', ' ')}" for q, r in enumerate(QUALITY_REASONS))
    affected = len(res.quality)
    w(f"<div class='card'><div class='k'>Data quality</div><div class='v'>{int(totals.sum()):,} <span style='font-size:14px;"
      f"font-weight:400'>issues in {affected} of {d} features</span></div><div class='d'>{_e(q_text)} "
      f"(out of range: beyond the training range by more than {_e(format(cfg.range_margin, '.0%'))} of it)</div></div>")
    w("</div>")
    if report.warnings:
        w("<ul class='warn'>" + "".join(f"<li>{_e(x)}</li>" for x in report.warnings) + "</ul>")
    _explanations_html(report, w)

    # feature table
    w(f"<h2>Features, most drifted first</h2><p class='legend'>State from PSI: warn at ≥ {_num(cfg.psi_warn, 'g')}, "
      f"drift at ≥ {_num(cfg.psi_drift, 'g')}. Wasserstein-1 on the binned data, divided by the span of the reference bins.</p>")
    w("<table><thead><tr><th>#</th><th>feature</th><th>state</th><th>PSI</th><th>Wasserstein</th><th>missing rate</th>"
      "<th>training missing rate</th>" + "".join(f"<th>{_e(QUALITY_LABELS.get(r, r))}</th>" for r in QUALITY_REASONS)
      + "</tr></thead><tbody>")
    for rank, f in enumerate(summary["features"], 1):
        j = index[f["name"]]
        state = f["state"] if res.judged else None
        ref_missing = prof_feats.get(f["name"], {}).get("missing_rate")
        cells = "".join(f"<td class='{'zero' if not win.quality[j, q] else ''}'>{int(win.quality[j, q]):,}</td>"
                        for q in range(len(QUALITY_REASONS)))
        w(f"<tr class='{_e(state or '')}'><td>{rank}</td><td class='name'><a href='#{_anchor(j)}'>{_e(f['name'])}</a></td>"
          f"<td>{_pill(state)}</td><td>{_num(f['psi'])}</td><td>{_num(f['wasserstein'])}</td>"
          f"<td>{_pct(f['missing_rate'])}</td><td>{_pct(ref_missing)}</td>{cells}</tr>")
    w("</tbody></table>")

    legend = (f"<p class='legend'><span class='sw' style='background:{REF_COLOUR};margin-left:0'></span>reference (training)"
              f"<span class='sw' style='background:{CUR_COLOUR}'></span>current ({_e(Path(report.data).name)})</p>")
    # score histogram
    w("<h2>Score distribution</h2>" + legend)
    s_total = win.score_counts.sum()
    s_cur = win.score_counts / s_total if s_total else None
    w("<div class='fig'>" + _histogram_svg(ref.score_proportions, s_cur, ref.score_edges, "score histogram",
                                           marker=report.threshold, width=1160, height=220) + "</div>")

    # per-feature histograms
    w("<h2>Feature distributions, most drifted first</h2>" + legend + "<div class='grid2'>")
    for f in summary["features"]:
        j = index[f["name"]]
        k = int(ref.n_bins[j])
        seen = win.counts[j, :k].sum()
        cur = win.counts[j, :k] / seen if seen else None
        state = f["state"] if res.judged else None
        extra = "" if seen else " · no values in the data"
        ref_missing = float(prof_feats.get(f["name"], {}).get("missing_rate") or 0.0)
        miss = (ref_missing, f["missing_rate"]) if ref_missing or win.missing[j] else None
        w(f"<div class='fig' id='{_anchor(j)}'><h3><code>{_e(f['name'])}</code>{_pill(state)}"
          f"<span class='stats'>PSI {_num(f['psi'])} · Wasserstein {_num(f['wasserstein'])} · "
          f"missing {_pct(f['missing_rate'])}{_e(extra)}</span></h3>"
          + _histogram_svg(ref.proportions[j, :k], cur, ref.edges[j, : k - 1], f"{f['name']} histogram",
                           missing=miss) + "</div>")
    w("</div>")
    w(f"<footer>outlierd drift report · {_e(report.generated)} · {res.records:,} records</footer></main></body></html>\n")
    return "".join(out)

"""deploy/: the Prometheus alert rules, the scrape config and the Grafana dashboard.

- ``promtool`` checks the rules and the config, and runs the rules' unit tests
  (deploy/prometheus/outlierd-rules.test.yml);
- the dashboard and the rules use only metric names the service exports (the public contract
  below, and the metrics declared in monitoring/metrics.py);
- end to end: a real ``outlierd serve`` scraped every second by a real Prometheus loading the
  rules; drifted records streamed through the server must show up as drift state 2 in Prometheus
  for the shifted features only, turn their drift alert pending, and every dashboard query must
  run against the real data.

promtool and prometheus come from Debian's ``prometheus`` package (``make deps-system`` installs it
when run as root); without them these tests skip, saying so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, dataset_path

DEPLOY = ROOT / "deploy"
PROM_DIR = DEPLOY / "prometheus"
RULES = PROM_DIR / "outlierd-rules.yml"
RULES_TEST = PROM_DIR / "outlierd-rules.test.yml"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "outlierd-dashboard.json"

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
INSTALL_HINT = "run `make deps-system` as root, or `apt-get install prometheus`"
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason=f"promtool not found on PATH ({INSTALL_HINT})")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason=f"prometheus not found on PATH ({INSTALL_HINT})")

# The public contract: metric name -> kind (histograms are exposed as _bucket/_count/_sum).
CONTRACT = {
    "outlierd_feature_psi": "gauge",
    "outlierd_feature_drift_state": "gauge",
    "outlierd_score_ks": "gauge",
    "outlierd_alert_rate": "gauge",
    "outlierd_expected_alert_rate": "gauge",
    "outlierd_alert_rate_pvalue": "gauge",
    "outlierd_data_quality_issues_total": "counter",
    "outlierd_request_duration_seconds": "histogram",
    "outlierd_records_scored_total": "counter",
    "outlierd_anomalies_total": "counter",
    "outlierd_model_info": "gauge",
    "outlierd_model_reloads_total": "counter",
    "outlierd_invalid_inputs_total": "counter",
    "outlierd_overloaded_total": "counter",
    "outlierd_queue_depth_records": "gauge",
    "outlierd_batch_size_records": "histogram",
}
METRIC_TOKEN = re.compile(r"\boutlierd_[A-Za-z0-9_]*")


def exposed_names(name: str, kind: str) -> set[str]:
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    if kind == "summary":
        return {name, f"{name}_count", f"{name}_sum"}
    if kind == "counter" and not name.endswith("_total"):
        return {f"{name}_total"}
    return {name}


def declared_metrics() -> dict[str, str]:
    """Metric names declared in monitoring/metrics.py (Counter/Gauge/Histogram/Summary("name", ...))."""
    src = (ROOT / "monitoring" / "metrics.py").read_text()
    found = re.findall(r"\b(Counter|Gauge|Histogram|Summary)\(\s*\"(outlierd_\w+)\"", src)
    return {name: kind.lower() for kind, name in found}


def allowed_names() -> set[str]:
    names: set[str] = set()
    for name, kind in {**CONTRACT, **declared_metrics()}.items():
        names |= exposed_names(name, kind)
    return names


def panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard.get("panels", []):
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows hold their panels
    return out


def dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(where, expr) of every panel target, variable query and annotation query."""
    exprs = [(f"panel {p.get('title')!r}", t["expr"]) for p in panels(dashboard) for t in p.get("targets", []) if t.get("expr")]
    for v in dashboard.get("templating", {}).get("list", []):
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if v.get("type") == "query" and q:
            exprs.append((f"variable {v['name']!r}", q))
    for a in dashboard.get("annotations", {}).get("list", []):
        if a.get("expr"):
            exprs.append((f"annotation {a.get('name')!r}", a["expr"]))
    return exprs


# ---------------------------------------------------------------------------------------------
# promtool
# ---------------------------------------------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=PROM_DIR, capture_output=True, text=True, timeout=60)


@needs_promtool
def test_promtool_check_rules():
    r = promtool("check", "rules", RULES.name)
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_promtool_rule_unit_tests():
    r = promtool("test", "rules", RULES_TEST.name)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


@needs_promtool
def test_promtool_check_config():
    r = promtool("check", "config", PROM_CONFIG.name)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_has_severity_summary_description_and_unit_tests():
    rules = RULES.read_text()
    alerts = re.findall(r"^\s*- alert: (\w+)\s*$", rules, re.M)
    assert len(alerts) >= 7 and len(set(alerts)) == len(alerts)
    blocks = re.split(r"^\s*- alert: ", rules, flags=re.M)[1:]
    for name, block in zip(alerts, blocks):
        assert re.search(r"severity: (critical|warning|info)\b", block), f"{name}: no severity label"
        assert "summary:" in block and "description:" in block, f"{name}: summary and description annotations"
    tested = set(re.findall(r"^\s*alertname: (\w+)\s*$", RULES_TEST.read_text(), re.M))
    assert set(alerts) <= tested, f"alerts without unit tests: {sorted(set(alerts) - tested)}"


# ---------------------------------------------------------------------------------------------
# metric names: dashboard and rules use only what the service exports
# ---------------------------------------------------------------------------------------------


def test_metrics_py_declares_the_service_contract():
    # the names parsed from metrics.py feed the check below: make sure the parse finds them
    declared = declared_metrics()
    assert {"outlierd_request_duration_seconds", "outlierd_records_scored_total", "outlierd_model_info"} <= set(declared)


def test_dashboard_parses_and_uses_only_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    allowed = allowed_names()
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    graphs = [p for p in panels(dashboard) if p["type"] != "row"]
    assert len(graphs) >= 8
    for p in graphs:
        assert p.get("targets"), f"panel {p['title']!r} has no query"
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
    used: set[str] = set()
    for where, expr in dashboard_exprs(dashboard):
        names = set(METRIC_TOKEN.findall(expr))
        unknown = names - allowed
        assert not unknown, f"{where} uses metrics the service does not export: {sorted(unknown)} in {expr!r}"
        used |= names
    # the panels the dashboard promises
    for name in ("outlierd_records_scored_total", "outlierd_request_duration_seconds_bucket", "outlierd_anomalies_total",
                 "outlierd_score_ks", "outlierd_alert_rate", "outlierd_feature_psi", "outlierd_feature_drift_state",
                 "outlierd_data_quality_issues_total", "outlierd_model_info", "outlierd_model_reloads_total"):
        assert name in used, f"no panel shows {name}"


def rule_exprs(text: str) -> list[str]:
    """The ``expr:`` values of a rules file (one line, or a block scalar's indented lines)."""
    lines, exprs, i = text.splitlines(), [], 0
    while i < len(lines):
        m = re.match(r"^(\s*)expr:\s*(.*)$", lines[i])
        i += 1
        if not m:
            continue
        indent, rest = len(m.group(1)), m.group(2).strip()
        if rest and rest[0] not in "|>":
            exprs.append(rest)
            continue
        block = []
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
            block.append(lines[i].strip())
            i += 1
        exprs.append("\n".join(block).strip())
    return exprs


def test_rules_use_only_exported_metrics():
    exprs = rule_exprs(RULES.read_text())
    assert len(exprs) == len(re.findall(r"^\s*- alert: ", RULES.read_text(), re.M)) and all(exprs)
    allowed = allowed_names()
    for expr in exprs:
        unknown = set(METRIC_TOKEN.findall(expr)) - allowed
        assert not unknown, f"outlierd-rules.yml uses metrics the service does not export: {sorted(unknown)} in {expr!r}"


# ---------------------------------------------------------------------------------------------
# end to end: outlierd serve -> Prometheus (scrape every 1 s, rules loaded) -> drift state 2
# ---------------------------------------------------------------------------------------------

SHIFTED = ("x0", "x3", "x10")  # cardio's features are standardised: +3 is +3 standard deviations
DRIFT_WAIT_S = 30.0
PANE_RECORDS = 2000  # small panes: a window is judged (>= 1000 records) within a fraction of a second
BATCH = 500


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, timeout: float = 2.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def start_process(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    log = open(log_path, "wb")
    try:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()  # the child holds its own descriptor


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)  # its own session: a server and any workers it spawned
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


class Prom:
    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"

    def query(self, expr: str) -> list[dict]:
        try:
            body = http_json(f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        except urllib.error.HTTPError as e:  # 400/422: a bad expression; say which, and why
            raise AssertionError(f"prometheus refused {expr!r}: {e.read().decode(errors='replace')}") from None
        assert body["status"] == "success", body
        return body["data"]["result"]

    def by_feature(self, expr: str) -> dict[str, float]:
        return {r["metric"]["feature"]: float(r["value"][1]) for r in self.query(expr)}


def wait_until(what, check, timeout: float, logs: list[Path], interval: float = 0.25):
    """Poll ``check()`` until it returns something truthy; fail with ``what`` (or ``what()``) and the logs' tails."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (OSError, ValueError) as e:  # not listening yet / not ready
            last = e
        else:
            if last:
                return last
        time.sleep(interval)
    what = what() if callable(what) else what
    pytest.fail(f"{what} (waited {timeout:.0f}s); last: {last!r}\n" + "\n".join(f"--- {p.name}:\n{tail(p)}" for p in logs))


def server_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTLIERD_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env["TMPDIR"] = str(tmp)
    # Small count-based tumbling drift windows, through the documented OUTLIERD_<FLAG> variables
    # (the same as --drift-pane-records / --drift-window-panes) where this version has the settings.
    from outlierd.server.settings import ServeSettings

    have = {f.name for f in fields(ServeSettings)}
    for name, value in (("drift_pane_records", PANE_RECORDS), ("drift_window_panes", 1)):
        if name in have:
            env[f"OUTLIERD_{name.upper()}"] = str(value)
    return env


def drifted_batches(X: np.ndarray, shift_cols: list[int], stop: threading.Event, rng: np.random.Generator):
    """Cardio rows drawn with replacement, the shifted columns moved by +3 std, until ``stop``."""
    std = X.std(axis=0)
    while not stop.is_set():
        B = X[rng.integers(0, len(X), BATCH)].copy()
        B[:, shift_cols] += 3.0 * std[shift_cols]
        yield B
        time.sleep(0.01)  # ~50k records/s at most: leave CPU for Prometheus on small machines


@needs_prometheus
def test_end_to_end_drift_shows_in_prometheus(tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    import grpc

    from outlierd.server.client import ScorerClient
    from outlierd.training.train import train

    t_start = time.monotonic()
    cardio = dataset_path("cardio")
    header = cardio.read_text().split("\n", 1)[0].split(",")
    X = np.loadtxt(cardio, delimiter=",", skiprows=1)[:, :-1]
    names = header[:-1]
    shift_cols = [names.index(f) for f in SHIFTED]
    unshifted = [f for f in names if f not in SHIFTED]

    # the prometheus first: it starts while the model trains
    grpc_port, metrics_port, prom_port = free_port(), free_port(), free_port()
    prom_cfg = tmp_path / "prometheus.yml"
    prom_cfg.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "outlierd", "scrape_interval": "1s", "scrape_timeout": "1s",
                            "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
    }))
    prom_log, server_log = tmp_path / "prometheus.log", tmp_path / "server.log"
    logs = [server_log, prom_log]
    prom_proc = start_process([PROMETHEUS, f"--config.file={prom_cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                               f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"], prom_log)
    server_proc = None
    stop = threading.Event()
    streamer = None
    try:
        train(cardio, tmp_path / "registry", "cardio", label_column="label", alias="champion", quiet=True)
        server_proc = start_process([sys.executable, "-m", "outlierd", "serve", "--registry", str(tmp_path / "registry"),
                                     "--model", "cardio", "--host", "127.0.0.1", "--port", str(grpc_port),
                                     "--metrics-port", str(metrics_port)], server_log, env=server_env(tmp_path))
        target = f"127.0.0.1:{grpc_port}"

        def serving():
            assert server_proc.poll() is None, f"server exited with {server_proc.returncode}:\n{tail(server_log)}"
            try:
                with grpc.insecure_channel(target) as ch:
                    return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1.0).status \
                        == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                return False

        wait_until("outlierd serve never said SERVING", serving, 40.0, logs)
        prom = Prom(prom_port)
        assert prom_proc.poll() is None, f"prometheus exited:\n{tail(prom_log)}"
        wait_until("prometheus is not ready", lambda: urllib.request.urlopen(f"{prom.base}/-/ready", timeout=1).status == 200, 20.0, logs)

        # stream drifted records in the background until the end of the test
        outcome: dict = {"records": 0, "errors": []}

        def stream():
            try:
                with ScorerClient(target) as client:
                    for r in client.score_stream(drifted_batches(X, shift_cols, stop, np.random.default_rng(0)), timeout=120):
                        if r.error:
                            outcome["errors"].append(r.error)
                        outcome["records"] += len(r.scores)
            except Exception as e:  # noqa: BLE001 - reported by the test below
                outcome["errors"].append(repr(e))

        streamer = threading.Thread(target=stream, name="drifted-stream", daemon=True)
        streamer.start()
        t_stream = time.monotonic()

        # 1. the target is up, and the drift state reaches Prometheus: 2 for every shifted feature
        wait_until("prometheus does not scrape outlierd (up != 1)",
                   lambda: [r for r in prom.query('up{job="outlierd"}') if r["value"][1] == "1"], 15.0, logs)

        seen: dict = {}

        def drift_seen():
            assert not outcome["errors"], outcome["errors"][:3]
            seen["states"] = prom.by_feature('outlierd_feature_drift_state{job="outlierd", model="cardio"}')
            return all(seen["states"].get(f) == 2 for f in SHIFTED)

        wait_until(lambda: f"outlierd_feature_drift_state never reached 2 for {SHIFTED} in Prometheus; last states "
                   + (f"{seen.get('states')}" if seen.get("states") else "none: the server exports no drift state")
                   + f"; {outcome['records']} records streamed", drift_seen, DRIFT_WAIT_S, logs)
        t_drift = time.monotonic() - t_stream

        # 2. ... and only for them: re-read once more, a scrape later
        time.sleep(1.0)
        states = prom.by_feature('outlierd_feature_drift_state{job="outlierd", model="cardio"}')
        psi = prom.by_feature('outlierd_feature_psi{job="outlierd", model="cardio"}')
        assert set(states) == set(names), f"drift state per feature, one per model feature: {sorted(states)}"
        assert all(states[f] == 2 for f in SHIFTED), states
        assert all(psi[f] >= 0.25 for f in SHIFTED), psi
        assert [f for f in unshifted if states[f] == 2] == [], f"unshifted features in drift: states {states}, psi {psi}"
        # resampled training rows are never out of the training range
        dq = prom.query('outlierd_data_quality_issues_total{job="outlierd", reason="out_of_range"} > 0')
        assert {r["metric"]["feature"] for r in dq} <= set(SHIFTED), dq

        # 3. the alert rules load, evaluate without errors, and the drift alert is pending for the
        #    shifted features (its `for` keeps it from firing within the test)
        groups = http_json(f"{prom.base}/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert len(rules) >= 7, groups
        bad = [(r["name"], r.get("lastError")) for r in rules if r.get("health") not in ("ok", "unknown")]
        assert not bad, f"rules failing to evaluate: {bad}"
        pending = wait_until(
            "OutlierdFeatureDrift is not pending for the shifted features",
            lambda: (lambda a: a if set(SHIFTED) <= a else None)(
                {r["metric"]["feature"] for r in prom.query('ALERTS{alertname="OutlierdFeatureDrift"}')}),
            10.0, logs)
        assert pending == set(SHIFTED), pending

        # 4. every dashboard query runs against the real data; the core panels have data
        dashboard = json.loads(DASHBOARD.read_text())
        empty = []
        for where, expr in dashboard_exprs(dashboard):
            q = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s").replace("$model", ".*").replace("$feature", ".*")
            if q.startswith("label_values("):
                m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q)
                assert m, q
                result = prom.query(m.group(1))
                assert all(m.group(2) in r["metric"] for r in result), (where, result)
            else:
                result = prom.query(q)  # asserts status success: the expression is valid PromQL
            if not result:
                empty.append(where)
        must_have_data = {"panel 'Throughput (records/s)'", "panel 'Request latency (p50 / p90 / p99)'", "panel 'Anomaly rate'",
                          "panel 'Score distribution shift'", "panel 'Model version serving'", "panel 'PSI per feature'",
                          "panel 'Drift state per feature'", "variable 'model'", "variable 'feature'"}
        assert not (must_have_data & set(empty)), f"dashboard queries with no data: {sorted(must_have_data & set(empty))}"

        assert not outcome["errors"], outcome["errors"][:3]
        assert outcome["records"] > 0
        print(f"\nend to end: drift state 2 in Prometheus {t_drift:.1f}s after the stream started; "
              f"{outcome['records']} records streamed; PSI shifted min {min(psi[f] for f in SHIFTED):.2f}, "
              f"unshifted max {max(psi[f] for f in unshifted):.3f}; total {time.monotonic() - t_start:.1f}s")
    finally:
        stop.set()
        if streamer is not None:
            streamer.join(10)
        if server_proc is not None:
            stop_process(server_proc)
        stop_process(prom_proc)

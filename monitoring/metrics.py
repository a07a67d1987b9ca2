"""Prometheus metrics of the scoring service. Names are a public contract (dashboards, alert rules).

With several worker processes, prometheus-client's multiprocess mode must be chosen before the
first metric exists: ``server.workers`` sets ``PROMETHEUS_MULTIPROC_DIR`` before it starts any
worker, and the parent serves ``/metrics`` through a ``MultiProcessCollector``. Tests inject a fresh
``CollectorRegistry``.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 16384, 65536, 262144, 1048576)


class ServiceMetrics:
    """Every metric the service exports, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry  # where companions (e.g. server.rollout's metrics) register too
        kw: dict[str, Any] = {"registry": registry} if registry is not None else {}
        self.request_latency = Histogram(
            "outlierd_request_duration_seconds", "Time from request received to response ready, by RPC method.",
            ["method"], buckets=LATENCY_BUCKETS, **kw)
        self.records_scored = Counter("outlierd_records_scored_total", "Records scored.", ["model", "version"], **kw)
        self.anomalies = Counter("outlierd_anomalies_total", "Records flagged anomalous (score >= threshold).", ["model", "version"], **kw)
        self.batch_size = Histogram("outlierd_batch_size_records", "Records per kernel call (after micro-batching).",
                                    ["model"], buckets=BATCH_BUCKETS, **kw)
        self.model_info = Gauge("outlierd_model_info", "1 for the model version each worker serves.",
                                ["model", "version", "alias"], multiprocess_mode="liveall", **kw)
        self.reloads = Counter("outlierd_model_reloads_total", "Model reload attempts by result (ok, refused; fallback: an earlier version served at start; registry_error: the registry could not be read).", ["model", "result"], **kw)
        self.invalid_inputs = Counter("outlierd_invalid_inputs_total", "Rejected requests by reason.", ["reason"], **kw)
        self.queue_depth = Gauge("outlierd_queue_depth_records", "Records waiting in the micro-batcher.",
                                 multiprocess_mode="livesum", **kw)
        self.device_fallbacks = Counter("outlierd_device_fallbacks_total", "Batches that failed on the GPU and ran on the CPU.", ["model"], **kw)
        self.overloaded = Counter("outlierd_overloaded_total", "Requests refused with RESOURCE_EXHAUSTED (queue full).", **kw)
        self.data_quality = Counter("outlierd_data_quality_issues_total",
                                    "Values with a data-quality issue, by feature and reason (missing, non_finite, out_of_range, constant_break).",
                                    ["model", "feature", "reason"], **kw)
        # Drift gauges: set here by a single worker; with several workers the parent computes them
        # from the merged histograms (monitoring.collector.DriftCollector) and workers leave these unset.
        self.drift = DriftGauges(registry)
        # Prediction capture (monitoring.capture) and reviewers' feedback (server.feedback)
        self.captured = Counter("outlierd_captured_total", "Scored records written to the feedback store.", ["model", "role"], **kw)
        self.capture_pruned = Counter("outlierd_capture_pruned_total",
                                      "Captured predictions deleted by retention (by age or store size; labelled ones are kept).", **kw)
        self.capture_dropped = Counter("outlierd_capture_dropped_total",
                                       "Records that should have been captured and were not, by reason (queue_full, write_error).",
                                       ["model", "reason"], **kw)
        self.store_retries = Counter("outlierd_feedback_store_retries_total",
                                     "Feedback store calls after a lost connection (PostgreSQL): retried (result=retry) or given up (result=failed).",
                                     ["result"], **kw)
        self.feedback = FeedbackGauges(registry)
        # Raw events through the feature engine (server.events): per-entity state
        self.feature_events = Counter("outlierd_feature_events_total", "Raw events turned into features.", ["model"], **kw)
        self.feature_entities = Gauge("outlierd_feature_entities", "Entities held in the feature state.", ["model"],
                                      multiprocess_mode="livesum", **kw)
        self.feature_state_bytes = Gauge("outlierd_feature_state_bytes", "Bytes of the feature state's arrays.", ["model"],
                                         multiprocess_mode="livesum", **kw)
        self.feature_evicted = Counter("outlierd_feature_entities_evicted_total",
                                       "Entities evicted from the feature state (least recently seen, over state.max_entities).",
                                       ["model"], **kw)
        self.feature_late = Counter("outlierd_feature_late_events_total",
                                    "Events older than their entity's previous event (processed at that event's time).", ["model"], **kw)


class DriftGauges:
    """The drift metrics of the last evaluated window (names are a public contract)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        kw: dict[str, Any] = {"registry": registry} if registry is not None else {}
        mode: dict[str, Any] = {"multiprocess_mode": "mostrecent"}
        self.psi = Gauge("outlierd_feature_psi", "PSI of the feature over the drift window vs the reference.", ["model", "feature"], **mode, **kw)
        self.wasserstein = Gauge("outlierd_feature_wasserstein", "Wasserstein-1 on the reference bins, over the bins' span.",
                                 ["model", "feature"], **mode, **kw)
        self.state = Gauge("outlierd_feature_drift_state", "Drift state per feature: 0 ok, 1 warn, 2 drift.", ["model", "feature"], **mode, **kw)
        self.score_ks = Gauge("outlierd_score_ks", "KS distance of the window's scores vs the reference scores.", ["model"], **mode, **kw)
        self.alert_rate = Gauge("outlierd_alert_rate", "Share of the window's records flagged anomalous.", ["model"], **mode, **kw)
        self.expected_alert_rate = Gauge("outlierd_expected_alert_rate", "The calibrated alert rate of the serving version.", ["model"], **mode, **kw)
        self.alert_rate_p = Gauge("outlierd_alert_rate_pvalue", "Binomial test p-value of the window's alert rate vs the calibrated one.",
                                  ["model"], **mode, **kw)
        self.window_records = Gauge("outlierd_drift_window_records", "Records in the evaluated drift window.", ["model"], **mode, **kw)

    def set(self, model: str, result) -> None:
        for f in result.features:
            self.psi.labels(model, f.name).set(f.psi)
            self.wasserstein.labels(model, f.name).set(f.wasserstein)
            self.state.labels(model, f.name).set(f.state)
        self.score_ks.labels(model).set(result.score_ks)
        self.alert_rate.labels(model).set(result.alert_rate)
        if result.expected_alert_rate is not None:
            self.expected_alert_rate.labels(model).set(result.expected_alert_rate)
        self.alert_rate_p.labels(model).set(result.alert_rate_p)
        self.window_records.labels(model).set(result.records)


class FeedbackGauges:
    """Live quality from reviewers' labels (monitoring.quality), recomputed from the shared store by
    every worker every few seconds: the workers agree, so multiprocess mode keeps the most recent.
    NaN: not enough labels to say."""

    def __init__(self, registry: CollectorRegistry | None = None):
        kw: dict[str, Any] = {"registry": registry} if registry is not None else {}
        mode: dict[str, Any] = {"multiprocess_mode": "mostrecent"}
        self.precision = Gauge("outlierd_feedback_precision", "Share of reviewed flagged records labelled anomaly.", ["model"], **mode, **kw)
        self.recall = Gauge("outlierd_feedback_recall_estimate",
                            "Estimated recall: flagged anomalies over flagged plus estimated missed ones (from reviewed random-sample captures).",
                            ["model"], **mode, **kw)
        self.disagreement = Gauge("outlierd_feedback_disagreement", "Share of records labelled by several reviewers whose labels disagree.",
                                  ["model"], **mode, **kw)
        self.labels = Gauge("outlierd_feedback_labels_total", "Labels stored, by label.", ["model", "label"], **mode, **kw)
        self.unknown = Gauge("outlierd_feedback_unknown_records", "Labelled record ids without a captured prediction.", ["model"], **mode, **kw)

    def set(self, model: str, q) -> None:
        nan = float("nan")
        self.precision.labels(model).set(nan if q.precision is None else q.precision)
        self.recall.labels(model).set(nan if q.recall_estimate is None else q.recall_estimate)
        self.disagreement.labels(model).set(nan if q.disagreement is None else q.disagreement)
        for label, n in q.by_label.items():
            self.labels.labels(model, label).set(n)
        self.unknown.labels(model).set(q.unknown_records)


def start_metrics_server(port: int, addr: str = "127.0.0.1", extra_collectors: tuple = ()) -> None:
    """Serve ``/metrics`` on ``addr:port`` (no auth: ``outlierd serve`` chooses ``addr`` by its
    ``--metrics-host``); aggregates worker processes when multiprocess mode is on. An address that
    cannot be bound is an OSError naming it."""
    registry = None
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        for c in extra_collectors:
            registry.register(c)
    try:
        if registry is not None:
            start_http_server(port, addr=addr, registry=registry)
        else:
            start_http_server(port, addr=addr)
    except OSError as e:
        raise OSError(f"cannot serve /metrics on {addr}:{port}: {e.strerror or e}") from e

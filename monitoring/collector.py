"""The parent's view of drift across worker processes (``outlierd serve --workers N``).

Workers share their panes as files; at every scrape this collector merges the panes of the newest
version any worker serves, evaluates the window once, and exports the drift gauges: the same values
one process seeing every record would have.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily

from outlierd.core.artifact import REFERENCE, load_json, read_manifest
from outlierd.core.registry import Registry

from .drift import DriftConfig, Reference, evaluate
from .stream import merge_dir, shared_tags


class DriftCollector:
    def __init__(self, share_dir: str | os.PathLike, registry: str | os.PathLike, model: str, window_panes: int,
                 config: DriftConfig = DriftConfig()):
        self.share_dir, self.model, self.window_panes, self.config = Path(share_dir), model, window_panes, config
        self.registry = Registry(registry)
        self._refs: dict[int, Reference] = {}

    def _reference(self, version: int) -> Reference:
        if version not in self._refs:
            path = self.registry.path(self.model, version)
            metrics = read_manifest(path).get("metrics", {})
            rate = metrics.get("train_alert_rate", metrics.get("alert_rate"))
            self._refs[version] = Reference.from_profile(load_json(path / REFERENCE), rate, self.config.range_margin)
        return self._refs[version]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        tags = shared_tags(self.share_dir) if self.share_dir.is_dir() else []
        if not tags:
            return
        version = tags[-1]
        ref = self._reference(version)
        result = evaluate(merge_dir(self.share_dir, ref, self.window_panes, tag=version), ref, self.config)
        m = self.model
        psi = GaugeMetricFamily("outlierd_feature_psi", "PSI of the feature over the drift window vs the reference.", labels=["model", "feature"])
        wd = GaugeMetricFamily("outlierd_feature_wasserstein", "Wasserstein-1 on the reference bins, over the bins' span.", labels=["model", "feature"])
        state = GaugeMetricFamily("outlierd_feature_drift_state", "Drift state per feature: 0 ok, 1 warn, 2 drift.", labels=["model", "feature"])
        for f in result.features:
            psi.add_metric([m, f.name], f.psi)
            wd.add_metric([m, f.name], f.wasserstein)
            state.add_metric([m, f.name], f.state)
        yield from (psi, wd, state)
        for name, doc, value in (
            ("outlierd_score_ks", "KS distance of the window's scores vs the reference scores.", result.score_ks),
            ("outlierd_alert_rate", "Share of the window's records flagged anomalous.", result.alert_rate),
            ("outlierd_alert_rate_pvalue", "Binomial test p-value of the window's alert rate vs the calibrated one.", result.alert_rate_p),
            ("outlierd_drift_window_records", "Records in the evaluated drift window.", result.records),
        ):
            g = GaugeMetricFamily(name, doc, labels=["model"])
            g.add_metric([m], value)
            yield g
        if result.expected_alert_rate is not None:
            g = GaugeMetricFamily("outlierd_expected_alert_rate", "The calibrated alert rate of the serving version.", labels=["model"])
            g.add_metric([m], result.expected_alert_rate)
            yield g

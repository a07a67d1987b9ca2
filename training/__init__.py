"""Training: data in, detectors fitted and evaluated, thresholds calibrated, artifacts published."""

from .export import export_detector, export_sklearn

__all__ = ["export_detector", "export_sklearn"]

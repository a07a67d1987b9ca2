"""The feature engine: raw events (entity, time, categories, amounts, places) -> feature rows, one
engine offline (replay, training) and online (serving). See docs/features.md."""

from .engine import FeatureEngine, FittedCategories
from .events import EventError, decode_events
from .fitted import FEATURES_FILE, engine_for, features_json, load_features
from .spec import FeatureSpec, SpecError, load_spec, parse_spec

__all__ = ["FEATURES_FILE", "EventError", "FeatureEngine", "FeatureSpec", "FittedCategories", "SpecError", "decode_events",
           "engine_for", "features_json", "load_features", "load_spec", "parse_spec"]

"""What a ``train`` job is asked to do: a frozen spec that validates itself once, on construction,
with an :class:`~outlierd.core.errors.InvalidInputError` naming the option, what it allows and
what it got. The pipeline (``training.train``) trusts it. (``score`` jobs: ``training.scoring.ScoreSpec``.)"""

from __future__ import annotations

import os
from dataclasses import dataclass
from collections.abc import Sequence

import numpy as np

from outlierd.core.errors import InvalidInputError
from outlierd.core.registry import validate_alias, validate_name
from outlierd.core.stacked import KIND as STACKED

from .detectors import DETECTORS, STREAMING_DETECTORS
from .labels import LabelledRecords
from .semi import DEFAULT_FOLDS, MIN_LABELS, parse_select

DEFAULT_ALERT_RATE = 0.01
AUTO = "auto"
# what ``detector=None`` (no ``--detector``) fits without labels for training; with partially
# labelled data (or feedback labels) of both kinds the default is ``auto`` (``training.train.resolve_detector``)
DEFAULT_DETECTOR = "iforest"
TRAIN_DETECTORS = (*DETECTORS, AUTO, STACKED, *STREAMING_DETECTORS)


def _name(value: str, what: str) -> str:
    try:
        return validate_name(value, what)
    except ValueError as e:
        raise InvalidInputError(str(e)) from e


def _int(name: str, value: object, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise InvalidInputError(f"{name} must be an integer >= {lo}; got {value!r}")


def _feature_columns(value: Sequence[str] | str | None, label_column: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    if isinstance(value, str):
        names = [c.strip() for c in value.split(",")]
    elif isinstance(value, Sequence) and all(isinstance(c, str) for c in value):
        names = list(value)
    else:
        raise InvalidInputError(f"--feature-columns must be column names (a comma-separated list); got {value!r}")
    if any(not c for c in names):
        raise InvalidInputError(f"--feature-columns: empty column name in {','.join(names)!r}")
    dupes = sorted({c for c in names if names.count(c) > 1})
    if dupes:
        raise InvalidInputError(f"--feature-columns names {dupes} more than once")
    if label_column is not None and label_column in names:
        raise InvalidInputError(f"--feature-columns includes the label column {label_column!r}; a column is a label "
                                "or a feature, not both")
    return tuple(names)


@dataclass(frozen=True)
class TrainSpec:
    """An ``outlierd train`` job.

    Labels: a ``label_column`` with every row labelled (0/1) is used for evaluation only. Partial
    labels (empty cells), ``feedback`` records, ``select`` or ``detector`` "auto" / "stacked"
    take the label-aware path: known anomalies are left out of the fit, detectors are compared out
    of fold, a semi-supervised model is fitted when there are ``min_labels`` labels of each kind.

    ``detector`` None (not given): iforest, unless the label-aware path has labels of both kinds
    (at least ``semi.MIN_SELECT_LABELS`` each), then ``auto``. An explicit ``detector`` is kept as
    given (``"iforest"`` stays unsupervised, known anomalies aside). ``select`` without a detector
    means ``auto``.
    """

    data: str | os.PathLike
    registry: str | os.PathLike
    model: str
    detector: str | None = None  # None: the default (see above); resolved by the pipeline
    label_column: str | None = None
    alert_rate: float = DEFAULT_ALERT_RATE
    alias: str | None = None
    seed: int = 0
    quiet: bool = False
    select: Sequence[str] | str | None = ()  # candidate names or a comma-separated string; a tuple once built
    feedback: LabelledRecords | None = None  # labelled captured records (``--labels-from-feedback``)
    min_labels: int = MIN_LABELS
    folds: int = DEFAULT_FOLDS
    # the feature columns, in order (names or a comma-separated string; a tuple once built). Empty:
    # every column but the label column, refused when one of them looks like a label (``label``,
    # ``target``, ``class`` ...: ``training.data.LABEL_LIKE``); listing such a column keeps it
    feature_columns: Sequence[str] | str | None = ()
    # a feature spec (JSON file): ``data`` holds raw events, replayed into features by the engine the
    # server runs; the spec and what it learned go into the artifact (docs/features.md)
    events_spec: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        _name(self.model, "model name")
        object.__setattr__(self, "feature_columns", _feature_columns(self.feature_columns, self.label_column))
        if self.alias is not None:
            try:
                validate_alias(self.alias)
            except ValueError as e:
                raise InvalidInputError(f"--alias: {e}") from e
        select = parse_select(self.select or None)
        object.__setattr__(self, "select", select)
        if self.detector is None and select:
            object.__setattr__(self, "detector", AUTO)
        if self.detector is not None and self.detector not in TRAIN_DETECTORS:
            raise InvalidInputError(f"unknown detector {self.detector!r}; choose one of {', '.join(TRAIN_DETECTORS)}")
        if select and self.detector not in (AUTO, STACKED):
            raise InvalidInputError(f"--select chooses the detector; drop --detector {self.detector} (or use --detector auto)")
        if (isinstance(self.alert_rate, bool) or not isinstance(self.alert_rate, (int, float))
                or not 0.0 < self.alert_rate < 1.0):
            raise InvalidInputError(f"--alert-rate must be in (0, 1); got {self.alert_rate}")
        _int("--seed", self.seed, 0)
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 2
                   for v in (self.min_labels, self.folds)):
            raise InvalidInputError(f"--min-labels and --folds must be at least 2; got {self.min_labels} and {self.folds}")
        if self.feedback is not None and not isinstance(self.feedback, LabelledRecords):
            raise InvalidInputError(f"feedback must be LabelledRecords; got {type(self.feedback).__name__}")
        if self.asks_for_labels and self.label_column is None and self.feedback is None:
            raise InvalidInputError("label-aware training needs labels: --label-column COL and/or --labels-from-feedback")

    @property
    def candidates(self) -> tuple[str, ...]:
        """``select`` as parsed on construction."""
        return tuple(self.select or ())

    @property
    def features(self) -> list[str] | None:
        """``feature_columns`` as parsed on construction; None when not given (every other column)."""
        return list(self.feature_columns or ()) or None

    @property
    def detector_given(self) -> bool:
        """False when the detector is the default one (resolved from the labels by the pipeline)."""
        return self.detector is not None

    @property
    def asks_for_labels(self) -> bool:
        """True when the options ask for label-aware training whatever the label column holds."""
        return bool(self.select) or self.feedback is not None or self.detector in (AUTO, STACKED)

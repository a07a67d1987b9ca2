"""The label vocabulary, defined once: what reviewers' labels are stored as, and the words accepted
for them (label columns of training data, feedback CSV imports)."""

from __future__ import annotations

ANOMALY = "anomaly"
NORMAL = "normal"
LABELS = (ANOMALY, NORMAL)   # what the feedback store holds
ANOMALY_WORDS = ("1", "1.0", "true", ANOMALY)
NORMAL_WORDS = ("0", "0.0", "false", NORMAL)
# cells read as "no label" in a partially labelled column
UNLABELLED_WORDS = ("", "nan", "null", "none", "na")


def label_of(word: str) -> str | None:
    """:data:`ANOMALY` or :data:`NORMAL` for an accepted word (any case, surrounding space
    ignored); ``None`` for anything else."""
    w = word.strip().lower()
    if w in ANOMALY_WORDS:
        return ANOMALY
    if w in NORMAL_WORDS:
        return NORMAL
    return None

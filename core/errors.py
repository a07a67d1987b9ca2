"""One error hierarchy for the whole service.

Each error carries a ``code`` naming the gRPC status it maps to; the mapping itself lives in one
place in ``server/`` so that unary and streaming handlers answer alike.
"""

from __future__ import annotations


class OutlierdError(Exception):
    """Base of every error outlierd raises on purpose."""

    code = "INTERNAL"


class InvalidInputError(OutlierdError, ValueError):
    """The caller's records are malformed (shape, dtype, non-finite values against the policy)."""

    code = "INVALID_ARGUMENT"


class ArtifactError(OutlierdError):
    """A model artifact is corrupt, incomplete, edited or of an unknown format: it must not serve."""

    code = "FAILED_PRECONDITION"


class ModelNotFoundError(OutlierdError, LookupError):
    """No such model, version or alias in the registry."""

    code = "NOT_FOUND"


class RegistryError(OutlierdError):
    """The registry could not complete an operation (locking, layout)."""

    code = "INTERNAL"

"""One error hierarchy for the whole project.

Every error outlierd raises on purpose is an :class:`OutlierdError` subclass. Each class carries
``code``, the gRPC status it maps to, and ``exit_code``, the CLI's exit status. The gRPC mapping
lives in one place (``outlierd.server.errors``: one decorator for unary handlers, one for streams);
the CLI has exactly one ``except`` (``outlierd.cli.main``). Library errors (OSError, sqlite3,
pyarrow, onnxruntime ...) are converted where they are caught, with ``raise ... from e``.

Classes that also derive from a builtin (``ValueError``, ``LookupError``, ``OSError``) keep
callers that caught the builtin working: extend, never rename.
"""

from __future__ import annotations

EXIT_ERROR = 2  # the CLI's exit status for any refused input or failed operation (argparse's too)


class OutlierdError(Exception):
    """Base of every error outlierd raises on purpose."""

    code = "INTERNAL"
    exit_code = EXIT_ERROR

    @property
    def message(self) -> str:
        """The text for a caller: the first argument as given (no quotes added by KeyError)."""
        return str(self.args[0]) if len(self.args) == 1 else str(self)


class InvalidInputError(OutlierdError, ValueError):
    """The caller's records or arguments are malformed (shape, dtype, non-finite values against
    the policy, an option out of range)."""

    code = "INVALID_ARGUMENT"


class DataError(InvalidInputError):
    """A data file cannot be used for training or scoring (missing, unreadable, wrong columns)."""


class ArtifactError(OutlierdError):
    """A model artifact is corrupt, incomplete, edited or of an unknown format: it must not serve."""

    code = "FAILED_PRECONDITION"


class DeviceError(OutlierdError):
    """The requested device cannot be used (e.g. ``--device cuda`` without a usable GPU)."""

    code = "FAILED_PRECONDITION"


class ModelNotFoundError(OutlierdError, LookupError):
    """No such model, version or alias in the registry."""

    code = "NOT_FOUND"


class RegistryError(OutlierdError):
    """The registry could not complete an operation (locking, layout)."""

    code = "INTERNAL"


class StoreError(OutlierdError):
    """The capture and label store cannot be read or written right now; nothing of the failed
    operation was stored."""

    code = "UNAVAILABLE"


class UnavailableError(OutlierdError):
    """A service or dependency the operation needs is not reachable or not enabled here."""

    code = "UNAVAILABLE"


class MissingDependencyError(OutlierdError, ImportError):
    """An optional extra this operation needs is not installed (the message names the extra)."""

    code = "FAILED_PRECONDITION"


class StoreUnavailableError(StoreError, OSError):
    """The store cannot be opened, read or written (locked, closed, unreachable, a newer schema).
    Also an OSError: callers that caught the OSError the store raised before keep working."""


class UnsupportedError(OutlierdError, NotImplementedError):
    """The model or backend does not offer this operation (e.g. explanations on a backend without
    an explanation kernel). Also a NotImplementedError, which it was raised as before."""

    code = "UNIMPLEMENTED"


class BackendUnavailableError(MissingDependencyError, ValueError):
    """The scoring backend asked for (``backend="onnx"`` / ``"torch"``) needs an extra that is not
    installed. Also a ValueError, which it was raised as before (an unusable ``backend`` argument)."""

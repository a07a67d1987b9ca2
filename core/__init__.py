"""outlierd's scoring core: Numba kernels, the model artifact and the registry.

``load_model(path)`` is the public entry point (also ``outlierd.load_model``); scores are float64,
higher = more anomalous. This package imports nothing else of the project.
"""

from .errors import (
    ArtifactError,
    BackendUnavailableError,
    DataError,
    DeviceError,
    InvalidInputError,
    MissingDependencyError,
    ModelNotFoundError,
    OutlierdError,
    RegistryError,
    StoreError,
    StoreUnavailableError,
    UnavailableError,
    UnsupportedError,
)
from .model import Model, load_model

__all__ = [
    "ArtifactError",
    "BackendUnavailableError",
    "DataError",
    "DeviceError",
    "InvalidInputError",
    "MissingDependencyError",
    "Model",
    "ModelNotFoundError",
    "OutlierdError",
    "RegistryError",
    "StoreError",
    "StoreUnavailableError",
    "UnavailableError",
    "UnsupportedError",
    "load_model",
]

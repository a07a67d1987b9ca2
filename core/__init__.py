"""outlierd's scoring core: Numba kernels, the model artifact and the registry.

``load_model(path)`` is the public entry point; scores are float64, higher = more anomalous.
"""

from .errors import ArtifactError, InvalidInputError, ModelNotFoundError, OutlierdError, RegistryError
from .model import Model, load_model

__all__ = [
    "ArtifactError",
    "InvalidInputError",
    "Model",
    "ModelNotFoundError",
    "OutlierdError",
    "RegistryError",
    "load_model",
]

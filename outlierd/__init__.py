"""outlierd: anomaly-detection scoring (Numba kernels, versioned artifacts, a registry, a gRPC service).

One import name. The design's folders install beneath it: ``outlierd.core`` (kernels, the artifact,
the registry), ``outlierd.training``, ``outlierd.server``, ``outlierd.monitoring``; the generated
gRPC stubs are ``outlierd.v1``; the console script is ``outlierd.cli``.

The library API::

    from outlierd import load_model, export_sklearn

Scores are float64, higher = more anomalous. The names below are imported on first use (PEP 562),
so ``import outlierd`` alone (the health check, the stubs) does not load Numba or scikit-learn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # `X as X`: an explicit re-export (PEP 484), the names __getattr__ below provides at run time
    from .core import ArtifactError as ArtifactError
    from .core import InvalidInputError as InvalidInputError
    from .core import Model as Model
    from .core import ModelNotFoundError as ModelNotFoundError
    from .core import OutlierdError as OutlierdError
    from .core import load_model as load_model
    from .training import export_detector as export_detector
    from .training import export_sklearn as export_sklearn

_LAZY = {
    "load_model": "outlierd.core",
    "Model": "outlierd.core",
    "OutlierdError": "outlierd.core",
    "InvalidInputError": "outlierd.core",
    "ArtifactError": "outlierd.core",
    "ModelNotFoundError": "outlierd.core",
    "export_sklearn": "outlierd.training",
    "export_detector": "outlierd.training",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'outlierd' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

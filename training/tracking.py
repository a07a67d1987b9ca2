"""MLflow as a view of the embedded registry: training runs, and a Model Registry mirror.

The directory registry (core/registry.py) stays the source of truth that the servers read; MLflow
gets a copy for the teams that already browse their experiments and models there:

- :func:`log_version_run` logs one published version as an MLflow run: parameters (the manifest's
  lineage parameters and detector parameters), metrics (the manifest's, plus the threshold), the
  lineage (data fingerprint, code version) as tags and ``lineage.json``, and the artifact directory
  itself under ``model/``.
- :func:`mirror_version`, :func:`mirror_alias` and :func:`mirror_model` mirror versions and aliases
  into the MLflow Model Registry, creating the registered model, the run holding the artifact and
  the model version when they are missing. The registered model has the outlierd model's name;
  MLflow numbers its versions itself, so every mirrored version carries the tag
  ``outlierd.version`` (the registry's version number) and is found again by it. Mirroring is
  idempotent: a version already mirrored is reused (after checking its manifest digest).

Model version tags: ``outlierd.version`` (registry version number), ``outlierd.package_version``
(the outlierd release that trained it), ``outlierd.manifest_sha256`` (the manifest's digest),
``outlierd.arrays_sha256`` (sha256 of ``arrays.npz``), ``outlierd.detector``, ``outlierd.published``.

MLflow is an optional extra (``pip install 'outlierd[mlflow]'``): it is imported inside the
functions, and a missing install is :class:`MlflowUnavailableError`. Every MLflow failure (server
down, bad URI, permission) surfaces as one :class:`MirrorError` naming the step that failed.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from collections.abc import Callable, Iterator

from outlierd.core.artifact import ARRAYS, read_manifest, verify_files
from outlierd.core.errors import MissingDependencyError, OutlierdError
from outlierd.core.registry import Registry

DEFAULT_EXPERIMENT = "outlierd"
ARTIFACT_PATH = "model"
"""Where a run keeps the artifact directory; model versions point at ``runs:/<run_id>/model``."""
INSTALL_HINT = "install the MLflow extra: pip install 'outlierd[mlflow]'"

TAG_MODEL = "outlierd.model"
TAG_VERSION = "outlierd.version"
TAG_PACKAGE = "outlierd.package_version"
TAG_MANIFEST = "outlierd.manifest_sha256"
TAG_ARRAYS = "outlierd.arrays_sha256"

_MAX_PARAM = 6000  # MLflow's limit on a parameter value (MAX_PARAM_VAL_LENGTH)
_MAX_TAG = 8000

T = TypeVar("T")


class MlflowUnavailableError(MissingDependencyError, ValueError):
    """``--mlflow-uri`` was given but MLflow is not installed (still a ValueError for older callers)."""


class MirrorError(OutlierdError):
    """An MLflow call failed (server down, bad URI, conflict): nothing in the embedded registry is lost."""

    code = "UNAVAILABLE"


@dataclass
class MirroredVersion:
    """One outlierd version as it stands in the MLflow Model Registry."""

    model: str
    version: int
    """The embedded registry's version number."""
    mlflow_version: str
    """MLflow's own version number for it (MLflow numbers versions itself)."""
    run_id: str | None
    created: bool
    """True when this call created the model version (False: it was already mirrored)."""


@dataclass
class MirrorReport:
    """What :func:`mirror_model` did."""

    model: str
    versions: list[MirroredVersion] = field(default_factory=list)
    aliases: dict[str, int] = field(default_factory=dict)
    """Aliases set in MLflow: alias -> outlierd version."""
    removed_aliases: list[str] = field(default_factory=list)
    """MLflow aliases on outlierd-managed versions that the embedded registry no longer has."""
    skipped: dict[int, str] = field(default_factory=dict)
    """Versions not mirrored (corrupt artifacts), with the reason."""


# ---------------------------------------------------------------------------------------- helpers


def require_mlflow() -> Any:
    """Import and return the ``mlflow`` module, or raise :class:`MlflowUnavailableError`."""
    try:
        import mlflow
        from mlflow.tracking import MlflowClient  # noqa: F401 - the client is what we use
    except ImportError as e:
        raise MlflowUnavailableError(f"--mlflow-uri needs MLflow, which is not installed ({e}); {INSTALL_HINT}") from e
    return mlflow


def client(uri: str) -> Any:
    """An ``MlflowClient`` whose tracking and registry stores are both ``uri``."""
    require_mlflow()
    from mlflow.tracking import MlflowClient

    return _step(f"connect to MLflow at {uri}", lambda: MlflowClient(tracking_uri=uri, registry_uri=uri))


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def _step(what: str, fn: Callable[[], T]) -> T:
    """Run one MLflow call; any failure becomes a :class:`MirrorError` saying what we were doing."""
    try:
        return fn()
    except OutlierdError:
        raise
    except Exception as e:  # MlflowException, requests, SQLAlchemy, OSError ...: one boundary
        raise MirrorError(f"MLflow: cannot {what}: {_one_line(e)}") from e


def _error_code(e: BaseException) -> str | None:
    cause: BaseException | None = e
    while cause is not None:
        code = getattr(cause, "error_code", None)
        if code:
            return str(code)
        cause = cause.__cause__
    return None


def _package_version(manifest: dict[str, Any]) -> str:
    libs = (manifest.get("lineage") or {}).get("libraries") or {}
    if libs.get("outlierd"):
        return str(libs["outlierd"])
    try:
        return importlib.metadata.version("outlierd")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
        return
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    out[prefix] = text[:_MAX_PARAM]


def run_params(manifest: dict[str, Any]) -> dict[str, str]:
    """MLflow parameters of a version: the lineage ``parameters`` and ``detector.*`` (kind and params)."""
    params: dict[str, str] = {}
    _flatten("", (manifest.get("lineage") or {}).get("parameters") or {}, params)
    det = manifest.get("detector") or {}
    params["detector"] = str(det.get("kind"))
    _flatten("detector", det.get("params") or {}, params)
    params["n_features"] = str(len(manifest.get("features") or []))
    return params


def run_metrics(manifest: dict[str, Any]) -> dict[str, float]:
    """The manifest's numeric metrics plus ``threshold`` (strings such as a note are left out)."""
    out: dict[str, float] = {}
    for k, v in (manifest.get("metrics") or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[str(k)] = float(v)
    thr = manifest.get("threshold")
    if isinstance(thr, (int, float)) and math.isfinite(thr):
        out["threshold"] = float(thr)
    return out


def version_tags(manifest: dict[str, Any], version: int) -> dict[str, str]:
    """The tags that identify an outlierd version in MLflow (runs and model versions)."""
    files = manifest.get("files") or {}
    return {
        TAG_MODEL: str(manifest.get("model")),
        TAG_VERSION: str(version),
        TAG_PACKAGE: _package_version(manifest),
        TAG_MANIFEST: str(manifest.get("manifest_sha256")),
        TAG_ARRAYS: str((files.get(ARRAYS) or {}).get("sha256")),
        "outlierd.detector": str((manifest.get("detector") or {}).get("kind")),
        "outlierd.published": str(manifest.get("published")),
    }


def _lineage_tags(manifest: dict[str, Any]) -> dict[str, str]:
    lin = manifest.get("lineage") or {}
    data = lin.get("data") or {}
    tags = {
        "outlierd.data.sha256": data.get("sha256"),
        "outlierd.data.path": data.get("path"),
        "outlierd.data.rows": data.get("rows"),
        "outlierd.code_version": lin.get("code_version"),
    }
    out = {k: str(v)[:_MAX_TAG] for k, v in tags.items() if v is not None}
    code = lin.get("code_version")
    if isinstance(code, str) and code:
        out["mlflow.source.git.commit"] = code.removesuffix("-dirty")
    return out


def _verified_manifest(registry: Registry, model: str, version: int) -> tuple[Path, dict[str, Any]]:
    # Ship only what the registry would serve: digest intact and every file's sha256 as recorded.
    path = registry.path(model, version)
    manifest = read_manifest(path)
    verify_files(path, manifest)
    return path, manifest


def default_artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside the database for a ``sqlite:///`` store
    (``<db dir>/mlartifacts``; MLflow's own default, ``./mlruns``, depends on the working directory),
    otherwise None (a tracking server chooses)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = uri[len("sqlite:///"):].split("?", 1)[0]
    if not db or db == ":memory:":
        return None
    return (Path(db).resolve().parent / "mlartifacts").as_uri()


def experiment_id(mlc: Any, name: str) -> str:
    """The id of experiment ``name``, created when missing (artifacts: :func:`default_artifact_location`)."""
    exp = _step(f"look up experiment {name!r}", lambda: mlc.get_experiment_by_name(name))
    if exp is not None:
        if getattr(exp, "lifecycle_stage", "active") == "deleted":
            raise MirrorError(f"MLflow: experiment {name!r} is deleted; restore it or choose another with --mlflow-experiment")
        return str(exp.experiment_id)
    location = default_artifact_location(str(mlc.tracking_uri))
    return str(_step(f"create experiment {name!r}", lambda: mlc.create_experiment(name, artifact_location=location)))


# ---------------------------------------------------------------------------------------- runs


def log_version_run(
    uri: str,
    registry: str | os.PathLike | Registry,
    model: str,
    version: int,
    *,
    experiment: str = DEFAULT_EXPERIMENT,
    logged_by: str = "train",
    extra_params: dict[str, Any] | None = None,
) -> str:
    """Log version ``version`` of ``model`` as a finished MLflow run in ``experiment``; returns the run id.

    The run holds the parameters, metrics, lineage tags, ``lineage.json``, the manifest's identity
    tags (see :func:`version_tags`) and the artifact directory under ``model/``. ``logged_by`` is
    recorded as the tag ``outlierd.logged_by`` (``train`` or ``mirror``).
    """
    require_mlflow()
    from mlflow.entities import Metric, Param

    reg = registry if isinstance(registry, Registry) else Registry(registry)
    path, manifest = _verified_manifest(reg, model, version)
    mlc = client(uri)
    exp_id = experiment_id(mlc, experiment)
    tags = {
        "mlflow.runName": f"{model}-v{version}",
        "outlierd.logged_by": logged_by,
        "outlierd.registry": str(reg.root.resolve()),
        **version_tags(manifest, version),
        **_lineage_tags(manifest),
    }
    run = _step(f"create a run in experiment {experiment!r}", lambda: mlc.create_run(exp_id, tags=tags))
    run_id = run.info.run_id
    try:
        params = run_params(manifest)
        for k, v in (extra_params or {}).items():
            params[k] = str(v)[:_MAX_PARAM]
        ts = int(run.info.start_time or 0)
        metrics = [Metric(k, v, ts, 0) for k, v in run_metrics(manifest).items()]
        plist = [Param(k, v) for k, v in params.items()]
        # MLflow takes at most 100 params+tags and 1000 metrics per batch.
        for chunk in _chunks(plist, 100):
            _step("log parameters", functools.partial(mlc.log_batch, run_id, params=chunk))
        for mchunk in _chunks(metrics, 1000):
            _step("log metrics", functools.partial(mlc.log_batch, run_id, metrics=mchunk))
        _step("log lineage.json", lambda: mlc.log_dict(run_id, manifest.get("lineage") or {}, "lineage.json"))
        _step(f"upload the artifact {path}", lambda: mlc.log_artifacts(run_id, str(path), ARTIFACT_PATH))
    except BaseException:
        # A half-logged run is marked FAILED so it is not mistaken for the version's record.
        try:
            mlc.set_terminated(run_id, status="FAILED")
        except Exception:
            pass
        raise
    _step("finish the run", lambda: mlc.set_terminated(run_id, status="FINISHED"))
    return str(run_id)


def _chunks(items: list[T], n: int) -> Iterator[list[T]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _find_run(mlc: Any, exp_id: str, model: str, version: int, manifest_sha: str) -> str | None:
    flt = (f"tags.`{TAG_MODEL}` = '{model}' and tags.`{TAG_VERSION}` = '{version}' "
           f"and tags.`{TAG_MANIFEST}` = '{manifest_sha}' and attributes.status = 'FINISHED'")
    runs = _step("search runs", lambda: mlc.search_runs([exp_id], filter_string=flt, max_results=1,
                                                          order_by=["attributes.start_time DESC"]))
    return str(runs[0].info.run_id) if runs else None


# ---------------------------------------------------------------------------------------- registry mirror


def _ensure_registered_model(mlc: Any, model: str) -> Any:
    try:
        return mlc.get_registered_model(model)
    except Exception as e:
        if _error_code(e) != "RESOURCE_DOES_NOT_EXIST":
            raise MirrorError(f"MLflow: cannot look up registered model {model!r}: {_one_line(e)}") from e
    return _step(f"create registered model {model!r}", lambda: mlc.create_registered_model(
        model, tags={"outlierd.managed": "true"},
        description="Mirrored from an outlierd registry (the source of truth); versions carry the tag outlierd.version."))


def _mlflow_versions(mlc: Any, model: str) -> list[Any]:
    return list(_step(f"list the versions of registered model {model!r}",
                      lambda: mlc.search_model_versions(f"name = '{model}'")))


def _by_outlierd_version(versions: list[Any]) -> dict[int, Any]:
    out: dict[int, Any] = {}
    for mv in versions:
        tag = (mv.tags or {}).get(TAG_VERSION)
        if tag and tag.isdigit():
            # several MLflow versions for one outlierd version (a concurrent mirror): the oldest wins
            if int(tag) not in out or int(mv.version) < int(out[int(tag)].version):
                out[int(tag)] = mv
    return out


def mirror_version(
    uri: str,
    registry: str | os.PathLike | Registry,
    model: str,
    version: int | str,
    *,
    run_id: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    _known: dict[int, Any] | None = None,
) -> MirroredVersion:
    """Make sure version ``version`` (number or alias) of ``model`` is a model version in MLflow.

    Reuses a model version tagged with this ``outlierd.version`` (refusing one whose manifest digest
    differs: the registry was rebuilt, or another registry mirrors to the same name). Otherwise
    creates it from ``run_id`` (a run holding the artifact under ``model/``), else from a finished
    run of this version in ``experiment``, else from a new run that uploads the artifact.
    """
    reg = registry if isinstance(registry, Registry) else Registry(registry)
    number = reg.resolve(model, version)
    _, manifest = _verified_manifest(reg, model, number)
    tags = version_tags(manifest, number)
    mlc = client(uri)
    _ensure_registered_model(mlc, model)
    known = _known if _known is not None else _by_outlierd_version(_mlflow_versions(mlc, model))
    existing = known.get(number)
    if existing is not None:
        theirs = (existing.tags or {}).get(TAG_MANIFEST)
        if theirs != tags[TAG_MANIFEST]:
            raise MirrorError(
                f"MLflow model {model!r} version {existing.version} is tagged outlierd.version={number} but has "
                f"manifest digest {theirs}, not {tags[TAG_MANIFEST]} (this registry's version {number}): another "
                "registry mirrors to the same name; use a different MLflow URI or delete that model version")
        return MirroredVersion(model, number, str(existing.version), existing.run_id, False)
    if run_id is None:
        exp_id = experiment_id(mlc, experiment)
        run_id = _find_run(mlc, exp_id, model, number, tags[TAG_MANIFEST])
    if run_id is None:
        run_id = log_version_run(uri, reg, model, number, experiment=experiment, logged_by="mirror")
    rid = run_id
    mv = _step(f"create a version of registered model {model!r}", lambda: mlc.create_model_version(
        model, f"runs:/{rid}/{ARTIFACT_PATH}", run_id=rid, tags=tags,
        description=f"outlierd {model} version {number} ({tags['outlierd.detector']})"))
    known[number] = mv
    return MirroredVersion(model, number, str(mv.version), rid, True)


def mirror_alias(
    uri: str,
    registry: str | os.PathLike | Registry,
    model: str,
    alias: str,
    *,
    experiment: str = DEFAULT_EXPERIMENT,
    run_id: str | None = None,
) -> MirroredVersion:
    """Point MLflow alias ``alias`` of registered model ``model`` at the version the embedded
    registry's ``alias`` points at (mirroring that version first when needed)."""
    reg = registry if isinstance(registry, Registry) else Registry(registry)
    number = reg.resolve(model, alias)
    mv = mirror_version(uri, reg, model, number, run_id=run_id, experiment=experiment)
    mlc = client(uri)
    _step(f"set alias {alias!r} of registered model {model!r}",
          lambda: mlc.set_registered_model_alias(model, alias, mv.mlflow_version))
    return mv


def mirror_model(
    uri: str,
    registry: str | os.PathLike | Registry,
    model: str,
    *,
    experiment: str = DEFAULT_EXPERIMENT,
    progress: Callable[[str], None] | None = None,
) -> MirrorReport:
    """Mirror every version and alias of ``model`` to MLflow; returns what was done.

    Versions already mirrored are left as they are; aliases are set to match the embedded registry,
    and MLflow aliases on outlierd-managed versions that the registry no longer has are removed (the
    registry is the source; MLflow is a view). A corrupt version is skipped and reported.
    """
    reg = registry if isinstance(registry, Registry) else Registry(registry)
    report = MirrorReport(model)
    infos = reg.versions(model)
    aliases = reg.aliases(model)
    mlc = client(uri)
    _ensure_registered_model(mlc, model)
    known = _by_outlierd_version(_mlflow_versions(mlc, model))
    for info in infos:
        number = int(info["version"])
        if info.get("error"):
            report.skipped[number] = str(info["error"])
            continue
        mv = mirror_version(uri, reg, model, number, experiment=experiment, _known=known)
        report.versions.append(mv)
        if progress is not None:
            progress(f"version {number} -> MLflow version {mv.mlflow_version}" + (" (created)" if mv.created else ""))
    mlflow_of = {mv.version: mv.mlflow_version for mv in report.versions}
    for alias, number in aliases.items():
        if number not in mlflow_of:
            continue  # points at a skipped (corrupt) version
        _step(f"set alias {alias!r} of registered model {model!r}",
              functools.partial(mlc.set_registered_model_alias, model, alias, mlflow_of[number]))
        report.aliases[alias] = number
    managed = {str(mv.version) for mv in known.values()}
    current = _step(f"read registered model {model!r}", lambda: mlc.get_registered_model(model))
    for alias, mlv in dict(current.aliases or {}).items():
        if alias not in aliases and str(mlv) in managed:
            _step(f"remove alias {alias!r} of registered model {model!r}",
                  functools.partial(mlc.delete_registered_model_alias, model, alias))
            report.removed_aliases.append(alias)
    return report


def retry_hint(registry: str | os.PathLike, model: str, uri: str, experiment: str | None = None) -> str:
    """The command that finishes an interrupted mirror."""
    exp = f" --mlflow-experiment {experiment}" if experiment and experiment != DEFAULT_EXPERIMENT else ""
    return f"outlierd registry mirror --registry {registry} --model {model} --mlflow-uri {uri}{exp}"

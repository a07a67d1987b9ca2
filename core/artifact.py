"""The model artifact: a directory of plain arrays and JSON, never pickle.

Layout::

    manifest.json   format version, detector, feature schema, preprocessing, threshold, lineage,
                    metrics, sha256 of every other file, and a digest of the manifest itself
    arrays.npz      the detector's arrays (flattened trees, statistics, histograms)
    probe.npz       probe inputs ``X`` and the scores ``expected`` they had at training time
    reference.json  the drift reference profile (per-feature bins, score histogram)

``manifest_sha256`` is the sha256 of the canonical JSON of the manifest without that key: a
hand-edited manifest is refused unless its digest is recomputed on purpose (``rewrite_manifest``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ArtifactError, InvalidInputError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ARRAYS = "arrays.npz"
PROBE = "probe.npz"
REFERENCE = "reference.json"
_DIGEST_KEY = "manifest_sha256"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _canonical(manifest: Mapping[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k != _DIGEST_KEY}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    return hashlib.sha256(_canonical(manifest)).hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    for key, value in arrays.items():
        if np.asarray(value).dtype == object:
            raise ArtifactError(f"array {key!r} has dtype object; artifacts hold numeric arrays only")
    with open(path, "wb") as f:
        named: dict[str, Any] = {k: np.asarray(v) for k, v in arrays.items()}  # Any: not savez's allow_pickle
        np.savez(f, **named)
        f.flush()
        os.fsync(f.fileno())


def write_artifact(
    path: str | os.PathLike,
    *,
    detector: Mapping[str, Any],
    feature_names: list[str],
    preprocessing: Mapping[str, Any],
    threshold: float,
    arrays: Mapping[str, np.ndarray],
    probe_X: np.ndarray,
    probe_expected: np.ndarray,
    probe_tolerance: Mapping[str, float],
    reference: Mapping[str, Any],
    lineage: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, bytes] | None = None,
) -> Path:
    """Write an artifact directory atomically (temporary sibling, then rename) and return its path.

    ``path`` must not exist yet, or be an empty directory. ``extra_files`` (name -> bytes, e.g.
    ``model.onnx``) are written beside the standard files and checksummed like them.
    """
    extra_files = dict(extra_files or {})
    for name in extra_files:
        if Path(name).name != name or name in (MANIFEST, ARRAYS, PROBE, REFERENCE) or name.endswith((".pkl", ".pickle", ".joblib")):
            raise ArtifactError(f"invalid extra artifact file name {name!r}")
    dest = Path(path)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ArtifactError(f"artifact path {dest} already exists and is not an empty directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        # mkdtemp makes 0700; an artifact on a shared volume must be readable by other users.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        _write_npz(tmp / ARRAYS, arrays)
        _write_npz(
            tmp / PROBE,
            {"X": np.asarray(probe_X, dtype=np.float64), "expected": np.asarray(probe_expected, dtype=np.float64)},
        )
        _write_json(tmp / REFERENCE, reference)
        for name, data in extra_files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        manifest: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "detector": dict(detector),
            "features": [{"name": n, "dtype": "float"} for n in feature_names],
            "preprocessing": dict(preprocessing),
            "threshold": float(threshold),
            "probe": {"rows": int(np.asarray(probe_X).shape[0]), **{k: float(v) for k, v in probe_tolerance.items()}},
            "lineage": dict(lineage or {}),
            "metrics": dict(metrics or {}),
            "model": None,
            "version": None,
            "files": {
                name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
                for name in (ARRAYS, PROBE, REFERENCE, *extra_files)
            },
        }
        manifest[_DIGEST_KEY] = manifest_digest(manifest)
        _write_json(tmp / MANIFEST, manifest)
        fsync_dir(tmp)
        if dest.exists():
            dest.rmdir()
        os.rename(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _no_constants(name: str) -> Any:
    # a ValueError, as json.load's own: read_manifest wraps both as ArtifactError
    raise InvalidInputError(f"{name} is not allowed in an artifact's JSON")


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``manifest.json``: parseable, digest intact, format version known."""
    mpath = Path(path) / MANIFEST
    try:
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f, parse_constant=_no_constants)
    except FileNotFoundError as e:
        raise ArtifactError(f"{path} is not a model artifact: {MANIFEST} is missing") from e
    except OSError as e:
        raise ArtifactError(f"cannot read {mpath}: {e}") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{mpath} must hold a JSON object")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise ArtifactError(f"{mpath} has no integer format_version")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has artifact format version {version}, newer than this outlierd reads "
            f"(up to {FORMAT_VERSION}); upgrade outlierd to load it"
        )
    if version < 1:
        raise ArtifactError(f"{mpath} has invalid format_version {version}")
    if manifest.get(_DIGEST_KEY) != manifest_digest(manifest):
        raise ArtifactError(
            f"{mpath} was modified after it was written (manifest_sha256 does not match its content); "
            "refusing to load it"
        )
    return manifest


def verify_files(path: str | os.PathLike, manifest: Mapping[str, Any]) -> None:
    """Check that every file the manifest lists exists with the recorded sha256."""
    root = Path(path)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{root / MANIFEST} lists no files")
    for name, meta in files.items():
        fpath = root / name
        if Path(name).name != name or name == MANIFEST:
            raise ArtifactError(f"{root / MANIFEST} names an invalid file: {name!r}")
        if not isinstance(meta, dict):
            raise ArtifactError(f"{root / MANIFEST}: the entry for {name} must be an object with sha256 and bytes")
        if not fpath.is_file():
            raise ArtifactError(f"{root} is incomplete: {name} is missing")
        if "bytes" in meta and fpath.stat().st_size != meta["bytes"]:
            raise ArtifactError(f"{fpath} is corrupt: {fpath.stat().st_size} bytes, the manifest says {meta['bytes']}")
        digest = sha256_file(fpath)
        if digest != meta.get("sha256"):
            raise ArtifactError(f"{fpath} is corrupt: sha256 {digest[:12]}… differs from the manifest's")


# deflate's largest compression ratio is about 1032:1: a compressed member cannot decompress to more
_MAX_DEFLATE_RATIO = 1032


def check_npz_shapes(path: str | os.PathLike) -> None:
    """Read the ``.npy`` headers inside the .npz ``path`` (no array data) and refuse
    (:class:`ArtifactError`) an array whose claimed shape needs more bytes than its member holds, so
    that a forged header never makes the loader allocate it."""
    import zipfile

    from numpy.lib import format as npformat

    size = Path(path).stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                with z.open(info) as f:
                    major, minor = npformat.read_magic(f)
                    if (major, minor) == (1, 0):
                        shape, _fortran, dtype = npformat.read_array_header_1_0(f, max_header_size=1 << 16)
                    else:
                        shape, _fortran, dtype = npformat.read_array_header_2_0(f, max_header_size=1 << 16)
                    header = f.tell()
                count = 1
                for dim in shape:
                    count *= int(dim)
                claimed = count * dtype.itemsize  # exact: Python ints never overflow
                # the member's bytes: its uncompressed size, which the zip states, bounded by what its
                # compressed bytes can hold
                room = info.file_size - header
                if info.compress_type != zipfile.ZIP_STORED:
                    room = min(room, info.compress_size * _MAX_DEFLATE_RATIO)
                if claimed > room:
                    raise ArtifactError(
                        f"{path}: array {name!r} claims shape {tuple(int(d) for d in shape)} of {dtype} ({claimed:,} bytes) "
                        f"but the file is {size:,} bytes ({max(room, 0):,} for this array); the artifact is corrupt or "
                        "forged and is refused")
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ArtifactError(f"cannot read {path}: {e}") from e


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load an .npz with pickle disabled (object arrays are refused); the shapes its headers claim
    are checked against the file's size first (:func:`check_npz_shapes`)."""
    check_npz_shapes(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError) as e:
        raise ArtifactError(f"cannot read {path}: {e}") from e


def load_json(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, parse_constant=_no_constants)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"cannot read {path}: {e}") from e


def rewrite_manifest(path: str | os.PathLike, **updates: Any) -> dict[str, Any]:
    """Update manifest fields (e.g. the registry stamps ``model`` and ``version``) and re-sign it.

    The manifest is replaced atomically; the other files are untouched.
    """
    root = Path(path)
    manifest = read_manifest(root)
    manifest.update(updates)
    manifest[_DIGEST_KEY] = manifest_digest(manifest)
    tmp = root / f".{MANIFEST}.{uuid.uuid4().hex}"
    _write_json(tmp, manifest)
    os.replace(tmp, root / MANIFEST)
    fsync_dir(root)
    return manifest

"""The embedded directory registry: versioned, immutable model artifacts plus movable aliases.

Layout under ``root``::

    <root>/<model>/<version>/   one artifact directory per version (1, 2, 3 … as decimal names)
    <root>/<model>/aliases.json {"champion": 3, "challenger": 4}
    <root>/<model>/audit.log    append-only JSON lines, one per publish and alias move
    <root>/<model>/.lock        fcntl.flock lock serialising writers of this model
    <root>/<model>/thresholds/<version>/<n>.json   threshold versions 1, 2, 3 … of a model version

Writers take the model's lock. A publish copies the artifact into ``<model>/.tmp-<uuid>/``, stamps
the manifest (model, version, published time), fsyncs it and renames it to ``<model>/<N>`` in one
step, so readers -- who take no lock -- only ever see complete versions: a version is a directory
whose name is a positive decimal integer. Temporary entries left by a publisher that died are
removed by the next writer holding the lock. Version directories are never modified after the
rename; ``aliases.json`` is replaced atomically (temporary file, fsync, ``os.replace``).
"""

from __future__ import annotations

import errno
import fcntl
import getpass
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from .artifact import MANIFEST, fsync_dir, read_manifest, rewrite_manifest, verify_files
from .errors import ArtifactError, InvalidInputError, ModelNotFoundError, OutlierdError, RegistryError
from .model import Model, load_model

ALIASES = "aliases.json"
AUDIT = "audit.log"
LOCK = ".lock"
TMP_PREFIX = ".tmp-"
THRESHOLDS = "thresholds"  # <model>/thresholds/<version>/<n>.json: threshold versions of a model version
MAX_NAME = 128
# The alias names the server, training and the promotion tools agree on.
CHAMPION = "champion"    # the version that answers
CHALLENGER = "challenger"  # the candidate: shadow-scored or given a split of the traffic

_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_VERSION_RE = re.compile(r"[1-9][0-9]*")


def _now() -> str:
    """UTC time, ISO-8601 with milliseconds and a ``Z`` suffix."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _user() -> str | None:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry / no login name in a container: the audit still gets written
        return None


def validate_name(name: Any, what: str = "model name") -> str:
    """Return ``name`` if it is a valid model (or alias) name, else raise ``ValueError``.

    Allowed: ASCII letters, digits, ``.``, ``_`` and ``-``; not starting with ``.``; 1 to 128
    characters. Names become directory names, so anything that could escape the registry root is
    refused.
    """
    if not isinstance(name, str):
        raise InvalidInputError(f"{what} must be a string; got {type(name).__name__}")
    if not name or len(name) > MAX_NAME or not _NAME_RE.fullmatch(name):
        raise InvalidInputError(
            f"invalid {what} {name!r}: use 1 to {MAX_NAME} letters, digits, '.', '_' or '-', "
            "not starting with '.'"
        )
    return name


def validate_alias(alias: Any) -> str:
    """Like :func:`validate_name`, and not all digits (those would read as version numbers)."""
    validate_name(alias, "alias name")
    if alias.isdigit():
        raise InvalidInputError(f"invalid alias name {alias!r}: an alias must not be all digits (it would read as a version)")
    return alias


class Registry:
    """A model registry in the directory ``root`` (local disk or a shared volume).

    Readers (``versions``, ``resolve``, ``get``, ``path``, ``load``, ``aliases``, ``models``,
    ``audit``) take no lock and never see a half-written version. Writers (``publish``,
    ``set_alias``, ``remove_alias``) serialise per model on ``<root>/<model>/.lock``; a writer waits
    at most ``lock_timeout`` seconds for it (``None``: forever) and then raises
    :class:`~core.errors.RegistryError`.
    """

    def __init__(self, root: str | os.PathLike, *, lock_timeout: float | None = 60.0) -> None:
        self.root = Path(root)
        self.lock_timeout = lock_timeout

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    # ------------------------------------------------------------------ locking and layout

    def _model_dir(self, name: str) -> Path:
        return self.root / validate_name(name)

    @contextmanager
    def _locked(self, name: str) -> Iterator[Path]:
        """Hold the model's exclusive lock; yields the model directory (created if needed)."""
        mdir = self._model_dir(name)
        try:
            mdir.mkdir(parents=True, exist_ok=True)
            fd = os.open(mdir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RegistryError(f"cannot open the lock of model {name!r} in {self.root}: {e}") from e
        try:
            self._acquire(fd, mdir / LOCK)
            try:
                yield mdir
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _acquire(self, fd: int, lock_path: Path) -> None:
        if self.lock_timeout is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RegistryError(f"cannot lock {lock_path}: {e}") from e
            if time.monotonic() >= deadline:
                raise RegistryError(
                    f"timed out after {self.lock_timeout:g} s waiting for {lock_path}; another writer "
                    "holds it (a process that died releases it automatically)"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    @staticmethod
    def _version_numbers(mdir: Path) -> list[int]:
        try:
            entries = list(os.scandir(mdir))
        except FileNotFoundError:
            return []
        return sorted(int(e.name) for e in entries if _VERSION_RE.fullmatch(e.name) and e.is_dir())

    @staticmethod
    def _remove_stale_tmp(mdir: Path) -> None:
        # Called with the lock held: a temporary entry now belongs to a writer that died mid-way.
        for entry in os.scandir(mdir):
            if not entry.name.startswith(TMP_PREFIX):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    pass

    def _append_audit(self, mdir: Path, **fields: Any) -> None:
        record = {"time": _now(), **fields, "user": _user(), "host": socket.gethostname(), "pid": os.getpid()}
        line = json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n"
        fd = os.open(mdir / AUDIT, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            # A writer killed mid-line leaves no newline: start on a fresh line so ours stays parseable.
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _read_aliases(self, mdir: Path) -> dict[str, int]:
        path = mdir / ALIASES
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RegistryError(f"cannot read {path}: {e}") from e
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in data.items()
        ):
            raise RegistryError(f"{path} must hold a JSON object of alias -> version number")
        return data

    def _write_aliases(self, mdir: Path, aliases: dict[str, int]) -> None:
        tmp = mdir / f"{TMP_PREFIX}{ALIASES}-{uuid.uuid4().hex}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(aliases, f, indent=2, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, mdir / ALIASES)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(mdir)

    def _require_model(self, name: str) -> tuple[Path, list[int]]:
        mdir = self._model_dir(name)
        numbers = self._version_numbers(mdir)
        if not numbers:
            known = self.models()
            where = f"registry {self.root}"
            if not self.root.is_dir():
                raise ModelNotFoundError(f"no model {name!r}: {where} does not exist")
            raise ModelNotFoundError(
                f"no model {name!r} in {where}; known models: {', '.join(known) if known else '(none)'}"
            )
        return mdir, numbers

    def _set_alias_locked(self, mdir: Path, name: str, alias: str, version: int, **extra: Any) -> None:
        aliases = self._read_aliases(mdir)
        previous = aliases.get(alias)
        aliases[alias] = version
        self._write_aliases(mdir, aliases)
        self._append_audit(mdir, action="alias", model=name, alias=alias, version=version, previous=previous, **extra)

    def _info(self, name: str, mdir: Path, version: int, aliases: dict[str, int]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        vdir = mdir / str(version)
        info: dict[str, Any] = {
            "model": name,
            "version": version,
            "aliases": sorted(a for a, v in aliases.items() if v == version),
            "path": str(vdir),
        }
        try:
            manifest = read_manifest(vdir)
        except ArtifactError as e:
            info.update(created=None, metrics={}, detector=None, threshold=None, error=str(e))
            return info, None
        info.update(
            created=manifest.get("published"),
            metrics=manifest.get("metrics") or {},
            detector=(manifest.get("detector") or {}).get("kind"),
            threshold=manifest.get("threshold"),
        )
        return info, manifest

    # ------------------------------------------------------------------ writers

    def publish(self, name: str, artifact_dir: str | os.PathLike, aliases: Iterable[str] = (), *,
                reprobe: bool = True) -> int:
        """Publish the artifact directory ``artifact_dir`` as the next version of model ``name``.

        The source is verified first by loading it (manifest digest, every file's sha256, array
        shapes, probe scores); a corrupt, incomplete or non-reproducing artifact is refused with :class:`~core.errors.ArtifactError` and nothing is
        written. The copy is stamped with ``model``, ``version`` and ``published`` (UTC ISO-8601)
        and renamed into place atomically; then each alias in ``aliases`` is pointed at it.
        Returns the new version number (1 for a model's first version).

        ``reprobe=False`` is for a caller that has just loaded this artifact with its probe
        verified (the training pipeline): the digest, checksums and shapes are still checked, the
        probe scores are not replayed a second time.
        """
        validate_name(name)
        alias_list = [validate_alias(a) for a in ([aliases] if isinstance(aliases, str) else aliases)]
        src = Path(artifact_dir)
        if not src.is_dir():
            raise ArtifactError(f"{src} is not a model artifact directory")
        # Full load: digest, checksums, shapes and probe scores. Only a servable model is published.
        manifest = load_model(src, verify_probe=reprobe).manifest
        files = [MANIFEST, *manifest["files"]]
        if CHALLENGER in alias_list:
            self._check_challenger(name, manifest)

        with self._locked(name) as mdir:
            self._remove_stale_tmp(mdir)
            existing = self._version_numbers(mdir)
            version = (existing[-1] + 1) if existing else 1
            tmp = mdir / f"{TMP_PREFIX}{uuid.uuid4().hex}"
            try:
                tmp.mkdir()
                # Copy only what the manifest covers: the version holds exactly the verified files.
                for fname in files:
                    shutil.copyfile(src / fname, tmp / fname)
                    with open(tmp / fname, "rb+") as f:
                        os.fsync(f.fileno())
                rewrite_manifest(tmp, model=name, version=version, published=_now())
                # The source could have changed between the check above and the copy: check the copy.
                verify_files(tmp, read_manifest(tmp))
                fsync_dir(tmp)
                os.rename(tmp, mdir / str(version))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            fsync_dir(mdir)
            self._append_audit(mdir, action="publish", model=name, version=version, alias=None, source=str(src.resolve()))
            for alias in alias_list:
                self._set_alias_locked(mdir, name, alias, version)
        return version

    def _check_challenger(self, name: str, manifest: dict[str, Any]) -> None:
        """Refuse a challenger whose features differ from the champion's: a server shadowing or
        splitting traffic could not score requests with both, and would refuse it only then."""
        try:
            champion = self.resolve(name, CHAMPION)
        except ModelNotFoundError:
            return  # no champion yet: nothing to compare with
        theirs = [f["name"] for f in read_manifest(self.path(name, champion))["features"]]
        ours = [f["name"] for f in manifest["features"]]
        if ours != theirs:
            extra, missing = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
            what = ", ".join(p for p in (f"extra {extra[:5]}" if extra else "", f"missing {missing[:5]}" if missing else "") if p) \
                or "the same names in another order"
            raise ArtifactError(f"a challenger must have the champion's features (version {champion}: {len(theirs)} features); "
                                f"this one has {len(ours)}: {what}. Train it with the champion's feature columns")

    def set_alias(self, name: str, alias: str, version: int | str, *, verify: bool = False, force: bool = False) -> int:
        """Point ``alias`` of model ``name`` at ``version`` (a number, a decimal string or another
        alias, resolved now). The alias file is replaced atomically and the move audited.
        Returns the version number the alias now points to.

        ``verify``: load the target first (checksums, shapes, probe scores) and refuse the move with
        :class:`~core.errors.ArtifactError` when it fails, so no worker that restarts is pointed at
        a version it cannot serve; ``force`` moves it anyway and records the failure in the audit
        log (``forced`` and ``verify_error``).
        """
        validate_alias(alias)
        self._require_model(name)
        failure = None
        if alias == CHALLENGER and verify and not force:
            self._check_challenger(name, read_manifest(self.path(name, self.resolve(name, version))))
        if verify:
            target = self.resolve(name, version)
            try:
                load_model(self.path(name, target))  # before the lock: a load replays the probe set
            except OutlierdError as e:
                if not force:
                    previous = self._read_aliases(self._model_dir(name)).get(alias)
                    raise ArtifactError(
                        f"version {target} of {name!r} fails verification, so alias {alias!r} stays "
                        f"{'at version ' + str(previous) if previous is not None else 'unset'}: {e.message} "
                        "(--force moves it anyway; the move is audited)") from e
                failure = e.message
        with self._locked(name) as mdir:
            target = self.resolve(name, version)
            extra = {} if failure is None else {"forced": True, "verify_error": failure}
            self._set_alias_locked(mdir, name, alias, target, **extra)
        return target

    def last_good(self, name: str, alias: str, refused: Iterable[int] = ()) -> Iterator[int]:
        """Versions ``alias`` of ``name`` pointed at before, newest move first, without repeats or
        ``refused`` ones (from the audit log): the candidates a worker falls back to when the
        alias points at a version it cannot load."""
        seen = set(refused)
        for record in reversed(self.audit(name)):
            if record.get("action") != "alias" or record.get("alias") != alias:
                continue
            for v in (record.get("version"), record.get("previous")):
                if isinstance(v, int) and not isinstance(v, bool) and v not in seen:
                    seen.add(v)
                    yield v

    def remove_alias(self, name: str, alias: str) -> None:
        """Delete ``alias`` of model ``name``; :class:`~core.errors.ModelNotFoundError` if it does not exist."""
        validate_alias(alias)
        self._require_model(name)
        with self._locked(name) as mdir:
            aliases = self._read_aliases(mdir)
            if alias not in aliases:
                raise ModelNotFoundError(
                    f"model {name!r} has no alias {alias!r}; aliases: {', '.join(sorted(aliases)) or '(none)'}"
                )
            previous = aliases.pop(alias)
            self._write_aliases(mdir, aliases)
            self._append_audit(mdir, action="remove_alias", model=name, alias=alias, version=None, previous=previous)

    def record(self, name: str, action: str, **fields: Any) -> None:
        """Append ``{"action": action, "model": name, **fields}`` to the audit log of ``name``, under
        the model's lock: for events decided outside the registry (e.g. a retraining trigger and its
        reason). ``fields`` must be JSON-serialisable; ``time``, ``user``, ``host`` and ``pid`` are
        stamped here and cannot be given.
        """
        if not isinstance(action, str) or not action:
            raise InvalidInputError(f"audit action must be a non-empty string; got {action!r}")
        reserved = sorted({"time", "user", "host", "pid"} & fields.keys())
        if reserved:
            raise InvalidInputError(f"audit fields {', '.join(reserved)} are stamped by the registry and cannot be given")
        try:
            json.dumps(fields)
        except (TypeError, ValueError) as e:
            raise InvalidInputError(f"audit fields must be JSON-serialisable: {e}") from e
        with self._locked(name) as mdir:
            self._append_audit(mdir, action=action, model=name, **fields)


    def publish_threshold(self, name: str, version: int | str, threshold: float, info: dict[str, Any] | None = None) -> int:
        """Publish ``threshold`` as the next threshold version of version ``version`` of ``name``.

        The artifact stays immutable (its manifest digest covers its own threshold, threshold version
        0); threshold versions 1, 2, 3 … are JSON files beside it, written under the model's lock
        (temporary file, fsync, rename, directory fsync), so ``n`` is monotonic and each file is
        complete when it appears. ``info`` (JSON-serialisable: method, target, sample sizes …) is
        stored with it; ``time``, ``user``, ``host`` are stamped here. The publish is audited.
        Returns the new threshold version.
        """
        value = float(threshold)
        if not np.isfinite(value):
            raise InvalidInputError(f"threshold must be a finite number; got {threshold!r}")
        extra = dict(info or {})
        reserved = sorted({"model", "version", "threshold", "threshold_version", "time", "user", "host"} & extra.keys())
        if reserved:
            raise InvalidInputError(f"threshold info fields {', '.join(reserved)} are set by the registry and cannot be given")
        try:
            json.dumps(extra, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InvalidInputError(f"threshold info must be JSON-serialisable with finite numbers: {e}") from e
        target = self.resolve(name, version)  # version directories are never removed: resolving before the lock is safe
        with self._locked(name) as mdir:
            tdir = mdir / THRESHOLDS / str(target)
            tdir.mkdir(parents=True, exist_ok=True)
            self._remove_stale_tmp(tdir)
            numbers = self._threshold_numbers(tdir)
            n = (numbers[-1] + 1) if numbers else 1
            record = {**extra, "model": name, "version": target, "threshold": value, "threshold_version": n,
                      "time": _now(), "user": _user(), "host": socket.gethostname()}
            tmp = tdir / f"{TMP_PREFIX}{uuid.uuid4().hex}"
            try:
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(record, f, indent=2, sort_keys=True, allow_nan=False)
                    f.write("\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.rename(tmp, tdir / f"{n}.json")
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            fsync_dir(tdir)
            self._append_audit(mdir, action="threshold", model=name, version=target, threshold=value, threshold_version=n,
                               **{k: v for k, v in extra.items() if k in ("method", "target")})
        return n

    # ------------------------------------------------------------------ readers

    def models(self) -> list[str]:
        """Names of the models that have at least one version, sorted."""
        try:
            entries = list(os.scandir(self.root))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(
            e.name
            for e in entries
            if e.is_dir() and len(e.name) <= MAX_NAME and _NAME_RE.fullmatch(e.name) and self._version_numbers(Path(e.path))
        )

    def versions(self, name: str) -> list[dict[str, Any]]:
        """Every version of ``name``, oldest first, each a dict with ``version`` (int), ``aliases``
        (list of str), ``created`` (the manifest's ``published`` time), ``metrics``, ``detector``
        (kind), ``threshold`` and ``path``. A version whose manifest cannot be read is listed with
        ``error`` set (and ``created`` / ``detector`` None) rather than hiding the others.
        """
        mdir, numbers = self._require_model(name)
        aliases = self._read_aliases(mdir)
        return [self._info(name, mdir, v, aliases)[0] for v in numbers]

    def aliases(self, name: str) -> dict[str, int]:
        """``{alias: version}`` for model ``name``."""
        mdir, _ = self._require_model(name)
        return dict(sorted(self._read_aliases(mdir).items()))

    def resolve(self, name: str, ref: int | str) -> int:
        """The version number ``ref`` names: an int, a decimal string (``"3"``) or an alias."""
        mdir, numbers = self._require_model(name)
        if isinstance(ref, bool) or not isinstance(ref, (int, str)):
            raise InvalidInputError(f"version reference must be an int, a decimal string or an alias name; got {ref!r}")
        if isinstance(ref, str) and ref.isascii() and ref.isdigit():
            ref = int(ref)
        if isinstance(ref, int):
            if ref not in numbers:
                raise ModelNotFoundError(
                    f"model {name!r} has no version {ref}; versions: {_ranges(numbers)}"
                )
            return ref
        aliases = self._read_aliases(mdir)
        if ref not in aliases:
            raise ModelNotFoundError(
                f"model {name!r} has no version or alias {ref!r}; versions: {_ranges(numbers)}; "
                f"aliases: {', '.join(f'{a}={v}' for a, v in sorted(aliases.items())) or '(none)'}"
            )
        version = aliases[ref]
        if version not in numbers:
            raise ModelNotFoundError(f"alias {ref!r} of model {name!r} points to version {version}, which does not exist")
        return version

    def get(self, name: str, ref: int | str) -> dict[str, Any]:
        """One version's info (as in :meth:`versions`) plus its full ``manifest``.

        Raises :class:`~core.errors.ArtifactError` when that version's manifest is corrupt.
        """
        version = self.resolve(name, ref)
        mdir = self._model_dir(name)
        info, manifest = self._info(name, mdir, version, self._read_aliases(mdir))
        if manifest is None:
            raise ArtifactError(info["error"])
        info["manifest"] = manifest
        return info

    def path(self, name: str, ref: int | str) -> Path:
        """The artifact directory of version ``ref`` of ``name``."""
        return self._model_dir(name) / str(self.resolve(name, ref))

    def load(self, name: str, ref: int | str) -> Model:
        """Load and verify (checksums, probe scores) version ``ref`` of ``name``."""
        return load_model(self.path(name, ref))

    def audit(self, name: str) -> list[dict[str, Any]]:
        """The audit records of ``name``, oldest first (a line torn by a crash is skipped)."""
        mdir = self._model_dir(name)
        try:
            with open(mdir / AUDIT, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            self._require_model(name)
            return []
        out = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                out.append(record)
        return out

    @staticmethod
    def _threshold_numbers(tdir: Path) -> list[int]:
        try:
            names = os.listdir(tdir)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(int(f[:-5]) for f in names if f.endswith(".json") and _VERSION_RE.fullmatch(f[:-5]))

    def threshold_version(self, name: str, version: int) -> int:
        """The latest threshold version of model version ``version`` (an int, not resolved: cheap,
        one directory listing, for watchers); 0 when only the artifact's own threshold exists."""
        numbers = self._threshold_numbers(self._model_dir(name) / THRESHOLDS / str(int(version)))
        return numbers[-1] if numbers else 0

    def _read_threshold(self, name: str, version: int, n: int) -> dict[str, Any]:
        path = self._model_dir(name) / THRESHOLDS / str(version) / f"{n}.json"
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise RegistryError(f"cannot read threshold version {n} of {name!r} version {version} ({path}): {e}") from e
        value = record.get("threshold") if isinstance(record, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise RegistryError(f"{path} holds no finite threshold")
        return record

    def threshold(self, name: str, version: int | str) -> tuple[float, int]:
        """``(threshold, threshold_version)`` in force for a version of ``name``: the latest published
        threshold version, or the artifact's own threshold and 0 when none was published."""
        target = self.resolve(name, version)
        n = self.threshold_version(name, target)
        if n == 0:
            return float(read_manifest(self._model_dir(name) / str(target))["threshold"]), 0
        return float(self._read_threshold(name, target, n)["threshold"]), n

    def thresholds(self, name: str, version: int | str) -> list[dict[str, Any]]:
        """Every published threshold version of a version of ``name``, oldest first (each the stored
        record: ``threshold_version``, ``threshold``, ``time``, ``user``, ``host`` and the publisher's
        info such as ``method`` and ``target``). Empty when only the artifact's own threshold exists."""
        target = self.resolve(name, version)
        tdir = self._model_dir(name) / THRESHOLDS / str(target)
        return [self._read_threshold(name, target, n) for n in self._threshold_numbers(tdir)]


def _ranges(numbers: list[int]) -> str:
    """``[1, 2, 3, 5]`` -> ``"1-3, 5"``."""
    if not numbers:
        return "(none)"
    parts = []
    start = prev = numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(parts)

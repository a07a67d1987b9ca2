"""MLflow as a view of the registry (training/tracking.py, ``train --mlflow-uri``, ``registry alias
--mlflow-uri``, ``registry mirror``), against a real local MLflow store: a SQLite database (the
Model Registry needs a database backend) with its artifacts in the test's temporary directory.

What is checked against an independent reference: the run's metrics against the registry manifest
and scikit-learn's ROC-AUC of the model's own scores, its data fingerprint against hashlib, its
artifact files byte for byte against the registry's version directory, and the model version tags
against sha256 of the files on disk.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from outlierd.core.registry import Registry
from outlierd.cli import main

HAVE_MLFLOW = importlib.util.find_spec("mlflow") is not None
needs_mlflow = pytest.mark.skipif(not HAVE_MLFLOW, reason="mlflow is not installed (pip install 'outlierd[mlflow]')")
EXPERIMENT = "outlierd-tests"
# MLflow's own SQLAlchemy mappings warn about a deprecated loader: not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the module (its first SQLite migration takes seconds)."""
    if not HAVE_MLFLOW:
        pytest.skip("mlflow is not installed (pip install 'outlierd[mlflow]')")
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    return uri, client, root


def _data(path: Path, rng, n: int = 400, d: int = 5, anomalies: int = 12) -> tuple[np.ndarray, np.ndarray]:
    X = rng.normal(size=(n, d))
    y = np.zeros(n, dtype=int)
    idx = rng.choice(n, anomalies, replace=False)
    X[idx] += rng.choice([-6.0, 6.0], size=(anomalies, d))
    y[idx] = 1
    header = ",".join([f"f{i}" for i in range(d)] + ["label"])
    np.savetxt(path, np.column_stack([X, y]), delimiter=",", header=header, comments="", fmt="%.17g")
    return X, y


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _train(data: Path, reg: Path, model: str, *extra: str) -> int:
    return main(["train", "--data", str(data), "--registry", str(reg), "--model", model, "--quiet",
                 "--detector", "robust_z", "--label-column", "label", *extra])  # _data's label column is a label


def _by_tag(client, model: str) -> dict[int, object]:
    return {int(mv.tags["outlierd.version"]): mv for mv in client.search_model_versions(f"name = '{model}'")}


@needs_mlflow
def test_train_logs_the_run_and_registers_the_version(store, tmp_path, rng, capsys):
    from sklearn.metrics import roc_auc_score

    uri, client, _ = store
    data, reg = tmp_path / "train.csv", tmp_path / "reg"
    X, y = _data(data, rng)
    rc = main(["train", "--data", str(data), "--registry", str(reg), "--model", "trained", "--label-column", "label",
               "--alias", "champion", "--seed", "3", "--quiet", "--json", "--mlflow-uri", uri, "--mlflow-experiment", EXPERIMENT])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    run_id = out["mlflow"]["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == EXPERIMENT

    info = Registry(reg).get("trained", out["version"])
    manifest = info["manifest"]
    # parameters: the lineage's training parameters and the detector's own
    p = run.data.params
    assert (p["detector"], p["seed"], p["alert_rate"], p["label_column"]) == ("iforest", "3", "0.01", "label")
    for k, v in manifest["detector"]["params"].items():
        assert p[f"detector.{k}"] == (v if isinstance(v, str) else json.dumps(v, sort_keys=True))
    # metrics: the manifest's, and ROC-AUC equal to scikit-learn's on the model's own scores
    m = run.data.metrics
    assert m["threshold"] == pytest.approx(manifest["threshold"])
    for k, v in manifest["metrics"].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            assert m[k] == pytest.approx(v), k
    scores = Registry(reg).load("trained", out["version"]).score(X)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    # lineage: the data fingerprint is the file's sha256; lineage.json is the manifest's block
    assert run.data.tags["outlierd.data.sha256"] == _sha(data)
    assert run.data.tags["outlierd.version"] == str(out["version"])
    dst = tmp_path / "dl"
    dst.mkdir()
    client.download_artifacts(run_id, "", str(dst))
    assert json.loads((dst / "lineage.json").read_text()) == manifest["lineage"]
    # the artifact directory, byte for byte
    vdir = Path(info["path"])
    assert sorted(f.name for f in (dst / "model").iterdir()) == sorted(f.name for f in vdir.iterdir())
    for f in vdir.iterdir():
        assert (dst / "model" / f.name).read_bytes() == f.read_bytes(), f.name
    # --alias: the registered model's alias points at a version built from this run, tagged with checksums
    mv = client.get_model_version_by_alias("trained", "champion")
    assert str(mv.version) == out["mlflow"]["model_version"] and mv.run_id == run_id
    assert mv.tags["outlierd.version"] == str(out["version"])
    assert mv.tags["outlierd.manifest_sha256"] == manifest["manifest_sha256"]
    assert mv.tags["outlierd.arrays_sha256"] == _sha(vdir / "arrays.npz")


@needs_mlflow
def test_alias_moves_show_in_the_model_registry(store, tmp_path, rng, capsys):
    uri, client, _ = store
    data, reg = tmp_path / "d.csv", tmp_path / "reg"
    _data(data, rng)
    assert _train(data, reg, "moved", "--alias", "champion", "--mlflow-uri", uri, "--mlflow-experiment", EXPERIMENT) == 0
    assert _train(data, reg, "moved", "--seed", "1") == 0  # published, not mirrored
    capsys.readouterr()
    # version 2 is not in MLflow yet: the alias move mirrors it (a new run holding its artifact)
    rc = main(["registry", "alias", "--registry", str(reg), "--model", "moved", "champion", "2", "--mlflow-uri", uri,
               "--mlflow-experiment", EXPERIMENT])
    assert rc == 0
    assert capsys.readouterr().out.startswith("moved: champion -> 2 (was 1)")
    mv = client.get_model_version_by_alias("moved", "champion")
    assert mv.tags["outlierd.version"] == "2"
    assert mv.tags["outlierd.arrays_sha256"] == _sha(reg / "moved" / "2" / "arrays.npz")
    assert client.get_run(mv.run_id).data.tags["outlierd.logged_by"] == "mirror"
    assert sorted(_by_tag(client, "moved")) == [1, 2]
    # moving back reuses the mirrored version 1: no new model version
    assert main(["registry", "alias", "--registry", str(reg), "--model", "moved", "champion", "1",
                 "--mlflow-uri", uri, "--mlflow-experiment", EXPERIMENT]) == 0
    assert client.get_model_version_by_alias("moved", "champion").tags["outlierd.version"] == "1"
    assert len(client.search_model_versions("name = 'moved'")) == 2


@needs_mlflow
def test_mirror_syncs_every_version_and_alias_idempotently(store, tmp_path, rng, capsys):
    uri, client, _ = store
    data, reg = tmp_path / "d.csv", tmp_path / "reg"
    _data(data, rng)
    for seed in range(3):
        assert _train(data, reg, "synced", "--seed", str(seed)) == 0
    registry = Registry(reg)
    registry.set_alias("synced", "champion", 2)
    registry.set_alias("synced", "challenger", 3)
    # version 1 already has a finished run (as when a train's run was logged but registering failed):
    # the mirror registers from that run instead of uploading the artifact again
    from outlierd.training.tracking import log_version_run

    run1 = log_version_run(uri, reg, "synced", 1, experiment=EXPERIMENT)
    cmd = ["registry", "mirror", "--registry", str(reg), "--model", "synced", "--mlflow-uri", uri,
           "--mlflow-experiment", EXPERIMENT, "--json"]
    capsys.readouterr()
    assert main(cmd) == 0
    first = json.loads(capsys.readouterr().out)
    assert [v["created"] for v in first["versions"]] == [True, True, True]
    versions = _by_tag(client, "synced")
    assert sorted(versions) == [1, 2, 3]
    assert versions[1].run_id == run1
    exp_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = client.search_runs([exp_id], filter_string="tags.`outlierd.model` = 'synced'")
    assert sorted(r.data.tags["outlierd.version"] for r in runs) == ["1", "2", "3"]
    for n, mv in versions.items():
        assert mv.tags["outlierd.manifest_sha256"] == registry.get("synced", n)["manifest"]["manifest_sha256"]
    aliases = client.get_registered_model("synced").aliases
    assert {a: versions_tag for a, versions_tag in
            ((a, client.get_model_version("synced", v).tags["outlierd.version"]) for a, v in aliases.items())} == \
        {"champion": "2", "challenger": "3"}
    # again: nothing new; then the registry drops an alias and MLflow follows
    assert main(cmd) == 0
    assert [v["created"] for v in json.loads(capsys.readouterr().out)["versions"]] == [False, False, False]
    assert len(client.search_model_versions("name = 'synced'")) == 3
    registry.remove_alias("synced", "challenger")
    assert main(cmd) == 0
    assert json.loads(capsys.readouterr().out)["removed_aliases"] == ["challenger"]
    assert set(client.get_registered_model("synced").aliases) == {"champion"}


@needs_mlflow
def test_an_mlflow_failure_keeps_the_published_version(store, tmp_path, rng, capsys, monkeypatch):
    uri, client, _ = store
    data, reg = tmp_path / "d.csv", tmp_path / "reg"
    _data(data, rng)
    # a tracking server that is down: refused at once (no retries, so the test stays short)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    rc = _train(data, reg, "kept", "--alias", "champion", "--mlflow-uri", down)
    err = capsys.readouterr().err
    assert rc == 1
    assert "kept version 1 was published" in err and "not mirrored to MLflow" in err
    assert f"outlierd registry mirror --registry {reg} --model kept --mlflow-uri {down}" in err
    assert Registry(reg).resolve("kept", "champion") == 1  # the acknowledged artifact is there
    # an unusable store on an alias move: the move stands, exit 1 with the retry command
    assert _train(data, reg, "kept", "--seed", "1") == 0
    (tmp_path / "afile").write_text("")
    bad = f"sqlite:///{tmp_path / 'afile' / 'mlflow.db'}"
    capsys.readouterr()
    assert main(["registry", "alias", "--registry", str(reg), "--model", "kept", "champion", "2", "--mlflow-uri", bad]) == 1
    err = capsys.readouterr().err
    assert "was moved to version 2" in err and "registry mirror" in err and len(err.strip().splitlines()) == 1
    assert Registry(reg).resolve("kept", "champion") == 2
    # the retry it suggests finishes the job
    assert main(["registry", "mirror", "--registry", str(reg), "--model", "kept", "--mlflow-uri", uri,
                 "--mlflow-experiment", EXPERIMENT]) == 0
    assert client.get_model_version_by_alias("kept", "champion").tags["outlierd.version"] == "2"
    assert sorted(_by_tag(client, "kept")) == [1, 2]


def test_without_mlflow_the_flag_is_a_one_line_error(tmp_path, rng, capsys, monkeypatch):
    data, reg = tmp_path / "d.csv", tmp_path / "reg"
    _data(data, rng)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError, as when not installed
    rc = _train(data, reg, "nomlflow", "--mlflow-uri", "sqlite:///x.db")
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("outlierd: error:") and "pip install 'outlierd[mlflow]'" in err
    assert len(err.strip().splitlines()) == 1
    assert not (reg / "nomlflow").exists()  # refused before training: nothing published
    assert _train(data, reg, "nomlflow") == 0
    capsys.readouterr()
    rc = main(["registry", "mirror", "--registry", str(reg), "--model", "nomlflow", "--mlflow-uri", "sqlite:///x.db"])
    assert rc == 2 and "outlierd[mlflow]" in capsys.readouterr().err

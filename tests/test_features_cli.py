"""``outlierd features replay`` and ``outlierd train --events --features``: the artifact carries the
spec, and the replay with the artifact's categories equals what the model was trained on."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from outlierd.cli import main
from outlierd.core.features import engine_for, load_features
from outlierd.core.model import load_model
from outlierd.payments import payments

SPEC = "data/payments.features.json"


@pytest.fixture(scope="module")
def events(tmp_path_factory):
    path = tmp_path_factory.mktemp("ev") / "events.parquet"
    pq.write_table(payments(4000, 80, days=2, seed=5), path)
    return path


def test_replay_writes_features_in_input_order(events, tmp_path, capsys):
    out = tmp_path / "f.parquet"
    assert main(["features", "replay", "--spec", SPEC, "--events", str(events), "--out", str(out), "--id-column", "event_id",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    table = pq.read_table(out)
    spec_names = summary["features"]
    assert table.column_names == ["event_id", *spec_names] and table.num_rows == 4000
    assert table.column("event_id").to_pylist() == pq.read_table(events).column("event_id").to_pylist()
    assert table.column("n_1h").to_numpy().min() == 1.0


def test_train_on_events_publishes_a_model_with_its_spec(events, tmp_path, capsys):
    reg = tmp_path / "reg"
    assert main(["train", "--events", str(events), "--features", SPEC, "--registry", str(reg), "--model", "pay",
                 "--alias", "champion", "--quiet", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    artifact = res["path"]
    spec, fitted = load_features(artifact)
    model = load_model(artifact)
    assert model.feature_names == spec.output_names
    assert "features.json" in model.manifest["files"] and model.manifest["feature_spec"]["digest"] == spec.digest
    # the replay with the artifact's categories reproduces the training features exactly
    out = tmp_path / "f.csv"
    assert main(["features", "replay", "--spec", SPEC, "--events", str(events), "--out", str(out),
                 "--categories-from", artifact]) == 0
    replayed = pacsv.read_csv(out)
    engine = engine_for(artifact)
    direct = engine.replay(pq.read_table(events))
    np.testing.assert_array_equal(replayed.column("mcc").to_numpy(), direct[:, spec.output_names.index("mcc")])


@pytest.mark.parametrize("argv, message", [
    (["train", "--events", "EV", "--registry", "r", "--model", "m"], "--events FILE|DIR with --features SPEC"),
    (["features", "replay", "--spec", "nope.json", "--events", "EV", "--out", "o.parquet"], "cannot read feature spec nope.json"),
    (["features", "replay", "--spec", SPEC, "--events", "EV", "--out", "o.txt"], "--out o.txt: write .parquet or .csv"),
])
def test_cli_errors_are_one_line(events, argv, message, capsys):
    argv = [str(events) if a == "EV" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1

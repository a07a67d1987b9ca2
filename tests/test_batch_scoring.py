"""`outlierd score` as streamed batch scoring: CSV, Parquet and directories in bounded record
batches, output equal row for row to ``core.load_model(...).score`` on the file's values, in input
order whatever the batch size; explanations equal to ``Model.explain``; clear errors; and the Dask
path on a LocalCluster giving the same output."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from outlierd.core import load_model
from outlierd.core.registry import Registry
from outlierd.cli import main
from outlierd.training.batch import RowProgress
from outlierd.training.evaluate import evaluate
from outlierd.training.scoring import score_file

N_FEATURES = 6
FEATURES = [f"f{j}" for j in range(N_FEATURES)]


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Two versions of an iforest on 6 features; 'champion' -> 2."""
    root = tmp_path_factory.mktemp("batch")
    gen = np.random.default_rng(7)
    for v in (1, 2):
        X = gen.normal(size=(1500, N_FEATURES))
        X[:15] += 6.0  # a few far-out records so the threshold sits in the tail
        path = root / f"train{v}.csv"
        pacsv.write_csv(pa.table({c: X[:, j] for j, c in enumerate(FEATURES)}), path)
        argv = ["train", "--data", path, "--registry", root / "reg", "--model", "m", "--quiet", "--alert-rate", "0.05"]
        assert main([str(a) for a in argv + (["--alias", "champion"] if v == 2 else [])]) == 0
    return root / "reg"


def _records(rng, n, *, nan_share=0.02):
    """Features (some missing, some far out), an id column, a 0/1 label and an ignored string column."""
    X = rng.normal(size=(n, N_FEATURES))
    far = rng.random(n) < 0.05
    X[far] += rng.choice([-7.0, 7.0], size=(int(far.sum()), N_FEATURES))
    X[rng.random((n, N_FEATURES)) < nan_share] = np.nan
    cols = {"id": pa.array(rng.permutation(10 * n)[:n].astype(np.int64))}
    for j, c in enumerate(FEATURES[::-1]):  # file column order differs from the model's
        cols[c] = pa.array(X[:, N_FEATURES - 1 - j], from_pandas=True)  # NaN -> null, as a CSV writer leaves it empty
    cols["label"] = pa.array(far.astype(np.int64))
    cols["note"] = pa.array([f"r{i}" for i in range(n)], pa.string())
    return pa.table(cols), X, far.astype(np.int8)


def _write(table, path, *, float32=False, row_group_size=None):
    if float32:
        table = table.cast(pa.schema([pa.field(f.name, pa.float32()) if f.name in FEATURES else f for f in table.schema]))
    if str(path).endswith(".parquet"):
        pq.write_table(table, path, row_group_size=row_group_size)
    else:
        pacsv.write_csv(table, path)
    return path


def _file_values(path):
    """The feature values as the file holds them, read whole and independently of outlierd."""
    t = pq.read_table(path) if str(path).endswith(".parquet") else pacsv.read_csv(path)
    return np.column_stack([t.column(c).to_numpy() for c in FEATURES]), t


def _read(path):
    return pq.read_table(path) if str(path).endswith(".parquet") else pacsv.read_csv(path)


@pytest.mark.parametrize("in_fmt,float32", [("csv", False), ("parquet", False), ("parquet", True)])
@pytest.mark.parametrize("out_ext", [".parquet", ".csv"])
def test_output_equals_load_model_score_row_for_row(registry, tmp_path, capsys, rng, in_fmt, float32, out_ext):
    table, _, _ = _records(rng, int(rng.integers(400, 900)))
    src = _write(table, tmp_path / f"in.{in_fmt}", float32=float32, row_group_size=int(rng.integers(20, 200)))
    X, raw = _file_values(src)
    assert X.dtype == (np.float32 if float32 else np.float64)
    batch = int(rng.integers(1, 60))  # many small batches: order must survive every boundary
    out = tmp_path / f"out{out_ext}"
    rc, stdout, err = _run(capsys, "score", "--input", src, "--registry", registry, "--model", "m", "--output", out,
                           "--id-column", "id", "--batch-rows", batch, "--json")
    assert rc == 0, err
    model = load_model(Registry(registry).path("m", "champion"))
    expected = model.score(X)
    res = _read(out)
    assert res.column_names == ["id", "score", "anomalous", "version"]
    np.testing.assert_array_equal(res.column("score").to_numpy(), expected)
    np.testing.assert_array_equal(res.column("anomalous").to_numpy(), expected >= model.threshold)
    np.testing.assert_array_equal(res.column("version").to_numpy(), np.full(len(expected), 2))
    np.testing.assert_array_equal(res.column("id").to_numpy(), raw.column("id").to_numpy())
    summary = json.loads(stdout)
    assert summary["rows"] == len(expected) and summary["version"] == 2
    assert summary["anomalies"] == int((expected >= model.threshold).sum())


def test_version_and_alias_resolution(registry, tmp_path, capsys, rng):
    table, X, _ = _records(rng, 300, nan_share=0)
    src = _write(table, tmp_path / "in.parquet")
    out = tmp_path / "v1.parquet"
    rc, _, err = _run(capsys, "score", "--data", src, "--registry", registry, "--model", "m", "--ref", "1", "--out", out)
    assert rc == 0, err
    res = pq.read_table(out)
    np.testing.assert_array_equal(res.column("version").to_numpy(), np.ones(300, dtype=np.int64))
    np.testing.assert_array_equal(res.column("score").to_numpy(), load_model(Registry(registry).path("m", 1)).score(X))
    assert not np.array_equal(res.column("score").to_numpy(), load_model(Registry(registry).path("m", 2)).score(X))


def test_directories_in_sorted_order(registry, tmp_path, capsys, rng):
    model = load_model(Registry(registry).path("m", "champion"))
    # a Parquet dataset: files of various sizes (one empty) written out of order, plus _SUCCESS
    pdir = tmp_path / "pq"
    pdir.mkdir()
    parts = []
    for i in rng.permutation(7):
        t, _, _ = _records(rng, 0 if i == 3 else int(rng.integers(1, 120)))
        _write(t, pdir / f"part-{i:02d}.parquet", row_group_size=17)
        parts.append((i, t))
    (pdir / "_SUCCESS").write_text("")
    whole = pa.concat_tables([t for _, t in sorted(parts, key=lambda p: p[0])])
    # a directory of CSV files and one Parquet file, also in sorted name order
    cdir = tmp_path / "mixed"
    cdir.mkdir()
    mixed = []
    for i in range(4):
        t, _, _ = _records(rng, int(rng.integers(1, 90)))
        _write(t, cdir / (f"b{i}.parquet" if i == 2 else f"b{i}.csv"))
        mixed.append(t)
    for src, tables in ((pdir, [whole]), (cdir, mixed)):
        out = tmp_path / f"{src.name}.parquet"
        rc, _, err = _run(capsys, "score", "--input", src, "--registry", registry, "--model", "m", "--output", out,
                          "--id-column", "id", "--batch-rows", int(rng.integers(1, 25)))
        assert rc == 0, err
        expected = np.concatenate([model.score(np.column_stack([t.column(c).to_numpy() for c in FEATURES]))
                                   for t in tables])
        ids = np.concatenate([t.column("id").to_numpy() for t in tables])
        res = pq.read_table(out)
        np.testing.assert_array_equal(res.column("score").to_numpy(), expected)
        np.testing.assert_array_equal(res.column("id").to_numpy(), ids)


@pytest.mark.parametrize("flagged_only", [False, True])
def test_explain_columns_match_model_explain(registry, tmp_path, capsys, rng, flagged_only):
    table, _, _ = _records(rng, 500)
    src = _write(table, tmp_path / "in.parquet")
    X, _ = _file_values(src)
    top_k = int(rng.integers(1, N_FEATURES + 1))
    out = tmp_path / "out.parquet"
    argv = ["score", "--input", src, "--registry", registry, "--model", "m", "--output", out, "--explain",
            "--top-k", top_k, "--batch-rows", 64, "--json"]
    rc, stdout, err = _run(capsys, *argv, *(["--explain-flagged-only"] if flagged_only else []))
    assert rc == 0, err
    model = load_model(Registry(registry).path("m", "champion"))
    scores = model.score(X)
    feats, contrib = model.explain(X, top_k=top_k)
    res = pq.read_table(out)
    assert res.column_names == ["score", "anomalous", "version"] + [
        f"top{i}_{w}" for i in range(1, top_k + 1) for w in ("feature", "contribution")]
    np.testing.assert_array_equal(res.column("score").to_numpy(), scores)
    explained = scores >= model.threshold if flagged_only else np.ones(len(scores), dtype=bool)
    assert explained.any() and (not flagged_only or not explained.all())
    assert json.loads(stdout)["explained"] == int(explained.sum())
    names = np.array(FEATURES, dtype=object)
    for i in range(top_k):
        got_names = np.array(res.column(f"top{i + 1}_feature").to_pylist(), dtype=object)
        got_contrib = res.column(f"top{i + 1}_contribution").to_numpy()
        assert res.schema.field(f"top{i + 1}_feature").type == pa.string()
        np.testing.assert_array_equal(got_names[explained], names[feats[explained, i]])
        np.testing.assert_allclose(got_contrib[explained], contrib[explained, i], rtol=1e-12, atol=0)
        assert all(v is None for v in got_names[~explained]) and np.isnan(got_contrib[~explained]).all()


def test_labels_evaluated_from_streamed_scores(registry, tmp_path, rng):
    table, _, y = _records(rng, 800)
    src = _write(table, tmp_path / "in.csv")
    X, _ = _file_values(src)
    model = load_model(Registry(registry).path("m", "champion"))
    res = score_file(src, registry, "m", label_column="label", batch_rows=50, keep_scores=False, quiet=True)
    assert res.scores is None and res.rows == 800  # keep_scores=False: the evaluation kept them, not the result
    assert res.metrics == evaluate(model.score(X), y, model.threshold)
    res = score_file(src, registry, "m", batch_rows=33, quiet=True)  # the Python API still returns every score
    np.testing.assert_array_equal(res.scores, model.score(X))
    assert res.anomalies == int((res.scores >= model.threshold).sum()) and res.output is None


@pytest.mark.parametrize(
    "make,extra,message",
    [
        (lambda t: t.drop_columns(["f3"]), [], "feature columns ['f3'] are missing"),
        (lambda t: t.set_column(t.schema.get_field_index("f1"), "f1", pa.array(["x"] * t.num_rows)), [],
         "feature column 'f1' has type string"),
        (lambda t: t, ["--id-column", "nope"], "id column 'nope' not found"),
        (lambda t: t, ["--label-column", "nope"], "label column 'nope' not found"),
        (lambda t: t, ["--explain", "--top-k", "9"], "--top-k must be between 1 and the model's 6 features; got 9"),
        (lambda t: t, ["--dask", "local"], "--dask scores Parquet input"),
    ],
)
def test_bad_input_is_one_line_exit_2(registry, tmp_path, capsys, rng, make, extra, message):
    table, _, _ = _records(rng, 50)
    src = _write(make(table), tmp_path / "in.csv")
    out = tmp_path / "out.parquet"
    rc, _, err = _run(capsys, "score", "--input", src, "--registry", registry, "--model", "m", "--output", out, *extra)
    assert rc == 2, err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob(".out.parquet*"))  # nothing half-written


def test_missing_input_unknown_model_and_output_type(registry, tmp_path, capsys, rng):
    table, _, _ = _records(rng, 20)
    src = _write(table, tmp_path / "in.parquet")
    for argv, message in (
        (["--input", tmp_path / "nope.parquet", "--model", "m"], "does not exist"),
        (["--input", tmp_path, "--model", "m"], "holds no .csv"),  # a directory without data files (in.parquet aside)
        (["--input", src, "--model", "ghost"], "ghost"),
        (["--input", src, "--model", "m", "--ref", "challenger"], "challenger"),
        (["--input", src, "--model", "m", "--output", tmp_path / "o.xlsx"], "unknown file type"),
    ):
        if argv[1] == tmp_path:
            (tmp_path / "empty").mkdir(exist_ok=True)
            argv[1] = tmp_path / "empty"
        rc, _, err = _run(capsys, "score", "--registry", registry, *argv)
        assert rc == 2 and message in err and "Traceback" not in err, err


def test_progress_line_counts_rate_and_percent():
    buf = io.StringIO()
    p = RowProgress(200, stream=buf)
    p.interval = 0.0  # show every update
    p.update(50)
    p.update(50)
    p.close()
    lines = buf.getvalue().splitlines()
    assert "50/200 records (25.0%)" in lines[0] and "100/200 records (50.0%)" in lines[1]
    assert all("records/s" in line for line in lines) and len(lines) == 3
    quiet = io.StringIO()
    RowProgress(None, stream=quiet, quiet=True).update(10)
    assert quiet.getvalue() == ""


def test_dask_local_cluster_equals_local_scoring(registry, tmp_path, capsys, rng):
    pytest.importorskip("distributed")
    ddir = tmp_path / "ds"
    ddir.mkdir()
    tables = []
    for i in range(3):  # hive-partitioned: the id passed through is the partition key, found in the path
        t, _, _ = _records(rng, int(rng.integers(150, 400)))
        (ddir / f"day={i + 1}").mkdir()
        _write(t, ddir / f"day={i + 1}" / "part-0.parquet", row_group_size=int(rng.integers(20, 90)))
        tables.append(t)
    common = ["score", "--input", ddir, "--registry", registry, "--model", "m", "--id-column", "day",
              "--label-column", "label", "--explain", "--top-k", "2", "--explain-flagged-only", "--batch-rows", 100, "--json"]
    rc, out_local, err = _run(capsys, *common, "--output", tmp_path / "local.parquet")
    assert rc == 0, err
    rc, out_dask, err = _run(capsys, *common, "--output", tmp_path / "dask.parquet", "--dask", "local", "--dask-workers", 2)
    assert rc == 0, err
    local, dask = pq.read_table(tmp_path / "local.parquet"), pq.read_table(tmp_path / "dask.parquet")
    assert dask.num_rows == sum(t.num_rows for t in tables)
    days = np.concatenate([np.full(t.num_rows, i + 1) for i, t in enumerate(tables)])
    np.testing.assert_array_equal(local.column("day").to_numpy(), days)
    assert dask.schema == local.schema
    for name in local.column_names:  # NaN (unexplained contributions) equal to NaN
        a, b = dask.column(name), local.column(name)
        if pa.types.is_floating(a.type):
            np.testing.assert_array_equal(a.to_numpy(), b.to_numpy(), err_msg=name)
        else:
            assert a.to_pylist() == b.to_pylist(), name
    s_local, s_dask = json.loads(out_local), json.loads(out_dask)
    assert s_dask["mode"] == "dask" and s_dask["metrics"] == s_local["metrics"] and s_dask["explained"] == s_local["explained"]
    model = load_model(Registry(registry).path("m", "champion"))
    X = np.concatenate([np.column_stack([t.column(c).to_numpy() for c in FEATURES]) for t in tables])
    np.testing.assert_array_equal(dask.column("score").to_numpy(), model.score(X))


def test_failure_mid_stream_leaves_no_output(registry, tmp_path, capsys, rng):
    # the second file of a directory lacks a feature column: found after the first file was scored
    d = tmp_path / "in"
    d.mkdir()
    good, _, _ = _records(rng, 200)
    bad, _, _ = _records(rng, 50)
    _write(good, d / "a.csv")
    _write(bad.drop_columns(["f4"]), d / "b.csv")
    out = tmp_path / "out.csv"
    rc, _, err = _run(capsys, "score", "--input", d, "--registry", registry, "--model", "m", "--output", out,
                      "--batch-rows", 16)
    assert rc == 2 and "b.csv" in err and "['f4'] are missing" in err and "Traceback" not in err, err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["in"]


def test_anomalous_uses_the_threshold_in_force(registry, tmp_path, capsys, rng):
    # a published threshold version (outlierd threshold calibrate) moves the cut for batch scoring as
    # it does for a server serving that version; without one, the artifact's threshold applies
    import shutil

    reg_dir = tmp_path / "reg"
    shutil.copytree(registry, reg_dir)
    model = load_model(Registry(reg_dir).path("m", "champion"))
    table, X, _ = _records(rng, 500, nan_share=0)
    src = _write(table, tmp_path / "in.parquet")
    scores = model.score(X)
    cut = float(np.quantile(scores, 0.7))  # far below the artifact's: many more alerts
    assert cut < model.threshold
    assert Registry(reg_dir).publish_threshold("m", 2, cut, {"method": "test"}) == 1
    out = tmp_path / "out.parquet"
    rc, stdout, err = _run(capsys, "score", "--input", src, "--registry", reg_dir, "--model", "m", "--output", out,
                           "--explain", "--explain-flagged-only", "--top-k", "1", "--json")
    assert rc == 0, err
    res, summary = _read(out), json.loads(stdout)
    np.testing.assert_array_equal(res.column("anomalous").to_numpy(), scores >= cut)
    assert summary["anomalies"] == int((scores >= cut).sum()) and summary["explained"] == summary["anomalies"]
    assert (summary["threshold"], summary["threshold_version"]) == (cut, 1)
    # version 1 has no threshold version: its artifact's threshold
    rc, stdout, err = _run(capsys, "score", "--input", src, "--registry", reg_dir, "--model", "m", "--ref", "1", "--json")
    v1 = load_model(Registry(reg_dir).path("m", 1))
    assert rc == 0, err
    summary = json.loads(stdout)
    assert (summary["threshold"], summary["threshold_version"]) == (v1.threshold, 0)
    assert summary["anomalies"] == int((v1.score(X) >= v1.threshold).sum())

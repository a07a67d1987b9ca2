"""The directory registry (outlierd.core.registry) and its CLI (outlierd registry ...)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from outlierd.core.artifact import read_manifest, write_artifact
from outlierd.core.errors import ArtifactError, ModelNotFoundError
from outlierd.core.model import Model, build_model, load_model
from outlierd.core.preprocess import Preprocessing
from outlierd.core.registry import Registry
from outlierd.cli import main as cli_main

N_PROCS = 8


def make_artifact(path, seed=0, d=3, roc_auc=0.9):
    rng = np.random.default_rng(seed)
    med = rng.normal(size=d)
    inv = 1.0 / (0.5 + rng.random(d))
    prep = Preprocessing.identity(d, median=med)
    arrays = {**prep.arrays(), "rz_median": med, "rz_scale_inv": inv}
    manifest = {
        "detector": {"kind": "robust_z", "params": {"combine": "rms"}},
        "features": [{"name": f"f{i}"} for i in range(d)],
        "threshold": 1.0,
        "preprocessing": prep.manifest(),
    }
    probe = rng.normal(size=(16, d))
    expected = build_model(manifest, arrays).score(probe)
    return write_artifact(
        path,
        detector=manifest["detector"],
        feature_names=[f"f{i}" for i in range(d)],
        preprocessing=prep.manifest(),
        threshold=1.0,
        arrays=arrays,
        probe_X=probe,
        probe_expected=expected,
        probe_tolerance={"atol": 1e-9, "rtol": 1e-9},
        reference={},
        lineage={"seed": seed},
        metrics={"roc_auc": roc_auc},
    )


@pytest.fixture()
def reg(tmp_path):
    return Registry(tmp_path / "registry")


@pytest.fixture()
def artifacts(tmp_path):
    """Three distinct source artifacts."""
    return [make_artifact(tmp_path / f"src{i}", seed=i, roc_auc=0.8 + i / 100) for i in range(3)]


# --------------------------------------------------------------------------- publish and read


def test_publish_numbers_versions_and_stamps_manifest(reg, artifacts):
    assert [reg.publish("fraud", a) for a in artifacts] == [1, 2, 3]
    assert reg.models() == ["fraud"]
    for n in (1, 2, 3):
        m = read_manifest(reg.path("fraud", n))  # digest re-signed after stamping
        assert (m["model"], m["version"]) == ("fraud", n)
        assert m["published"].endswith("Z")
    # Another model numbers its versions independently.
    assert reg.publish("other", artifacts[0]) == 1
    assert reg.models() == ["fraud", "other"]
    # The source artifacts are left untouched.
    assert read_manifest(artifacts[0])["version"] is None


def test_versions_get_resolve_and_load(reg, artifacts):
    for a in artifacts:
        reg.publish("fraud", a)
    reg.set_alias("fraud", "champion", 2)
    reg.set_alias("fraud", "challenger", 3)

    vs = reg.versions("fraud")
    assert [v["version"] for v in vs] == [1, 2, 3]
    assert [v["aliases"] for v in vs] == [[], ["champion"], ["challenger"]]
    assert [v["metrics"]["roc_auc"] for v in vs] == pytest.approx([0.80, 0.81, 0.82])
    assert all(v["detector"] == "robust_z" for v in vs)
    assert all(v["created"] and Path(v["path"]).is_dir() for v in vs)
    assert [v["created"] for v in vs] == sorted(v["created"] for v in vs)

    assert reg.aliases("fraud") == {"challenger": 3, "champion": 2}
    assert reg.resolve("fraud", 1) == 1
    assert reg.resolve("fraud", "3") == 3
    assert reg.resolve("fraud", "champion") == 2

    info = reg.get("fraud", "champion")
    assert info["version"] == 2 and info["aliases"] == ["champion"]
    assert info["manifest"]["lineage"] == {"seed": 1}
    assert {k: info[k] for k in vs[1]} == vs[1]
    assert reg.path("fraud", "challenger") == reg.root / "fraud" / "3"

    model = reg.load("fraud", "champion")
    assert isinstance(model, Model)
    assert (model.name, model.version) == ("fraud", 2)
    X = np.random.default_rng(5).normal(size=(10, 3))
    np.testing.assert_array_equal(model.score(X), load_model(artifacts[1]).score(X))


def test_publish_with_aliases(reg, artifacts):
    assert reg.publish("fraud", artifacts[0], aliases=["champion", "challenger"]) == 1
    assert reg.publish("fraud", artifacts[1], aliases=("challenger",)) == 2
    assert reg.aliases("fraud") == {"champion": 1, "challenger": 2}


def test_alias_moves_and_audit_log(reg, artifacts):
    for a in artifacts[:2]:
        reg.publish("fraud", a)
    reg.set_alias("fraud", "champion", 1)
    reg.set_alias("fraud", "champion", "2")
    reg.set_alias("fraud", "stable", "champion")  # another alias, resolved now
    reg.remove_alias("fraud", "stable")
    assert reg.aliases("fraud") == {"champion": 2}
    on_disk = json.loads((reg.root / "fraud" / "aliases.json").read_text())
    assert on_disk == {"champion": 2}
    # The alias file is replaced via a temporary file that never stays behind.
    assert not [p for p in (reg.root / "fraud").iterdir() if p.name.startswith(".tmp-")]

    log = reg.audit("fraud")
    assert [(r["action"], r["version"], r.get("alias")) for r in log] == [
        ("publish", 1, None),
        ("publish", 2, None),
        ("alias", 1, "champion"),
        ("alias", 2, "champion"),
        ("alias", 2, "stable"),
        ("remove_alias", None, "stable"),
    ]
    assert log[3]["previous"] == 1 and log[2]["previous"] is None
    for r in log:
        assert r["time"].endswith("Z") and r["pid"] == os.getpid()
        assert {"user", "host"} <= r.keys()
    # One JSON object per line, appended.
    lines = (reg.root / "fraud" / "audit.log").read_text().splitlines()
    assert [json.loads(x)["action"] for x in lines] == [r["action"] for r in log]


def test_audit_survives_a_torn_line(reg, artifacts):
    reg.publish("fraud", artifacts[0])
    with open(reg.root / "fraud" / "audit.log", "a") as f:
        f.write('{"action": "publ')  # a writer killed mid-line
    reg.publish("fraud", artifacts[1])
    assert [r["version"] for r in reg.audit("fraud")] == [1, 2]


# --------------------------------------------------------------------------- errors


def test_unknown_model_version_alias(reg, artifacts):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        reg.versions("fraud")
    reg.publish("fraud", artifacts[0], aliases=["champion"])
    reg.publish("spam", artifacts[1])
    with pytest.raises(ModelNotFoundError, match=r"no model 'frud'.*known models: fraud, spam"):
        reg.versions("frud")
    with pytest.raises(ModelNotFoundError, match=r"no version 7; versions: 1"):
        reg.resolve("fraud", 7)
    with pytest.raises(ModelNotFoundError, match=r"no version 9"):
        reg.get("fraud", "9")
    with pytest.raises(ModelNotFoundError, match=r"no version or alias 'prod'.*champion=1"):
        reg.load("fraud", "prod")
    with pytest.raises(ModelNotFoundError, match="no version 4"):
        reg.set_alias("fraud", "champion", 4)
    with pytest.raises(ModelNotFoundError, match="no alias 'prod'"):
        reg.remove_alias("fraud", "prod")
    with pytest.raises(ModelNotFoundError):
        reg.set_alias("frud", "champion", 1)
    assert reg.aliases("fraud") == {"champion": 1}


@pytest.mark.parametrize("name", ["", ".hidden", "../escape", "a/b", "x" * 129, "sp ace", "é", 3])
def test_invalid_model_names(reg, artifacts, name):
    with pytest.raises(ValueError, match="model name"):
        reg.publish(name, artifacts[0])
    with pytest.raises(ValueError):
        reg.versions(name)
    assert not reg.root.exists() or not any(reg.root.iterdir())


def test_valid_edge_names_and_invalid_aliases(reg, artifacts):
    name = "A-b_c.9" + "x" * 121
    assert len(name) == 128
    assert reg.publish(name, artifacts[0]) == 1
    for alias in ("123", ".x", "a/b", ""):
        with pytest.raises(ValueError, match="alias name"):
            reg.set_alias(name, alias, 1)
        with pytest.raises(ValueError, match="alias name"):
            reg.publish(name, artifacts[1], aliases=[alias])
    assert [v["version"] for v in reg.versions(name)] == [1]  # refused before anything was written
    reg.set_alias(name, "v2-candidate", 1)
    assert reg.resolve(name, "v2-candidate") == 1


def test_corrupt_source_is_refused(reg, tmp_path, artifacts):
    bad = make_artifact(tmp_path / "bad")
    with open(bad / "arrays.npz", "r+b") as f:
        f.seek(40)
        byte = f.read(1)
        f.seek(40)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ArtifactError, match="corrupt"):
        reg.publish("fraud", bad)

    edited = make_artifact(tmp_path / "edited")
    m = json.loads((edited / "manifest.json").read_text())
    m["threshold"] = 0.0
    (edited / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="modified"):
        reg.publish("fraud", edited)

    with pytest.raises(ArtifactError):
        reg.publish("fraud", tmp_path / "nowhere")
    assert reg.models() == []

    reg.publish("fraud", artifacts[0])
    incomplete = make_artifact(tmp_path / "incomplete")
    (incomplete / "probe.npz").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        reg.publish("fraud", incomplete)
    assert [v["version"] for v in reg.versions("fraud")] == [1]


def test_readers_ignore_non_version_entries(reg, artifacts):
    reg.publish("fraud", artifacts[0])
    mdir = reg.root / "fraud"
    (mdir / ".tmp-deadbeef").mkdir()
    (mdir / "notes").mkdir()
    (mdir / "07").mkdir()
    (mdir / "9").write_text("a file, not a version dir")
    assert [v["version"] for v in reg.versions("fraud")] == [1]
    assert reg.publish("fraud", artifacts[1]) == 2
    assert not (mdir / ".tmp-deadbeef").exists()


# --------------------------------------------------------------------------- concurrency and crashes


def _publish_child(root, src, barrier, out):
    barrier.wait()
    out.put(Registry(root).publish("fraud", src))


def test_concurrent_publishers_get_distinct_consecutive_versions(tmp_path):
    root = tmp_path / "registry"
    srcs = [make_artifact(tmp_path / f"src{i}", seed=i) for i in range(N_PROCS)]
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(N_PROCS), ctx.Queue()
    procs = [ctx.Process(target=_publish_child, args=(str(root), str(s), barrier, out)) for s in srcs]
    for p in procs:
        p.start()
    reg = Registry(root)
    # Meanwhile, a reader only ever sees complete versions.
    while any(p.is_alive() for p in procs):
        if reg.models():
            for v in reg.versions("fraud"):
                assert "error" not in v and v["created"], v
        time.sleep(0.002)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    got = sorted(out.get(timeout=5) for _ in procs)
    assert got == list(range(1, N_PROCS + 1))

    vs = reg.versions("fraud")
    assert [v["version"] for v in vs] == got
    # Each version holds exactly one of the sources, unchanged (its probe still reproduces).
    seeds = set()
    for v in vs:
        model = reg.load("fraud", v["version"])
        assert model.version == v["version"]
        seeds.add(model.manifest["lineage"]["seed"])
    assert seeds == set(range(N_PROCS))
    assert sorted(r["version"] for r in reg.audit("fraud") if r["action"] == "publish") == got
    assert not [p for p in (root / "fraud").iterdir() if p.name.startswith(".tmp-")]


def _publish_and_die(root, src):
    import outlierd.core.registry

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    # After the copy, before the stamp and the rename: the worst moment to be killed.
    outlierd.core.registry.rewrite_manifest = die
    Registry(root).publish("fraud", src, aliases=["champion"])


def test_publish_killed_half_way_leaves_nothing_visible(reg, artifacts):
    reg.publish("fraud", artifacts[0], aliases=["champion"])
    before = reg.versions("fraud")
    audit_before = reg.audit("fraud")

    p = mp.get_context("spawn").Process(target=_publish_and_die, args=(str(reg.root), str(artifacts[1])))
    p.start()
    p.join(60)
    assert p.exitcode == -signal.SIGKILL

    mdir = reg.root / "fraud"
    stale = [x for x in mdir.iterdir() if x.name.startswith(".tmp-")]
    assert len(stale) == 1 and (stale[0] / "arrays.npz").is_file()  # the copy had happened
    assert reg.versions("fraud") == before
    assert reg.aliases("fraud") == {"champion": 1}
    assert reg.audit("fraud") == audit_before

    # The dead publisher's lock is gone with it; the next publish works and sweeps its leftovers.
    assert Registry(reg.root, lock_timeout=5).publish("fraud", artifacts[2]) == 2
    assert not [x for x in mdir.iterdir() if x.name.startswith(".tmp-")]
    assert reg.load("fraud", 2).manifest["lineage"] == {"seed": 2}


def test_lock_timeout_is_a_clear_error(reg, artifacts):
    import fcntl

    from outlierd.core.errors import RegistryError

    reg.publish("fraud", artifacts[0])
    with open(reg.root / "fraud" / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another open file description: conflicts like another process
        with pytest.raises(RegistryError, match="timed out"):
            Registry(reg.root, lock_timeout=0.05).publish("fraud", artifacts[1])
        assert [v["version"] for v in reg.versions("fraud")] == [1]  # readers take no lock


# --------------------------------------------------------------------------- CLI


def cli(*argv):
    """``outlierd ARGV`` through the console script's main: the CLI's one error boundary is there."""
    return cli_main(list(argv))


@pytest.fixture()
def populated(reg, artifacts):
    for a in artifacts:
        reg.publish("fraud", a)
    reg.set_alias("fraud", "champion", 2)
    return reg


def test_cli_list_json(populated, capsys):
    assert cli("registry", "list", "--registry", str(populated.root), "--model", "fraud", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out, list) and [v["version"] for v in out] == [1, 2, 3]
    for v in out:
        assert isinstance(v["version"], int) and isinstance(v["aliases"], list)
        assert isinstance(v["created"], str) and isinstance(v["metrics"], dict)
    assert out[1]["aliases"] == ["champion"] and out[0]["metrics"] == {"roc_auc": 0.8}


def test_cli_list_table(populated, capsys):
    assert cli("registry", "list", "--registry", str(populated.root), "--model", "fraud") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["VERSION", "ALIASES", "CREATED", "DETECTOR", "METRICS"]
    assert len(lines) == 4
    row = lines[2].split()
    assert row[:2] == ["2", "champion"] and row[3] == "robust_z" and row[4] == "roc_auc=0.81"


def test_cli_show(populated, capsys):
    root = str(populated.root)
    assert cli("registry", "show", "--registry", root, "--model", "fraud", "champion", "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["version"] == 2 and info["aliases"] == ["champion"]
    assert info["manifest"]["version"] == 2 and info["metrics"] == {"roc_auc": 0.81}
    assert cli("registry", "show", "--registry", root, "--model", "fraud", "3") == 0
    text = capsys.readouterr().out
    assert "version:    3" in text and "robust_z" in text and "roc_auc=0.82" in text


def test_cli_alias(populated, capsys):
    root = str(populated.root)
    assert cli("registry", "alias", "--registry", root, "--model", "fraud", "champion", "3") == 0
    assert capsys.readouterr().out.strip() == "fraud: champion -> 3 (was 2)"
    assert populated.aliases("fraud") == {"champion": 3}
    assert populated.audit("fraud")[-1]["action"] == "alias"


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["list", "--model", "nope"], "no model 'nope'"),
        (["list", "--model", "../etc", "--json"], "invalid model name"),
        (["show", "--model", "fraud", "9"], "no version 9"),
        (["show", "--model", "fraud", "prod", "--json"], "no version or alias 'prod'"),
        (["alias", "--model", "fraud", "champion", "9"], "no version 9"),
        (["alias", "--model", "fraud", "42", "1"], "invalid alias name"),
        (["alias", "--model", "nope", "champion", "1"], "no model 'nope'"),
    ],
)
def test_cli_errors_exit_2_with_one_line(populated, capsys, argv, needle):
    rc = cli("registry", argv[0], "--registry", str(populated.root), *argv[1:])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.out == ""
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("outlierd: error: ") and needle in err[0]
    assert "Traceback" not in captured.err
    assert populated.aliases("fraud") == {"champion": 2}


def test_cli_missing_registry_dir(tmp_path, capsys):
    rc = cli("registry", "list", "--registry", str(tmp_path / "none"), "--model", "fraud")
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()  # a read never creates the registry

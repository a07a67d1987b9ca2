"""`outlierd serve` argument handling: --registry / --model from flags or OUTLIERD_* variables."""

from __future__ import annotations

import pytest

import outlierd.server.workers
from outlierd.cli import main


@pytest.fixture
def captured(monkeypatch):
    got = {}

    def fake_serve(settings):
        got["settings"] = settings
        return 0

    monkeypatch.setattr(outlierd.server.workers, "serve", fake_serve)
    for var in ("OUTLIERD_REGISTRY", "OUTLIERD_MODEL", "OUTLIERD_PORT"):
        monkeypatch.delenv(var, raising=False)
    return got


@pytest.mark.parametrize("missing", ["registry", "model"])
def test_missing_registry_or_model_is_a_one_line_error(captured, capsys, tmp_path, missing):
    argv = {"registry": ["--registry", str(tmp_path)], "model": ["--model", "m"]}
    args = ["serve"] + [a for k, v in argv.items() if k != missing for a in v]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"outlierd serve: error: --{missing} is required (or set OUTLIERD_{missing.upper()})"
    assert "settings" not in captured


def test_registry_and_model_from_the_environment(captured, monkeypatch, tmp_path):
    monkeypatch.setenv("OUTLIERD_REGISTRY", str(tmp_path))
    monkeypatch.setenv("OUTLIERD_MODEL", "fraud")
    monkeypatch.setenv("OUTLIERD_PORT", "50999")
    assert main(["serve"]) == 0
    s = captured["settings"]
    assert (str(s.registry), s.model, s.port) == (str(tmp_path), "fraud", 50999)


def test_flags_override_the_environment(captured, monkeypatch, tmp_path):
    monkeypatch.setenv("OUTLIERD_REGISTRY", "/nonexistent")
    monkeypatch.setenv("OUTLIERD_MODEL", "fraud")
    assert main(["serve", "--registry", str(tmp_path), "--model", "payments", "--port", "50123"]) == 0
    s = captured["settings"]
    assert (str(s.registry), s.model, s.port) == (str(tmp_path), "payments", 50123)


@pytest.mark.parametrize("cmd", [["rollback"], ["compare"], ["promote"], ["threshold", "list"]])
def test_rollout_commands_take_the_registry_from_the_environment(monkeypatch, capsys, tmp_path, cmd):
    missing = tmp_path / "no-registry-here"
    monkeypatch.setenv("OUTLIERD_REGISTRY", str(missing))
    monkeypatch.setenv("OUTLIERD_MODEL", "fraud")
    assert main(cmd) == 2  # parsed without --registry / --model: the variables were used
    assert str(missing) in capsys.readouterr().err


def test_rollout_commands_without_registry_anywhere_are_refused(monkeypatch, capsys):
    monkeypatch.delenv("OUTLIERD_REGISTRY", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["rollback", "--model", "m"])
    assert e.value.code == 2 and "--registry" in capsys.readouterr().err

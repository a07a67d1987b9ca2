"""`outlierd serve` argument handling: --registry / --model from flags or OUTLIERD_* variables."""

from __future__ import annotations

import argparse
import ast
from dataclasses import fields
from pathlib import Path

import pytest

import outlierd.server.settings
import outlierd.server.workers
from outlierd.cli import build_parser, main
from outlierd.server.settings import ServeSettings


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


# ---------------------------------------------------------------------------------------------
# the flags are generated from ServeSettings: one per field, its docstring as the help


def _serve_actions() -> dict[str, argparse.Action]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices["serve"]._actions if a.dest != "help"}


def _docstrings_from_source() -> dict[str, str]:
    """The attribute docstrings read here on their own (not with the code under test): the string
    literal right after each annotated field in server/settings.py, whitespace folded."""
    tree = ast.parse(Path(outlierd.server.settings.__file__).read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ServeSettings")
    return {a.target.id: " ".join(b.value.value.split()) for a, b in zip(cls.body, cls.body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}


def test_every_settings_field_has_a_flag_whose_help_is_its_docstring():
    actions = _serve_actions()
    docs = _docstrings_from_source()
    names = [f.name for f in fields(ServeSettings)]
    assert sorted(docs) == sorted(names)  # a docstring on every field
    dests = {f.name: f.metadata.get("dest", f.name) for f in fields(ServeSettings)}
    assert sorted(actions) == sorted(dests.values())  # one flag per field, nothing else
    for name in names:
        action = actions[dests[name]]
        assert action.default is None, name  # unset flags leave the field to OUTLIERD_<FIELD> or its default
        assert action.help.replace("%%", "%").startswith(docs[name]), name


def test_flag_forms_kept():
    actions = _serve_actions()
    assert actions["max_delay_us"].option_strings == ["--max-delay-us"] and actions["max_delay_us"].type is int
    assert actions["grace_s"].type is float and actions["feedback_store"].type is None  # a string, as before
    assert actions["drift"].option_strings == ["--no-drift"] and actions["drift"].const == 0
    assert actions["capture"].option_strings == ["--no-capture"] and actions["capture"].const == 0
    assert actions["auth_token_file"].option_strings == ["--auth-token-file"]
    assert "auth_token" not in actions  # the token itself is never a flag (it would show in `ps`)
    assert tuple(actions["device"].choices) == ("cpu", "cuda", "auto")
    assert tuple(actions["gpu_backend"].choices) == ("onnx", "torch", "cuda")
    assert tuple(actions["rollout"].choices) == ("off", "shadow", "split")
    assert tuple(actions["split_key"].choices) == ("id", "request")


def test_shown_defaults_are_the_fields_defaults():
    actions = _serve_actions()
    assert actions["max_delay_us"].help.endswith("(default 0)")  # the hand-written flag said 500
    assert ServeSettings(registry=Path("r"), model="m").max_delay_us == 0
    assert actions["port"].help.endswith("(default 50051)")
    assert actions["grace_s"].help.endswith("(default 10)")
    assert actions["capture_sample"].help.endswith("(default 0.01)")
    assert actions["drift"].help.endswith("(default 1; --no-drift sets 0)")
    assert "(default" not in actions["tls_cert"].help  # no default: none shown
    serve = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["serve"]
    text = " ".join(serve.format_help().split())  # `outlierd serve --help`, line breaks folded
    assert "--max-delay-us N Extra wait for a batch to fill." in text
    assert "so small values cost about 1 ms of latency. (default 0)" in text and "(default 500)" not in text


def test_generated_flags_reach_the_settings(captured, tmp_path, monkeypatch):
    monkeypatch.setenv("OUTLIERD_STREAM_INFLIGHT", "5")  # a variable still applies when its flag is not given
    assert main(["serve", "--registry", str(tmp_path), "--model", "m", "--max-delay-us", "7", "--grace-s", "2.5",
                 "--drift-psi-warn", "0.2", "--max-concurrent-rpcs", "9", "--device", "cpu", "--rollout", "shadow",
                 "--no-drift", "--no-capture", "--feedback-store", str(tmp_path / "fb.sqlite")]) == 0
    s = captured["settings"]
    assert (s.max_delay_us, s.grace_s, s.drift_psi_warn, s.max_concurrent_rpcs) == (7, 2.5, 0.2, 9)
    assert (s.device, s.rollout, s.drift, s.capture, s.stream_inflight) == ("cpu", "shadow", 0, 0, 5)
    assert s.feedback_store == tmp_path / "fb.sqlite" and s.alias == "champion" and s.max_batch == 1024


def test_auth_token_file_is_read(captured, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    assert main(["serve", "--registry", str(tmp_path), "--model", "m", "--auth-token-file", str(token)]) == 0
    assert captured["settings"].auth_token == "s3cret"

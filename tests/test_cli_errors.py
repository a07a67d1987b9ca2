"""The CLI's one error boundary (``outlierd.cli.main``): an error becomes one ``outlierd: error:``
line and its exit code; OUTLIERD_DEBUG re-raises it."""

from __future__ import annotations

import pytest

from outlierd import registry_cli
from outlierd.cli import main
from outlierd.core.errors import (
    ArtifactError,
    InvalidInputError,
    ModelNotFoundError,
    OutlierdError,
    StoreUnavailableError,
    UnsupportedError,
)


class _Custom(OutlierdError):
    exit_code = 3


def _raising(monkeypatch, exc: BaseException) -> None:
    def run(args):
        raise exc

    monkeypatch.setattr(registry_cli, "run", run)  # `registry ...` dispatches to it through main's parser
    monkeypatch.delenv("OUTLIERD_DEBUG", raising=False)


@pytest.mark.parametrize("exc, line, rc", [
    (InvalidInputError("k must be >= 1; got 0"), "outlierd: error: k must be >= 1; got 0", 2),
    (ModelNotFoundError("no model 'm'"), "outlierd: error: no model 'm'", 2),  # no KeyError-style quotes
    (ArtifactError("manifest.json is missing"), "outlierd: error: manifest.json is missing", 2),
    (StoreUnavailableError("feedback store x unavailable"), "outlierd: error: feedback store x unavailable", 2),
    (UnsupportedError("no explanations"), "outlierd: error: no explanations", 2),
    (_Custom("its own exit code"), "outlierd: error: its own exit code", 3),
    (OSError(2, "No such file or directory"), "outlierd: error: [Errno 2] No such file or directory", 2),
    (ValueError("plain"), "outlierd: error: plain", 2),
])
def test_errors_become_one_line_and_the_exit_code(monkeypatch, capsys, tmp_path, exc, line, rc):
    _raising(monkeypatch, exc)
    assert main(["registry", "list", "--registry", str(tmp_path), "--model", "m"]) == rc
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [line]


def test_keyboard_interrupt_exits_130(monkeypatch, capsys, tmp_path):
    _raising(monkeypatch, KeyboardInterrupt())
    assert main(["registry", "list", "--registry", str(tmp_path), "--model", "m"]) == 130
    assert capsys.readouterr().err.splitlines() == ["outlierd: interrupted"]


@pytest.mark.parametrize("exc", [InvalidInputError("bad"), OSError("disk"), ValueError("plain")])
def test_outlierd_debug_re_raises(monkeypatch, tmp_path, exc):
    _raising(monkeypatch, exc)
    monkeypatch.setenv("OUTLIERD_DEBUG", "1")
    with pytest.raises(type(exc)) as got:
        main(["registry", "list", "--registry", str(tmp_path), "--model", "m"])
    assert got.value is exc


def test_an_unexpected_error_is_not_swallowed(monkeypatch, tmp_path):
    _raising(monkeypatch, RuntimeError("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["registry", "list", "--registry", str(tmp_path), "--model", "m"])


def test_registry_command_errors_reach_main(capsys, tmp_path):
    # registry_cli.run no longer catches: the unknown model propagates to main's boundary
    (tmp_path / "reg").mkdir()
    assert main(["registry", "list", "--registry", str(tmp_path / "reg"), "--model", "nope"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("outlierd: error: no model 'nope'")


def test_errors_that_replaced_builtins_still_are_them():
    # callers (server, training, tests) that caught the builtin these used to be keep working
    from outlierd.core.errors import BackendUnavailableError, MissingDependencyError, StoreError, UnavailableError
    from outlierd.monitoring.trigger import ScrapeError

    assert issubclass(StoreUnavailableError, StoreError) and issubclass(StoreUnavailableError, OSError)
    assert issubclass(UnsupportedError, NotImplementedError) and UnsupportedError.code == "UNIMPLEMENTED"
    assert issubclass(BackendUnavailableError, MissingDependencyError) and issubclass(BackendUnavailableError, ValueError)
    assert issubclass(ScrapeError, UnavailableError)
    assert str(StoreUnavailableError("store x unavailable")) == "store x unavailable"


def test_error_messages_never_carry_escape_codes(tmp_path):
    # any error message that quotes a file's bytes: the escape sequence is shown, not executed
    from conftest import run_cli

    bad = tmp_path / "evil\x1b[2J.csv"
    res = run_cli("train", "--data", str(bad), "--registry", str(tmp_path / "reg"), "--model", "m")
    (line,) = [line for line in res.stderr.splitlines() if line.startswith("outlierd: error:")]
    assert res.returncode == 2 and "\x1b" not in line and "\\x1b[2J" in line, line

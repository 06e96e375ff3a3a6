"""Tests for the user-facing errors and their one-message report in anomalib's CLI (anomalib_cflow_plus.errors)."""

from __future__ import annotations

import sys

import pytest

from anomalib_cflow_plus import errors
from anomalib_cflow_plus.errors import ConfigurationError, find_user_error, install_cli_report


def test_a_user_error_is_found_through_causes_and_in_quoted_text() -> None:
    error = ConfigurationError("lr must be > 0, got -1.0.")
    try:
        raise RuntimeError("wrapped") from error
    except RuntimeError as wrapped:
        assert find_user_error(wrapped) is error
    quoted = ValueError(f"Does not validate against any of the Union subtypes\nErrors:\n  - {error}\nGiven value: ...")
    assert find_user_error(quoted) is error
    assert find_user_error(ValueError("something else")) is None


def test_configuration_errors_are_still_value_errors() -> None:
    with pytest.raises(ValueError, match="coupling_blocks"):
        from anomalib_cflow_plus.torch_model import CflowPlusModel

        CflowPlusModel(backbone="efficientnet_lite0", coupling_blocks=0)


@pytest.fixture
def hook(monkeypatch: pytest.MonkeyPatch) -> list:
    """Install the report in front of a recording hook; return what the recording hook received."""
    received = []
    monkeypatch.setattr(sys, "excepthook", lambda kind, value, traceback: received.append(value))
    monkeypatch.delenv(errors.TRACEBACK_VARIABLE, raising=False)
    install_cli_report()
    install_cli_report()  # once only
    assert sys.excepthook.reports_cflow_plus_errors
    return received


def test_the_cli_report_prints_only_the_message_of_a_user_error(hook: list, capsys) -> None:
    error = ConfigurationError("lr must be > 0, got -1.0.")
    sys.excepthook(ValueError, ValueError(f"Union noise: {error} Namespace(...)"), None)
    assert hook == []
    printed = capsys.readouterr().err.strip().splitlines()
    assert printed[0] == "ConfigurationError: lr must be > 0, got -1.0."
    assert errors.TRACEBACK_VARIABLE in printed[-1]


def test_the_cli_report_leaves_other_errors_and_an_asked_traceback_alone(
    hook: list, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = KeyError("not ours")
    sys.excepthook(KeyError, other, None)
    monkeypatch.setenv(errors.TRACEBACK_VARIABLE, "1")
    user = ConfigurationError("sigma must be >= 0, got -1.")
    sys.excepthook(ConfigurationError, user, None)
    assert hook == [other, user]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("argv0", "expected"),
    [("/venv/bin/anomalib", True), ("/site-packages/anomalib/cli/cli.py", True), ("train.py", False), ("", False)],
)
def test_the_cli_is_recognized(monkeypatch: pytest.MonkeyPatch, argv0: str, expected: bool) -> None:
    monkeypatch.setattr(sys, "argv", [argv0])
    assert errors.running_anomalib_cli() is expected


def test_outside_the_cli_raising_installs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    previous = sys.excepthook
    monkeypatch.setattr(sys, "argv", ["train.py"])
    ConfigurationError("x")
    assert sys.excepthook is previous

"""CLI usage contract: help everywhere, exit code 2 for wrong usage (DESIGN §10)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from ml.cli import app

runner = CliRunner()

COMMANDS = [["simulate"], ["import", "completejourney"], ["validate"], ["train"], ["score"], ["monitor"],
            ["models", "list"], ["models", "report"], ["models", "history"], ["models", "promote"],
            ["models", "rollback"], ["demo"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c))
def test_every_command_has_help_with_an_example(cmd):
    result = runner.invoke(app, [*cmd, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example: offerflow" in result.output


@pytest.mark.parametrize("args", [
    ["train", "--data", "x", "--as-of", "2025-13-01"],
    ["train", "--data", "x", "--as-of", "yesterday"],
    ["score", "--data", "x", "--as-of", "31/12/2025"],
    ["validate", "--no-such-option"],
    ["train", "--data", "x", "--as-of", "2025-01-01", "--offer-type", "megasell"],
    ["models", "history", "megasell"],
    ["nonexistent-command"],
])
def test_wrong_usage_exits_2(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output


def test_missing_data_source_is_a_usage_error(monkeypatch):
    monkeypatch.delenv("OFFERFLOW_DATA", raising=False)
    result = runner.invoke(app, ["validate"])
    assert result.exit_code == 2
    assert "OFFERFLOW_DATA" in result.output

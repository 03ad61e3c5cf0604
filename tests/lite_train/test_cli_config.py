"""One config path: every option of the config-built commands is a field of their dataclass, with its default
and help, and the help reads at 80 columns."""

from __future__ import annotations

import dataclasses

import pytest
import typer
from typer.testing import CliRunner

from lite_train.cli import app
from lite_train.evaluate.predict import PredictConfig
from lite_train.evaluate.testing import TestConfig
from lite_train.evaluate.vtab.config import VtabEvalConfig
from lite_train.train.config import TrainConfig
from lite_train.train.pretrain_config import PretrainConfig

COMMANDS = {"train": TrainConfig, "pretrain": PretrainConfig, "test": TestConfig, "predict": PredictConfig,
            "eval-vtab": VtabEvalConfig}
EXTRA = {"device", "resume"}  # options of the commands that are not settings of the result


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_is_a_config_field_with_its_default_and_help(name):
    cls = COMMANDS[name]
    command = typer.main.get_command(app).commands[name]
    options = {p.name: p for p in command.params}
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("cli")}
    assert set(fields) <= set(options) and set(options) - set(fields) <= EXTRA
    for field in fields.values():
        option = options[field.name]
        assert option.help == field.metadata["help"]
        assert option.opts[0] == "--" + field.name.replace("_", "-")
        if field.default is dataclasses.MISSING:
            assert option.required
        elif isinstance(field.default, tuple):
            assert option.default in (",".join(field.default), list(field.default))
        else:
            assert option.default == field.default, field.name


@pytest.mark.parametrize("name", sorted(COMMANDS) + ["describe", "episodes", "plot"])
def test_help_shows_every_option_name_whole_at_80_columns(name):
    result = CliRunner().invoke(app, [name, "--help"], terminal_width=80)
    assert result.exit_code == 0
    assert max(len(line) for line in result.output.splitlines()) <= 80
    for param in typer.main.get_command(app).commands[name].params:
        for opt in param.opts:
            assert opt in result.output, opt

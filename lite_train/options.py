"""One config path: frozen dataclasses whose fields carry their CLI help, typer commands built from them.

A config field declared with `option(default, "help", ...)` is a command-line option of every command
built from its dataclass (`--field-name`, the same default, the help text beside the field), so a default
or a help text is written once. `config_command` builds the typer command: its options are the dataclass
fields (minus `skip`) plus the command's own extra parameters, and it calls the function with a dict of
the config fields as given on the command line.

    @dataclasses.dataclass(frozen=True)
    class PretrainConfig:
        epochs: int = option(30, "Passes over the training images.", min=0)

    @config_command(app, "pretrain", PretrainConfig, skip=("device",))
    def pretrain(values: dict, device: str = typer.Option("auto")) -> None: ...

Fields of type tuple[str, ...] are comma-separated on the command line ("" = the empty tuple).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from typing import Any, Callable, Optional

import typer

MAX_IMAGE_SIZE = 1024  # pixels a side; MD and LITE use 84 or 224
MIN_IMAGE_SIZE = 32  # the set encoder halves the image five times (and EfficientNet-B0 has stride 32)


def option(default: Any, help: str, *, min: float | None = None, max: float | None = None,
           cli: bool = True, metavar: str | None = None, repeat: bool = False) -> Any:
    """A dataclass field with its command-line help (and bounds, checked by `check_bounds`); a default of
    `...` makes the field (and the option) required; `repeat`: a tuple field given by repeating the option
    (`--checkpoint a.pt --checkpoint b.pt`) instead of one comma-separated value."""
    metadata = {"help": help, "min": min, "max": max, "cli": cli, "metavar": metavar, "repeat": repeat}
    if default is ...:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag(name: str) -> str:
    """The command-line spelling of a field name: image_size -> --image-size."""
    return "--" + name.replace("_", "-")


def names(text: str | None) -> tuple[str, ...]:
    """'a, b,c' -> ('a', 'b', 'c'); None or '' -> ()."""
    return tuple(s.strip() for s in (text or "").split(",") if s.strip())


def check_bounds(config: Any) -> None:
    """Every numeric field within its declared bounds and finite (one line naming the option otherwise).

    Raises:
        ValueError: e.g. "--learning-rate nan: not a finite number", "--image-size 16: at least 32".
    """
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{flag(f.name)} {value}: not a finite number")
        low, high = f.metadata.get("min"), f.metadata.get("max")
        if low is not None and value < low:
            raise ValueError(f"{flag(f.name)} {value}: must be at least {low:g}")
        if high is not None and value > high:
            raise ValueError(f"{flag(f.name)} {value}: must be at most {high:g}")


def from_dict(cls, raw: dict[str, Any], origin: str):
    """A config dataclass from its `dataclasses.asdict` form (lists back to tuples); unknown or missing keys
    are errors, not silently dropped."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(fields)
    if unknown:
        raise ValueError(f"{origin}: unknown config keys {sorted(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    try:
        return cls(**values)
    except TypeError as e:
        raise ValueError(f"{origin}: {e}") from None


class ConfigRecord:
    """Mixin of a config dataclass saved as JSON (config.json, checkpoints, model files): to_dict / from_dict /
    to_json, and the fields a resumed run must agree on."""

    # fields that may change between a run and its resume (where it runs, not what it computes)
    OPERATIONAL = ("device", "threads", "num_workers", "checkpoint_every", "data", "out")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], origin: str = "config"):
        """The inverse of `to_dict`; unknown or missing keys are errors, not silently dropped."""
        return from_dict(cls, raw, origin)

    def to_json(self) -> str:
        import json

        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    @classmethod
    def resume_fields(cls) -> tuple[str, ...]:
        """What a resumed run must agree on: every field but the operational ones."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in cls.OPERATIONAL)


def _cli_type(annotation: Any) -> Any:
    """The type typer parses for a field: tuples of names come in as one comma-separated string."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is tuple:
        return str
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        return Optional[_cli_type(inner)]
    return annotation


def config_parameters(cls, skip: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """One typer option per CLI field of `cls` (not in `skip`), with the field's default and help."""
    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("cli", False):
            continue
        default = f.default
        kind = _cli_type(hints[f.name])
        if f.metadata.get("repeat"):
            kind = list[str]
            default = ... if default is dataclasses.MISSING else list(default)
        elif f.default is dataclasses.MISSING:
            default = ...
        elif isinstance(default, tuple):
            default = ",".join(default)
        info = typer.Option(default, flag(f.name) if kind is not bool else
                            f"{flag(f.name)}/--no-{f.name.replace('_', '-')}",
                            help=f.metadata["help"], metavar=f.metadata.get("metavar"), show_default=True)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=kind))
    return params


def config_values(cls, given: dict[str, Any]) -> dict[str, Any]:
    """Command-line values of `cls`'s fields -> dataclass values (comma lists to tuples)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for name, value in given.items():
        if typing.get_origin(hints[name]) is tuple:
            value = names(value) if isinstance(value, str) else tuple(value or ())
        out[name] = value
    return out


def config_command(app: typer.Typer, name: str, cls, *, skip: tuple[str, ...] = ()) -> Callable:
    """Decorator: register `fn(values, **extras)` as command `name` whose options are `cls`'s CLI fields
    (values: {field: value}, only those fields) plus `fn`'s own keyword parameters (extras)."""

    def decorate(fn: Callable) -> Callable:
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
               for p in list(inspect.signature(fn, eval_str=True).parameters.values())[1:]]
        fields = config_parameters(cls, skip)
        field_names = {p.name for p in fields}

        def command(**kwargs):
            values = config_values(cls, {k: v for k, v in kwargs.items() if k in field_names})
            return fn(values, **{k: v for k, v in kwargs.items() if k not in field_names})

        command.__signature__ = inspect.Signature(fields + own)
        command.__annotations__ = {p.name: p.annotation for p in fields + own}
        command.__doc__ = fn.__doc__
        command.__name__ = fn.__name__
        app.command(name)(command)
        return fn

    return decorate

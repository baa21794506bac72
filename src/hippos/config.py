"""Typed dataclass configurations: field comments become help text, overrides are checked against types.

A config is a dataclass whose fields each carry a trailing `# comment`. `add_arguments` turns the fields into
`--field value` options (help = the comment), `from_overrides` builds the dataclass from parsed values,
refusing a value that does not fit the field's type before any work starts.

Run files are TOML with one table per section (`[model]`, `[train]`, ...); `load_run` reads one and applies
`--section.field value` overrides from the command line. Unknown sections and keys are errors.

Every config checks its own values in `__post_init__`, so a config that exists is a valid one: `check_numbers`
holds the rules all of them share (numbers of the right type, ints within 64 bits and not negative, floats
finite and not negative, the fields a class names in POSITIVE above zero); each class adds its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import math
import tokenize
import tomllib
import typing
from functools import cache

INT_MAX = 2**63 - 1  # torch and numpy hold counts, ids and seeds in 64 bits: a larger int is a typo or an attack


@cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its trailing comment} read from the dataclass's source."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    docs, pending = {}, None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and pending is None and tok.start[1] == 4:
            pending = tok.string  # a name at class-body indentation starts a field line
        elif tok.type == tokenize.COMMENT and pending is not None:
            docs[pending] = tok.string.lstrip("# ").strip()
        if tok.type in (tokenize.NEWLINE, tokenize.NL):
            pending = None
    return docs


def check_numbers(cfg) -> None:
    """Refuse a config's ill-typed or out-of-range numbers, naming the field (rules: see the module docstring).

    The class may name fields in POSITIVE (must be > 0) and give other lower bounds for ints in MINIMUM.
    """
    positive = getattr(cfg, "POSITIVE", ())
    minimum = getattr(cfg, "MINIMUM", {})
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        annotation, value = hints[f.name], getattr(cfg, f.name)
        if typing.get_origin(annotation) is tuple:
            annotation, values = typing.get_args(annotation)[0], value
            if not isinstance(values, tuple):
                raise ValueError(f"{f.name} must be a tuple, got {values!r}")
        else:
            values = (value,)
        if annotation in (int, float):
            for v in values:
                _check_number(v, annotation, f.name, f.name in positive, minimum.get(f.name, 0))


def _check_number(value, kind: type, name: str, positive: bool, low: int) -> None:
    """One value of an int or float field (see check_numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ValueError(f"{name} must be {'a number' if kind is float else 'an integer'}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if kind is int and value > INT_MAX:
        raise ValueError(f"{name} is too large ({value}); the limit is {INT_MAX}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def check_choices(name: str, values: tuple[str, ...], choices, allow_empty: bool = False) -> None:
    """Refuse names outside `choices` (and an empty tuple unless allowed), listing the known ones."""
    unknown = [v for v in values if v not in choices]
    if unknown or not (values or allow_empty):
        raise ValueError(f"{name} must name one or more of {', '.join(choices)}; got {', '.join(values) or 'none'}")


def check_device_name(name: str) -> None:
    """Refuse a device string torch cannot parse, or an accelerator this machine does not have."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r}; write cpu, cuda, cuda:1, mps, ...") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but this machine has no CUDA GPU that PyTorch can use")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} asked for, but there are {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} asked for, but MPS is not available on this machine")


def parse_value(text: str, annotation, name: str):
    """Convert command-line text to a field's type: int, float, str, bool or tuple[x, ...]."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        inner = typing.get_args(annotation)[0]
        return tuple(parse_value(part, inner, name) for part in text.split(",") if part.strip())
    if annotation is bool:
        lowered = text.lower()
        if lowered not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"--{name} takes true or false, got {text!r}")
        return lowered in ("1", "true", "yes")
    if annotation in (int, float, str):
        try:
            return annotation(text)
        except ValueError:
            raise ValueError(f"--{name} takes {annotation.__name__}, got {text!r}") from None
    raise TypeError(f"field {name} has a type ({annotation}) that has no command-line form")


def _check_toml_value(value, annotation, where: str):
    """A TOML value of the field's type (ints are accepted for floats; lists for tuples)."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        if not isinstance(value, list):
            raise ValueError(f"{where} takes a list, got {value!r}")
        inner = typing.get_args(annotation)[0]
        return tuple(_check_toml_value(v, inner, where) for v in value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool) and type(value) is annotation:
        return value
    raise ValueError(f"{where} takes {getattr(annotation, '__name__', annotation)}, got {value!r}")


def read_run_file(path) -> dict:
    """The tables of a TOML run file; a clear error when it is not valid TOML."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path} is not valid TOML: {err}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file (a run file is TOML, UTF-8 text)") from None


def load_run(path: str | dict | None, sections: dict[str, type], overrides: list[str] = (), build=None) -> dict:
    """{section: dataclass} from a TOML run file (or its tables, already read) and `--section.field value` overrides.

    build: optional {section: callable(values dict) -> config} for sections built another way (a model
    section that names a preset, say); the values are type-checked against sections[name] first.
    """
    raw: dict = {}
    if isinstance(path, dict):
        raw, path = {name: dict(table) for name, table in path.items()}, "the run record"
    elif path is not None:
        raw = read_run_file(path)
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ValueError(f"unknown section(s) {unknown} in {path}; known: {sorted(sections)}")
    if len(overrides) % 2:
        raise ValueError(f"overrides come in pairs '--section.field value', got {list(overrides)}")
    for flag, text in zip(overrides[::2], overrides[1::2]):
        name = flag.removeprefix("--")
        if "." not in name or name.split(".", 1)[0] not in sections:
            raise ValueError(f"unknown option {flag}; overrides look like --{next(iter(sections))}.field value")
        section, key = name.split(".", 1)
        raw.setdefault(section, {})[key.replace("-", "_")] = ("text", text)
    result = {}
    for section, cls in sections.items():
        hints = typing.get_type_hints(cls)
        values = {}
        for key, value in raw.get(section, {}).items():
            extra = build and section in build and key == "preset"
            if key not in hints and not extra:
                raise ValueError(f"unknown key {section}.{key}; known: {sorted(hints)}")
            annotation = str if extra else hints[key]
            where = f"{section}.{key}"
            if isinstance(value, tuple) and value[:1] == ("text",):
                values[key] = parse_value(value[1], annotation, where)
            else:
                values[key] = _check_toml_value(value, annotation, where)
        result[section] = build[section](values) if build and section in build else cls(**values)
    return result


def _fields(cls):
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if hints[f.name] is not dict]


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one `--field-name VALUE` option per dataclass field (default: the field's default)."""
    docs = field_docs(cls)
    for f, annotation in _fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            metavar=typing.get_origin(annotation) and "A,B,..." or annotation.__name__.upper(),
            help=f"{docs.get(f.name, '')} (default: {shown})",
        )


def from_overrides(cls: type, namespace: argparse.Namespace | dict, base=None):
    """Build cls from `base` (or its defaults) with every option the user gave, type-checked."""
    values = vars(namespace) if isinstance(namespace, argparse.Namespace) else dict(namespace)
    changes = {}
    for f, annotation in _fields(cls):
        text = values.get(f.name)
        if text is not None:
            changes[f.name] = parse_value(str(text), annotation, f.name)
    return dataclasses.replace(base if base is not None else cls(), **changes)

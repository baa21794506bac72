"""Typed dataclass configurations: one dialect, `--section.field value`, from TOML run files or the command line.

A config is a dataclass whose fields each carry a trailing `# comment`. `add_section` turns its fields into
`--section.field VALUE` options (help = the comment) in a group of their own; `load_run` builds the
dataclasses from a TOML file (one table per section: `[model]`, `[train]`, `[bench]`, ...) and the options
given (`section_overrides`), refusing unknown sections and keys and values that do not fit a field's type
before any work starts. `dotted_flags` lets `--train.warmup-steps` stand for `--train.warmup_steps`.

Every config checks its own values in `__post_init__`, so a config that exists is a valid one: `check_numbers`
holds the rules all of them share (numbers of the right type, ints within 64 bits and not negative, floats
finite and not negative, the fields a class names in POSITIVE above zero); each class adds its own.

Why argparse and not tyro (measured with tyro 1.0.17 on the bench and generate commands): tyro would remove
the option builder and value parser here (field_docs, parse_value, add_section: about 60 of this file's lines;
the per-subcommand add_argument calls in cli.py would become dataclass fields, about as many lines). It does
not read TOML, so read_run_file and load_run stay; its errors are multi-line boxes on stderr with no hook to
make them the one `hippos: error: ...` line scripts and tests rely on (console_outputs=False drops the
message); a __post_init__ error reads "Error parsing __tyro-dummy-inner__.bench: ..."; lists change from
`--bench.lengths 512,2048` to `512 2048` and optional values show as `{None}|STR`; and it adds three
dependencies (tyro, docstring-parser, typeguard). The ~60 lines it saves do not pay for that.
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


def load_run(
    path: str | dict | None, sections: dict[str, type], overrides: list[str] = (), build=None, base=None
) -> dict:
    """{section: dataclass} from a TOML run file (or its tables, already read) and `--section.field value` overrides.

    build: optional {section: callable(values dict) -> config} for sections built another way (a model
    section that names a preset, say); the values are type-checked against sections[name] first.
    base: optional {section: instance} whose values stand where the file and the overrides say nothing.
    """
    raw = _raw_tables(path, sections)
    for section, key, text in _split_overrides(overrides, sections):
        raw.setdefault(section, {})[key] = ("text", text)
    result = {}
    for section, cls in sections.items():
        extra = ("preset",) if build and section in build else ()
        values = _typed_values(section, cls, raw.get(section, {}), extra)
        if build and section in build:
            result[section] = build[section](values)
        elif base and section in base:
            result[section] = dataclasses.replace(base[section], **values)  # __post_init__ checks the whole again
        else:
            result[section] = cls(**values)
    return result


def _raw_tables(path: str | dict | None, sections: dict[str, type]) -> dict:
    """The run file's tables as {section: {key: value}}, refusing unknown sections."""
    raw: dict = {}
    if isinstance(path, dict):
        raw, path = {name: dict(table) for name, table in path.items()}, "the run record"
    elif path is not None:
        raw = read_run_file(path)
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ValueError(f"unknown section(s) {unknown} in {path}; known: {sorted(sections)}")
    return raw


def _split_overrides(overrides: list[str], sections: dict[str, type]) -> list[tuple[str, str, str]]:
    """["--section.field", "text", ...] -> [(section, field, text)], refusing unknown sections and odd lists."""
    if len(overrides) % 2:
        raise ValueError(f"overrides come in pairs '--section.field value', got {list(overrides)}")
    split = []
    for flag, text in zip(overrides[::2], overrides[1::2]):
        name = flag.removeprefix("--")
        if "." not in name or name.split(".", 1)[0] not in sections:
            raise ValueError(f"unknown option {flag}; overrides look like --{next(iter(sections))}.field value")
        section, key = name.split(".", 1)
        split.append((section, key.replace("-", "_"), text))
    return split


def _typed_values(section: str, cls: type, table: dict, extra: tuple[str, ...]) -> dict:
    """A section's values checked against cls's field types (command-line text parsed, TOML values checked).

    extra: keys that are no field but taken as text (a model table's `preset`)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in table.items():
        if key not in hints and key not in extra:
            raise ValueError(f"unknown key {section}.{key}; known: {sorted(hints)}")
        annotation, where = (str if key in extra else hints[key]), f"{section}.{key}"
        if isinstance(value, tuple) and value[:1] == ("text",):
            values[key] = parse_value(value[1], annotation, where)
        else:
            values[key] = _check_toml_value(value, annotation, where)
    return values


def add_section(
    parser: argparse.ArgumentParser, section: str, cls: type, skip=(), description: str | None = None, defaults=True
):
    """Add one `--section.field VALUE` option per dataclass field, in a help group of its own; returns the group.

    The options default to None (not given): `section_overrides` hands the given ones to `load_run`, which
    parses them against the field types, so a run file and the command line share one set of checks.
    description: the group's help text (default: the class docstring's first line); defaults: whether the
    help shows each field's default (not where the base comes from elsewhere, a model's recorded run, say).
    """
    doc = (cls.__doc__ or "").strip().splitlines()
    group = parser.add_argument_group(f"{section} settings (--{section}.FIELD VALUE)", description or doc[0])
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or hints[f.name] is dict:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = f" (default: {','.join(map(str, default)) if isinstance(default, tuple) else default})"
        text = docs.get(f.name, "") + (shown if defaults else "")
        group.add_argument(
            f"--{section}.{f.name}",
            dest=f"{section}.{f.name}",
            metavar=typing.get_origin(hints[f.name]) and "A,B,..." or hints[f.name].__name__.upper(),
            help=text.replace("%", "%%"),  # argparse expands %-formats in help
        )
    return group


def section_overrides(namespace: argparse.Namespace) -> list[str]:
    """The `--section.field value` options given on the command line, as `load_run` takes them."""
    given = [(name, value) for name, value in vars(namespace).items() if "." in name and value is not None]
    return [text for name, value in given for text in (f"--{name}", value)]


def dotted_flags(argv: list[str]) -> list[str]:
    """argv with `--section.field-name` spelled `--section.field_name` (both spellings are accepted)."""
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if flag.startswith("--") and "." in flag:
            section, _, key = flag.partition(".")
            arg = f"{section}.{key.replace('-', '_')}{eq}{value}"
        out.append(arg)
    return out

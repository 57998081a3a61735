"""Command-line flags generated from pydantic fields, the pattern of TRL's HfArgumentParser: a setting is declared
once, as a field with its type, default and description, and its flag follows from it.

    add_model_arguments(parser, TrainSettings, "train")     # --beta, --lora-r, --shared-prompt/--no-shared-prompt
    TrainSettings.model_validate(given_values(args, "train"))

Each field becomes `--<field>` (a nested model's fields `--<field>-<subfield>`): a bool `--x/--no-x`, a Literal
its choices, a list `nargs="+"`, help the description and the default. A field's `json_schema_extra` may add
`trl` (TRL's name for the flag, kept as an alias) and `cli_switches` ({flag: value}: e.g. `--bf16` sets
mixed_precision to bf16). The flags keep no argparse default: `given_values` returns only what the command line
set, under the field's path, so the model's own defaults and checks apply as they do to YAML.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo


def flag_name(path: tuple[str, ...]) -> str:
    """('lora', 'target_modules') -> '--lora-target-modules'."""
    return "--" + "-".join(part.replace("_", "-") for part in path)


def _without_none(annotation: Any) -> Any:
    """`int | None` -> int: an optional field's flag takes the value type (unset means the default)."""
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    annotation = _without_none(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _help(field: FieldInfo) -> str:
    default = field.get_default(call_default_factory=True)
    shown = " ".join(map(str, default)) if isinstance(default, list) else default
    text = f"{field.description or ''} (default: {shown})".strip()
    return text.replace("%", "%%")  # argparse formats help with %-style placeholders


def _value_kwargs(annotation: Any, dest: str) -> dict:
    """The argparse keywords that parse one value of this type."""
    annotation = _without_none(annotation)
    origin = get_origin(annotation)
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is Literal:
        choices = list(get_args(annotation))
        return {"choices": choices, "type": type(choices[0])}
    if origin is list:
        (item,) = get_args(annotation)
        return {"nargs": "+", "type": item}
    if annotation in (int, float, str):
        return {"type": annotation}
    raise TypeError(f"{dest}: no command-line form for a field of type {annotation!r}")


def _add_field(parser, path: tuple[str, ...], field: FieldInfo, dest: str) -> None:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    flags = [flag_name(path)]
    if "trl" in extra:
        flags.append(flag_name((extra["trl"],)))
    kwargs = _value_kwargs(field.annotation, dest)
    if "action" not in kwargs and "choices" not in kwargs:
        kwargs["metavar"] = path[-1].upper()
    parser.add_argument(*flags, dest=dest, default=argparse.SUPPRESS, help=_help(field), **kwargs)
    for switch, value in extra.get("cli_switches", {}).items():
        parser.add_argument(
            f"--{switch}",
            dest=dest,
            action="store_const",
            const=value,
            default=argparse.SUPPRESS,
            help=f"same as {flags[0]} {value}",
        )


def add_model_arguments(
    parser, model: type[BaseModel], dest_root: str, only: set[str] | None = None, _path: tuple[str, ...] = ()
) -> None:
    """A flag for each field of `model` (recursively; `only`: these top-level fields), stored under
    "<dest_root>.<field path>" (e.g. "train.lora.r"): the same dotted path as `--set train.lora.r=...`."""
    for name, field in model.model_fields.items():
        if only is not None and name not in only:
            continue
        path = (*_path, name)
        nested = _nested_model(field.annotation)
        if nested is not None:
            add_model_arguments(parser, nested, dest_root, _path=path)
        else:
            _add_field(parser, path, field, ".".join((dest_root, *path)))


def given_values(args: argparse.Namespace, dest_root: str) -> dict:
    """The values the command line set under `dest_root`, as the nested dict the model validates."""
    out: dict = {}
    for dest, value in vars(args).items():
        root, _, rest = dest.partition(".")
        if root != dest_root or not rest:
            continue
        *parents, leaf = rest.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def validate_given(model: type[BaseModel], args: argparse.Namespace, dest_root: str, command: str):
    """`model` from the flags under `dest_root`; a problem exits with one line per flag."""
    try:
        return model.model_validate(given_values(args, dest_root))
    except ValidationError as err:
        problems = [
            f"{flag_name(tuple(map(str, e['loc']))) if e['loc'] else dest_root}: {e['msg']}"
            for e in err.errors()
        ]
        raise SystemExit(f"{command}: " + "; ".join(problems)) from None

"""Command-line flags from a settings dataclass: one `--kebab-case` flag per field, each
with an environment variable `<PREFIX><FIELD>` (a flag beats the environment, which beats
the default).

Used by `trident serve` (`trident.serve_config.ServeConfig`, prefix `TRIDENT_`) and the
planner (`planner.config.PlannerConfig`, prefix `TRIDENT_PLANNER_`). Values are parsed by
`trident.core.settings.coerce`; the dataclass's `validate()` runs last.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import MISSING, fields, replace
from typing import Any, TypeVar

from trident.core.settings import coerce

T = TypeVar("T")


def add_flags(parser: argparse.ArgumentParser, cls: type, help: Mapping[str, str], env_prefix: str) -> argparse.ArgumentParser:
    """Add one flag per field of `cls` (default None: the environment decides)."""
    for f in fields(cls):
        default = f.default if f.default is not MISSING else None
        switch = {"nargs": "?", "const": "true"} if str(f.type) == "bool" else {}  # `--flag` alone = true
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            metavar=str(f.type).upper() if str(f.type) != "str" else "STR",
            help=f"{help[f.name]} [env {env_prefix}{f.name.upper()}, default {default!r}]",
            **switch,
        )
    return parser


def from_namespace(cls: type[T], args: argparse.Namespace, env: Mapping[str, str], env_prefix: str) -> T:
    """`cls()` with the flags that were given, else the environment variables that are set."""
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        raw = getattr(args, f.name, None)
        if raw is None:
            raw = env.get(env_prefix + f.name.upper())
            if raw is None or raw.strip() == "":
                continue
        values[f.name] = coerce(f.name, f.type, raw)
    config = replace(cls(), **values)  # type: ignore[type-var]
    validate = getattr(config, "validate", None)
    return validate() if callable(validate) else config

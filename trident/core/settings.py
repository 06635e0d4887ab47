"""One way to read a component's settings: a frozen dataclass filled from config.pbtxt
parameters (strings) and `TRIDENT_*` environment variables with the same key names.

Used by the engine (`TorchEngineConfig`), the worker's event publishing
(`WorkerEventsConfig`), the router (`RouterModelConfig`, `RoutingConfig`, `DisaggConfig`) and
`trident serve` (`ServeConfig`). A parameter that is missing, empty or an unexpanded
`${...}` counts as unset, so a template config.pbtxt works as is. A value that does not
parse raises `ConfigError` naming the key.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import fields, replace
from typing import Any, TypeVar

from trident.core.errors import ConfigError

T = TypeVar("T")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def is_unset(value: object) -> bool:
    return value is None or (isinstance(value, str) and (value.strip() == "" or value.strip().startswith("${")))


def coerce(name: str, kind: object, raw: object) -> object:
    """Parse `raw` as the dataclass field type named by `kind` ("int", "float", "bool", "str")."""
    kind = str(kind)
    text = str(raw).strip()
    try:
        if kind == "bool":
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError(text)
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        raise ConfigError(f"{name}: cannot parse {text!r} as {kind}") from None
    return text


def load_settings(
    cls: type[T],
    params: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    env_prefix: str = "TRIDENT_",
    env_key: Callable[[str], str] | None = None,
) -> T:
    """`cls` defaults, overridden by `params`, overridden by the environment; validated
    with `cls.validate()` when it has one."""
    env = os.environ if env is None else env
    name_of = env_key or (lambda key: env_prefix + key.upper())
    values: dict[str, object] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        raw = env.get(name_of(f.name))
        if is_unset(raw):
            raw = params.get(f.name)
        if is_unset(raw):
            continue
        values[f.name] = coerce(f.name, f.type, raw)
    config = replace(cls(), **values)  # type: ignore[type-var]
    validate = getattr(config, "validate", None)
    return validate() if callable(validate) else config


def model_parameters(model_config: Mapping[str, Any]) -> dict[str, str]:
    """String parameters of a Triton model config (dict form), without the unset ones."""
    out: dict[str, str] = {}
    for key, entry in (model_config.get("parameters") or {}).items():
        value = entry.get("string_value") if isinstance(entry, Mapping) else entry
        if not is_unset(value):
            out[key] = str(value)
    return out


def instance_device(args: Mapping[str, str]) -> str | None:
    """`cuda:N` for a KIND_GPU instance (from `model_instance_device_id`), else None."""
    if str(args.get("model_instance_kind", "")).upper() != "GPU":
        return None
    return f"cuda:{int(args.get('model_instance_device_id', 0) or 0)}"

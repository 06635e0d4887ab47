"""Which engine a worker model runs: the `engine` parameter of its config ("torch")."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from plugins.base import Engine
from trident.core.errors import ConfigError
from trident.core.settings import instance_device

ENGINES = ("torch",)


def build_engine(name: str, params: Mapping[str, str], args: Mapping[str, str]) -> Engine:
    """The engine named by the `engine` parameter ("torch", the default) for this instance."""
    kind = params.get("engine", "torch")
    if kind not in ENGINES:
        raise ConfigError(f"engine: unknown engine {kind!r} (available: {', '.join(ENGINES)})")
    from plugins.torch_engine.config import TorchEngineConfig
    from plugins.torch_engine.engine import TorchEngine

    config = TorchEngineConfig.from_mapping(params)
    changes: dict[str, object] = {"worker_id": name}
    device = instance_device(args)
    if device is not None:  # a KIND_GPU instance: honour model_instance_device_id
        changes["device"] = device
    return TorchEngine(dataclasses.replace(config, **changes).validate())

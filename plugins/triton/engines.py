"""Which engine a worker model runs: the `engine` parameter of its config ("torch", "vllm", "trtllm"),
or `TRIDENT_ENGINE` (which wins, as for every engine setting)."""

from __future__ import annotations

import dataclasses
import locale
import os
from collections.abc import Mapping

from plugins.base import Engine
from trident.core.endpoints import engine_events_endpoint, events_dir
from trident.core.errors import ConfigError
from trident.core.settings import instance_device, is_unset

ENGINES = ("torch", "vllm", "trtllm")


def engine_kind(params: Mapping[str, str], env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    raw = env.get("TRIDENT_ENGINE", "")
    if is_unset(raw):
        raw = params.get("engine", "")
    kind = "torch" if is_unset(raw) else raw.strip()
    if kind not in ENGINES:
        raise ConfigError(f"engine: unknown engine {kind!r} (available: {', '.join(ENGINES)})")
    return kind


def utf8_locale() -> None:
    """The Python-backend stub embeds Python in the C locale, whatever LANG says, so open()
    decodes ASCII; vLLM's import (torch inductor's templates) needs UTF-8."""
    if locale.getpreferredencoding(False).lower().replace("-", "") == "utf8":
        return
    for name in ("", "C.UTF-8"):
        try:
            locale.setlocale(locale.LC_CTYPE, name)
        except locale.Error:
            continue
        if locale.getpreferredencoding(False).lower().replace("-", "") == "utf8":
            return


def build_engine(name: str, params: Mapping[str, str], args: Mapping[str, str]) -> Engine:
    """The engine named by `engine_kind` for this instance."""
    changes: dict[str, object] = {"worker_id": name}
    device = instance_device(args)
    if device is not None:  # a KIND_GPU instance: honour model_instance_device_id
        changes["device"] = device
    kind = engine_kind(params)
    if kind == "trtllm":  # TensorRT-LLM: NGC's trtllm-python-py3 images with a GPU only
        from plugins.trtllm.config import TrtllmEngineConfig
        from plugins.trtllm.engine import TrtllmEngine

        config = TrtllmEngineConfig.from_mapping(params)
        return TrtllmEngine(dataclasses.replace(config, **changes).validate())
    if kind == "vllm":
        utf8_locale()
        from plugins.vllm.config import VllmEngineConfig
        from plugins.vllm.engine import VllmEngine

        config = VllmEngineConfig.from_mapping(params)
        changes["kv_events_endpoint"] = engine_events_endpoint(name, events_dir(params))
        return VllmEngine(dataclasses.replace(config, **changes).validate())
    from plugins.torch_engine.config import TorchEngineConfig
    from plugins.torch_engine.engine import TorchEngine

    config = TorchEngineConfig.from_mapping(params)
    return TorchEngine(dataclasses.replace(config, **changes).validate())

"""Helpers the model.py files use to read what Triton passes to `initialize`."""

from __future__ import annotations

import pytest

from trident.core.settings import instance_device, model_parameters


@pytest.mark.parametrize(
    ("args", "device"),
    [
        ({"model_instance_kind": "GPU", "model_instance_device_id": "2"}, "cuda:2"),
        ({"model_instance_kind": "GPU", "model_instance_device_id": ""}, "cuda:0"),
        ({"model_instance_kind": "CPU", "model_instance_device_id": "0"}, None),
        ({}, None),  # KIND_MODEL / unknown: the engine's own `device` setting decides
    ],
)
def test_instance_device_follows_the_instance_group(args: dict[str, str], device: str | None) -> None:
    assert instance_device(args) == device


def test_model_parameters_drop_unset_template_values() -> None:
    config = {"parameters": {"model": {"string_value": "${model}"}, "dtype": {"string_value": "float32"}, "x": {"string_value": ""}}}
    assert model_parameters(config) == {"dtype": "float32"}

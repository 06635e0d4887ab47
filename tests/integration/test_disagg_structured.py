"""Structured outputs across the prefill -> decode handoff, on the real tritonserver.

The prefill worker samples the first token under the request's grammar; the decode worker
replays that token into its own matcher and goes on. Long prompts make the router prefill
remotely (`worker` = "prefill>decode"); every answer must still match its constraint.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator

import jsonschema
import pytest

from tests.integration.helpers import generate, generate_stream
from tests.waiting import wait_for
from trident.launcher import Launcher
from trident.serve_config import ServeConfig

logger = logging.getLogger(__name__)
pytestmark = [pytest.mark.integration, pytest.mark.slow]

STORY = (
    "The old lighthouse keeper, Marguerite Olsen, had tended the lamp on Gull Rock for thirty-one "
    "years. Every evening she climbed the one hundred and twelve steps, trimmed the wick, polished "
    "the great Fresnel lens and wrote the weather in a leather logbook. Her brother Anders, a "
    "fisherman from the village of Skarvik, rowed out every Sunday with bread, coffee and news."
)
SCHEMA = {
    "type": "object",
    "properties": {
        "keeper": {"type": "string", "maxLength": 24},
        "years": {"type": "integer", "minimum": 0, "maximum": 120},
        "family": {
            "type": "array",
            "items": {"enum": ["brother", "sister", "none"]},
            "maxItems": 2,
        },
    },
    "required": ["keeper", "years", "family"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def http_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp_dir = tmp_path_factory.mktemp("disagg-structured")
    config = ServeConfig(
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        decode=1,
        prefill=1,
        disagg_threshold=16,
        kv_cache_mb=64,
        num_threads=1,
        dtype="float32",
        server_log=str(tmp_dir / "tritonserver.log"),
        log_level=os.environ.get("TRIDENT_TEST_LOG_LEVEL", "info"),
    )
    launcher = Launcher(config, progress=logger.info)
    try:
        launcher.start()
    except Exception as exc:
        pytest.fail(f"tritonserver did not start: {exc}")
    try:
        assert launcher.endpoints is not None
        url = launcher.endpoints.http_url
        assert wait_for(
            lambda: generate(url, text_input="Hi", max_tokens=1).status_code == 200, timeout=30
        )
        yield url
    finally:
        launcher.stop()


def _chat(question: str, salt: int) -> str:
    return json.dumps([{"role": "user", "content": f"{STORY} ({salt}) {question}"}])


def test_json_schema_survives_the_handoff(http_url: str) -> None:
    spec = json.dumps({"json": SCHEMA})
    for i, (temperature, seed) in enumerate(((0.0, 0), (1.0, 1), (1.0, 2))):
        resp = generate(
            http_url,
            messages=_chat("Describe the keeper as JSON.", i),
            max_tokens=120,
            temperature=temperature,
            seed=seed,
            structured_outputs=spec,
        )
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["worker"] == "prefill>decode", body
        assert body["finish_reason"] == "stop", body["text_output"]
        jsonschema.validate(json.loads(body["text_output"]), SCHEMA)


def test_regex_and_choice_survive_the_handoff_streaming(http_url: str) -> None:
    pattern = r"[A-Z][a-z]{1,10}, [0-9]{1,3} years"
    events = generate_stream(
        http_url,
        messages=_chat("Who and how long?", 10),
        max_tokens=30,
        stream=True,
        structured_outputs=json.dumps({"regex": pattern}),
    )
    assert events[-1]["worker"] == "prefill>decode" and events[-1]["finish_reason"] == "stop"
    assert re.fullmatch(pattern, "".join(e["text_output"] for e in events))
    choices = ["the keeper", "her brother", "a sailor"]
    resp = generate(
        http_url,
        messages=_chat("Who rowed out on Sundays?", 11),
        max_tokens=10,
        structured_outputs=json.dumps({"choice": choices}),
    )
    body = resp.json()
    assert body["worker"] == "prefill>decode" and body["text_output"] in choices, body

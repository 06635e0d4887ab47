"""The router model on the real tritonserver: answers, streaming, stop strings, concurrency."""

from __future__ import annotations

import threading

import pytest

from tests.integration.helpers import CHAT_FRANCE, generate, generate_stream, metric_values
from tests.integration.server_fixture import ServerInfo
from trident.router_client import RouterClient


@pytest.fixture()
def client(triton_server: ServerInfo):
    with RouterClient(triton_server.grpc_url) as c:
        yield c


def test_chat_prompt_answers_paris_over_grpc(client: RouterClient) -> None:
    responses = client.generate(messages=CHAT_FRANCE, max_tokens=24, temperature=0.0)
    assert len(responses) == 1  # stream=false: exactly one response
    (out,) = responses
    assert "Paris" in out["text_output"]
    assert out["finish_reason"] in ("stop", "length")
    assert out["num_output_tokens"] == len(out["output_ids"]) > 0
    assert out["num_input_tokens"] > 10  # the chat template was applied
    assert out["worker"].startswith("decode")


def test_http_generate_returns_exactly_one_response(triton_server: ServerInfo) -> None:
    resp = generate(triton_server.http_url, messages=CHAT_FRANCE, max_tokens=24, temperature=0)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert "Paris" in body["text_output"]
    assert body["finish_reason"] in ("stop", "length")
    assert body["num_output_tokens"] == len(body["output_ids"])


def test_streamed_deltas_concatenate_to_the_non_streamed_text(triton_server: ServerInfo, client: RouterClient) -> None:
    params = dict(text_input="Once upon a time, in a small village,", max_tokens=24, temperature=0.9, seed=1234)
    whole = client.generate(stream=False, **params)
    deltas = client.generate(stream=True, **params)
    assert len(whole) == 1 and len(deltas) > 1
    assert "".join(d["text_output"] for d in deltas) == whole[0]["text_output"]
    assert sum((d["output_ids"] for d in deltas), []) == whole[0]["output_ids"]
    assert [d["finish_reason"] for d in deltas[:-1]] == [""] * (len(deltas) - 1)
    assert deltas[-1]["finish_reason"] == whole[0]["finish_reason"] == "length"
    assert deltas[-1]["num_output_tokens"] == 24
    # the same through HTTP generate_stream
    events = generate_stream(triton_server.http_url, stream=True, **params)
    assert "".join(e["text_output"] for e in events) == whole[0]["text_output"]
    assert events[-1]["finish_reason"] == "length"


def test_multibyte_text_streams_intact(client: RouterClient) -> None:
    chat = '[{"role": "user", "content": "Écris « café crème » et « naïve » en français, avec des accents."}]'
    params = dict(messages=chat, max_tokens=32, temperature=0.0)
    whole = client.generate_text(**params)
    deltas = client.generate(stream=True, **params)
    assert "".join(d["text_output"] for d in deltas) == whole
    assert "\ufffd" not in whole
    assert any(ord(ch) > 127 for ch in whole), whole


def test_stop_string_truncates_and_finishes_with_stop(client: RouterClient) -> None:
    params = dict(text_input="The days of the week are Monday, Tuesday,", max_tokens=24, temperature=0.0, ignore_eos=True)
    full = client.generate_text(**params)
    assert len(full) > 12, full
    stop = full[8:12]  # a string the model will produce mid-answer
    expected = full[: full.index(stop)]
    for stream in (False, True):
        responses = client.generate(stop=[stop, "NEVER-APPEARS"], stream=stream, **params)
        assert "".join(r["text_output"] for r in responses) == expected
        assert responses[-1]["finish_reason"] == "stop"


def test_max_tokens_bounds_the_output(client: RouterClient) -> None:
    (out,) = client.generate(text_input="Count: one, two, three,", max_tokens=5, ignore_eos=True, temperature=0.0)
    assert out["num_output_tokens"] == 5 and len(out["output_ids"]) == 5
    assert out["finish_reason"] == "length"


def test_input_ids_are_accepted(client: RouterClient) -> None:
    (ref,) = client.generate(text_input="The capital of France is", max_tokens=6, temperature=0.0)
    from router_ensemble.text.tokenizer import load_tokenizer

    ids = load_tokenizer("").encode("The capital of France is", add_special_tokens=True)
    (out,) = client.generate(input_ids=ids, max_tokens=6, temperature=0.0)
    assert out["output_ids"] == ref["output_ids"]
    assert out["num_input_tokens"] == len(ids)


def test_sixteen_concurrent_requests_complete_on_both_workers(triton_server: ServerInfo) -> None:
    results: dict[int, list] = {}
    errors: list[str] = []

    def one(i: int) -> None:
        try:
            with RouterClient(triton_server.grpc_url) as c:
                results[i] = c.generate(messages=CHAT_FRANCE, max_tokens=16, temperature=0.0, stream=bool(i % 2))
        except BaseException as exc:  # reported below
            errors.append(f"request {i}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert len(results) == 16
    for responses in results.values():
        text = "".join(r["text_output"] for r in responses)
        assert "Paris" in text, text
        assert responses[-1]["finish_reason"] in ("stop", "length")
    workers = {r[-1]["worker"] for r in results.values()}
    assert workers == set(triton_server.decode_models) == {"decode", "decode_1"}


def test_metrics_are_published_per_worker(triton_server: ServerInfo, client: RouterClient) -> None:
    client.generate(text_input="Hello", max_tokens=4)
    client.generate(text_input="Hello again", max_tokens=4)
    import time

    time.sleep(0.6)  # workers flush metrics every 0.25 s
    totals = metric_values(triton_server.metrics_url, "trident_kv_blocks_capacity")
    assert set(totals) == {"decode", "decode_1"} and all(v > 0 for v in totals.values())
    for name in ("trident_requests_total", "trident_generation_tokens_total", "trident_prompt_tokens_total",
                 "trident_time_to_first_token_seconds_count", "trident_inter_token_latency_seconds_count"):
        values = metric_values(triton_server.metrics_url, name)
        assert values and sum(values.values()) > 0, name
    for name in ("trident_kv_blocks_used", "trident_requests_running", "trident_requests_waiting"):
        assert set(metric_values(triton_server.metrics_url, name)) == {"decode", "decode_1"}, name

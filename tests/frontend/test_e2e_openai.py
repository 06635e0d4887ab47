"""The official `openai` client (sync and async) against the real stack.

tritonserver (router + two decode workers on SmolLM2-135M) from the session fixture, our
frontend in front of it. Greedy decoding (temperature 0) makes outputs comparable across
streaming and non-streaming calls.
"""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.frontend.conftest import MODEL_ID

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name three colors."},
]


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def greedy_chat(client: openai.OpenAI):  # type: ignore[no-untyped-def]
    return client.chat.completions.create(
        model=MODEL_ID, messages=MESSAGES, max_tokens=8, temperature=0
    )


def test_models(client: openai.OpenAI) -> None:
    assert MODEL_ID in [m.id for m in client.models.list()]
    assert client.models.retrieve("router").id == "router"


def test_chat_non_streaming(greedy_chat) -> None:  # type: ignore[no-untyped-def]
    choice = greedy_chat.choices[0]
    assert greedy_chat.object == "chat.completion" and greedy_chat.model == MODEL_ID
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = greedy_chat.usage
    assert usage.prompt_tokens > 10  # system + user + ChatML template
    assert 0 < usage.completion_tokens <= 8
    if choice.finish_reason == "length":
        assert usage.completion_tokens == 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens >= 0


def test_chat_streaming_matches_non_streaming(client: openai.OpenAI, greedy_chat) -> None:  # type: ignore[no-untyped-def]
    stream = client.chat.completions.create(
        model=MODEL_ID,
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy_chat.choices[0].message.content
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == [greedy_chat.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.completion_tokens == greedy_chat.usage.completion_tokens
    assert usage.prompt_tokens == greedy_chat.usage.prompt_tokens
    # Cache hits depend on the worker the router picks; test_e2e_http checks them.
    assert 0 <= usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_with_prompt_list(client: openai.OpenAI) -> None:
    resp = client.completions.create(
        model=MODEL_ID, prompt=["The capital of France is", "1, 2, 3,"], max_tokens=4, temperature=0
    )
    assert resp.object == "text_completion"
    assert [c.index for c in resp.choices] == [0, 1]
    assert all(c.text and c.finish_reason in ("stop", "length") for c in resp.choices)
    assert 0 < resp.usage.completion_tokens <= 8 and resp.usage.prompt_tokens >= 8


def test_completions_streaming_and_stop(client: openai.OpenAI) -> None:
    prompt = "1, 2, 3, 4,"
    full = client.completions.create(
        model=MODEL_ID, prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    text = full.choices[0].text
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 8
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL_ID, prompt=prompt, max_tokens=8, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == text
    # Stop at something the greedy continuation really contains.
    stop = text.strip().split(",")[1].strip() if "," in text.strip() else text.strip()[:2]
    stopped = client.completions.create(
        model=MODEL_ID, prompt=prompt, max_tokens=8, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stop not in stopped.choices[0].text
    assert text.startswith(stopped.choices[0].text)


def test_seeded_sampling_is_reproducible_and_n_gives_distinct_choices(
    client: openai.OpenAI,
) -> None:
    def sample(seed: int, n: int = 1) -> list[str]:
        resp = client.completions.create(
            model=MODEL_ID,
            prompt="Once upon a time",
            max_tokens=6,
            temperature=1.0,
            seed=seed,
            n=n,
            extra_body={"ignore_eos": True},
        )
        return [c.text for c in resp.choices]

    assert sample(7) == sample(7)
    two = sample(7, n=2)
    assert len(two) == 2 and two[0] == sample(7)[0]


def test_multi_turn_chat_with_text_parts(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL_ID,
        messages=[
            {"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": "Hello Ada."},
            {"role": "user", "content": [{"type": "text", "text": "What is my name?"}]},
        ],
        max_tokens=6,
        temperature=0,
        user="tester",
    )
    assert resp.choices[0].message.content
    assert resp.usage.prompt_tokens > 30


def test_min_tokens_and_max_completion_tokens(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "Say OK."}],
        max_completion_tokens=6,
        temperature=0,
        extra_body={"min_tokens": 6},
    )
    assert resp.usage.completion_tokens == 6 and resp.choices[0].finish_reason == "length"


def test_errors_through_the_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)
    assert nf.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model=MODEL_ID, messages=MESSAGES, max_tokens=2, temperature=-1
        )
    assert bad.value.body["param"] == "temperature"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as ctx:
        client.completions.create(model=MODEL_ID, prompt="hi", max_tokens=10_000_000)
    assert ctx.value.code == "context_length_exceeded"
    assert ctx.value.body["param"] == "max_tokens"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as ctx_stream:
        client.chat.completions.create(
            model=MODEL_ID, messages=MESSAGES, max_completion_tokens=10_000_000, stream=True
        )
    assert ctx_stream.value.code == "context_length_exceeded"
    assert ctx_stream.value.body["param"] == "max_completion_tokens"  # type: ignore[index]


def test_async_client_streams_concurrently(base_url: str, greedy_chat) -> None:  # type: ignore[no-untyped-def]
    async def main() -> tuple[list[str], str]:
        async with openai.AsyncOpenAI(
            base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120
        ) as aclient:

            async def one_stream() -> str:
                stream = await aclient.chat.completions.create(
                    model=MODEL_ID, messages=MESSAGES, max_tokens=8, temperature=0, stream=True
                )
                return "".join(
                    [c.choices[0].delta.content or "" async for c in stream if c.choices]
                )

            texts = await asyncio.gather(*(one_stream() for _ in range(3)))
            resp = await aclient.completions.create(
                model="trident", prompt="Hello", max_tokens=3, temperature=0
            )
            return list(texts), resp.choices[0].text

    texts, completion = asyncio.run(main())
    assert texts == [greedy_chat.choices[0].message.content] * 3
    assert completion

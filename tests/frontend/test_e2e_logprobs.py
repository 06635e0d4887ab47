"""Logprobs, penalties, logit_bias and min_p through the official `openai` client and the
router model, on the session's real tritonserver (SmolLM2-135M, float32).

The reference is transformers' log-softmax of the same GGUF (fp32) over the same tokens:
each logprob must agree within `TOLERANCE` (fp32 on both sides, different kernels and
batch shapes).
"""

from __future__ import annotations

import os

import httpx
import openai
import pytest
import torch

from router_ensemble.text.tokenizer import load_tokenizer
from tests.frontend.conftest import MODEL_ID
from tests.integration.server_fixture import ServerInfo
from trident.core.model_files import default_model_path
from trident.router_client import RouterClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOLERANCE = 2e-3
MESSAGES = [{"role": "user", "content": "Name three colors."}]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(default_model_path())


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), torch_dtype=torch.float32
    ).eval()


def _log_softmax(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


def _hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False
        )
    return out[0].tolist()


def _chat_prompt(tok) -> list[int]:
    return tok.encode(tok.apply_chat_template(MESSAGES, add_generation_prompt=True))


def test_chat_logprobs_equal_transformers(client, tok, hf) -> None:
    resp = client.chat.completions.create(
        model=MODEL_ID,
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    prompt = _chat_prompt(tok)
    out = _hf_greedy(hf, prompt, len(content))[len(prompt) :]  # greedy: the served tokens
    assert tok.decode(out) == resp.choices[0].message.content
    ref = _log_softmax(hf, prompt + out)
    assert "".join(e.token for e in content) == resp.choices[0].message.content
    for i, entry in enumerate(content):
        row = ref[len(prompt) - 1 + i]
        assert entry.logprob == pytest.approx(row[out[i]].item(), abs=TOLERANCE)
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 5
        assert entry.top_logprobs[0].token == entry.token  # greedy: the likeliest
        expected = torch.topk(row, 5)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
            expected.values.tolist(), abs=TOLERANCE
        )
        assert [t.token for t in entry.top_logprobs] == [
            tok.decode([i], False) for i in expected.indices.tolist()
        ]


def test_streamed_logprobs_concatenate_to_the_whole(client) -> None:
    kw = dict(
        model=MODEL_ID,
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    whole = client.chat.completions.create(**kw).choices[0].logprobs.content
    streamed = []
    for chunk in client.chat.completions.create(stream=True, **kw):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed.extend(chunk.choices[0].logprobs.content)
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in whole]


def test_completion_echo_logprobs_cover_the_prompt(client, tok, hf) -> None:
    resp = client.completions.create(
        model=MODEL_ID, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3, echo=True
    )
    choice = resp.choices[0]
    lp = choice.logprobs
    prompt = tok.encode(PROMPT, add_special_tokens=True)
    n = len(prompt) + resp.usage.completion_tokens
    assert (
        len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    )
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # the first prompt token
    assert choice.text.startswith(PROMPT)
    assert all(
        b - a == len(t)
        for a, b, t in zip(lp.text_offset, lp.text_offset[1:], lp.tokens, strict=False)
    )
    ids = _hf_greedy(hf, prompt, resp.usage.completion_tokens)  # greedy: the served tokens
    assert tok.decode(ids[len(prompt) :]) == choice.text[len(PROMPT) :]
    ref = _log_softmax(hf, ids)
    for i in range(1, n):
        assert lp.token_logprobs[i] == pytest.approx(ref[i - 1, ids[i]].item(), abs=TOLERANCE), i
        assert (
            len(lp.top_logprobs[i]) >= 3
        )  # the top 3, plus the token itself when it is not among them
    stream = client.completions.create(
        model=MODEL_ID,
        prompt=PROMPT,
        max_tokens=4,
        temperature=0,
        logprobs=3,
        echo=True,
        stream=True,
    )
    tokens = [
        t
        for c in stream
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.tokens
    ]
    assert tokens == lp.tokens


def test_logit_bias_forces_a_token(client, tok) -> None:
    (forced,) = tok.encode(" blue")
    resp = client.chat.completions.create(
        model=MODEL_ID,
        messages=MESSAGES,
        max_tokens=4,
        temperature=0.8,
        seed=3,
        logit_bias={str(forced): 100},
    )
    assert resp.choices[0].message.content == " blue" * 4


def test_min_p_one_is_greedy(client) -> None:
    greedy = (
        client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=6, temperature=0)
        .choices[0]
        .text
    )
    for seed in range(3):
        resp = client.completions.create(
            model=MODEL_ID,
            prompt=PROMPT,
            max_tokens=6,
            temperature=1.5,
            seed=seed,
            extra_body={"min_p": 1.0},
        )
        assert resp.choices[0].text == greedy


@pytest.mark.parametrize(
    "penalty",
    [
        {"frequency_penalty": 2.0},
        {"presence_penalty": 2.0},
        {"extra_body": {"repetition_penalty": 2.0}},
    ],
)
def test_penalties_stop_a_repetition(client, tok, penalty) -> None:
    prompt = "1 1 1 1 1 1 1 1"  # greedy goes on with " 1 1 1 1" (tokens " ", "1" in turn)
    plain = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=8, temperature=0)
    penalized = client.completions.create(
        model=MODEL_ID, prompt=prompt, max_tokens=8, temperature=0, **penalty
    )
    before, after = tok.encode(plain.choices[0].text), tok.encode(penalized.choices[0].text)
    assert max(before.count(t) for t in before) == 4
    assert max(after.count(t) for t in after) < 4, penalized.choices[0].text
    if "extra_body" not in penalty:  # over the output only: the first token is unaffected
        assert before[0] == after[0]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/completions", {"logprobs": 21}, "logprobs"),
        ("/v1/completions", {"logprobs": 1, "echo": True, "prompt": [1, 2]}, "echo"),
        ("/v1/chat/completions", {"logit_bias": {"99999999": 5}}, "logit_bias"),
        ("/v1/chat/completions", {"logit_bias": {"1": 150}}, "logit_bias.1"),
        ("/v1/chat/completions", {"presence_penalty": 2.5}, "presence_penalty"),
        ("/v1/completions", {"frequency_penalty": -3}, "frequency_penalty"),
        ("/v1/completions", {"repetition_penalty": 0}, "repetition_penalty"),
        ("/v1/completions", {"min_p": 1.5}, "min_p"),
    ],
)
def test_unsupported_values_get_a_400_naming_the_field(
    base_url: str, path: str, body: dict, param: str
) -> None:
    prompt = {"messages": MESSAGES} if "chat" in path else {"prompt": PROMPT}
    resp = httpx.post(
        f"{base_url}{path}", json={"model": MODEL_ID, "max_tokens": 2, **prompt, **body}, timeout=60
    )
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param, resp.text


def test_the_router_model_returns_logprobs(triton_server: ServerInfo, tok, hf) -> None:
    """Triton clients get the same: the router's logprob outputs, token texts included."""
    ids = tok.encode(PROMPT, add_special_tokens=True)
    with RouterClient(triton_server.grpc_url) as router:
        (out,) = router.generate(
            input_ids=ids, max_tokens=3, temperature=0.0, logprobs=2, prompt_logprobs=1
        )
    assert len(out["output_ids"]) == len(out["output_logprobs"]) == len(out["output_tokens"]) == 3
    assert len(out["top_logprob_ids"]) == len(out["top_logprobs"]) == 6
    assert list(out["prompt_ids"]) == ids and len(out["prompt_token_logprobs"]) == len(ids) - 1
    assert len(out["prompt_top_logprob_ids"]) == len(ids) - 1
    ref = _log_softmax(hf, ids + list(out["output_ids"]))
    for i, token in enumerate(out["output_ids"]):
        assert out["output_logprobs"][i] == pytest.approx(
            ref[len(ids) - 1 + i, token].item(), abs=TOLERANCE
        )
        assert out["top_logprob_ids"][2 * i] == token  # greedy
    for i, token in enumerate(ids[1:]):
        assert out["prompt_token_logprobs"][i] == pytest.approx(ref[i, token].item(), abs=TOLERANCE)


def test_the_router_generate_endpoint_returns_logprobs(triton_server: ServerInfo) -> None:
    """Triton's HTTP generate extension carries them too (JSON fields named as the outputs)."""
    body = {
        "text_input": PROMPT,
        "max_tokens": 2,
        "temperature": 0.0,
        "logprobs": 1,
        "presence_penalty": 0.5,
    }
    resp = httpx.post(f"{triton_server.http_url}/v2/models/router/generate", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert len(out["output_logprobs"]) == len(out["output_ids"]) == len(out["output_tokens"]) == 2
    assert len(out["top_logprob_ids"]) == 2 and all(lp <= 0 for lp in out["output_logprobs"])
    bad = httpx.post(
        f"{triton_server.http_url}/v2/models/router/generate",
        json={**body, "logprobs": 21},
        timeout=60,
    )
    assert bad.status_code == 400 and "logprobs" in bad.text

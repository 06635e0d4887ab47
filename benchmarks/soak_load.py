"""The soak benchmark's client load (`benchmarks.soak` starts it, stops it, reads its tally).

`Load.run(deadline)` runs `concurrency` closed-loop client threads against the OpenAI
frontend until `deadline`; each thread draws one request kind after another (`KINDS`, with
its weight) with its own seeded `random.Random`:

- `chat`, `chat_stream`, `completion`, `completion_stream`: the official `openai` client;
  prompts short, long (past the router's disaggregation threshold: prefilled by the prefill
  worker) or a shared long prefix plus a short suffix (a prefix-cache hit); 4-64 new tokens.
  Success: a finish_reason of `stop` or `length` and some output.
- `cancel`: an `openai` stream closed after 1-3 chunks.
- `disconnect`: raw httpx, the connection dropped mid-stream or by a short read timeout on a
  non-streaming request.
- `bad_input`: raw httpx, a request the frontend must refuse with a 4xx (temperature -1, an
  unknown model, malformed JSON, max_tokens 0, no messages, a prompt over the context).
  A 4xx is an *expected* error; anything else is unexpected.

Every other failure is unexpected and tallied by kind (`classify`) with a sample message,
except an error saying the worker "went away" (`worker_killed`, the router's) or "is not
healthy" (`worker_unhealthy`, Triton's for a dead stub) on a request that was in flight when
`at_kill` ran: those are tallied as `lost_to_kill`. Thread-safe: the client
threads record, the main thread reads `tally()` after `run` returns.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai

logger = logging.getLogger("benchmarks.soak")

KINDS = {  # kind -> weight
    "chat": 3,
    "chat_stream": 3,
    "completion": 2,
    "completion_stream": 2,
    "cancel": 1,
    "disconnect": 1,
    "bad_input": 1,
}
BAD_INPUTS = (
    "temperature",
    "unknown_model",
    "malformed_json",
    "max_tokens_zero",
    "no_messages",
    "too_long",
)
WORDS = (
    "the of and to in is that it was for on are as with his they at be this from have or by one had not but "
    "what all were when we there can an your which their said if do will each about how up out them then she "
    "many some so these would other into has more her two like him see time could no make than first been its "
    "who now people my made over did down only way find use may water long little very after words called just "
    "where most know get through back much before go good new write our used me man too any day same right look "
    "think also around another came come work three word must because does part even place well such here take"
).split()
KILL_KINDS = ("worker_killed", "worker_unhealthy")  # errors the kill explains, if in flight then
TIMEOUT_S = 120.0  # per request: a request that takes longer hangs, and counts as `timeout`


@dataclass(slots=True)
class Tally:
    requests: Counter[str] = field(default_factory=Counter)  # by request kind
    completed: Counter[str] = field(default_factory=Counter)  # ended as intended, by request kind
    expected: Counter[str] = field(
        default_factory=Counter
    )  # bad inputs refused with a 4xx, by input
    unexpected: Counter[str] = field(default_factory=Counter)  # by error kind
    samples: dict[str, str] = field(default_factory=dict)  # error kind -> first message
    lost_to_kill: int = 0
    lost_sample: str = ""


class Unexpected(Exception):
    """A response that is not an error to the client but wrong (no output, a 200 to a bad input)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def classify(exc: BaseException) -> str:
    """The error kind of a failed request."""
    if "went away" in str(exc):  # the router gave up on a worker that stopped answering
        return "worker_killed"
    if "is not healthy" in str(exc):  # Triton's answer from a worker whose stub is dead
        return "worker_unhealthy"
    if isinstance(exc, Unexpected):
        return exc.kind
    if isinstance(exc, (openai.APITimeoutError, httpx.TimeoutException)):
        return "timeout"
    if isinstance(exc, (openai.APIConnectionError, httpx.TransportError)):
        return "connection"
    if isinstance(exc, openai.APIStatusError):
        return f"http_{exc.status_code}"
    if isinstance(exc, openai.APIError):
        return "stream_error"  # an {"error": ...} event after the stream started
    return type(exc).__name__


class Prompts:
    """Short, long and shared-prefix prompts; `long_words` words put a prompt past the
    router's disaggregation threshold."""

    def __init__(self, seed: int, long_words: int) -> None:
        rng = random.Random(seed)
        self.long_words = long_words
        self.prefixes = [self.words(rng, long_words) for _ in range(3)]

    @staticmethod
    def words(rng: random.Random, n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    def draw(self, rng: random.Random) -> tuple[str, str]:
        """(system or prefix part, the rest); the first part may be empty."""
        r = rng.random()
        if r < 0.5:
            return "", self.words(rng, rng.randint(3, 30))
        if r < 0.75:
            return rng.choice(self.prefixes), self.words(rng, rng.randint(5, 30))
        return "", self.words(rng, rng.randint(self.long_words, 2 * self.long_words))


class Load:
    """The client threads and their tally. `benchmarks.soak.soak` calls `run` on a thread of
    its own, `at_kill` once from its main thread while `run` runs, `tally` after it returned."""

    def __init__(
        self, base_url: str, model: str, prompts: Prompts, *, concurrency: int, seed: int
    ) -> None:
        self.base_url = base_url
        self.model = model
        self.concurrency = concurrency
        self.seed = seed
        self.prompts = prompts
        self._lock = threading.Lock()
        self._tally = Tally()
        self._inflight: set[int] = set()
        self._at_kill: set[int] = set()
        self._next_id = 0

    # ---- main thread ---------------------------------------------------------------------
    def run(self, deadline: float) -> None:
        """Run the client threads until `deadline` (time.monotonic()); return once all ended."""
        threads = [
            threading.Thread(
                target=self._client, args=(i, deadline), name=f"soak-client-{i}", daemon=True
            )
            for i in range(self.concurrency)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def at_kill(self, kill: Callable[[], None]) -> int:
        """Run `kill()` with no request starting or ending meanwhile; remember the requests in
        flight. Returns their number."""
        with self._lock:
            self._at_kill = set(self._inflight)
            kill()
            return len(self._at_kill)

    def tally(self) -> Tally:
        with self._lock:
            return self._tally

    # ---- client threads ------------------------------------------------------------------
    def _client(self, index: int, deadline: float) -> None:
        rng = random.Random(self.seed * 1000 + index)
        oai = openai.OpenAI(
            base_url=self.base_url + "/v1", api_key="soak", max_retries=0, timeout=TIMEOUT_S
        )
        raw = httpx.Client(base_url=self.base_url, timeout=TIMEOUT_S)
        kinds, weights = list(KINDS), list(KINDS.values())
        try:
            while time.monotonic() < deadline:
                kind = rng.choices(kinds, weights)[0]
                self._one(kind, lambda kind=kind: self._send(kind, rng, oai, raw))
        finally:
            oai.close()
            raw.close()

    def _one(self, kind: str, send: Callable[[], str | None]) -> None:
        with self._lock:
            rid = self._next_id
            self._next_id += 1
            self._inflight.add(rid)
            self._tally.requests[kind] += 1
        refused: str | None = None
        error: BaseException | None = None
        try:
            refused = send()
        except Exception as exc:  # tallied below by kind
            error = exc
        with self._lock:
            self._inflight.discard(rid)
            t = self._tally
            if error is None:
                t.completed[kind] += 1
                if refused:
                    t.expected[refused] += 1
                return
            what = classify(error)
            message = f"{kind}: {type(error).__name__}: {error}"[:500]
            if what in KILL_KINDS and rid in self._at_kill:
                t.lost_to_kill += 1
                t.lost_sample = t.lost_sample or message
                return
            t.unexpected[what] += 1
            t.samples.setdefault(what, message)
        logger.warning("request %d failed (%s): %s", rid, what, message)

    def _send(
        self, kind: str, rng: random.Random, oai: openai.OpenAI, raw: httpx.Client
    ) -> str | None:
        """Send one request of `kind`; return the bad input's name when it was refused as it
        should be, None on success; raise on failure."""
        chat = kind.startswith("chat") or (kind in ("cancel", "disconnect") and rng.random() < 0.5)
        head, tail = self.prompts.draw(rng)
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": rng.randint(4, 64),
            "temperature": rng.choice([0.0, 0.7, 1.0]),
        }
        if rng.random() < 0.3:
            body["seed"] = rng.randrange(1 << 30)
        if chat:
            body["messages"] = ([{"role": "system", "content": head}] if head else []) + [
                {"role": "user", "content": tail}
            ]
        else:
            body["prompt"] = f"{head} {tail}".strip()
        if kind == "bad_input":
            return self._bad_input(rng.choice(BAD_INPUTS), body, raw)
        if kind == "disconnect":
            self._disconnect(rng, chat, body)
            return None
        create = oai.chat.completions.create if chat else oai.completions.create
        if kind == "cancel":
            chunks = rng.randint(1, 3)
            with create(**body, stream=True) as stream:
                for n, _ in enumerate(stream, 1):
                    if n >= chunks:
                        break
            return None
        if kind.endswith("_stream"):
            finish, text = None, ""
            with create(**body, stream=True) as stream:
                for chunk in stream:
                    for choice in chunk.choices:
                        text += (choice.delta.content or "") if chat else choice.text
                        finish = choice.finish_reason or finish
            _check(finish, text)
            return None
        response = create(**body)
        choice = response.choices[0]
        _check(choice.finish_reason, choice.message.content if chat else choice.text)
        return None

    def _disconnect(self, rng: random.Random, chat: bool, body: dict[str, Any]) -> None:
        """Drop the connection mid-stream, or time out a non-streaming request (fresh client,
        so that the connection really closes)."""
        path = "/v1/chat/completions" if chat else "/v1/completions"
        if rng.random() < 0.5:
            with (
                httpx.Client(base_url=self.base_url, timeout=TIMEOUT_S) as client,
                client.stream("POST", path, json={**body, "stream": True}) as response,
            ):
                if response.status_code != 200:
                    raise Unexpected(
                        f"http_{response.status_code}", response.read().decode(errors="replace")
                    )
                for _ in response.iter_bytes():
                    break  # the first bytes arrived: hang up
            return
        body["max_tokens"] = 64
        try:
            with httpx.Client(
                base_url=self.base_url, timeout=httpx.Timeout(TIMEOUT_S, read=rng.uniform(0.1, 0.8))
            ) as client:
                response = client.post(path, json=body)
        except httpx.ReadTimeout:
            return  # hung up while the server generated
        if response.status_code != 200:
            raise Unexpected(f"http_{response.status_code}", response.text)

    def _bad_input(self, what: str, body: dict[str, Any], raw: httpx.Client) -> str:
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        content: bytes | None = None
        if what == "temperature":
            body["temperature"] = -1
        elif what == "unknown_model":
            body["model"] = "no-such-model"
        elif what == "max_tokens_zero":
            body["max_tokens"] = 0
        elif what == "no_messages":
            path, body = "/v1/chat/completions", {"model": self.model, "messages": []}
        elif what == "too_long":  # over the model's context (8192 tokens for SmolLM2)
            path, body = (
                "/v1/completions",
                {"model": self.model, "prompt": "hello " * 9000, "max_tokens": 4},
            )
        elif what == "malformed_json":
            content = json.dumps(body).encode()[:-7]
        if content is None:
            content = json.dumps(body).encode()
        response = raw.post(path, content=content, headers={"Content-Type": "application/json"})
        if not 400 <= response.status_code < 500:
            kind = (
                "bad_input_accepted"
                if response.status_code < 400
                else f"http_{response.status_code}"
            )
            raise Unexpected(kind, f"{what}: HTTP {response.status_code}: {response.text[:300]}")
        return what


def _check(finish: str | None, text: str | None) -> None:
    if finish not in ("stop", "length"):
        raise Unexpected("bad_finish", f"finish_reason={finish!r}, text={text!r:.80}")
    if finish == "length" and not text:
        raise Unexpected("no_output", "finish_reason='length' with no text")

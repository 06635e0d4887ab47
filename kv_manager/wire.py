"""The ZMQ wire format of KV events and worker load, shared with vLLM, SGLang and Dynamo.

Every message is a three-frame ZMQ multipart `[topic, seq, payload]`: `seq` is an 8-byte
big-endian unsigned integer and `payload` is msgpack.

- KV events (any topic other than the two below; vLLM's default topic is ""): `seq` numbers
  the worker's event batches 0, 1, 2, ... and the payload is vLLM's `KVEventBatch` encoded as
  a msgspec `array_like` struct: `[ts, [event, ...], data_parallel_rank]`. Each event is a
  tagged array whose first element names its type:
  `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium]`,
  `["BlockRemoved", block_hashes, medium]`, `["AllBlocksCleared"]`.
  Decoding also takes what other vLLM releases send: no `medium`/`data_parallel_rank`
  (older), extra trailing fields such as `lora_name`, `extra_keys`, `group_idx` (newer, ignored),
  the map form of msgspec structs (`{"ts": ..., "events": [{"type": "BlockStored", ...}]}`),
  negative (signed) and `bytes` block hashes (both folded to unsigned 64-bit, like Dynamo).
- Load reports (topic `trident.load`) and worker control (topic `trident.control`, kinds
  "announce" and "leave") are Trident's own: msgpack maps; their `seq` frame carries the
  worker's *next* event sequence number, so a subscriber also sees a gap at the tail of the
  event stream.
- An engine that publishes its own KV events (vLLM) does so on its own PUB socket; the worker's
  load reports and announces then name that socket (`events_endpoint`), its replay socket and
  the engine's hash scheme (`hashes`), and their `seq` frame says nothing about its stream.
- Resync requests go to the worker's ROUTER socket: vLLM's replay request (one frame: the
  8-byte start seq; replies `[seq, payload]` ..., then `[END_SEQ, b""]`; vLLM 0.32 and later
  put the topic first: `[topic, seq, payload]` ..., `[b"", END_SEQ, b""]`) or Trident's snapshot
  request (`b"trident.snapshot"`; one reply `[b"trident.snapshot", next_seq, payload]` whose payload is an
  event batch that rebuilds the worker's whole cache: AllBlocksCleared, then BlockStored runs).

Pure functions and frozen dataclasses: the publisher (worker side) and the subscriber
(router side) call them from their own threads.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import MISSING, dataclass
from typing import Any

import msgpack

from kv_manager.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from trident.core.errors import ValidationError

TOPIC_LOAD = b"trident.load"
TOPIC_CONTROL = b"trident.control"
DEFAULT_EVENTS_TOPIC = b"kv-events"
END_SEQ = (-1).to_bytes(8, "big", signed=True)
SNAPSHOT = b"trident.snapshot"
ANNOUNCE = "announce"
LEAVE = "leave"
U64_MASK = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class EventBatch:
    """One published batch of KV events (vLLM's `KVEventBatch`)."""

    ts: float
    events: tuple[KVEvent, ...]
    data_parallel_rank: int | None = 0


@dataclass(frozen=True, slots=True)
class LoadReport:
    """A worker's load, published every ~0.5 s; `next_seq` is its next event batch number."""

    worker_id: str
    instance: str  # random per publisher start: a change means the worker restarted
    ts: float
    active_blocks: int
    total_blocks: int
    running: int
    waiting: int
    active_prefill_tokens: int
    cached_blocks: int = 0
    block_size: int = 0
    resync_endpoint: str = ""
    next_seq: int = 0
    # Set when the engine publishes its KV events itself (vLLM's kv_events_config): where,
    # its replay socket, and how it hashes blocks ("tokens": not the router's scheme).
    events_endpoint: str = ""
    events_replay_endpoint: str = ""
    hashes: str = ""


@dataclass(frozen=True, slots=True)
class WorkerControl:
    """A worker announcing itself at start (`kind="announce"`) or leaving (`"leave"`)."""

    kind: str
    worker_id: str
    instance: str
    ts: float
    block_size: int = 0
    resync_endpoint: str = ""
    next_seq: int = 0
    # Set when the engine publishes its KV events itself (vLLM's kv_events_config): where,
    # its replay socket, and how it hashes blocks ("tokens": not the router's scheme).
    events_endpoint: str = ""
    events_replay_endpoint: str = ""
    hashes: str = ""


# ---------------------------------------------------------------- frames


def pack_frames(topic: bytes, seq: int, payload: bytes) -> list[bytes]:
    return [topic, seq.to_bytes(8, "big"), payload]


def unpack_frames(frames: Sequence[bytes]) -> tuple[bytes, int, bytes]:
    """`[topic, seq, payload]` -> (topic, seq, payload); ValidationError on anything else."""
    if len(frames) != 3:
        raise ValidationError(
            "frames", f"expected 3 frames [topic, seq, payload], got {len(frames)}"
        )
    topic, seq_bytes, payload = (bytes(f) for f in frames)
    if len(seq_bytes) != 8:
        raise ValidationError("seq", f"expected 8 bytes, got {len(seq_bytes)}")
    return topic, int.from_bytes(seq_bytes, "big"), payload


# ---------------------------------------------------------------- event batches


def encode_event(event: KVEvent) -> list[Any]:
    if isinstance(event, BlockStored):
        return [
            "BlockStored",
            list(event.block_hashes),
            event.parent_block_hash,
            list(event.token_ids),
            event.block_size,
            event.lora_id,
            event.medium,
        ]
    if isinstance(event, BlockRemoved):
        return ["BlockRemoved", list(event.block_hashes), event.medium]
    if isinstance(event, AllBlocksCleared):
        return ["AllBlocksCleared"]
    raise ValidationError("event", f"not a KV event: {type(event).__name__}")


def encode_batch(
    events: Iterable[KVEvent], ts: float | None = None, data_parallel_rank: int = 0
) -> bytes:
    """msgpack of `[ts, [events...], data_parallel_rank]` (vLLM's array_like KVEventBatch)."""
    body = [encode_event(e) for e in events]
    return msgpack.packb(
        [time.time() if ts is None else ts, body, data_parallel_rank], use_bin_type=True
    )


def decode_batch(payload: bytes) -> EventBatch:
    """Parse an event batch from any vLLM layout (see module docstring).

    Unknown event types are skipped (newer engines may add some); malformed known events
    raise ValidationError naming the field, e.g. `events[2].block_hashes`.
    """
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ValidationError("payload", f"not valid msgpack: {exc}") from None
    if isinstance(obj, dict):
        ts, raw_events, dp_rank = obj.get("ts"), obj.get("events"), obj.get("data_parallel_rank")
    elif isinstance(obj, (list, tuple)) and len(obj) >= 2:
        ts, raw_events = obj[0], obj[1]
        dp_rank = obj[2] if len(obj) > 2 else None
    else:
        raise ValidationError("payload", "expected [ts, events, data_parallel_rank]")
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        raise ValidationError("ts", f"expected a number, got {ts!r}")
    if not isinstance(raw_events, (list, tuple)):
        raise ValidationError("events", f"expected a list, got {type(raw_events).__name__}")
    if dp_rank is not None and (not isinstance(dp_rank, int) or isinstance(dp_rank, bool)):
        raise ValidationError("data_parallel_rank", f"expected an integer, got {dp_rank!r}")
    events: list[KVEvent] = []
    for i, raw in enumerate(raw_events):
        event = decode_event(raw, f"events[{i}]")
        if event is not None:
            events.append(event)
    return EventBatch(float(ts), tuple(events), dp_rank)


_STORED_FIELDS = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
)
_REMOVED_FIELDS = ("block_hashes", "medium")
_MISSING = object()


def decode_event(raw: Any, where: str = "event") -> KVEvent | None:
    """One tagged event (array or map form) -> dataclass; None for unknown types."""
    if isinstance(raw, dict):
        tag = raw.get("type")
        fields = raw
    elif isinstance(raw, (list, tuple)) and raw:
        tag = raw[0]
        names = _STORED_FIELDS if tag == "BlockStored" else _REMOVED_FIELDS
        fields = dict(zip(names, raw[1:], strict=False))
    else:
        raise ValidationError(where, f"expected a tagged array or map, got {raw!r:.80}")
    if tag == "BlockStored":
        for name in ("block_hashes", "parent_block_hash", "token_ids", "block_size"):
            if name not in fields:
                raise ValidationError(f"{where}.{name}", "missing")
        parent = fields["parent_block_hash"]
        block_size = fields["block_size"]
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
            raise ValidationError(
                f"{where}.block_size", f"expected a positive integer, got {block_size!r}"
            )
        lora_id = fields.get("lora_id")
        if lora_id is not None and not isinstance(lora_id, int):
            raise ValidationError(
                f"{where}.lora_id", f"expected an integer or nil, got {lora_id!r}"
            )
        return BlockStored(
            block_hashes=_hashes(fields["block_hashes"], f"{where}.block_hashes"),
            parent_block_hash=None
            if parent is None
            else to_u64(parent, f"{where}.parent_block_hash"),
            token_ids=_tokens(fields["token_ids"], f"{where}.token_ids"),
            block_size=block_size,
            lora_id=lora_id,
            medium=_medium(fields.get("medium", "GPU"), f"{where}.medium"),
        )
    if tag == "BlockRemoved":
        if "block_hashes" not in fields:
            raise ValidationError(f"{where}.block_hashes", "missing")
        return BlockRemoved(
            block_hashes=_hashes(fields["block_hashes"], f"{where}.block_hashes"),
            medium=_medium(fields.get("medium", "GPU"), f"{where}.medium"),
        )
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    if isinstance(tag, str):
        return None
    raise ValidationError(f"{where}.type", f"expected an event type name, got {tag!r:.80}")


def to_u64(value: Any, field: str) -> int:
    """A block hash as unsigned 64-bit: ints are taken modulo 2**64 (vLLM may send signed
    ones), bytes (vLLM's sha256 hashes) by their low 64 bits, big-endian."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not -(1 << 63) <= value <= U64_MASK:
            raise ValidationError(field, f"{value} does not fit 64 bits")
        return value & U64_MASK
    if isinstance(value, (bytes, bytearray)):
        return int.from_bytes(value, "big") & U64_MASK
    raise ValidationError(field, f"expected an integer or bytes hash, got {type(value).__name__}")


def _hashes(raw: Any, field: str) -> tuple[int, ...]:
    if not isinstance(raw, (list, tuple)):
        raise ValidationError(field, f"expected a list, got {type(raw).__name__}")
    return tuple(to_u64(h, f"{field}[{i}]") for i, h in enumerate(raw))


def _tokens(raw: Any, field: str) -> tuple[int, ...]:
    if not isinstance(raw, (list, tuple)):
        raise ValidationError(field, f"expected a list, got {type(raw).__name__}")
    if not all(type(t) is int and t >= 0 for t in raw):
        raise ValidationError(field, "expected non-negative integers")
    return tuple(raw)


def _medium(raw: Any, field: str) -> str | None:
    if raw is not None and not isinstance(raw, str):
        raise ValidationError(field, f"expected a string or nil, got {raw!r:.80}")
    return raw


# ---------------------------------------------------------------- load and control


def encode_load(report: LoadReport) -> bytes:
    return msgpack.packb({f: getattr(report, f) for f in LoadReport.__slots__}, use_bin_type=True)


def decode_load(payload: bytes) -> LoadReport:
    return LoadReport(**_decode_map(payload, LoadReport, "load"))


def encode_control(message: WorkerControl) -> bytes:
    return msgpack.packb(
        {f: getattr(message, f) for f in WorkerControl.__slots__}, use_bin_type=True
    )


def decode_control(payload: bytes) -> WorkerControl:
    message = WorkerControl(**_decode_map(payload, WorkerControl, "control"))
    if message.kind not in (ANNOUNCE, LEAVE):
        raise ValidationError(
            "control.kind", f"expected 'announce' or 'leave', got {message.kind!r}"
        )
    return message


_FIELD_TYPES = {"str": str, "int": int, "float": (int, float)}


def _decode_map(payload: bytes, cls: type, what: str) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(payload, raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ValidationError(what, f"not valid msgpack: {exc}") from None
    if not isinstance(obj, dict):
        raise ValidationError(what, f"expected a map, got {type(obj).__name__}")
    out: dict[str, Any] = {}
    for name, ftype in cls.__annotations__.items():
        value = obj.get(name, _MISSING)
        if value is _MISSING:
            if cls.__dataclass_fields__[name].default is not MISSING:
                continue
            raise ValidationError(f"{what}.{name}", "missing")
        expected = _FIELD_TYPES[str(ftype)]
        if not isinstance(value, expected) or isinstance(value, bool):
            raise ValidationError(f"{what}.{name}", f"expected {ftype}, got {value!r:.80}")
        out[name] = float(value) if ftype == "float" else value
    return out

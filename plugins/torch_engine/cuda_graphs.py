"""CUDA graphs of the decode forward, one per (batch, context width) bucket, as in vLLM.

On a GPU a decode step of a small model is hundreds of kernel launches from Python plus
the host-to-device copies of its inputs: host overhead, not the GPU, sets the step time.
A replayed graph launches them all at once.

Who calls what: `ModelRunner` owns one `DecodeGraphs` on a CUDA device (config
`cuda_graphs`) and, for a decode-only step, hands it that step's host lists (`run`). It
returns the static hidden states [B, hidden] of the padded batch (the first D rows are the
step's sequences), or None when the step does not fit a graph; the runner then runs the
step eagerly. Only the engine loop thread calls it. The model and the KV pool belong to the
engine: the graphs hold their addresses, so neither may be reallocated while they live.

Buckets: the batch is padded to the next of 1, 2, 4, ... 64 (capped at `max_num_seqs`),
and the block tables to the next power of two of KV blocks per sequence (capped at
`ceil(max_model_len / block_size)`): decode attention gathers width * block_size tokens
per sequence, so one fixed maximal width would read far more KV than there are weights.
A bucket's graph is captured on its first use, at most `max_graphs` of them; past that,
new buckets run eagerly.

Inputs: per bucket, one static int64 device buffer holds input_ids, positions, slot blocks,
slot offsets, decode lens (B each) and the block tables (B x W); a step fills one pinned
host staging buffer and copies it in with one non-blocking copy. The int32 lens and the
attention mask are computed inside the graph from it.

Padding: a padded row is a copy of the first row's inputs (token, position, slot, table,
len). It computes the same K/V as that row (the same kernel over the same input row) and
writes them to the same slot, so it changes nothing another sequence owns; its output row
is never read. Table entries past a sequence's blocks are block 0, masked out by its len.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from plugins.torch_engine.attention import AttentionMetadata
from plugins.torch_engine.llama import LlamaModel

log = logging.getLogger(__name__)

Forward = Callable[[], torch.Tensor]  # the decode forward over one bucket's static inputs
Capture = Callable[[Forward], Forward]  # forward -> replay (both return the hidden states)

MAX_BATCH_BUCKET = 64
MAX_GRAPHS = 64
_ROWS = 5  # input_ids, positions, slot_blocks, slot_offsets, decode_lens


def batch_buckets(max_num_seqs: int) -> tuple[int, ...]:
    return _powers_upto(min(max_num_seqs, MAX_BATCH_BUCKET))


def width_buckets(max_model_len: int, block_size: int) -> tuple[int, ...]:
    return _powers_upto(-(-max_model_len // block_size))


def _powers_upto(n: int) -> tuple[int, ...]:
    """1, 2, 4, ... below n, then n itself."""
    out, p = [], 1
    while p < n:
        out.append(p)
        p *= 2
    return (*out, max(n, 1))


def _ceil(buckets: tuple[int, ...], n: int) -> int | None:
    i = bisect.bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else None


class CudaGraphCapture:
    """The real `Capture`: one eager warm-up of the forward on a side stream (as torch
    requires before a capture), then a `torch.cuda.CUDAGraph` of it on that stream (not
    torch's class-wide default capture stream, made on whichever device came first). All
    graphs of one instance share one memory pool: safe, since they are replayed one at a time
    on one stream and only their outputs are read afterwards. Capture errors are thread-local,
    so the KV loader's and tiers' threads may keep using the device meanwhile."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)

    def __call__(self, forward: Forward) -> Forward:
        device = self.device
        with torch.cuda.device(device):
            self.stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(self.stream):
                forward()
            torch.cuda.current_stream(device).wait_stream(self.stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
                out = forward()

        def replay() -> torch.Tensor:
            with torch.cuda.device(device):  # the loop thread's current device may be another
                graph.replay()
            return out

        return replay


@dataclass(slots=True)
class _Graph:
    inputs: torch.Tensor  # [B * (_ROWS + W)] int64 on the device: the static inputs
    replay: Forward


class DecodeGraphs:
    """Captured decode forwards by (batch, width) bucket; see the module docstring."""

    def __init__(
        self,
        model: LlamaModel,
        pool: torch.Tensor,
        block_size: int,
        max_num_seqs: int,
        max_model_len: int,
        capture: Capture,
        max_graphs: int = MAX_GRAPHS,
    ) -> None:
        self.model = model
        self.pool = pool
        self.block_size = block_size
        self.device = pool.device
        self.batch_buckets = batch_buckets(max_num_seqs)
        self.width_buckets = width_buckets(max_model_len, block_size)
        self.max_graphs = max_graphs
        self.enabled = True  # off after a failed capture: every step then runs eagerly
        self._capture = capture
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._staging: torch.Tensor | None = None
        self._copied = torch.cuda.Event() if self.device.type == "cuda" else None

    @property
    def captured(self) -> list[tuple[int, int]]:
        """The (batch, width) buckets captured so far, in capture order."""
        return list(self._graphs)

    def bucket(self, num_seqs: int, width: int) -> tuple[int, int] | None:
        """The (batch, width in blocks) bucket of a decode batch, or None if it has none."""
        b, w = _ceil(self.batch_buckets, num_seqs), _ceil(self.width_buckets, width)
        return None if b is None or w is None else (b, w)

    def run(
        self,
        ids: list[int],
        positions: list[int],
        slot_blocks: list[int],
        slot_offsets: list[int],
        tables: list[list[int]],
        lens: list[int],
    ) -> torch.Tensor | None:
        """Hidden states [B, hidden] of one decode token per sequence (rows past len(ids) are
        padding), or None: no bucket, too many graphs, or graphs disabled."""
        key = self.bucket(len(ids), max(map(len, tables))) if self.enabled and ids else None
        if key is None:
            return None
        graph = self._graphs.get(key)
        if graph is None and len(self._graphs) >= self.max_graphs:
            return None
        if graph is not None:
            inputs = graph.inputs
        else:
            inputs = torch.empty(key[0] * (_ROWS + key[1]), dtype=torch.long, device=self.device)
        self._load(inputs, key, (ids, positions, slot_blocks, slot_offsets, lens), tables)
        if graph is None:
            graph = self._capture_bucket(key, inputs)  # its warm-up computed this step too
            if graph is None:
                return None
        return graph.replay()

    def _load(
        self, inputs: torch.Tensor, key: tuple[int, int], rows: tuple[list[int], ...], tables: list[list[int]]
    ) -> None:
        """One host list in the buffer layout, padded (see the module docstring), then one copy."""
        b, w = key
        pad = b - len(rows[0])
        flat: list[int] = []
        for row in rows:
            flat += row
            flat += [row[0]] * pad
        for table in tables:
            flat += table
            flat += [0] * (w - len(table))
        flat += (tables[0] + [0] * (w - len(tables[0]))) * pad
        host = self._host(len(flat))
        host.copy_(torch.tensor(flat, dtype=torch.long))
        inputs.copy_(host, non_blocking=True)
        if self._copied is not None:
            self._copied.record(torch.cuda.current_stream(self.device))

    def _host(self, n: int) -> torch.Tensor:
        """The first n elements of the staging buffer, once the last copy out of it is done."""
        if self._staging is None:
            size = self.batch_buckets[-1] * (_ROWS + self.width_buckets[-1])
            self._staging = torch.empty(size, dtype=torch.long, pin_memory=self._copied is not None)
        elif self._copied is not None:
            self._copied.synchronize()
        return self._staging[:n]

    def _capture_bucket(self, key: tuple[int, int], inputs: torch.Tensor) -> _Graph | None:
        b, w = key
        ids, positions, slot_blocks, slot_offsets, lens = inputs[: _ROWS * b].view(_ROWS, b)
        tables = inputs[_ROWS * b :].view(b, w)
        cols = torch.arange(w * self.block_size, device=self.device)
        model, pool = self.model, self.pool

        def forward() -> torch.Tensor:
            lens32 = lens.to(torch.int32)
            mask = (cols[None, :] < lens32[:, None])[:, None, None, :]
            meta = AttentionMetadata(
                slot_blocks=slot_blocks,
                slot_offsets=slot_offsets,
                num_decode=b,
                decode_block_tables=tables,
                decode_lens=lens32,
                decode_mask=mask,
                prefills=[],
            )
            return model.forward(ids, positions, pool, meta)

        t0 = time.perf_counter()
        try:
            replay = self._capture(forward)
        except Exception:
            log.exception("decode graph capture failed (batch %d, width %d blocks); decoding eagerly from now on", b, w)
            self.enabled = False
            return None
        self._graphs[key] = graph = _Graph(inputs, replay)
        log.info(
            "captured decode graph %d/%d: batch %d, width %d blocks (%d tokens), %.0f ms",
            len(self._graphs), self.max_graphs, b, w, w * self.block_size, (time.perf_counter() - t0) * 1e3,
        )
        return graph

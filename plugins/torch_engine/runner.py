"""Turns a `ScheduledBatch` into model inputs, runs the model and samples.

Called by the engine loop thread once per step. The runner reads block tables but never
changes them (the scheduler owns blocks). Each step's inputs are built as host lists first
(`StepInputs`); a decode-only step is then replayed from a CUDA graph when the runner owns
`DecodeGraphs` (`plugins.torch_engine.cuda_graphs`) and the batch fits one of its buckets,
and every other step becomes device tensors for an eager forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from plugins.torch_engine.attention import AttentionMetadata, PrefillSpan
from plugins.torch_engine.config import TorchEngineConfig
from plugins.torch_engine.cuda_graphs import CudaGraphCapture, DecodeGraphs
from plugins.torch_engine.llama import LlamaModel
from plugins.torch_engine.logits import token_logprobs
from plugins.torch_engine.sampler import Logprob, sample
from plugins.torch_engine.scheduler import ScheduledBatch
from plugins.torch_engine.sequence import Sequence

_PROMPT_SLICE = 256  # prompt rows whose logits are computed at once (each row: vocab floats)


@dataclass(slots=True)
class StepInputs:
    """One step's model inputs as host lists, one entry per new token unless noted."""

    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slot_blocks: list[int] = field(default_factory=list)
    slot_offsets: list[int] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)  # one per sampling sequence
    samplers: list[Sequence] = field(default_factory=list)
    decode_tables: list[list[int]] = field(default_factory=list)  # per decode row, unpadded
    decode_lens: list[int] = field(default_factory=list)
    prefills: list[tuple[int, int, int, list[int]]] = field(default_factory=list)  # start, end, ctx, table


class ModelRunner:
    def __init__(
        self, model: LlamaModel, pool: torch.Tensor, block_size: int, seed: int = 0, graphs: DecodeGraphs | None = None
    ) -> None:
        self.model = model
        self.pool = pool
        self.block_size = block_size
        self.device = model.device
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        kernels = model.kernels
        self.kernels = kernels if kernels is not None and kernels.handles_attention(pool, model.num_heads) else None
        self.graphs = graphs  # decode-only steps replay from these when set
        # Set by the engine: masks the sampled rows' logits in place (structured outputs).
        self.logits_hook: Callable[[torch.Tensor, list[Sequence]], None] | None = None

    @classmethod
    def for_engine(cls, model: LlamaModel, pool: torch.Tensor, config: TorchEngineConfig, max_model_len: int) -> ModelRunner:
        """The engine's runner: with decode CUDA graphs on a CUDA pool when `cuda_graphs` is on."""
        graphs = None
        if config.cuda_graphs and pool.is_cuda:
            graphs = DecodeGraphs(
                model, pool, config.block_size, config.max_num_seqs, max_model_len, CudaGraphCapture(pool.device)
            )
        return cls(model, pool, config.block_size, graphs=graphs)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[tuple[Sequence, int, Logprob | None]]:
        """Forward the batch; return (sequence, sampled token, its logprobs or None) for every
        sequence whose pending tokens are all computed by this step. Prompt logprobs of the
        prompt rows computed this step are appended to their sequences."""
        step = self._host_inputs(batch)
        hidden = self._replay_decode(batch, step) if self.graphs is not None else None
        if hidden is None:
            input_ids, positions, meta = self._device_inputs(batch, step)
            if self.device.type == "cpu" and self.model.kernels is None:
                # PyTorch's GEMMs: oneDNN's matmul is ~2.4x slower than ATen's own GEMV for one
                # or two rows on CPU and faster from four rows up; the flag is process-wide, and
                # only this thread does heavy math in a worker process.
                torch.backends.mkldnn.enabled = input_ids.numel() > 2
            hidden = self.model.forward(input_ids, positions, self.pool, meta)
        self._prompt_logprobs(batch, hidden)
        rows, samplers = step.sample_rows, step.samplers
        if not rows:
            return []
        if rows[-1] == len(rows) - 1:  # rows increase: they are 0..n-1 (every decode step)
            picked = hidden[: len(rows)]
        else:
            picked = hidden.index_select(0, torch.tensor(rows, device=self.device))
        logits = self.model.compute_logits(picked)
        if self.logits_hook is not None:
            self.logits_hook(logits, samplers)
        penalized = any(s.request.sampling.penalized for s in samplers)
        sampled = sample(
            logits,
            [s.sampling for s in samplers],
            [s.num_outputs for s in samplers],
            self.generator,
            [s.token_ids for s in samplers] if penalized else (),
            [s.output_start for s in samplers] if penalized else (),
            argmax=self.model.kernels.argmax if self.model.kernels is not None else None,  # CPU models only
        )
        return [(seq, token, lp) for seq, (token, lp) in zip(samplers, sampled, strict=True)]

    def _replay_decode(self, batch: ScheduledBatch, step: StepInputs) -> torch.Tensor | None:
        """Hidden states from a decode graph (padded rows after the batch's), or None when the
        step must run eagerly: prefill rows, prompt-logprob rows, or no bucket fits."""
        assert self.graphs is not None
        d = len(batch.seqs)
        if not d or batch.num_decode != d or len(step.ids) != d:
            return None
        if any(s.needs_prompt_logits and s.num_computed < s.prompt_len - 1 for s in batch.seqs):
            return None
        return self.graphs.run(
            step.ids, step.positions, step.slot_blocks, step.slot_offsets, step.decode_tables, step.decode_lens
        )

    def _prompt_logprobs(self, batch: ScheduledBatch, hidden: torch.Tensor) -> None:
        """Logprobs of the prompt tokens whose predicting rows were computed this step, for
        the sequences that ask for them (logits of those rows only, a slice at a time)."""
        row0 = 0
        for seq, n in zip(batch.seqs, batch.num_new, strict=True):
            start, first = seq.num_computed, row0
            row0 += n
            if not seq.needs_prompt_logits:
                continue
            # position p predicts token p + 1; positions before len(prompt_logprobs) are done
            lo, hi = max(start, len(seq.prompt_logprobs)), min(start + n, seq.prompt_len - 1)
            k = seq.request.sampling.prompt_logprobs or 0
            for a in range(lo, hi, _PROMPT_SLICE):
                b = min(hi, a + _PROMPT_SLICE)
                rows = torch.arange(first + a - start, first + b - start, device=self.device)
                logits = self.model.compute_logits(hidden.index_select(0, rows))
                found = token_logprobs(logits, seq.token_ids[a + 1 : b + 1], [k] * (b - a))
                seq.prompt_logprobs.extend(lp for lp, _ in found)
                seq.prompt_top_logprobs.extend(top for _, top in found)

    def _host_inputs(self, batch: ScheduledBatch) -> StepInputs:
        bs = self.block_size
        s = StepInputs()
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new, strict=True)):
            start = seq.num_computed
            row0 = len(s.ids)
            s.ids.extend(seq.token_ids[start : start + n])
            table = [b.block_id for b in seq.block_table]
            for p in range(start, start + n):
                s.positions.append(p)
                s.slot_blocks.append(table[p // bs])
                s.slot_offsets.append(p % bs)
            ctx = start + n
            if i < batch.num_decode:
                s.decode_tables.append(table[: -(-ctx // bs)])
                s.decode_lens.append(ctx)
            else:
                s.prefills.append((row0, row0 + n, ctx, table[: -(-ctx // bs)]))
            if ctx == len(seq.token_ids):
                s.sample_rows.append(row0 + n - 1)
                s.samplers.append(seq)
        return s

    def _device_inputs(self, batch: ScheduledBatch, s: StepInputs) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        dev, bs = self.device, self.block_size
        tables = lens = mask = None
        if s.decode_tables:
            width = max(len(t) for t in s.decode_tables)
            tables = torch.tensor([t + [0] * (width - len(t)) for t in s.decode_tables], dtype=torch.long, device=dev)
            lens = torch.tensor(s.decode_lens, dtype=torch.int32, device=dev)
            if self.kernels is None:
                cols = torch.arange(width * bs, device=dev)
                mask = (cols[None, :] < lens[:, None])[:, None, None, :]
        prefills = [
            PrefillSpan(start, end, ctx, torch.tensor(table, dtype=torch.long, device=dev))
            for start, end, ctx, table in s.prefills
        ]
        meta = AttentionMetadata(
            slot_blocks=torch.tensor(s.slot_blocks, dtype=torch.long, device=dev),
            slot_offsets=torch.tensor(s.slot_offsets, dtype=torch.long, device=dev),
            num_decode=batch.num_decode,
            decode_block_tables=tables,
            decode_lens=lens,
            decode_mask=mask,
            prefills=prefills,
            kernels=self.kernels,
        )
        input_ids = torch.tensor(s.ids, dtype=torch.long, device=dev)
        positions = torch.tensor(s.positions, dtype=torch.long, device=dev)
        return input_ids, positions, meta

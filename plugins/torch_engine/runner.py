"""Turns a `ScheduledBatch` into model inputs, runs the model and samples.

Called by the engine loop thread once per step. The runner reads block tables but never
changes them (the scheduler owns blocks).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from plugins.torch_engine.attention import AttentionMetadata, PrefillSpan
from plugins.torch_engine.llama import LlamaModel
from plugins.torch_engine.logits import token_logprobs
from plugins.torch_engine.sampler import Logprob, sample
from plugins.torch_engine.scheduler import ScheduledBatch
from plugins.torch_engine.sequence import Sequence

_PROMPT_SLICE = 256  # prompt rows whose logits are computed at once (each row: vocab floats)


class ModelRunner:
    def __init__(self, model: LlamaModel, pool: torch.Tensor, block_size: int, seed: int = 0) -> None:
        self.model = model
        self.pool = pool
        self.block_size = block_size
        self.device = model.device
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        kernels = model.kernels
        self.kernels = kernels if kernels is not None and kernels.handles_attention(pool, model.num_heads) else None
        # Set by the engine: masks the sampled rows' logits in place (structured outputs).
        self.logits_hook: Callable[[torch.Tensor, list[Sequence]], None] | None = None

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[tuple[Sequence, int, Logprob | None]]:
        """Forward the batch; return (sequence, sampled token, its logprobs or None) for every
        sequence whose pending tokens are all computed by this step. Prompt logprobs of the
        prompt rows computed this step are appended to their sequences."""
        input_ids, positions, meta, sample_rows, samplers = self._prepare(batch)
        if self.device.type == "cpu" and self.model.kernels is None:
            # PyTorch's GEMMs: oneDNN's matmul is ~2.4x slower than ATen's own GEMV for one
            # or two rows on CPU and faster from four rows up; the flag is process-wide, and
            # only this thread does heavy math in a worker process.
            torch.backends.mkldnn.enabled = input_ids.numel() > 2
        hidden = self.model.forward(input_ids, positions, self.pool, meta)
        self._prompt_logprobs(batch, hidden)
        if not sample_rows:
            return []
        rows = torch.tensor(sample_rows, device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, rows))
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
        )
        return [(seq, token, lp) for seq, (token, lp) in zip(samplers, sampled, strict=True)]

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

    def _prepare(self, batch: ScheduledBatch):
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slot_blocks: list[int] = []
        slot_offsets: list[int] = []
        sample_rows: list[int] = []
        samplers: list[Sequence] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillSpan] = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new, strict=True)):
            start = seq.num_computed
            row0 = len(ids)
            ids.extend(seq.token_ids[start : start + n])
            table = [b.block_id for b in seq.block_table]
            for p in range(start, start + n):
                pos.append(p)
                slot_blocks.append(table[p // bs])
                slot_offsets.append(p % bs)
            ctx = start + n
            if i < batch.num_decode:
                decode_tables.append(table[: -(-ctx // bs)])
                decode_lens.append(ctx)
            else:
                bt = torch.tensor(table[: -(-ctx // bs)], dtype=torch.long, device=self.device)
                prefills.append(PrefillSpan(row0, row0 + n, ctx, bt))
            if ctx == len(seq.token_ids):
                sample_rows.append(row0 + n - 1)
                samplers.append(seq)
        dev = self.device
        tables = lens = mask = None
        if decode_tables:
            width = max(len(t) for t in decode_tables)
            tables = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables], dtype=torch.long, device=dev)
            lens = torch.tensor(decode_lens, dtype=torch.int32, device=dev)
            if self.kernels is None:
                cols = torch.arange(width * bs, device=dev)
                mask = (cols[None, :] < lens[:, None])[:, None, None, :]
        meta = AttentionMetadata(
            slot_blocks=torch.tensor(slot_blocks, dtype=torch.long, device=dev),
            slot_offsets=torch.tensor(slot_offsets, dtype=torch.long, device=dev),
            num_decode=batch.num_decode,
            decode_block_tables=tables,
            decode_lens=lens,
            decode_mask=mask,
            prefills=prefills,
            kernels=self.kernels,
        )
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        positions = torch.tensor(pos, dtype=torch.long, device=dev)
        return input_ids, positions, meta, sample_rows, samplers

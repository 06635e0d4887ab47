"""`structured_outputs` on the vLLM engine: our spec as vLLM's `StructuredOutputsParams`.

Called by `plugins.vllm.engine.VllmEngine.submit` (`check_structured`, the caller's thread)
and `plugins.vllm.setup.sampling_params` (`structured_outputs_params`). The spec's kinds are
vLLM's own (json, json_object, regex, choice, grammar), so the mapping is one for one.

Two limits, refused with a `ValidationError` naming the field rather than served wrongly:
vLLM's structured outputs need its tokenizer, and this worker starts vLLM without one
(`skip_tokenizer_init`: token ids in and out, the router tokenizes); and vLLM would start a
handed-off or migrated request's grammar from scratch, its earlier outputs being part of
the prompt there.
"""

from __future__ import annotations

from typing import Any

from trident.core.errors import ValidationError
from trident.core.structured import FIELD, parse_structured_outputs
from trident.core.types import GenerateRequest


def structured_outputs_params(text: str | None) -> Any:
    """vLLM's `StructuredOutputsParams` for our spec text (None for None)."""
    if text is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    spec = parse_structured_outputs(text)
    value = list(spec.value) if spec.kind == "choice" else spec.value
    return StructuredOutputsParams(**{spec.kind: value})


def check_structured(request: GenerateRequest, has_tokenizer: bool) -> None:
    """Refuse a constrained request this vLLM worker cannot serve as the contract says."""
    if request.sampling.structured_outputs is None:
        return
    if not has_tokenizer:
        raise ValidationError(
            FIELD,
            "not supported by the vLLM engine here: it runs without a tokenizer (skip_tokenizer_init), "
            "which vLLM's structured outputs need; use the torch engine",
        )
    if request.kv_descriptor is not None or request.output_offset:
        raise ValidationError(
            FIELD, "the vLLM engine cannot resume a grammar after a prefill handoff or a migration"
        )

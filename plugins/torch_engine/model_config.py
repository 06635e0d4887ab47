"""Shape and hyper-parameters of a Llama-family decoder, whatever file it was read from.

The format readers (`gguf_loader`, `hf_loader`) build a `ModelConfig`; `loader` checks the
weights against it; `llama.LlamaModel` is built from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trident.core.errors import ModelLoadError

LLAMA = "LlamaForCausalLM"
QWEN2 = "Qwen2ForCausalLM"
MISTRAL = "MistralForCausalLM"
SUPPORTED_ARCHITECTURES = (LLAMA, QWEN2, MISTRAL)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shape and hyper-parameters of a decoder-only Llama-family model.

    `rope_scaling` is Hugging Face's dict (`{"rope_type": "llama3", "factor": ..., ...}`,
    `linear`, `dynamic`, `yarn`) or None. From a GGUF with a `rope_freqs` tensor (Llama 3.1
    and later) it is `{"rope_type": "freq_factors", "freq_factors": [...]}`: llama.cpp's
    per-frequency divisors of the inverse frequencies (`inv_freq / freq_factors`).
    """

    model_id: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def attention_bias(self) -> bool:
        """Whether q/k/v projections have biases (Qwen2)."""
        return self.architecture == QWEN2

    def validate(self, source: str) -> ModelConfig:
        """Raise `ModelLoadError` (naming `source`) for an unsupported or inconsistent config."""
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"{source}: architecture {self.architecture!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ModelLoadError(f"{source}: {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"{source}: num_heads ({self.num_heads}) is not a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise ModelLoadError(f"{source}: rms_norm_eps and rope_theta must be positive")
        return self

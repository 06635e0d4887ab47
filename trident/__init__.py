"""Trident: disaggregated, KV-aware LLM serving on NVIDIA Triton Inference Server.

This package holds what every other package shares: request/response types
(`trident.core.types`), the error hierarchy (`trident.core.errors`), the `trident` CLI and the
launcher that starts `tritonserver` on `model_repository/`.
"""

__version__ = "0.1.0"

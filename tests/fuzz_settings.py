"""Hypothesis settings shared by the fuzz tests (tests/frontend/test_fuzz_openai.py,
tests/integration/test_router_fuzz.py), which run against the real server."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

CASE_TIMEOUT_S = 30.0  # a case that takes longer counts as a hang
VOCAB_SIZE = 49152  # SmolLM2-135M's, the model the server fixture serves
FUZZ = settings(
    deadline=None,
    database=None,  # the checkout may be shared: no .hypothesis/ directory
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

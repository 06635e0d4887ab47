"""Request tracing with OpenTelemetry: one trace per request across the processes it crosses.

Who calls what:
- each process calls `configure(service)` once at start (the frontend in `create_app`, the
  router and worker models in `initialize`). Tracing is on only when an OTLP endpoint is
  configured: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` (the
  standard variables, read by the OTLP/HTTP exporter), and `OTEL_SDK_DISABLED` is not true.
  Otherwise nothing is installed and `span()` returns a shared no-op context manager, so a
  request pays one boolean test per hop.
- the frontend starts a request's root span and sends its W3C `traceparent` to the router as
  the Triton request parameter `traceparent` (`TRACEPARENT`); the router reads it, opens its
  span under it, and passes its own child span's `traceparent` to each worker it calls (BLS
  request parameter); a worker opens its span under that.

Spans are exported in batches from a background thread (`BatchSpanProcessor`); `shutdown()`
flushes them (the models call it in `finalize`, the frontend at exit).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from typing import Any

logger = logging.getLogger(__name__)

TRACEPARENT = "traceparent"  # the Triton request parameter carrying the W3C trace context
ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_NOOP = contextlib.nullcontext(None)
_lock = threading.Lock()
_provider: Any = None  # the SDK TracerProvider once configured


def endpoint(env: Mapping[str, str] | None = None) -> str:
    """The configured OTLP endpoint, or '' (tracing off)."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ""
    return next((env[v].strip() for v in ENDPOINT_VARS if env.get(v, "").strip()), "")


def enabled() -> bool:
    return _provider is not None


def configure(service: str, env: Mapping[str, str] | None = None) -> bool:
    """Install an OTLP/HTTP exporting tracer provider for this process if an endpoint is
    configured; return whether tracing is on. Safe to call more than once (the first wins)."""
    global _provider
    if not endpoint(env):
        return _provider is not None
    with _lock:
        if _provider is not None:
            return True
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
        _provider = provider
        logger.info("tracing: %s exports spans to %s", service, endpoint(env))
        return True


def shutdown() -> None:
    """Flush and stop the exporter (safe to call twice, or when tracing is off)."""
    global _provider
    with _lock:
        provider, _provider = _provider, None
    if provider is not None:
        provider.shutdown()


def _parent(traceparent: str | None) -> Any:
    if not traceparent:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({TRACEPARENT: traceparent})


def span(
    name: str, traceparent: str | None = None, **attributes: Any
) -> contextlib.AbstractContextManager[Any]:
    """A span made current for the `with` block, child of `traceparent` if given (else of
    the current span); a no-op when tracing is off."""
    if _provider is None:
        return _NOOP
    return _provider.get_tracer("trident").start_as_current_span(
        name, context=_parent(traceparent), attributes=_clean(attributes)
    )


def start(name: str, traceparent: str | None = None, **attributes: Any) -> Any:
    """A span that is not made current (for work that ends on another thread or in an async
    generator); end it with `end(span)`. None when tracing is off."""
    if _provider is None:
        return None
    return _provider.get_tracer("trident").start_span(
        name, context=_parent(traceparent), attributes=_clean(attributes)
    )


def end(span_: Any, error: str = "") -> None:
    if span_ is None:
        return
    if error:
        from opentelemetry.trace import Status, StatusCode

        span_.set_status(Status(StatusCode.ERROR, error))
    span_.end()


def traceparent(span_: Any = None) -> str:
    """The W3C traceparent of `span_` (else of the current span); '' when there is none."""
    if _provider is None:
        return ""
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    context = trace.set_span_in_context(span_) if span_ is not None else None
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=context)
    return carrier.get(TRACEPARENT, "")


@contextlib.contextmanager
def current(span_: Any) -> Iterator[None]:
    """Make a `start()`ed span current for the block (no-op for None)."""
    if span_ is None:
        yield
        return
    from opentelemetry import trace

    with trace.use_span(span_, end_on_exit=False):
        yield


def capture() -> Any:
    """The current trace context, to carry to another thread (None when tracing is off)."""
    if _provider is None:
        return None
    from opentelemetry import context

    return context.get_current()


def run_in(context_: Any, fn: Any, *args: Any) -> Any:
    """Call `fn(*args)` with `context_` (from `capture()`) attached on this thread."""
    if context_ is None:
        return fn(*args)
    from opentelemetry import context

    token = context.attach(context_)
    try:
        return fn(*args)
    finally:
        context.detach(token)


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {
        f"trident.{k}": v for k, v in attributes.items() if isinstance(v, str | int | float | bool)
    }

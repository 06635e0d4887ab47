"""Chat templates: compile and render them the way transformers does, with request checks.

`router_ensemble.text.tokenizer.Tokenizer.apply_chat_template` is the caller. Templates come from model
files, so they run in jinja2's immutable sandbox; bad messages (and a template's own
`raise_exception`) surface as `ValidationError("messages", ...)`.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from trident.core.errors import ModelLoadError, ValidationError


def compile_template(source: str) -> jinja2.Template:
    """Compile like transformers: sandboxed, trim/lstrip blocks, loop controls, tojson, raise_exception."""

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ModelLoadError(f"chat template does not compile: {exc}") from exc


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Check OpenAI chat messages; text-part lists become one string (parts joined by newlines)."""
    if not isinstance(messages, list) or not messages:
        raise ValidationError("messages", "must be a non-empty list of {role, content} objects")
    chat = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValidationError(
                "messages", f"[{i}] must be an object, got {type(message).__name__}"
            )
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValidationError("messages", f"[{i}].role must be a non-empty string")
        chat.append({**message, "content": _content_text(i, message.get("content"))})
    return chat


def _content_text(i: int, content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValidationError("messages", f"[{i}].content must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        if (
            not isinstance(part, dict)
            or part.get("type") != "text"
            or not isinstance(part.get("text"), str)
        ):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValidationError(
                "messages", f"[{i}].content[{j}]: only text parts are supported, got {kind!r}"
            )
        texts.append(part["text"])
    return "\n".join(texts)

"""Messages in the Chat Completions format, with no SDK import.

The ``openai`` adapter sends this format over HTTP and the ``local`` adapter
hands it to llama-cpp-python, so it lives here, where importing it does not
import the ``openai`` package.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from chatsession.errors import InvalidArgumentError
from chatsession.log import ImagePart, Message, TextPart

__all__ = ["EMPTY_CONTENT_CHOICES", "check_empty_content", "to_openai_messages"]

EMPTY_CONTENT_CHOICES: tuple[str | None, ...] = ("", None)
"""What an assistant message that only calls tools may carry as ``content``."""


def check_empty_content(value: object) -> str | None:
    """``value`` if it is a valid ``empty_content`` option (``""`` or ``None``).

    Raises:
        InvalidArgumentError: Anything else.
    """
    if value is None or (isinstance(value, str) and value == ""):
        return value
    raise InvalidArgumentError(
        f"empty_content must be '' (the default: llama.cpp, OpenAI, Ollama and vLLM accept it) "
        f"or None (JSON null, for a server that wants null), not {value!r}"
    )


def to_openai_messages(
    messages: Sequence[Message], *, empty_content: str | None = ""
) -> list[dict[str, Any]]:
    """Messages in the Chat Completions format.

    Args:
        messages: The context, oldest first.
        empty_content: The ``content`` of an assistant message that only
            calls tools: ``""`` (the default) or ``None`` (JSON ``null``).
            OpenAI, Ollama and vLLM take both; llama.cpp's servers answer 500
            to ``null``.

    Returns:
        One dict a message, ready to be sent as ``messages``.
    """
    out: list[dict[str, Any]] = []
    for m in messages:
        item: dict[str, Any] = {"role": m.role}
        if isinstance(m.content, str):
            item["content"] = m.content
        else:
            parts: list[dict[str, Any]] = []
            for part in m.content:
                if isinstance(part, TextPart):
                    parts.append({"type": "text", "text": part.text})
                elif isinstance(part, ImagePart) and part.url:
                    parts.append({"type": "image_url", "image_url": {"url": part.url}})
            item["content"] = parts
        if m.tool_calls:
            item["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in m.tool_calls
            ]
            if not m.text:
                item["content"] = empty_content
        if m.role == "tool":
            item["tool_call_id"] = m.tool_call_id
        out.append(item)
    return out

"""The interface every model adapter implements.

An adapter streams :class:`TextDelta` chunks and ends with one
:class:`Completion` holding the whole assistant message, its usage and its
finish reason. A call that fails, or whose answer ends without a finish
reason, raises :class:`~chatsession.errors.ModelError` instead of ending
(the text streamed before stays with the caller).

Besides the :class:`LLM` protocol, an adapter may offer these; the
:class:`~chatsession.agent.Agent` uses them when present and falls back
otherwise:

- ``async get_context_window() -> int``: the context size, asking the server
  if needed (fallback: the ``context_window`` attribute);
- ``async acount_tokens(messages) -> int | None``: ``count_tokens`` without
  blocking the event loop (fallback: ``count_tokens``);
- ``async aclose() -> None``: release connections (fallback: nothing).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from chatsession.log import Message, Usage

__all__ = [
    "LLM",
    "Completion",
    "LLMChunk",
    "TextDelta",
    "ToolSpec",
    "estimate_text_tokens",
    "estimate_tokens",
]

ToolSpec = dict[str, Any]
"""A tool in the OpenAI ``tools`` format (see ``Tool.to_openai``)."""


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of text as the model produces it."""

    text: str


@dataclass(frozen=True, slots=True)
class Completion:
    """The end of a model call.

    Attributes:
        message: The whole assistant message, with any tool calls.
        usage: Tokens used, when the model reports them (None: estimate).
        finish_reason: Why the model stopped: ``stop``, ``tool_calls``, or
            ``length`` (the output limit cut the answer; the agent marks the
            message ``truncated``).
    """

    message: Message
    usage: Usage | None = None
    finish_reason: str = "stop"


LLMChunk = TextDelta | Completion


@runtime_checkable
class LLM(Protocol):
    """A chat model.

    Attributes:
        provider: ``openai``, ``local``, ``scripted``, ...
        model: The model's name.
        context_window: How many tokens of context the model takes.
    """

    provider: str
    model: str

    @property
    def context_window(self) -> int:
        """The context size in tokens, as far as known without I/O."""
        ...

    def stream(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec]
    ) -> AsyncIterator[LLMChunk]:
        """Answer the conversation: text deltas, then one ``Completion``.

        Args:
            messages: The context, the system prompt first when there is one.
            tools: The tools the model may call.

        Raises:
            ModelError: The call failed, or the answer ended without a
                finish reason.
        """
        ...

    def count_tokens(self, messages: Sequence[Message]) -> int | None:
        """The context's size in the model's own tokens, or None without a tokenizer."""
        ...


def estimate_tokens(messages: Sequence[Message]) -> int:
    """About four characters a token, plus a few tokens per message."""
    total = 0
    for message in messages:
        chars = len(message.text) + sum(len(c.name) + len(c.arguments) for c in message.tool_calls)
        total += 4 + math.ceil(chars / 4)
    return total


def estimate_text_tokens(text: str) -> int:
    """About four characters a token."""
    return math.ceil(len(text) / 4)

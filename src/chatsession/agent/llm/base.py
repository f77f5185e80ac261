"""The interface every model adapter implements.

An adapter streams :class:`TextDelta` chunks and ends with one
:class:`Completion` holding the whole assistant message and its usage.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from chatsession.log import Message, Usage

__all__ = ["LLM", "Completion", "LLMChunk", "TextDelta", "ToolSpec", "estimate_tokens"]

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
        finish_reason: Why the model stopped (``stop``, ``tool_calls``, ``length``).
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
    context_window: int

    def stream(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec]
    ) -> AsyncIterator[LLMChunk]:
        """Answer the conversation: text deltas, then one ``Completion``.

        Args:
            messages: The context, the system prompt first when there is one.
            tools: The tools the model may call.

        Raises:
            ModelError: The call failed.
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

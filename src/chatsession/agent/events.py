"""What a turn yields as it runs.

``TextEvent`` carries text deltas as the model streams them; the other events
mark completed steps. ``ChatSession`` persists each completed step before it
yields the event.
"""

from __future__ import annotations

from dataclasses import dataclass

from chatsession.log import Message, ToolCall, Usage

__all__ = [
    "AgentEvent",
    "AssistantMessageEvent",
    "ErrorEvent",
    "StopEvent",
    "TextEvent",
    "ToolCallEvent",
    "ToolResultEvent",
    "UsageEvent",
]


@dataclass(frozen=True, slots=True)
class TextEvent:
    """A piece of the answer's text, as the model streams it.

    Attributes:
        content: The text delta.
    """

    content: str

    @property
    def text(self) -> str:
        """The same as ``content``."""
        return self.content


@dataclass(frozen=True, slots=True)
class AssistantMessageEvent:
    """A model call finished: the whole assistant message, with any tool calls."""

    message: Message


@dataclass(frozen=True, slots=True)
class ToolCallEvent:
    """The model asked for a tool; it runs next."""

    call: ToolCall

    @property
    def name(self) -> str:
        """The tool's name."""
        return self.call.name


@dataclass(frozen=True, slots=True)
class ToolResultEvent:
    """A tool returned (or failed: ``is_error``); ``message`` is what the model sees.

    A call in an answer cut by the output limit is not run: it gets an error
    result without a :class:`ToolCallEvent` before it.
    """

    call_id: str
    name: str
    content: str
    is_error: bool
    message: Message


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """Tokens (and cost) of one model call."""

    usage: Usage


@dataclass(frozen=True, slots=True)
class StopEvent:
    """The turn ended.

    Attributes:
        reason: ``end_turn`` (the model answered), ``length`` (the model hit
            its output limit, ``finish_reason="length"``: the last assistant
            message is marked ``truncated``; tool calls in it were not run
            but answered with error results), ``max_steps`` (the step limit
            stopped the tool loop) or ``error`` (the model call failed; an
            :class:`ErrorEvent` came just before).
        text: The final answer's text (for ``error``: what the failed call
            streamed before it failed).
    """

    reason: str
    text: str = ""


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    """The model call failed; a ``StopEvent("error")`` follows.

    Attributes:
        error: The message.
        exception: The error, a :class:`~chatsession.errors.ModelError` for
            a failed model call (``status_code`` holds the HTTP status, if any).
    """

    error: str
    exception: BaseException | None = None


AgentEvent = (
    TextEvent
    | AssistantMessageEvent
    | ToolCallEvent
    | ToolResultEvent
    | UsageEvent
    | StopEvent
    | ErrorEvent
)

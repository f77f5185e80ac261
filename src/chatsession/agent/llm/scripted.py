"""Deterministic models for tests and demos: ``scripted`` and ``FunctionLLM``.

``ScriptedLLM`` answers from a queue of canned replies, then from rules
(regular expression → reply), then by echoing the user. Replies stream word
by word. Usage is counted in words, the same way every time. Nothing is
random and nothing touches the network. Every request is kept in
``.requests``.

``FunctionLLM`` lets a function of yours play the model.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from chatsession.agent.llm.base import Completion, LLMChunk, TextDelta, ToolSpec
from chatsession.errors import ModelError, UsageError
from chatsession.log import Message, ToolCall, Usage

__all__ = ["FunctionLLM", "Reply", "ScriptedLLM", "ScriptedRequest"]


@dataclass(frozen=True)
class Reply:
    """A canned answer: text, tool calls, or both.

    Build a tool-calling reply with ``Reply.call("name", arg=value)``.

    Attributes:
        text: The answer's text, streamed word by word.
        tool_calls: ``(name, arguments)`` pairs.
        finish_reason: Why the model "stopped"; default ``tool_calls`` when
            there are calls, else ``stop``. ``length`` plays a model that hit
            its output limit.
    """

    text: str = ""
    tool_calls: tuple[tuple[str, dict[str, Any]], ...] = ()
    finish_reason: str | None = None

    @classmethod
    def call(cls, name: str, text: str = "", /, **arguments: Any) -> Reply:
        """A reply that calls tool ``name`` with ``arguments``."""
        return cls(text=text, tool_calls=((name, arguments),))


ReplyLike = str | Reply | BaseException | Callable[[Sequence[Message]], "str | Reply"]


@dataclass
class ScriptedRequest:
    """One call of the model, as recorded in ``.requests``."""

    messages: list[Message]
    tools: list[ToolSpec] = field(default_factory=list)


#: How many contexts a scripted model remembers the count of.
_COUNTED = 256


def _words(text: str) -> int:
    return len(text.split())


def _last(messages: Sequence[Message], role: str) -> Message | None:
    return next((m for m in reversed(messages) if m.role == role), None)


class _StreamingModel:
    """What scripted models share: streaming a reply and counting words."""

    provider = "scripted"

    def __init__(
        self, model: str, context_window: int, chunk_delay: float, keep_requests: int
    ) -> None:
        if (
            isinstance(keep_requests, bool)
            or not isinstance(keep_requests, int)
            or keep_requests < 0
        ):
            raise UsageError(f"keep_requests must be an int >= 0, not {keep_requests!r}")
        self.model = model
        self.context_window = context_window
        self.chunk_delay = chunk_delay
        # the most recent calls only: a long-running demo must not keep every context
        self.requests: deque[ScriptedRequest] = deque(maxlen=keep_requests)
        self._calls = 0
        # (first message, anchor, last message, how many, total) of the last contexts
        # counted, by their anchor (the first message after any system prompt, which
        # is made afresh per call), several at once (the model is shared by many
        # sessions): a context that extends one is counted from where it left off
        self._counted: OrderedDict[int, tuple[Message, Message, Message, int, int]] = OrderedDict()

    @staticmethod
    def _count(message: Message) -> int:
        return 4 + _words(message.text) + sum(_words(c.arguments) + 1 for c in message.tool_calls)

    def count_tokens(self, messages: Sequence[Message]) -> int | None:
        """Words plus four per message: this model's own deterministic "tokenizer".

        Counting is incremental: a context that extends one counted recently
        (the last 256, whatever session they came from) costs only its new messages.
        """
        if not messages:
            return 0
        start, total = 0, 0
        anchor = messages[1] if len(messages) > 1 and messages[0].role == "system" else messages[0]
        key = id(anchor)  # the entry holds the anchor, so its id is not reused meanwhile
        counted = self._counted.get(key)
        if counted is not None:
            first, held, last, size, prefix = counted
            if (
                held is anchor
                and len(messages) >= size
                and messages[size - 1] is last
                and messages[0] == first
            ):
                start, total = size, prefix
        total += sum(self._count(m) for m in messages[start:])
        self._counted[key] = (messages[0], anchor, messages[-1], len(messages), total)
        self._counted.move_to_end(key)
        if len(self._counted) > _COUNTED:
            self._counted.popitem(last=False)
        return total

    async def _emit(self, reply: Reply, messages: Sequence[Message]) -> AsyncIterator[LLMChunk]:
        for piece in re.findall(r"\S+\s*|\s+", reply.text):
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
            yield TextDelta(piece)
        calls = []
        for name, arguments in reply.tool_calls:
            self._calls += 1
            calls.append(
                ToolCall(id=f"call_{self._calls}", name=name, arguments=json.dumps(arguments))
            )
        message = Message(role="assistant", content=reply.text, tool_calls=tuple(calls))
        prompt = self.count_tokens(messages) or 0
        completion = _words(reply.text) + sum(_words(c.arguments) + 1 for c in calls)
        usage = Usage(
            model=self.model,
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
        )
        finish = reply.finish_reason or ("tool_calls" if calls else "stop")
        yield Completion(message, usage, finish)


class ScriptedLLM(_StreamingModel):
    """A deterministic model (the ``scripted`` spec).

    Args:
        replies: Answers given in order, before anything else. Each is text, a
            :class:`Reply`, an exception (raised as the model failing), or a
            function of the messages returning text or a Reply.
        rules: ``(pattern, reply)`` pairs: the first pattern found in the last
            user message picks the reply (used when the queue is empty).
        echo: With no queued reply and no rule: answer ``You said: ...``
            (after a tool result: ``The tool NAME returned: ...``).
        chunk_delay: Seconds between streamed words (for timeouts and demos).
        model: The model name reported in usage.
        context_window: The context size reported to the session.
        keep_requests: How many of the latest calls ``.requests`` keeps
            (each holds its context: a long run must not keep them all; 0
            records none).
    """

    def __init__(
        self,
        replies: Iterable[ReplyLike] = (),
        *,
        rules: Iterable[tuple[str, ReplyLike]] = (),
        echo: bool = True,
        chunk_delay: float = 0.0,
        model: str = "scripted",
        context_window: int = 8192,
        keep_requests: int = 100,
    ) -> None:
        super().__init__(model, context_window, chunk_delay, keep_requests)
        self.queue: deque[ReplyLike] = deque(replies)
        self.rules = [(re.compile(p, re.I), r) for p, r in rules]
        self.echo = echo

    def enqueue(self, *replies: ReplyLike) -> None:
        """Add canned replies to the end of the queue."""
        self.queue.extend(replies)

    def _pick(self, messages: Sequence[Message]) -> ReplyLike:
        if self.queue:
            return self.queue.popleft()
        user = _last(messages, "user")
        text = user.text if user else ""
        for pattern, reply in self.rules:
            if pattern.search(text):
                return reply
        if messages and messages[-1].role == "tool":
            last = messages[-1]
            return f"The tool {last.name or 'call'} returned: {last.text}"
        if not self.echo:
            raise ModelError("the scripted model has no reply queued and echo is off")
        return f"You said: {text}"

    async def stream(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec]
    ) -> AsyncIterator[LLMChunk]:
        """Answer deterministically (see the class docstring)."""
        if self.requests.maxlen:
            self.requests.append(ScriptedRequest(list(messages), list(tools)))
        choice = self._pick(messages)
        if isinstance(choice, BaseException):
            raise choice
        if callable(choice) and not isinstance(choice, Reply):
            choice = choice(messages)
        reply = choice if isinstance(choice, Reply) else Reply(text=str(choice))
        async for chunk in self._emit(reply, messages):
            yield chunk


class FunctionLLM(_StreamingModel):
    """A model played by your function.

    Args:
        fn: Called with ``(messages, tools)``; returns (or, if async, resolves
            to) text or a :class:`Reply`. Exceptions it raises are the model
            failing.
        model: The model name reported in usage.
        context_window: The context size reported to the session.
        chunk_delay: Seconds between streamed words.
        keep_requests: How many of the latest calls ``.requests`` keeps.
    """

    def __init__(
        self,
        fn: Callable[[list[Message], list[ToolSpec]], str | Reply | Awaitable[str | Reply]],
        *,
        model: str = "function",
        context_window: int = 8192,
        chunk_delay: float = 0.0,
        keep_requests: int = 100,
    ) -> None:
        super().__init__(model, context_window, chunk_delay, keep_requests)
        self.provider = "function"
        self.fn = fn

    async def stream(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec]
    ) -> AsyncIterator[LLMChunk]:
        """Ask the function, then stream its answer."""
        if self.requests.maxlen:
            self.requests.append(ScriptedRequest(list(messages), list(tools)))
        result = self.fn(list(messages), list(tools))
        if inspect.isawaitable(result):
            result = await result
        reply = result if isinstance(result, Reply) else Reply(text=str(result))
        async for chunk in self._emit(reply, messages):
            yield chunk

"""The agent: runs one turn of the tool-calling loop. It knows nothing of storage."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from typing import Any, overload

from chatsession.agent.events import (
    AgentEvent,
    AssistantMessageEvent,
    ErrorEvent,
    StopEvent,
    TextEvent,
    ToolCallEvent,
    ToolResultEvent,
    UsageEvent,
)
from chatsession.agent.llm import LLM, Completion, TextDelta, ToolSpec, resolve_llm
from chatsession.agent.llm.base import estimate_text_tokens, estimate_tokens
from chatsession.agent.pricing import PriceTable
from chatsession.agent.tools import Tool, ToolContext, as_tools, schema_hash
from chatsession.errors import InvalidArgumentError, ModelError, ToolError
from chatsession.log import Message, ToolCall, Usage, replace

__all__ = ["Agent"]

ToolResultHook = Callable[[Message], Awaitable[Message]]

SUMMARY_PROMPT = (
    "Summarise the conversation so far for your own later use: the user's goals, facts "
    "learned, decisions made, tool results that matter, and open questions. Be brief and "
    "keep names, numbers and identifiers exact."
)

CUT_CALL_RESULT = (
    "Error: the answer hit the model's output limit (finish_reason 'length') while this tool "
    "call was being written, so its arguments may be cut off; the tool was not run. Ask again "
    "with a shorter request, or raise the model's max_tokens."
)
"""The result given to each tool call of an answer cut by the output limit (none is run)."""


class TurnContext(Sequence[Message]):
    """What the model is sent in a turn: a system prompt, the session's context
    and the turn's new messages, without copying the context (it can be long).

    A read-only sequence but for :meth:`append`, which adds a new message.
    """

    __slots__ = ("_base", "_head", "_new")

    def __init__(self, head: list[Message], base: Sequence[Message]) -> None:
        self._head = head
        self._base = base
        self._new: list[Message] = []

    def append(self, message: Message) -> None:
        """Add one of this turn's messages."""
        self._new.append(message)

    def __len__(self) -> int:
        return len(self._head) + len(self._base) + len(self._new)

    @overload
    def __getitem__(self, index: int) -> Message: ...

    @overload
    def __getitem__(self, index: slice) -> list[Message]: ...

    def __getitem__(self, index: int | slice) -> Message | list[Message]:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return list(self)[index]
            out: list[Message] = []
            for part in (self._head, self._base, self._new):
                size = len(part)
                if stop > 0 and start < size:
                    out.extend(part[max(start, 0) : min(stop, size)])
                start -= size
                stop -= size
            return out
        size = len(self)
        if index < 0:
            index += size
        if not 0 <= index < size:
            raise IndexError("context index out of range")
        for part in (self._head, self._base, self._new):
            if index < len(part):
                return part[index]
            index -= len(part)
        raise IndexError("context index out of range")  # not reached

    def __iter__(self) -> Iterator[Message]:
        yield from self._head
        yield from self._base
        yield from self._new

    def __reversed__(self) -> Iterator[Message]:
        yield from reversed(self._new)
        yield from reversed(self._base)
        yield from reversed(self._head)


class Agent:
    """An LLM with tools and a system prompt, running the tool-calling loop.

    Args:
        llm: A model object or spec (``scripted``, ``openai:MODEL``, ``local``);
            None picks the default (see :func:`resolve_llm`).
        tools: Tools (``@tool`` functions, or plain functions).
        system_prompt: Sent first in every model call (not stored in the log).
        max_steps: The most model calls in one turn.
        level: A tag for usage statistics (``main``, ``subagent``, ...).
        name: A name for the agent (recorded in the fingerprint).
        settings: Settings that matter for consistency checks on resume.
        prices: This agent's price table (a :class:`PriceTable`, or a mapping
            ``model -> (prompt, completion)`` US dollars per million tokens
            added to the defaults).
    """

    def __init__(
        self,
        llm: LLM | str | None = None,
        tools: Iterable[Tool | Callable[..., Any]] = (),
        *,
        system_prompt: str | None = None,
        max_steps: int = 10,
        level: str = "main",
        name: str | None = None,
        settings: dict[str, Any] | None = None,
        prices: PriceTable | Mapping[str, tuple[float, float]] | None = None,
    ) -> None:
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise InvalidArgumentError(
                f"max_steps must be a whole number, at least 1, not {max_steps!r}"
            )
        self.llm = resolve_llm(llm)
        self.tools = as_tools(tools)
        self._by_name = {t.name: t for t in self.tools}
        self.system_prompt = system_prompt
        self.max_steps = max_steps
        self.level = level
        self.name = name
        self.settings = dict(settings or {})
        self.prices = prices if isinstance(prices, PriceTable) else PriceTable(prices)

    # -- what the session asks --------------------------------------------------

    @property
    def context_window(self) -> int:
        """The model's context size in tokens, as far as known without I/O.

        :meth:`get_context_window` may ask the model's server instead.
        """
        return self.llm.context_window

    async def get_context_window(self) -> int:
        """The model's context size in tokens, asking its server the first time if needed.

        Uses the adapter's ``get_context_window()`` when it has one (the
        ``openai`` adapter asks the server once and caches the answer), else
        :attr:`context_window`.
        """
        getter = getattr(self.llm, "get_context_window", None)
        if getter is None:
            return self.llm.context_window
        return int(await getter())

    def count_tokens(self, messages: Sequence[Message]) -> int | None:
        """The context's size in the model's tokens (system prompt included), or None.

        May block (the ``local`` model loads and tokenizes here): from async
        code use :meth:`acount_tokens`.
        """
        return self.llm.count_tokens(self._with_system(messages))

    async def acount_tokens(self, messages: Sequence[Message]) -> int | None:
        """:meth:`count_tokens` without blocking the event loop.

        Uses the adapter's ``acount_tokens()`` when it has one (``local``
        tokenizes on a worker thread), else its ``count_tokens()``.
        """
        context = self._with_system(messages)
        counter = getattr(self.llm, "acount_tokens", None)
        if counter is None:
            return self.llm.count_tokens(context)
        counted = await counter(context)
        return None if counted is None else int(counted)

    async def aclose(self) -> None:
        """Release what the model adapter holds (HTTP connections); the agent stays usable."""
        closer = getattr(self.llm, "aclose", None)
        if closer is not None:
            await closer()

    def fingerprint(self) -> dict[str, Any]:
        """What must stay the same for a resumed session to mean the same thing.

        Full sha256 hashes of the system prompt and of the tool schemas.
        """
        prompt = self.system_prompt or ""
        return {
            "provider": self.llm.provider,
            "model": self.llm.model,
            "system_prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest(),
            "tool_schema_sha256": schema_hash(self.tools),
            "tools": sorted(self._by_name),
            "max_steps": self.max_steps,
            "level": self.level,
            "settings": json.loads(json.dumps(self.settings, sort_keys=True, default=str)),
        }

    def _with_system(self, messages: Sequence[Message]) -> TurnContext:
        head = [Message(role="system", content=self.system_prompt)] if self.system_prompt else []
        return TurnContext(head, messages)

    def _tool_specs(self) -> list[ToolSpec]:
        return [t.to_openai() for t in self.tools]

    def _usage(
        self, completion: Completion, context: Sequence[Message], specs: Sequence[ToolSpec] = ()
    ) -> Usage:
        usage = completion.usage
        if usage is None:
            # the tool schemas go out with the prompt; an empty answer cost nothing
            prompt = estimate_tokens(context)
            if specs:
                prompt += estimate_text_tokens(json.dumps(list(specs)))
            answer = completion.message
            out = estimate_tokens([answer]) if answer.text or answer.tool_calls else 0
            usage = Usage(
                model=self.llm.model,
                prompt_tokens=prompt,
                completion_tokens=out,
                total_tokens=prompt + out,
                estimated=True,
            )
        return replace(usage, level=self.level, cost=self.prices.cost(usage))

    def estimated_usage(self, messages: Sequence[Message], partial: str = "") -> Usage:
        """An estimate of a model call that never reported usage (timed out, killed, failed).

        The prompt is estimated from the messages, the system prompt and the
        tool schemas sent with them (about four characters a token, plus a few
        a message); the answer from ``partial`` (0 when nothing came).

        Args:
            messages: The context the call was sent (the system prompt is added).
            partial: The text the model produced before it stopped.

        Returns:
            A :class:`Usage` marked ``estimated``, with this agent's level and price.
        """
        message = Message(role="assistant", content=partial)
        return self._usage(Completion(message), self._with_system(messages), self._tool_specs())

    # -- the loop --------------------------------------------------------------

    async def _call_model(
        self, context: Sequence[Message], specs: Sequence[ToolSpec]
    ) -> AsyncIterator[TextEvent | Completion]:
        """One model call: text events, then its ``Completion``.

        Raises:
            ModelError: The adapter ended without a ``Completion`` (an answer
                with no finish reason is not a finished answer).
        """
        completion = None
        async for chunk in self.llm.stream(context, specs):
            if isinstance(chunk, TextDelta):
                yield TextEvent(chunk.text)
            else:
                completion = chunk
        if completion is None:
            raise ModelError(
                f"the model {self.llm.model!r} ({self.llm.provider}) ended its answer without "
                "a finish reason; what it produced is kept"
            )
        yield completion

    async def _run_tool(self, call: ToolCall, context: ToolContext | None) -> Message:
        tool = self._by_name.get(call.name)
        try:
            if tool is None:
                raise ToolError(
                    f"there is no tool named {call.name!r}; available: {sorted(self._by_name)}"
                )
            try:
                arguments = call.parsed_arguments()
            except ValueError as exc:
                raise ToolError(
                    f"arguments for {call.name!r} are not a JSON object: {exc}"
                ) from exc
            content = await tool.call(arguments, context)
            is_error = False
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as exc:  # the model sees the failure and can recover
            content = f"Error: {type(exc).__name__}: {exc}"
            is_error = True
        return Message(
            role="tool", content=content, tool_call_id=call.id, name=call.name, is_error=is_error
        )

    async def run(
        self,
        messages: Sequence[Message],
        *,
        on_tool_result: ToolResultHook | None = None,
        tool_context: ToolContext | None = None,
    ) -> AsyncIterator[AgentEvent]:
        """Run one turn on the given context and yield its events.

        Args:
            messages: The conversation so far, ending with the user's message.
            on_tool_result: Called with each tool result before the model sees
                it; returns the message to use instead (the session offloads
                large outputs this way).
            tool_context: Handed to tools that take a :class:`ToolContext`
                (the session passes its ``state`` this way).

        Yields:
            In order:

            - a normal answer: ``TextEvent`` deltas, ``AssistantMessageEvent``,
              ``UsageEvent``, ``StopEvent("end_turn", text)``;
            - a tool round (repeated up to ``max_steps`` model calls): the
              deltas, ``AssistantMessageEvent`` (with its tool calls),
              ``UsageEvent``, then per call ``ToolCallEvent`` and
              ``ToolResultEvent``; then the next model call;
            - an answer cut by the output limit (``finish_reason="length"``):
              ``AssistantMessageEvent`` with ``message.truncated``,
              ``UsageEvent``; without tool calls ``StopEvent("length", text)``;
              with tool calls none of them is run (their arguments may be cut
              off): a ``ToolResultEvent`` with ``is_error`` and
              :data:`CUT_CALL_RESULT` for each (no ``ToolCallEvent``), then
              ``StopEvent("length", text)``;
            - a failed model call (an HTTP error, a broken stream, a stream
              with no finish reason): the deltas that came, ``ErrorEvent``
              (its ``exception`` a :class:`~chatsession.errors.ModelError`),
              ``StopEvent("error", text streamed in that call)``;
            - ``StopEvent("max_steps", text)`` when the step limit ends the loop.

            Cancellation and Ctrl+C propagate.
        """
        context = self._with_system(messages)
        specs = self._tool_specs()
        last_text = ""
        for _ in range(self.max_steps):
            completion: Completion | None = None
            partial: list[str] = []
            try:
                async for item in self._call_model(context, specs):
                    if isinstance(item, TextEvent):
                        partial.append(item.content)
                        yield item
                    else:
                        completion = item
                if completion is None:  # _call_model raises first; kept for -O safety
                    raise ModelError(f"the model {self.llm.model!r} gave no answer")
            except (asyncio.CancelledError, KeyboardInterrupt, GeneratorExit):
                raise
            except Exception as exc:
                error = (
                    exc
                    if isinstance(exc, ModelError)
                    else ModelError(
                        f"the model {self.llm.model!r} failed: {type(exc).__name__}: {exc}"
                    )
                )
                yield ErrorEvent(str(error), error)
                yield StopEvent("error", "".join(partial))
                return
            message = completion.message
            truncated = completion.finish_reason == "length"
            if truncated and not message.truncated:
                message = replace(message, truncated=True)
            last_text = message.text
            yield AssistantMessageEvent(message)
            yield UsageEvent(self._usage(completion, context, specs))
            context.append(message)
            if not message.tool_calls:
                yield StopEvent("length" if truncated else "end_turn", message.text)
                return
            if truncated:
                for call in message.tool_calls:
                    result = Message(
                        role="tool",
                        content=CUT_CALL_RESULT,
                        tool_call_id=call.id,
                        name=call.name,
                        is_error=True,
                    )
                    context.append(result)
                    yield ToolResultEvent(call.id, call.name, result.text, True, result)
                yield StopEvent("length", message.text)
                return
            for call in message.tool_calls:
                yield ToolCallEvent(call)
                result = await self._run_tool(call, tool_context)
                if on_tool_result is not None:
                    result = await on_tool_result(result)
                context.append(result)
                yield ToolResultEvent(call.id, call.name, result.text, result.is_error, result)
        yield StopEvent("max_steps", last_text)

    async def summarize(self, messages: Sequence[Message]) -> tuple[str, Usage]:
        """Summarise messages with the model (for compaction), usage tagged ``compaction``.

        Raises:
            ModelError: The model call failed.
        """
        transcript = "\n".join(f"{m.role}: {m.text}" for m in messages if m.text)
        context = [
            Message(role="system", content=SUMMARY_PROMPT),
            Message(role="user", content=transcript),
        ]
        completion: Completion | None = None
        async for item in self._call_model(context, ()):
            if isinstance(item, Completion):
                completion = item
        if completion is None:  # _call_model raises first; kept for -O safety
            raise ModelError(f"the model {self.llm.model!r} gave no summary")
        usage = replace(self._usage(completion, context), level="compaction")
        return completion.message.text, usage

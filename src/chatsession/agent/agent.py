"""The agent: runs one turn of the tool-calling loop. It knows nothing of storage."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

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
from chatsession.agent.llm import LLM, Completion, TextDelta, resolve_llm
from chatsession.agent.llm.base import estimate_tokens
from chatsession.agent.pricing import PriceTable
from chatsession.agent.tools import Tool, ToolContext, as_tools, schema_hash
from chatsession.errors import ModelError, ToolError, UsageError
from chatsession.log import Message, ToolCall, Usage

__all__ = ["Agent"]

ToolResultHook = Callable[[Message], Awaitable[Message]]

SUMMARY_PROMPT = (
    "Summarise the conversation so far for your own later use: the user's goals, facts "
    "learned, decisions made, tool results that matter, and open questions. Be brief and "
    "keep names, numbers and identifiers exact."
)


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
        if max_steps < 1:
            raise UsageError(f"max_steps must be at least 1, not {max_steps}")
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
        """The model's context size in tokens."""
        return self.llm.context_window

    def count_tokens(self, messages: Sequence[Message]) -> int | None:
        """The context's size in the model's tokens (system prompt included), or None."""
        return self.llm.count_tokens(self._with_system(messages))

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

    def _with_system(self, messages: Sequence[Message]) -> list[Message]:
        if self.system_prompt:
            return [Message(role="system", content=self.system_prompt), *messages]
        return list(messages)

    def _usage(self, completion: Completion, context: Sequence[Message]) -> Usage:
        usage = completion.usage
        if usage is None:
            prompt = estimate_tokens(context)
            out = estimate_tokens([completion.message])
            usage = Usage(
                model=self.llm.model,
                prompt_tokens=prompt,
                completion_tokens=out,
                total_tokens=prompt + out,
                estimated=True,
            )
        return usage.model_copy(update={"level": self.level, "cost": self.prices.cost(usage)})

    def estimated_usage(self, messages: Sequence[Message], partial: str = "") -> Usage:
        """An estimate of a model call that never reported usage (timed out, killed, failed).

        Args:
            messages: The context the call was sent (the system prompt is added).
            partial: The text the model produced before it stopped.

        Returns:
            A :class:`Usage` marked ``estimated``, with this agent's level and price.
        """
        message = Message(role="assistant", content=partial)
        return self._usage(Completion(message), self._with_system(messages))

    # -- the loop --------------------------------------------------------------

    async def _call_model(self, context: list[Message]) -> AsyncIterator[TextEvent | Completion]:
        specs = [t.to_openai() for t in self.tools]
        text: list[str] = []
        completion = None
        async for chunk in self.llm.stream(context, specs):
            if isinstance(chunk, TextDelta):
                text.append(chunk.text)
                yield TextEvent(chunk.text)
            else:
                completion = chunk
        if completion is None:
            completion = Completion(Message(role="assistant", content="".join(text)))
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
            ``TextEvent`` deltas; per model call an ``AssistantMessageEvent``
            and a ``UsageEvent``; per tool call a ``ToolCallEvent`` and a
            ``ToolResultEvent``; finally a ``StopEvent`` (after an
            ``ErrorEvent`` when the model failed). Cancellation and Ctrl+C
            propagate.
        """
        context = self._with_system(messages)
        last_text = ""
        for _ in range(self.max_steps):
            completion: Completion | None = None
            partial: list[str] = []
            try:
                async for item in self._call_model(context):
                    if isinstance(item, TextEvent):
                        partial.append(item.content)
                        yield item
                    else:
                        completion = item
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
            assert completion is not None
            message = completion.message
            last_text = message.text
            yield AssistantMessageEvent(message)
            yield UsageEvent(self._usage(completion, context))
            context.append(message)
            if not message.tool_calls:
                yield StopEvent("end_turn", message.text)
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
        """Summarise messages with the model (for compaction), usage tagged ``compaction``."""
        transcript = "\n".join(f"{m.role}: {m.text}" for m in messages if m.text)
        context = [
            Message(role="system", content=SUMMARY_PROMPT),
            Message(role="user", content=transcript),
        ]
        completion: Completion | None = None
        async for item in self._call_model(context):
            if isinstance(item, Completion):
                completion = item
        assert completion is not None
        usage = self._usage(completion, context).model_copy(update={"level": "compaction"})
        return completion.message.text, usage

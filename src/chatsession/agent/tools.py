"""Tools the model can call: ``@tool`` builds the JSON schema from a function.

The parameters' types come from the type hints (``str``, ``int``, ``float``,
``bool``, lists, dicts, ``Optional``, ``Literal``, enums, pydantic models),
their descriptions from the Google-style docstring's ``Args:`` section, and
the tool's description from the docstring's first paragraph (or the
decorator's argument)::

    @tool
    def get_weather(city: str, unit: Literal["C", "F"] = "C") -> str:
        '''The weather in a city.

        Args:
            city: The city's name.
            unit: Celsius or Fahrenheit.
        '''

Sync tools run in a worker thread so they never block the event loop.

A tool that declares a parameter typed :class:`ToolContext` gets the running
session's context there (its persisted ``state`` key-values, its id and the
turn's id); that parameter is not part of the schema the model sees::

    @tool
    def remember(fact: str, ctx: ToolContext) -> str:
        '''Remember a fact for later turns.

        Args:
            fact: What to remember.
        '''
        ctx.state.setdefault("facts", []).append(fact)
        return "noted"
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, get_type_hints, overload

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from chatsession.errors import ToolError, UsageError

__all__ = ["Tool", "ToolContext", "schema_hash", "tool"]


@dataclass
class ToolContext:
    """What a tool receives when it declares a parameter of this type.

    Attributes:
        state: The session's key-value state (JSON values). Changes are saved
            with the turn that makes them and restored on resume; without a
            session (an agent run on its own) it is a fresh dict.
        session_id: The running session's id, if any.
        turn_id: The running turn's id, if any.
    """

    state: dict[str, Any] = field(default_factory=dict)
    session_id: str | None = None
    turn_id: str | None = None


_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _docstring_parts(doc: str | None) -> tuple[str, dict[str, str]]:
    """The description and the ``Args:`` descriptions of a Google-style docstring."""
    text = inspect.cleandoc(doc or "")
    if not text:
        return "", {}
    sections = re.split(r"\n\s*\n", text)
    description = sections[0].replace("\n", " ").strip()
    args: dict[str, str] = {}
    match = re.search(r"^Args:\s*\n(.*?)(?:^\S.*:\s*$|\Z)", text, re.S | re.M)
    if match:
        current = None
        for line in match.group(1).splitlines():
            found = re.match(r"^\s+(\*{0,2}\w+)(?:\s*\(.*?\))?:\s*(.*)$", line)
            if found and (current is None or len(line) - len(line.lstrip()) <= 8):
                current = found.group(1).lstrip("*")
                args[current] = found.group(2).strip()
            elif current is not None and line.strip():
                args[current] = (args[current] + " " + line.strip()).strip()
    return description, args


def _strip_titles(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {
            k: _strip_titles(v)
            for k, v in schema.items()
            if not (k == "title" and isinstance(v, str))
        }
    if isinstance(schema, list):
        return [_strip_titles(v) for v in schema]
    return schema


class Tool:
    """A function the model can call.

    Attributes:
        name: The name the model uses.
        description: What the tool does (from the docstring).
        parameters: The JSON schema of the arguments.
        fn: The wrapped function.
    """

    def __init__(
        self, fn: Callable[..., Any], *, name: str | None = None, description: str | None = None
    ) -> None:
        if not callable(fn):
            raise UsageError(f"@tool needs a function, got {fn!r}")
        self.fn = fn
        self.name = name or fn.__name__
        if _NAME_RE.fullmatch(self.name) is None:
            raise UsageError(f"tool name {self.name!r} must be 1-64 letters, digits, '_' or '-'")
        doc_description, arg_docs = _docstring_parts(fn.__doc__)
        self.description = description or doc_description or self.name
        self.is_async = inspect.iscoroutinefunction(fn)
        signature = inspect.signature(fn)
        try:
            hints = get_type_hints(fn)
        except Exception as exc:  # unresolvable annotations
            raise UsageError(f"cannot read the type hints of tool {self.name!r}: {exc}") from exc
        fields: dict[str, Any] = {}
        self._context_param: str | None = None
        for param in signature.parameters.values():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise UsageError(f"tool {self.name!r} cannot take *args or **kwargs")
            annotation = hints.get(param.name, Any)
            if annotation is ToolContext:
                if self._context_param is not None:
                    raise UsageError(f"tool {self.name!r} takes more than one ToolContext")
                self._context_param = param.name
                continue
            default = ... if param.default is param.empty else param.default
            fields[param.name] = (
                annotation,
                Field(default, description=arg_docs.get(param.name) or None),
            )
        self._model: type[BaseModel] = create_model(
            f"{self.name}_arguments", __config__=ConfigDict(extra="forbid"), **fields
        )
        schema = _strip_titles(self._model.model_json_schema())
        schema.pop("additionalProperties", None)
        schema.setdefault("properties", {})
        schema["type"] = "object"
        self.parameters: dict[str, Any] = schema

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function directly, as if it were not a tool."""
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Tool({self.name!r})"

    def to_openai(self) -> dict[str, Any]:
        """The tool in the OpenAI ``tools`` format."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }

    async def call(self, arguments: dict[str, Any], context: ToolContext | None = None) -> str:
        """Validate the arguments, run the function and return its result as text.

        Args:
            arguments: The model's arguments (a JSON object).
            context: Given to a parameter typed :class:`ToolContext`, if the
                tool has one (a fresh, empty context when None).

        Raises:
            ToolError: The arguments do not fit the schema.
            Exception: Whatever the function raises.
        """
        try:
            validated = self._model.model_validate(arguments)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}" for e in exc.errors()
            )
            raise ToolError(f"bad arguments for tool {self.name!r}: {problems}") from exc
        kwargs = {name: getattr(validated, name) for name in type(validated).model_fields}
        if self._context_param is not None:
            kwargs[self._context_param] = context if context is not None else ToolContext()
        if self.is_async:
            result = await self.fn(**kwargs)
        else:
            result = await asyncio.to_thread(self.fn, **kwargs)
        if isinstance(result, str):
            return result
        if isinstance(result, BaseModel):
            return result.model_dump_json()
        try:
            return json.dumps(result, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            return str(result)


@overload
def tool(fn: Callable[..., Any], /) -> Tool: ...


@overload
def tool(
    description: str | None = None, /, *, name: str | None = None
) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(
    fn: Callable[..., Any] | str | None = None, /, *, name: str | None = None
) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Make a function a tool: ``@tool``, ``@tool("description")`` or ``@tool(name=...)``.

    Args:
        fn: The function (when used as ``@tool``) or a description string.
        name: The name the model sees (default: the function's name).
    """
    if callable(fn):
        return Tool(fn, name=name)
    description = fn

    def decorate(function: Callable[..., Any]) -> Tool:
        return Tool(function, name=name, description=description)

    return decorate


def as_tools(items: Iterable[Tool | Callable[..., Any]]) -> list[Tool]:
    """Tools from tools or plain functions; names must be unique."""
    tools = [item if isinstance(item, Tool) else Tool(item) for item in items]
    names = [t.name for t in tools]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UsageError(f"two tools share the name(s) {duplicates}; give one another name")
    return tools


def schema_hash(tools: Iterable[Tool]) -> str:
    """The sha256 of the canonical JSON of all tool schemas (order-independent)."""
    specs = sorted((t.to_openai() for t in tools), key=lambda s: s["function"]["name"])
    canonical = json.dumps(specs, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()

"""Agents, tools and models: everything that runs a turn. No storage here."""

from __future__ import annotations

from chatsession.agent.agent import Agent
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
from chatsession.agent.llm import LLM, FunctionLLM, Reply, ScriptedLLM, resolve_llm
from chatsession.agent.pricing import DEFAULT_PRICES, PriceTable, cost_of
from chatsession.agent.tools import Tool, ToolContext, schema_hash, tool

__all__ = [
    "DEFAULT_PRICES",
    "LLM",
    "Agent",
    "AgentEvent",
    "AssistantMessageEvent",
    "ErrorEvent",
    "FunctionLLM",
    "PriceTable",
    "Reply",
    "ScriptedLLM",
    "StopEvent",
    "TextEvent",
    "Tool",
    "ToolCallEvent",
    "ToolContext",
    "ToolResultEvent",
    "UsageEvent",
    "cost_of",
    "resolve_llm",
    "schema_hash",
    "tool",
]

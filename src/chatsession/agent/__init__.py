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
from chatsession.agent.pricing import PRICES, cost_of, register_price
from chatsession.agent.tools import Tool, schema_hash, tool

__all__ = [
    "LLM",
    "PRICES",
    "Agent",
    "AgentEvent",
    "AssistantMessageEvent",
    "ErrorEvent",
    "FunctionLLM",
    "Reply",
    "ScriptedLLM",
    "StopEvent",
    "TextEvent",
    "Tool",
    "ToolCallEvent",
    "ToolResultEvent",
    "UsageEvent",
    "cost_of",
    "register_price",
    "resolve_llm",
    "schema_hash",
    "tool",
]

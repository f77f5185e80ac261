"""Usage and context accounting: what a session's model calls used, how full its context is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from chatsession.agent import Agent
from chatsession.agent.llm.base import estimate_tokens
from chatsession.log import ConversationState, Message, UsageTotals
from chatsession.log.state import sum_totals

__all__ = ["ContextInfo", "ModelUsage", "UsageSummary", "context_info", "usage_summary"]

#: Token usage of one model, one level, or a fork's inherited history: the one
#: usage-totals type (``chatsession.log.UsageTotals``), under its public name.
ModelUsage = UsageTotals


@dataclass(frozen=True)
class UsageSummary:
    """What a session's model calls used, from :meth:`ChatSession.get_usage`.

    For a fork, the main figures are the fork's own; ``inherited`` is what
    the shared history (before the fork point) used, and ``including_inherited``
    both together. Nothing is counted twice.

    Attributes:
        total_prompt_tokens: Prompt tokens of this session's own calls.
        total_completion_tokens: Completion tokens of this session's own calls.
        total_tokens: Both.
        total_cost: US dollars, from the price table (0 where unknown).
        calls: Model calls made.
        estimated: True when some of the own figures are local estimates
            (see :attr:`ModelUsage.estimated`).
        by_model: Own usage per model.
        by_level: Own usage per agent level (main, subagent, compaction, ...).
        inherited: Usage of the history shared with the parent (forks only).
        including_inherited: Own plus inherited.
    """

    total_prompt_tokens: int
    total_completion_tokens: int
    total_tokens: int
    total_cost: float
    calls: int
    estimated: bool
    by_model: dict[str, ModelUsage]
    by_level: dict[str, ModelUsage]
    inherited: ModelUsage
    including_inherited: ModelUsage


def usage_summary(
    state: ConversationState, inherited: dict[tuple[str, str], UsageTotals]
) -> UsageSummary:
    """The summary of ``state``'s usage, a fork's ``inherited`` part set apart."""
    own: dict[tuple[str, str], UsageTotals] = {}
    for key, group in state.usage_groups.items():
        mine = group.minus(inherited[key]) if key in inherited else group.copy()
        if mine.calls:
            own[key] = mine
    by_model: dict[str, UsageTotals] = {}
    by_level: dict[str, UsageTotals] = {}
    total = UsageTotals()
    for (model, level), group in own.items():
        by_model.setdefault(model, UsageTotals()).merge(group)
        by_level.setdefault(level, UsageTotals()).merge(group)
        total.merge(group)
    before = sum_totals(inherited.values())
    return UsageSummary(
        total_prompt_tokens=total.prompt_tokens,
        total_completion_tokens=total.completion_tokens,
        total_tokens=total.total_tokens,
        total_cost=total.cost,
        calls=total.calls,
        estimated=total.estimated,
        by_model=by_model,
        by_level=by_level,
        inherited=before,
        including_inherited=state.usage,
    )


@dataclass(frozen=True)
class ContextInfo:
    """How full the model's context is, from :meth:`ChatSession.get_context_info`.

    Attributes:
        current_tokens: Tokens of the context the model would see now.
        budget_tokens: The context budget (the model's window or the setting).
        conversation_items: The messages in context.
        utilisation: ``current_tokens / budget_tokens``.
        method: ``provider`` (last reported prompt + completion, plus an
            estimate of newer messages), ``tokenizer`` (the model's own), or
            ``estimate`` (about four characters a token).
        estimated: True unless the figure is exact.
    """

    current_tokens: int
    budget_tokens: int
    conversation_items: list[Message]
    utilisation: float
    method: Literal["provider", "tokenizer", "estimate"]
    estimated: bool


async def context_info(
    state: ConversationState, agent: Agent, budget_tokens: int | None
) -> ContextInfo:
    """How many tokens the model's context holds, against the budget."""
    context = state.context
    messages = state.messages
    budget = budget_tokens or await agent.get_context_window()
    exact = await agent.acount_tokens(messages)
    method: Literal["provider", "tokenizer", "estimate"]
    last = state.last_usage
    if exact is not None:
        current, method = exact, "tokenizer"
    elif last is not None and not last[1].estimated and context and last[0] > context[0][0]:
        newer = [m for s, m in context if s > last[0]]
        current = last[1].prompt_tokens + last[1].completion_tokens + estimate_tokens(newer)
        method = "provider"
    else:
        current, method = estimate_tokens(messages), "estimate"
    return ContextInfo(
        current_tokens=current,
        budget_tokens=budget,
        conversation_items=messages,
        utilisation=current / budget if budget else 0.0,
        method=method,
        estimated=method != "tokenizer",
    )

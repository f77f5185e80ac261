"""Prices of models, to turn token counts into cost.

Prices are US dollars per million tokens. Add your own with
:func:`register_price`; a model not in the table has no cost (None).
"""

from __future__ import annotations

from chatsession.log import Usage

__all__ = ["PRICES", "cost_of", "register_price"]

#: model -> (prompt $ per 1M tokens, completion $ per 1M tokens)
PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "deepseek-chat": (0.27, 1.10),
    "scripted": (0.0, 0.0),
    "SmolLM2-135M-Instruct": (0.0, 0.0),
}


def register_price(model: str, prompt_per_million: float, completion_per_million: float) -> None:
    """Add or change a model's price (US dollars per million tokens)."""
    if prompt_per_million < 0 or completion_per_million < 0:
        raise ValueError("prices cannot be negative")
    PRICES[model] = (float(prompt_per_million), float(completion_per_million))


def cost_of(usage: Usage) -> float | None:
    """The cost of a usage in US dollars, or None when the model's price is unknown."""
    price = PRICES.get(usage.model)
    if price is None:
        # "openai:gpt-4o-mini-2024-07-18" and the like: try the longest known prefix
        for name in sorted(PRICES, key=len, reverse=True):
            if usage.model.startswith(name):
                price = PRICES[name]
                break
    if price is None:
        return None
    return (usage.prompt_tokens * price[0] + usage.completion_tokens * price[1]) / 1_000_000

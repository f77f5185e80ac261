"""Prices of models, to turn token counts into cost.

Prices are US dollars per million tokens. :data:`DEFAULT_PRICES` is a
read-only table of well-known models; each :class:`~chatsession.Agent` has its
own :class:`PriceTable` (``Agent(..., prices=...)``), so adding a price never
changes another agent's figures. A model not in the table has no cost (None).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from types import MappingProxyType

from chatsession.errors import InvalidArgumentError
from chatsession.log import Usage

__all__ = ["DEFAULT_PRICES", "PriceTable", "cost_of"]

#: model -> (prompt $ per 1M tokens, completion $ per 1M tokens); read-only.
DEFAULT_PRICES: Mapping[str, tuple[float, float]] = MappingProxyType(
    {
        "gpt-4o": (2.50, 10.00),
        "gpt-4o-mini": (0.15, 0.60),
        "gpt-4.1": (2.00, 8.00),
        "gpt-4.1-mini": (0.40, 1.60),
        "gpt-4.1-nano": (0.10, 0.40),
        "deepseek-chat": (0.27, 1.10),
        "scripted": (0.0, 0.0),
        "SmolLM2-135M-Instruct": (0.0, 0.0),
    }
)


def _checked(model: str, price: tuple[float, float]) -> tuple[float, float]:
    if not isinstance(model, str) or not model:
        raise InvalidArgumentError(f"a price needs a model name, got {model!r}")
    try:
        prompt, completion = (float(p) for p in price)
    except (TypeError, ValueError):
        raise InvalidArgumentError(
            f"the price of {model!r} must be (prompt, completion) US dollars per million "
            f"tokens, got {price!r}"
        ) from None
    if not (math.isfinite(prompt) and math.isfinite(completion)) or prompt < 0 or completion < 0:
        raise InvalidArgumentError(
            f"the price of {model!r} must be finite and not negative: {price!r}"
        )
    return prompt, completion


class PriceTable(Mapping[str, tuple[float, float]]):
    """Model prices in US dollars per million tokens: ``model -> (prompt, completion)``.

    Args:
        prices: Prices to add to (or change in) the defaults.
        defaults: Start from :data:`DEFAULT_PRICES` (True) or from nothing.

    A model id such as ``gpt-4o-mini-2024-07-18`` takes the price of the
    longest known name it starts with.
    """

    def __init__(
        self, prices: Mapping[str, tuple[float, float]] | None = None, *, defaults: bool = True
    ) -> None:
        self._prices: dict[str, tuple[float, float]] = dict(DEFAULT_PRICES) if defaults else {}
        for model, price in (prices or {}).items():
            self.set(model, *price)

    def set(self, model: str, prompt_per_million: float, completion_per_million: float) -> None:
        """Add or change a model's price in this table.

        Raises:
            InvalidArgumentError: The name is empty or a price is negative, infinite
                or not a number.
        """
        self._prices[model] = _checked(model, (prompt_per_million, completion_per_million))

    def __getitem__(self, model: str) -> tuple[float, float]:
        return self._prices[model]

    def __iter__(self) -> Iterator[str]:
        return iter(self._prices)

    def __len__(self) -> int:
        return len(self._prices)

    def __repr__(self) -> str:
        return f"PriceTable({self._prices!r})"

    def cost(self, usage: Usage) -> float | None:
        """The cost of a usage in US dollars, or None when the model's price is unknown."""
        return cost_of(usage, self)


def cost_of(
    usage: Usage, prices: Mapping[str, tuple[float, float]] = DEFAULT_PRICES
) -> float | None:
    """The cost of a usage in US dollars from ``prices``, or None when the model is unknown."""
    price = prices.get(usage.model)
    if price is None:
        # "openai:gpt-4o-mini-2024-07-18" and the like: try the longest known prefix
        for name in sorted(prices, key=len, reverse=True):
            if usage.model.startswith(name):
                price = prices[name]
                break
    if price is None:
        return None
    return (usage.prompt_tokens * price[0] + usage.completion_tokens * price[1]) / 1_000_000

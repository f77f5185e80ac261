"""Tools the session tests share."""

from __future__ import annotations

from chatsession import tool


@tool
def add(a: int, b: int) -> int:
    """Add two numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b

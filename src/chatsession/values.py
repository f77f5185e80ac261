"""The agent's state: key-values a session keeps, refused at assignment when unstorable.

:class:`AgentState` is the ``dict`` behind ``ChatSession.state`` and
``ToolContext.state``. Setting a key to a value no store could give back
exactly (see :func:`~chatsession.store.base.check_json_value`) raises
:class:`~chatsession.errors.UnsupportedValueError` at once, where the
mistake is made. A value changed in place (``state["list"].append(x)``) is
checked when the tool returns and when the state is saved.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from chatsession.store.base import MAX_JSON_DEPTH, check_json_value

__all__ = ["STATE_DEPTH", "AgentState", "check_state"]

#: State values sit one level inside their event's payload (``{"values": {...}}``).
STATE_DEPTH = MAX_JSON_DEPTH - 1


def check_state(values: Mapping[str, Any], what: str = "state") -> None:
    """Refuse key-values that cannot be stored exactly (:class:`UnsupportedValueError`)."""
    check_json_value(
        dict(values) if type(values) is not dict else values, what, max_depth=STATE_DEPTH
    )


class AgentState(dict[str, Any]):
    """A ``dict`` of JSON values that refuses, on assignment, what cannot be stored.

    Raises:
        UnsupportedValueError: From ``state[key] = value``, ``update``,
            ``setdefault`` and ``|=`` when a key is not a ``str`` or a value
            is not JSON (NaN, tuples, sets, objects, lone surrogates, too deep).
    """

    def __init__(self, values: Mapping[str, Any] | Iterable[tuple[str, Any]] = (), /) -> None:
        initial = dict(values)
        check_state(initial)
        super().__init__(initial)

    def __setitem__(self, key: str, value: Any) -> None:
        check_state({key: value})
        super().__setitem__(key, value)

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Like ``dict.update``; every new value is checked first (all or nothing)."""
        new = dict(*args, **kwargs)
        check_state(new)
        super().update(new)

    def setdefault(self, key: str, default: Any = None, /) -> Any:
        """Like ``dict.setdefault``; a default that is stored is checked first."""
        if key not in self:
            self[key] = default
        return self[key]

    def __ior__(self, other: Any) -> AgentState:  # type: ignore[override,misc]
        self.update(other)
        return self

    def snapshot(self) -> dict[str, Any]:
        """A deep, plain-``dict`` copy (what would be saved now)."""
        return copy.deepcopy(dict(self))

    def restore(self, values: Mapping[str, Any]) -> None:
        """Replace everything with a deep copy of ``values`` (already known to be storable)."""
        super().clear()
        super().update(copy.deepcopy(dict(values)))

    def __deepcopy__(self, memo: dict[int, Any]) -> AgentState:
        copied = AgentState.__new__(AgentState)
        dict.update(copied, copy.deepcopy(dict(self), memo))
        return copied

    def __reduce__(self) -> Any:  # pickles as a plain dict's items
        return (AgentState, (dict(self),))

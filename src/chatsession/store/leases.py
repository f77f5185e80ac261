"""The lease rules, as pure functions over what a store keeps about a session's lease.

A store keeps, per session, the current lease (``owner``, ``token``,
``expires_at``; expired or not, until released) and the highest token it has
handed out. These functions decide, from that and the store's clock, what
``acquire_lease``, ``renew_lease`` and a fenced ``append`` do; the store runs
them inside its own atomic step (a lock, a transaction) and writes the result.
The embedded backends (memory, SQLite, ``file://``) use them; Redis and
PostgreSQL, which decide in the server, follow the same rules.
"""

from __future__ import annotations

from chatsession.errors import InvalidArgumentError, LeaseLostError, SessionBusyError
from chatsession.store.checks import check_lease
from chatsession.store.types import Lease

__all__ = ["check_lease_for", "check_writer", "granted", "renewed"]


def check_lease_for(lease: object, session_id: str) -> Lease:
    """Refuse, before any I/O, what is not a lease of ``session_id`` (for a fenced append).

    Raises:
        InvalidArgumentError: Not a :class:`Lease` a store handed out
            (:func:`~chatsession.store.checks.check_lease`), or one of another
            session (its token means nothing for this one).
    """
    checked = check_lease(lease)
    if checked.session_id != session_id:
        raise InvalidArgumentError(
            f"the lease passed is for session {checked.session_id!r}, not {session_id!r}: "
            "pass the lease acquire_lease() gave for this session"
        )
    return checked


def granted(
    session_id: str, held: Lease | None, last_token: int, owner: str, ttl: float, at: float
) -> Lease:
    """The lease ``acquire_lease(session_id, owner, ttl)`` hands out at time ``at``.

    The holder asking again keeps its token (a renewal); a new holder gets
    ``last_token + 1``.

    Args:
        session_id: The session.
        held: The current lease, expired or not; None when none is held.
        last_token: The highest token handed out for the session (0: none yet).
        owner: Who asks.
        ttl: For how many seconds.
        at: Now, by the store's clock.

    Raises:
        SessionBusyError: Another owner holds a live lease.
    """
    if held is not None and held.expires_at > at:
        if held.owner != owner:
            raise SessionBusyError(session_id, held.owner, held.expires_at - at)
        return Lease(session_id, owner, held.token, at + ttl)
    return Lease(session_id, owner, max(last_token, held.token if held else 0) + 1, at + ttl)


def renewed(lease: Lease, held: Lease | None, ttl: float, at: float) -> Lease:
    """``lease`` extended to ``ttl`` seconds from ``at``, if it is still the held one.

    A lease that expired but that nobody took since is renewed too.

    Raises:
        LeaseLostError: It was released, or another owner took the session.
    """
    if held is None or held.token != lease.token:
        raise LeaseLostError(lease.session_id, lease.token, "it was taken over or released")
    return held._replace(expires_at=at + ttl)


def check_writer(session_id: str, held: Lease | None, lease: Lease | None, at: float) -> None:
    """Raise unless a write may happen now (see ``Store.append``).

    With ``lease``: it must be the held one and not expired. Without: no
    other writer may hold a live lease.

    Raises:
        LeaseLostError: ``lease`` expired, was released or was taken over.
        SessionBusyError: No ``lease`` was given and a live one is held.
    """
    if lease is not None:
        if held is None or held.token != lease.token:
            raise LeaseLostError(session_id, lease.token, "it was taken over or released")
        if held.expires_at <= at:
            raise LeaseLostError(session_id, lease.token, "it expired")
    elif held is not None and held.expires_at > at:
        raise SessionBusyError(session_id, held.owner, held.expires_at - at)

"""What a driver or network error means: an outage, a lost connection, a retry, or a fault.

:class:`~chatsession.store.postgres.connection.Connection` uses these to
translate asyncpg's errors at the store's boundary and to decide what is sent
again on a fresh connection.
"""

from __future__ import annotations

import asyncpg.exceptions as pgerr

#: The server or the network is down, refuses service, or did not answer in time.
OUTAGE: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable; TimeoutError (command_timeout) is one too
    pgerr.PostgresConnectionError,  # class 08: the connection failed or was lost
    pgerr.OperatorInterventionError,  # class 57: shutting down, starting up, cancelled
    pgerr.InsufficientResourcesError,  # class 53: too many connections, disk full, no memory
    pgerr.PostgresSystemError,  # class 58: an I/O error on the server
    pgerr.LockNotAvailableError,  # lock_timeout ran out
    pgerr.ReadOnlySQLTransactionError,  # a standby, or the server is read-only
)

#: Aborted by the server to break a deadlock or a serialization conflict:
#: nothing was written, so the call is tried again.
RETRY: tuple[type[BaseException], ...] = (
    pgerr.DeadlockDetectedError,
    pgerr.SerializationError,
)

#: The server ended the session: shut down, crashed, or timed it out while idle.
_SESSION_ENDED: tuple[type[BaseException], ...] = (
    pgerr.AdminShutdownError,  # 57P01: a shutdown or pg_terminate_backend
    pgerr.CrashShutdownError,  # 57P02
    pgerr.IdleSessionTimeoutError,  # 57P05
    pgerr.ConnectionDoesNotExistError,  # closed in the middle of the call
    ConnectionResetError,
    BrokenPipeError,
)


def connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says that the connection the call used was lost (not that
    the server cannot be reached): a fresh connection may well work."""
    if isinstance(exc, _SESSION_ENDED):
        return True
    message = str(exc)
    # asyncpg's plain InterfaceError says "connection is closed" when the server
    # went away between calls, and "released back to the pool" when it closed the
    # connection we held (asyncpg then detaches our proxy); its subclasses are
    # configuration errors. A connection that took the server's goodbye while
    # idle refuses the next statement ("cannot switch to state ...").
    if type(exc) is pgerr.InterfaceError:
        return "is closed" in message or "released back to the pool" in message
    return isinstance(exc, pgerr.InternalClientError) and "cannot switch to state" in message


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` means the server cannot be used now (down, busy, or the link lost)."""
    return isinstance(exc, OUTAGE) or connection_lost(exc)


def describe(exc: BaseException) -> str:
    """``Type: message; detail`` of a driver error, for messages."""
    text = f"{type(exc).__name__}: {exc}"
    detail = getattr(exc, "detail", None)
    return f"{text}; {detail}" if detail else text

"""Every exception chatsession raises, in one tree.

Usage mistakes (the caller's code must change) are kept apart from run-time
failures (the world did something: a conflict, an outage, a corrupt file)::

    ChatSessionError
    ├── UsageError                      the calling code is wrong
    │   ├── InvalidArgumentError        a bad argument value (range, type, cursor)
    │   │   ├── InvalidIdError          an id unsafe as a file name or key
    │   │   └── UnsupportedValueError   a value no store can keep exactly (refused, nothing written)
    │   ├── InvalidURLError             a store URL that cannot be used
    │   ├── MissingDependencyError      an optional extra is not installed
    │   └── ChatSessionClosedError      a closed session was used
    ├── StoreError                      the store could not do what was asked
    │   ├── SessionNotFoundError        no such (visible) session
    │   ├── SessionExistsError          create() with an id already taken
    │   ├── ConflictError               the head or version moved (optimistic concurrency)
    │   │   ├── SessionBusyError        another writer holds the session's lease
    │   │   └── LeaseLostError          our lease expired or was taken: nothing was written
    │   ├── SessionLimitError           the user has as many sessions as they may
    │   ├── SessionArchivedError        the session is archived: read-only
    │   ├── BlobNotFoundError           no blob with that id for the session
    │   ├── StoreUnavailableError       the store cannot be reached or refused service
    │   └── CorruptDataError            stored bytes that cannot be read back
    │       └── DecryptionError         encrypted with a key we lack, or changed since
    ├── ConsistencyError                a resumed session's fingerprint changed (strict mode)
    └── AgentError                      a turn failed
        ├── SessionTimeoutError         a turn ran past its timeout
        ├── ModelError                  the LLM call failed
        └── ToolError                   a tool raised or was misused

    StoreRepairWarning (a UserWarning)  a store found damage and repaired it


``SessionNotFoundError`` is only raised when the store answered and the session
does not exist; a store that fails raises ``StoreUnavailableError`` instead, so
an outage is never mistaken for a missing session.
"""

from __future__ import annotations

__all__ = [
    "AgentError",
    "BlobNotFoundError",
    "ChatSessionClosedError",
    "ChatSessionError",
    "ConflictError",
    "ConsistencyError",
    "CorruptDataError",
    "DecryptionError",
    "InvalidArgumentError",
    "InvalidIdError",
    "InvalidURLError",
    "LeaseLostError",
    "MissingDependencyError",
    "ModelError",
    "SessionArchivedError",
    "SessionBusyError",
    "SessionExistsError",
    "SessionLimitError",
    "SessionNotFoundError",
    "SessionTimeoutError",
    "StoreError",
    "StoreRepairWarning",
    "StoreUnavailableError",
    "ToolError",
    "UnsupportedValueError",
    "UsageError",
]


class ChatSessionError(Exception):
    """Root of every error raised by chatsession."""


class UsageError(ChatSessionError):
    """Raised when the calling code uses chatsession wrongly; fix the call."""


class InvalidArgumentError(UsageError, ValueError):
    """Raised before any I/O when an argument has a bad value or type.

    For example a negative ``expected_seq``, a page size outside 1..1000, a
    listing cursor this library did not make, or a fork point past the head.
    """


class UnsupportedValueError(InvalidArgumentError):
    """Raised before anything is written when a value cannot be stored exactly.

    Every backend gives back exactly what it acknowledged, so values it could
    not give back are refused instead: anything that is not JSON (sets,
    tuples, objects, keys that are not strings), NaN and infinite floats, lone
    UTF-16 surrogates, NUL in names and ids, nesting deeper than
    :data:`~chatsession.store.base.MAX_JSON_DEPTH` levels, and payloads over
    the size limits. The message says which value and why.
    """


class InvalidIdError(InvalidArgumentError):
    """Raised before any I/O when a session, blob or checkpoint id is unsafe.

    Ids must be 1-128 characters of letters, digits, ``-``, ``_`` and ``.``,
    must not start with ``.`` and must not contain control characters or path
    separators, so that every backend can use them as file names and keys.
    """


class InvalidURLError(UsageError, ValueError):
    """Raised when a store URL has an unknown scheme or unusable parts."""


class MissingDependencyError(UsageError, ImportError):
    """Raised when a feature needs an optional extra that is not installed.

    The message names the ``pip install 'chatsession[EXTRA]'`` command to run.
    """

    def __init__(self, feature: str, extra: str, module: str) -> None:
        self.feature = feature
        self.extra = extra
        self.module = module
        super().__init__(
            f"{feature} needs the Python package {module!r}, which is not installed. "
            f"Install it with: pip install 'chatsession[{extra}]'"
        )


class ChatSessionClosedError(UsageError, RuntimeError):
    """Raised when a session is used after ``close()`` / ``aclose()``."""


class StoreError(ChatSessionError):
    """Raised when a store could not carry out an operation."""


class SessionNotFoundError(StoreError, KeyError):
    """Raised when the store answered and has no visible session with that id.

    Deleted and expired sessions are not visible.
    """

    def __init__(self, session_id: str, detail: str = "") -> None:
        self.session_id = session_id
        msg = f"session {session_id!r} not found"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class SessionExistsError(StoreError):
    """Raised by ``create``/``fork`` when the new session id is already taken.

    Also raised when opening an id that a deleted session still holds for its
    forks: such an id cannot be reused.
    """

    def __init__(self, session_id: str, detail: str = "") -> None:
        self.session_id = session_id
        super().__init__(
            f"session id {session_id!r} is taken: {detail}"
            if detail
            else f"session {session_id!r} already exists; choose another id or open the existing one"
        )


class ConflictError(StoreError):
    """Raised when a conditional write lost a race.

    ``append`` raises it when the session's head is not ``expected_seq``;
    ``update`` raises it when the record's version is not the expected one.
    Re-read the current head or record and try again.

    Attributes:
        session_id: The session written to.
        expected: The head (or version) the caller expected.
        actual: The head (or version) the store holds, when known.
    """

    def __init__(
        self, session_id: str, expected: int, actual: int | None, what: str = "head seq"
    ) -> None:
        self.session_id = session_id
        self.expected = expected
        self.actual = actual
        now = f"it is {actual}" if actual is not None else "it has moved"
        super().__init__(
            f"conflict on session {session_id!r}: expected {what} {expected} but {now}; "
            "another writer got there first: re-read and retry"
        )


class SessionBusyError(ConflictError):
    """Raised when a session cannot take a turn now because another writer holds it.

    Attributes:
        holder: Who holds the session's lease, when known.
        retry_after: Seconds until that lease runs out (a hint for waiting), when known.
    """

    def __init__(
        self, session_id: str, holder: str | None = None, retry_after: float | None = None
    ) -> None:
        self.session_id = session_id
        self.expected = 0
        self.actual = None
        self.holder = holder
        self.retry_after = retry_after
        by = f" ({holder})" if holder else ""
        wait = f"; it is free in {retry_after:.1f} s at the latest" if retry_after else ""
        StoreError.__init__(
            self,
            f"session {session_id!r} is busy: another writer is using it{by}{wait}; "
            "wait for it to finish, then retry",
        )


class LeaseLostError(ConflictError):
    """Raised when a write made under a lease finds it is no longer the holder.

    The lease expired (the process was paused, or renewal failed) or another
    writer took it over; nothing was written. Stop the turn: another writer may
    be changing the session. Take the lease again to continue.
    """

    def __init__(self, session_id: str, token: int, detail: str = "") -> None:
        self.session_id = session_id
        self.expected = token
        self.actual = None
        self.token = token
        more = f" ({detail})" if detail else ""
        StoreError.__init__(
            self,
            f"the lease on session {session_id!r} (token {token}) is no longer held{more}; "
            "nothing was written: another writer may have taken over, so take the lease "
            "again and re-read the session before writing",
        )


class SessionLimitError(StoreError):
    """Raised when creating a session would take its user past their session limit.

    Archived sessions do not count. Nothing was written.

    Attributes:
        user_id: The user whose limit it is.
        limit: The most sessions that user may have (not counting archived ones).
        count: How many they have now.
    """

    def __init__(self, user_id: str, limit: int, count: int) -> None:
        self.user_id = user_id
        self.limit = limit
        self.count = count
        super().__init__(
            f"user {user_id!r} has {count} session(s), the limit is {limit}: delete or "
            "archive one first, or raise max_sessions_per_user"
        )


class SessionArchivedError(StoreError):
    """Raised when something tries to write to an archived session: it is read-only.

    Nothing was written. Restore it (``SessionManager.restore_session``) to
    take turns again; reading, exporting and forking still work.

    Attributes:
        session_id: The archived session.
    """

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        super().__init__(
            f"session {session_id!r} is archived (read-only): restore it before taking "
            "turns or writing to it; it can still be read, exported and forked"
        )


class BlobNotFoundError(StoreError, KeyError):
    """Raised by ``get_blob`` when no blob with that id is reachable from the session."""

    def __str__(self) -> str:
        return str(self.args[0])


class StoreUnavailableError(StoreError, ConnectionError):
    """Raised when the store cannot be reached, timed out, or failed on its side.

    Nothing is known to have been written by the failed call unless the message
    says so; acknowledged writes are never lost. Retry once the store is back.
    """


class CorruptDataError(StoreError):
    """Raised when stored data cannot be read back (bad JSON, torn rows, bad schema).

    The message names the session, where the damage is, and what to do.
    """


class DecryptionError(CorruptDataError):
    """Raised when stored data was encrypted with a key this process does not have.

    The key that wrote it is missing from ``encryption_keys``, or the data was
    changed after it was written (authenticated encryption detects both). The
    message names the session and what could not be read; nothing is returned
    in its place.

    Attributes:
        session_id: The session the data belongs to.
    """

    def __init__(self, session_id: str, what: str, why: str) -> None:
        self.session_id = session_id
        super().__init__(
            f"session {session_id!r}: cannot decrypt its {what} ({why}); add the key it "
            "was written with to encryption_keys (keys rotate: keep old keys after the "
            "new first one)"
        )


class ConsistencyError(ChatSessionError):
    """Raised on resume with ``consistency="strict"`` when the agent changed.

    Attributes:
        changes: Human-readable descriptions of each difference.
    """

    def __init__(self, changes: list[str]) -> None:
        self.changes = changes
        super().__init__(
            "the agent differs from the one that wrote this session: "
            + "; ".join(changes)
            + ' (resume with consistency="warn" or "ignore" to continue anyway)'
        )


class AgentError(ChatSessionError):
    """Raised when a turn of the agent fails."""


class SessionTimeoutError(AgentError, TimeoutError):
    """Raised when a turn runs past its timeout; the partial turn is kept as ``timeout``."""


class ModelError(AgentError):
    """Raised when the LLM call fails (HTTP error, bad response, missing key).

    Attributes:
        status_code: The HTTP status the model's server answered, or None when
            there was no HTTP answer (connection refused, stream cut, a local model).
    """

    def __init__(self, message: str = "", *, status_code: int | None = None) -> None:
        self.status_code = status_code
        super().__init__(message)


class ToolError(AgentError):
    """Raised when a tool is misused (unknown tool, bad schema); tool exceptions
    during a turn go back to the model as error results instead."""


class StoreRepairWarning(UserWarning):
    """Warned when a store found damage and repaired it without losing data.

    For example the JSONL store moves a torn last line (a write cut off by a
    crash) aside to ``context.jsonl.corrupt``. The message says what was
    found, where it was moved, and which session it belongs to.
    """

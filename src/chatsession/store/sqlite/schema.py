"""The SQLite schema as named migrations, opening a connection, and SQLite's errors in ours.

Migrations are applied in order, each once, recorded by name in
``chatsession_migrations``, inside one ``BEGIN IMMEDIATE`` transaction, so
processes that open a database at the same time are safe and an older
database upgrades when it is opened.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

from chatsession.errors import CorruptDataError, StoreUnavailableError
from chatsession.store.base import now

__all__ = ["MAX_COUNTER", "MIGRATIONS", "connect", "is_busy", "migrate", "translate"]


def _migration_1(db: sqlite3.Connection) -> None:
    db.execute(
        """CREATE TABLE sessions (
            pk INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            user_id TEXT,
            agent_id TEXT,
            window_id TEXT,
            state TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            expires_at REAL,
            parent_pk INTEGER,
            parent_seq INTEGER,
            head INTEGER NOT NULL DEFAULT 0,
            version INTEGER NOT NULL DEFAULT 1,
            deleted INTEGER NOT NULL DEFAULT 0,
            children INTEGER NOT NULL DEFAULT 0,
            body TEXT NOT NULL DEFAULT '{}'
        )"""
    )
    db.execute("CREATE INDEX sessions_by_created ON sessions (created_at DESC, id DESC)")
    db.execute("CREATE INDEX sessions_by_user ON sessions (user_id, created_at DESC, id DESC)")
    db.execute("CREATE INDEX sessions_by_agent ON sessions (agent_id, created_at DESC, id DESC)")
    db.execute("CREATE INDEX sessions_by_window ON sessions (window_id, created_at DESC, id DESC)")
    db.execute(
        "CREATE INDEX sessions_by_expiry ON sessions (expires_at) WHERE expires_at IS NOT NULL"
    )
    db.execute(
        """CREATE TABLE events (
            session_pk INTEGER NOT NULL,
            seq INTEGER NOT NULL,
            type TEXT NOT NULL,
            ts REAL NOT NULL,
            turn_id TEXT,
            v INTEGER NOT NULL,
            data TEXT NOT NULL,
            PRIMARY KEY (session_pk, seq)
        ) WITHOUT ROWID"""
    )
    db.execute(
        """CREATE TABLE blobs (
            session_pk INTEGER NOT NULL,
            id TEXT NOT NULL,
            media_type TEXT NOT NULL DEFAULT '',
            data BLOB NOT NULL,
            PRIMARY KEY (session_pk, id)
        ) WITHOUT ROWID"""
    )


def _migration_2(db: sqlite3.Connection) -> None:
    db.execute("CREATE INDEX sessions_by_state ON sessions (state, created_at DESC, id DESC)")


def _migration_3(db: sqlite3.Connection) -> None:
    """Event ids (retried appends), the write lease (fencing) and snapshots.

    The lease lives in the session's row, so an append reads it with the head
    in one lookup. ``lease_token`` is the last token handed out and stays when
    the lease is released (owner and expiry NULL), so tokens only grow.
    Existing events get no id (NULL); the retry check looks up one event by
    its primary key, so ``event_id`` needs no index.
    """
    db.execute("ALTER TABLE events ADD COLUMN event_id TEXT")
    db.execute("ALTER TABLE sessions ADD COLUMN lease_owner TEXT")
    db.execute("ALTER TABLE sessions ADD COLUMN lease_token INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE sessions ADD COLUMN lease_expires REAL")
    db.execute(
        """CREATE TABLE snapshots (
            session_pk INTEGER PRIMARY KEY,
            seq INTEGER NOT NULL,
            data BLOB NOT NULL
        )"""
    )


#: The most a session's ``tokens`` figure holds (it saturates there): sums of
#: counters stay far from SQLite's 64-bit integer limit.
MAX_COUNTER = 1 << 62


def _migration_4(db: sqlite3.Connection) -> None:
    """Per-session figures for ``stats()``, and the index a user's listing by state needs.

    ``messages``, ``tokens`` and ``bytes`` count the session's own events
    (:func:`~chatsession.store.types.count_events`); every append adds to
    them in its transaction. Sessions that already have events get theirs
    counted here, once, from their rows (a usage event's ``total_tokens``
    counts when it is a JSON integer >= 0, as ``count_events`` has it).
    ``sessions_by_user_state`` serves ``list_sessions(user_id=, state=)``
    without reading other users' sessions.
    """
    for column in ("messages", "tokens", "bytes"):
        db.execute(f"ALTER TABLE sessions ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")
    db.execute(
        f"""UPDATE sessions SET messages = c.messages, tokens = c.tokens, bytes = c.bytes
        FROM (
            SELECT session_pk,
                sum(type = 'message') AS messages,
                CAST(min(total(CASE
                    WHEN type = 'usage' AND typeof(data) = 'text' AND json_valid(data)
                        AND json_type(data, '$.total_tokens') = 'integer'
                        AND json_extract(data, '$.total_tokens') >= 0
                    THEN json_extract(data, '$.total_tokens') ELSE 0 END), {MAX_COUNTER})
                    AS INTEGER) AS tokens,
                sum(length(CAST(data AS BLOB))) AS bytes
            FROM events GROUP BY session_pk
        ) AS c
        WHERE sessions.pk = c.session_pk"""
    )
    db.execute(
        "CREATE INDEX sessions_by_user_state ON sessions (user_id, state, created_at DESC, id DESC)"
    )


#: Applied in order, each once, recorded by name. Never edit or reorder: append.
MIGRATIONS: list[tuple[str, Callable[[sqlite3.Connection], None]]] = [
    ("001_sessions_events_blobs", _migration_1),
    ("002_sessions_by_state", _migration_2),
    ("003_event_ids_leases_snapshots", _migration_3),
    ("004_session_counters", _migration_4),
]


def migrate(db: sqlite3.Connection) -> None:
    """Apply the migrations ``db`` lacks, in one write transaction."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS chatsession_migrations "
        "(name TEXT PRIMARY KEY, applied_at REAL NOT NULL)"
    )
    done = {row[0] for row in db.execute("SELECT name FROM chatsession_migrations")}
    if all(name in done for name, _ in MIGRATIONS):
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        done = {row[0] for row in db.execute("SELECT name FROM chatsession_migrations")}
        for name, migration in MIGRATIONS:
            if name not in done:
                migration(db)
                db.execute(
                    "INSERT INTO chatsession_migrations (name, applied_at) VALUES (?, ?)",
                    (name, now()),
                )
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _create_file(path: str) -> None:
    """Make the database's folder, and the file itself readable by its owner only."""
    parent = Path(path).expanduser().absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreUnavailableError(
            f"cannot create the directory {str(parent)!r} for the SQLite store: "
            f"{exc.strerror or exc}; choose a writable path (CHATSESSION_STORE_URL or "
            "CHATSESSION_DATA_DIR)"
        ) from exc
    try:  # a new database holds conversations: readable by its owner only
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError as exc:
        raise StoreUnavailableError(
            f"cannot create the SQLite file {path!r}: {exc.strerror or exc}; "
            "choose a writable path (CHATSESSION_STORE_URL or CHATSESSION_DATA_DIR)"
        ) from exc


def connect(
    path: str, busy_timeout: int, synchronous: str, *, upgrade: bool = True
) -> sqlite3.Connection:
    """Open ``path`` in WAL mode with the store's pragmas; upgrade its schema if ``upgrade``.

    Args:
        path: The database file, or ``:memory:``.
        busy_timeout: Milliseconds a statement waits for another writer's lock.
        synchronous: ``normal`` or ``full``.
        upgrade: Run the migrations (the first connection of a store object does).

    Raises:
        StoreUnavailableError: The file cannot be made, opened or put in WAL mode.
        CorruptDataError: The file is not a sound SQLite database.
    """
    if path != ":memory:":
        _create_file(path)
    try:
        db = sqlite3.connect(
            path, timeout=busy_timeout / 1000, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise translate(exc, path, busy_timeout) from exc
    try:
        db.execute(f"PRAGMA busy_timeout = {busy_timeout}")
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if path != ":memory:" and str(mode).lower() != "wal":
            raise StoreUnavailableError(
                f"cannot turn on WAL mode for {path!r} (got {mode!r}); is it on a "
                "network file system?"
            )
        db.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        if upgrade:
            migrate(db)
    except sqlite3.Error as exc:
        db.close()
        raise translate(exc, path, busy_timeout) from exc
    except BaseException:
        db.close()
        raise
    return db


def is_busy(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` is SQLITE_BUSY: another connection holds the lock asked for."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return bool(code & 0xFF == sqlite3.SQLITE_BUSY)
    return "locked" in str(exc).lower()


#: SQLite's errors by the words their messages hold: our error, and what to say.
_TRANSLATIONS: tuple[tuple[tuple[str, ...], type[Exception], str], ...] = (
    (
        ("not a database", "malformed", "corrupt"),
        CorruptDataError,
        "the SQLite file {path!r} is damaged ({message}); restore it from a backup, "
        "or salvage it with: sqlite3 {path} .recover | sqlite3 repaired.db",
    ),
    (
        ("no such table", "no such column", "has no column"),
        CorruptDataError,
        "the SQLite file {path!r} lacks part of its schema ({message}), though its "
        "migrations are recorded as done: it was damaged or edited by hand; restore it "
        "from a backup",
    ),
    (
        ("locked", "busy"),
        StoreUnavailableError,
        "the SQLite file {path!r} stayed locked by another writer for more than "
        "{busy_timeout} ms; retry, or raise busy_timeout in the store URL",
    ),
    (
        ("unable to open", "readonly", "disk i/o"),
        StoreUnavailableError,
        "cannot use the SQLite file {path!r} ({message}); check that the path "
        "exists and is writable",
    ),
)


def translate(exc: sqlite3.Error, path: str, busy_timeout: int) -> Exception:
    """Our error for SQLite's ``exc``: damage, a lock held too long, or the file unusable."""
    message = str(exc)
    lowered = message.lower()
    for words, kind, text in _TRANSLATIONS:
        if any(word in lowered for word in words):
            return kind(text.format(path=path, message=message, busy_timeout=busy_timeout))
    return StoreUnavailableError(f"SQLite error on {path!r}: {message}")

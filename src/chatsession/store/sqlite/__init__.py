"""``sqlite:///path.db``: the embedded default store.

URL forms (SQLAlchemy's convention): ``sqlite:///relative/path.db`` is relative
to the working directory, ``sqlite:////absolute/path.db`` absolute, and
``sqlite:///:memory:`` a private in-memory database. Parent directories are
created. Query options (also accepted as keyword options of ``open_store``;
unknown and repeated ones are refused):

``synchronous=normal`` (default)
    WAL journal with ``synchronous=NORMAL``. Every acknowledged append is in
    the WAL file when ``append`` returns, so killing any process (``kill -9``)
    loses nothing acknowledged. A power loss or OS crash can lose the last
    transactions (never corrupts the database).
``synchronous=full``
    Also ``fsync`` on every commit: acknowledged appends survive power loss.
    Slower (one disk flush per append).
``busy_timeout=MILLISECONDS`` (default 30000)
    How long a writer waits for another process's write transaction.

Concurrency: any number of processes on one machine may share the file. Every
write is one ``BEGIN IMMEDIATE`` transaction, so a conditional append checks
the head (and the write lease) and inserts atomically; a writer that cannot
get the lock within ``busy_timeout`` gets
:class:`~chatsession.errors.StoreUnavailableError`, never a raw "database is
locked". Do not put the file on a network file system.

Threads: a short call (append, leases, records) runs on the event loop's
thread when SQLite's write lock is free at once (no thread hop); when another
writer holds it, the call goes to the store object's worker thread, which
waits for it, so the event loop never blocks on a lock. Reads of a history,
blobs and snapshots always run on the worker (see
:mod:`chatsession.store.sqlite.connection`).

Leases and snapshots: the write lease is kept in the session's row and
checked in the append's transaction; its expiry is judged by this machine's
wall clock. Event ids are kept with each event, so an append sent again after
a lost reply is applied once. Snapshots are kept one per session.

Many users: ``create(max_per_user=)`` counts the user's sessions (on the
``sessions_by_user`` index) and inserts the new one in one ``BEGIN
IMMEDIATE`` transaction, so creates racing in any number of processes never
pass the limit. An append checks the session's state (archived refuses) and
adds its figures (``messages``, ``tokens``, ``bytes`` columns, migration
004) in its own transaction, on whichever thread it runs; ``stats()`` is a
few aggregate queries over the ``sessions`` table, never reading an event.
``purge_expired`` finds and deletes expired sessions in write transactions
of up to 200, so purges running at once in several processes delete (and
count) each session once. A user's listing reads that user's index entries
only (``sessions_by_user``, ``sessions_by_user_state``).

A new database file is created readable and writable by its owner only
(``0600``); SQLite gives its ``-wal`` and ``-shm`` files the same mode. An
existing file keeps its mode.

Schema changes are named migrations recorded in ``chatsession_migrations``;
they run once, inside a write transaction, so processes starting at once are
safe and an older database upgrades when it is opened
(:mod:`chatsession.store.sqlite.schema`).

Damage (a bad restore, a hand edit, a disk error) is
:class:`~chatsession.errors.CorruptDataError` naming the session and where it
is (table, column, seq), never :class:`~chatsession.errors.StoreUnavailableError`,
which tells callers to retry: a table or column missing although its migration
is recorded, a record column of the wrong type or holding bad JSON, an event
row of the wrong type, events missing before the head or stored past it, a
fork whose ancestors are missing or loop. ``list_sessions`` skips a session
whose record is damaged and logs a warning (logger ``chatsession.store.sqlite``)
naming it, so one damaged session does not hide the others. A damaged snapshot
row is ignored (logged): snapshots are derived data.

Modules: ``schema`` (migrations, connecting, SQLite's errors), ``connection``
(the fast path and the worker thread), ``rows`` (reading rows back),
``leases`` (leases and snapshots), ``stats`` (the per-session figures and
``stats()``), ``store`` (``SQLiteStore``).
"""

from __future__ import annotations

from chatsession.store.sqlite.schema import MIGRATIONS
from chatsession.store.sqlite.store import SQLiteStore

__all__ = ["MIGRATIONS", "SQLiteStore"]

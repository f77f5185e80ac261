"""``postgresql://user@host/db``: sessions in PostgreSQL (asyncpg, the ``postgres`` extra).

URL: ``postgresql://[user[:password]@][host][:port][,host2[:port2]...][/database][?options]``
(``postgres://`` works too). The user, password and database are
percent-decoded (write ``%40`` for ``@``, ``%2F`` for ``/``, ``%23`` for
``#``); a port is a number from 1 to 65535; several hosts are tried in turn.
What the URL leaves out comes from libpq's environment variables
(``PGHOST``, ``PGUSER``, ``PGPASSWORD``, ...) as in ``psql``. Options, each
given at most once (``open_store`` keyword options override the URL's; a
``+`` in a value is a plus sign, as in libpq, not a space):

``schema`` (default ``public``)
    The schema holding chatsession's tables (created if missing).
``synchronous_commit`` (``on``, ``off``, ``local``, ``remote_write``, ``remote_apply``)
    Not set by default: the database's and the role's setting applies
    (``ALTER DATABASE``/``ALTER ROLE ... SET synchronous_commit``; PostgreSQL's
    own default is ``on``, which loses nothing acknowledged). With ``off``,
    commits return before the server flushes its WAL: appends cost a network
    round trip instead of a disk flush. What it risks: if the *server*
    crashes (not a client), the last few hundred milliseconds of
    acknowledged appends can be lost; the database is never corrupted and
    seqs stay contiguous.
``min_size``, ``max_size`` (default 1 and 10)
    The connection pool's size.
``command_timeout``, ``connect_timeout`` (seconds, default 30 and 10)
    How long a call or a connection attempt waits before the store reports
    itself unavailable.
``sslmode`` (``disable``, ``allow``, ``prefer``, ``require``, ``verify-ca``, ``verify-full``)
    As in libpq; by default ``PGSSLMODE``, else ``prefer``.
``application_name`` (printable ASCII, at most 63 characters)
    Shown by the server in ``pg_stat_activity``.
``password``
    The password, when it is not in the URL's user part (not both).

Options are handed to the driver as the parsed values, never pasted into a
connection string: a ``%26`` (``&``) or ``%3D`` (``=``) in a value stays
part of that value and cannot add or change a connection parameter. An
unknown or repeated option, a bad value or a bad port raises
:class:`~chatsession.errors.InvalidURLError`. The password never appears in
``store.url``, ``repr(store)`` or any message (it is shown as ``***``).

Tables ``sessions`` (the records: identity columns, and ``title``,
``metadata`` and ``fingerprint`` in ``body``, JSONB, or ``body_text``, see
below; ``text_payloads`` is true once a session has a payload kept as
text; the write lease in ``lease_owner``, ``lease_token``,
``lease_expires``), ``events`` (primary key ``(session_pk, seq)``; the
payload is in ``data``, JSONB, so it can be queried and indexed in place,
or in ``data_text`` as the exact text, with ``data`` NULL; a CHECK keeps
exactly one of the two set; the writer's ``event_id``), ``blobs`` and
``snapshots`` (one per session). Schema changes are named migrations
recorded in ``chatsession_migrations``, applied once under an advisory lock,
so processes starting at once are safe. Migration ``002_events_data_jsonb``
converts the payloads of a database made by an earlier version (it rewrites
the events table under an exclusive lock: on a big table the first store to
open waits for it, and so do the others). A payload that is not valid JSON
stops it with :class:`~chatsession.errors.CorruptDataError` and changes
nothing. Migration ``003_events_data_text`` adds ``data_text``, the CHECK,
``sessions.text_payloads`` and ``fillfactor = 80`` on ``sessions``: no
rewrite, one scan of the events table to check the constraint. Migration
``004_sessions_body_text`` adds ``sessions.body_text`` and its CHECK: no
rewrite, one scan of the sessions table. Migration
``005_leases_event_ids_snapshots`` adds ``events.event_id``, the lease
columns and the ``snapshots`` table: catalog changes only, no scan.
Migration ``006_session_figures_user_states`` adds ``sessions.messages``,
``tokens`` and ``bytes`` (the figures ``stats()`` sums), back-filled by one
pass over the events table that counts what is stored (see its docstring
for how exact), and index ``sessions_by_user_state``.

What is acknowledged reads back exactly. JSONB keeps JSON *values*, not
their text: it drops insignificant whitespace, orders object keys (shorter
keys first) and writes numbers in plain decimal. Whitespace and key order
do not change what ``json.loads`` gives back, but plain decimal would change
some numbers' types: ``1e16`` or ``1.5e1`` would come back as an ``int``,
``-0.0`` as ``0.0``. JSONB cannot hold some values at all: a ``\\u0000``
escape (NUL), an unpaired surrogate escape, a number beyond ``numeric``
(more than 131072 digits before the point or 16383 after). A payload (or a
record's body) with any of these is kept as text (``data_text``,
``body_text``) exactly as written and comes back byte for byte; every other
one is kept as JSONB and comes back as JSON that parses to equal values of
the same types (dictionaries' key order aside). The client tells them apart
(a substring test for ``\\u``, a scan of the escapes of the payloads that
have one, and one parse of each payload by the C scanner, about as long as
``json.loads``, which looks closely only at floats written with an exponent
or as ``-0``); the server finds plain-decimal numbers beyond ``numeric``:
the statement fails having written nothing and is sent once more with
those payloads as text, the only append that takes two round trips. A
session whose ``text_payloads`` is false (nearly all) reads ``data``; one
that is true reads ``COALESCE(data_text::json::text, data::text)`` (the
cast checks the text is still JSON and keeps it as is); a fork reads each
ancestor's part by that ancestor's flag.

An append is one SQL statement (so one transaction and one round trip): it
moves the head only if it is still ``expected_seq`` and the writer may
write (with a lease: it is the current one and has not expired by the
server's ``clock_timestamp()``; without: no live lease is held), which
locks the session's row, so it cannot race a delete or a lease change, and
inserts the events: up to 16 events, none kept as text, as one ``VALUES``
row each, otherwise as ``unnest`` of arrays. When it writes nothing, one
more query tells why: the head moved (``ConflictError``), unless the event
after ``expected_seq`` carries the first event's ``event_id``, which means
this append was done before and its reply was lost (it then returns the
head after those events, having written nothing); or the lease
(``LeaseLostError``, ``SessionBusyError``), or the session is archived
(``SessionArchivedError``: the same statement refuses to write to an
archived session). The same statement adds the events' figures
(``count_events``) to the session's ``messages``, ``tokens`` and
``bytes``; ``stats()`` is one statement of aggregates over the
``sessions`` table, never reading an event. The ``sessions`` fillfactor
leaves room on each page so that moving the head is a HOT update (no index
entries written) on pages filled since migration 003. Expiry is the
``expires_at`` column, checked on every read; ``purge_expired`` deletes in
bounded batches picked with ``FOR UPDATE SKIP LOCKED``, so purges running
at once in several processes delete, and count, each session once, and
never wait for other calls.

``create(max_per_user=)`` is one transaction: it takes a
transaction-scoped advisory lock on the user
(``pg_advisory_xact_lock(hashtextextended('chatsession:<schema>:user:<id>', 0))``),
then counts the user's visible sessions that are not archived and inserts
in one statement. The lock serialises limited creates for one user across
connections and processes; being transaction-scoped, it is released by the
commit and works through poolers in transaction mode. Listing by owner
walks index ``sessions_by_user`` (``user_id, created_at DESC, id DESC``,
of rows not deleted), or ``sessions_by_user_state`` with a state, from the
cursor: its cost follows the page, not the table.

A lease is a row's columns, not an advisory lock (those die with the
connection and do not work through poolers): acquiring, renewing and
releasing are one ``UPDATE`` each on the server's clock, and the token is
the highest one handed out, so it grows with every new holder. A snapshot is
replaced only by one at the same or a higher seq, in a statement that
share-locks the session's row; it is deleted with the session (also while a
deleted session is kept for its forks) and is not shared with forks.

``read`` streams: one query (keyset, ``seq > last``) per batch of
``batch_size`` events, so it holds one batch at a time whatever the
session's size. A fork's ancestry is walked by one recursive query per 1000
ancestors; a chain that loops back on itself (a hand edit, a bad restore) is
:class:`~chatsession.errors.CorruptDataError`, never an endless walk.

Driver errors are translated where they happen:

- the server or the network is down, refuses service (starting up, shutting
  down, too many connections, out of disk, read-only standby) or does not
  answer in time (``command_timeout``, ``statement_timeout``, a cancelled
  statement): :class:`~chatsession.errors.StoreUnavailableError`. A
  connection the server closed (a restart, a failover,
  ``idle_session_timeout``, ``pg_terminate_backend``, a pooler) is replaced:
  the call that was using it raises ``StoreUnavailableError``, and the same
  store object works again from the next call once the server accepts
  connections. A call that finds its connection lost (closed while it sat
  in the pool, or the reply lost on the way back) is sent once more on a
  fresh connection when doing it twice is the same as doing it once: reads
  (``get``, ``list_sessions``, ``read``, ``get_blob``, ``get_snapshot``),
  ``put_blob``, ``put_snapshot``, the lease calls, and an ``append`` whose
  first event has an ``event_id`` (it recognises itself). Other writes are
  not: they may have been done (an ``append`` without event ids, retried by
  its caller, then meets a ``ConflictError`` if it was);
- a refused login or a missing database: :class:`~chatsession.errors.InvalidURLError`;
- chatsession's tables missing or changed, or data the server reports as
  damaged: :class:`~chatsession.errors.CorruptDataError`. Rows damaged by
  hand (a record's body that is not its JSON object, a missing ancestor, a
  head before the fork point, a gap in the events, text that is not JSON)
  are ``CorruptDataError`` too, naming the session and where;
  ``list_sessions`` skips a damaged record and logs a warning on the
  ``chatsession.store`` logger;
- a value the server rejects: :class:`~chatsession.errors.UsageError`;
- a deadlock or serialization failure is retried (the transaction was rolled
  back, so nothing was written); if it persists, and for anything else the
  server refuses (a missing privilege, say): :class:`~chatsession.errors.StoreError`.

The package, by concern: ``settings`` (the URL), ``connection`` and
``errors`` (the pool, what is sent again, error translation), ``schema``
(migrations), ``jsonb`` (what is kept as text), ``rows`` (reading a
session's row and fork chain), ``records``, ``events`` (the append and the
read), ``leases``, ``blobs`` (blobs and snapshots), and ``store``, which puts
them together as :class:`PostgresStore`.
"""

from __future__ import annotations

# the driver first: a missing one is reported by name (open_store names the extra)
# even when this package's modules are still imported from an earlier attempt
import asyncpg  # noqa: F401

from chatsession.store.postgres.schema import MIGRATIONS
from chatsession.store.postgres.store import PostgresStore

__all__ = ["MIGRATIONS", "PostgresStore"]

"""``redis://host:6379/0``: sessions in Redis, for many processes on many machines.

Needs Redis 7.0 or later (the scripts use ``PEXPIRETIME``); the store checks
the server's version on its first call and says so when it is older.

URL: ``redis://[[user]:password@]host[:port][/db]`` (``rediss://`` for TLS), with
query options (or keyword options of :func:`~chatsession.open_store`, which
override the URL's):

``prefix`` (default ``chatsession:``)
    Put before every key, so applications sharing a server stay apart.
``socket_timeout``, ``socket_connect_timeout`` (seconds, default 5)
    How long a call waits before the store reports itself unavailable.
``max_connections`` (default 50), ``pool_timeout`` (seconds, default 10)
    The size of the connection pool, and how long a call waits for a free
    connection when all are busy before it reports the store unavailable.
``retries`` (default 3)
    How many times a call that is safe to repeat is sent again when the
    connection drops before its reply (with a jittered exponential
    backoff from 50 ms to 1 s); 0 never sends anything twice.
``ssl_cert_reqs`` (``none``, ``optional``, ``required``), ``ssl_ca_certs``,
``ssl_ca_path``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_password``,
``ssl_check_hostname`` (``true``/``false``), ``ssl_ciphers``, ``ssl_min_version``
(``TLSv1_2``, ``TLSv1_3``)
    TLS settings, for ``rediss://`` URLs only.
``username``, ``password``
    Credentials, instead of (or overriding) the URL's; ``open_store(url,
    password=...)`` keeps the password out of the URL.

Options are read by the shared :func:`~chatsession.store.options.parse_options`:
an unknown option, one given twice, or a bad value raises
:class:`~chatsession.errors.InvalidURLError`, and so does a port that is not a
number from 1 to 65535 or a database that is not a number. Passwords (the
URL's, ``password``, ``ssl_password``) never appear in ``store.url``,
``repr(store)`` or any message.

The package, by concern: :mod:`.connection` (URL, options, pool, calls,
re-sends, errors), :mod:`.scripts` (the Lua scripts in ``lua/``, loaded as
package data), :mod:`.records` (records; create, get, update, delete, list),
:mod:`.index` (the steps in the index slot), :mod:`.events` (events; append,
read, fork, blobs), :mod:`.leases` (leases and snapshots), :mod:`.cleanup`
(``purge_expired``), :mod:`.stats` (``stats()``), :mod:`.layout` (the layout
number, and the upgrade of data written by earlier versions), :mod:`.store`
(:class:`RedisStore`).

Keys. A session's keys share the hash tag ``{ID}``, the indexes share
``{idx}``, and every script call is given all the keys it touches, all under
one tag (no script builds a key name): each call runs on one hash slot, so
the layout works on Redis Cluster. (The store connects to one server:
standalone, or a primary behind Sentinel.) ::

    PREFIX{ID}:rec       hash: the record, head, version, stamp, fence, tombstone flag,
                         and its figures for stats(): messages, tokens, bytes
    PREFIX{ID}:ev        list: the session's own events (parent_seq+1..head), in order
    PREFIX{ID}:blob      hash: blob id -> bytes
    PREFIX{ID}:forks     sorted set: its forks (ID#STAMP), by when each fork began
    PREFIX{ID}:lease     string 'TOKEN OWNER', expiring with the lease (PX)
    PREFIX{ID}:snap      hash: seq, data of the kept snapshot
    PREFIX{idx}:all      sorted set of sessions (ID#STAMP) by created_at
    PREFIX{idx}:user:U   the same, per user (and :agent:A, :window:W)
    PREFIX{idx}:live:U   sorted set: the user's sessions that are not archived,
                         by expires_at (+inf for none): what a limit counts
    PREFIX{idx}:expiry   sorted set of sessions by expires_at
    PREFIX{idx}:where    hash: ID#STAMP -> the indexes it is in, its parent, version
    PREFIX{idx}:due      sorted set: sessions a change across slots is under way
                         for, by when cleanup may finish that change
    PREFIX{idx}:meta     hash: the layout number of the data (see :mod:`.layout`)
    PREFIX{idx}:tally:R:user, ...:agent   sorted sets kept during one stats()
                         call when it counts more than 5,000 users and agents
                         (expiring after 10 minutes, removed at its end)

Values. Whatever a write acknowledged reads back exactly (same values, same
types): see :mod:`.events` for events (a JSON header with the event id, a
line break, the payload as given) and :mod:`.records` for records. No script
decodes a payload or a record's JSON (cjson would change big numbers and
empty arrays).

Damage. A read checks, in one ``MULTI`` per session of the fork chain, that
the event list holds exactly the events its record counts, and each event's
header carries its seq; ``append`` checks the list ends at the head before
it pushes. A stray item after the head, a missing or moved event, a fork
chain that loops or names a missing parent, a record with a missing or
unreadable field, and a lease key that does not hold ``TOKEN OWNER`` raise
:class:`~chatsession.errors.CorruptDataError` naming the session, the key and
what to do (a listing leaves such a session out and logs a warning on the
``chatsession.store`` logger; ``purge_expired`` skips it the same way). A
damaged snapshot reads as None (logged): it is rebuilt from the log.

Leases (:mod:`.leases`). The lease key is set with ``PX``, so the server's
clock decides expiry. The fencing token is the record's ``fence`` field,
moved on for every new holder and every release. ``append`` checks the head
and then the lease in its one script: with a lease, only while the key still
holds that token and owner; without one, only while no key is there (else
:class:`~chatsession.errors.SessionBusyError` with the holder and the time
left). Snapshots are a hash in the session's slot, kept only for a seq not
below the kept one's, removed with the session (a tombstone kept for its
forks loses its lease and snapshot at once).

``STAMP`` is random, given by ``create`` and ``fork``: ``ID#STAMP`` names one
*incarnation* of an id, so what is left of a deleted session never touches a
new session with the same id.

What is atomic: everything on one session is one script on its slot.
``append`` checks visibility, the head, that the session is not archived
(:class:`~chatsession.errors.SessionArchivedError`, nothing written) and the
lease, pushes the events, moves the head and adds the events' figures
(:func:`~chatsession.store.types.count_events`) to the record's
``messages``, ``tokens`` and ``bytes`` with ``HINCRBY``, all in that one
script; it never touches the index slot (listings are ordered by
``created_at``, which never changes). So are ``put_blob``, the lease calls,
``put_snapshot``, and the step of each other write that decides whether it
happens (its *commit*). The record is the truth; the index slot is derived
from it. Writes across slots are short sequences of single-slot scripts:

- ``create``: (1) index: list ``ID#STAMP`` and mark it *due*; (2) session:
  write the record unless the id is taken (commit); (3) index: clear the mark.
  If (2) finds the id taken, (1) is undone. With ``max_per_user``, step (1)
  counts the user's live set (``ZCOUNT`` of the sessions not yet expired)
  and lists the new session only below the limit, in the same script: the
  count and the write are one atomic step, whatever the number of processes
  creating at once. A session counts from its step (1) until it is deleted,
  expires or is archived; one whose create was cut short counts until cleanup
  removes it (a refused create settles the user's changes past due first,
  and counts again).
- ``fork``: (1) index: as create's; (2) parent: add ``ID#STAMP`` to its
  forks and drop its native expiry (fails if the parent is gone or the fork
  point is past its head); (3) child: write the record with its parent
  pointer unless the id is taken (commit); (4) index: clear the mark. If (2)
  or (3) fails, the steps before it are undone. (1) and (2) go in one round
  trip, in that order on one connection; should (1) fail, (2) is undone.
- ``update``: (1) index: mark, add the indexes the new version needs;
  (2) session: check the version, write (commit); (3) index: record the new
  placement, drop memberships it no longer needs, clear the mark.
- ``delete``: (1) index: mark; (2) session: remove its keys, or make it a
  tombstone if it has forks (commit); (3) parent: drop it from its parent's
  forks (a tombstone left with no forks goes too, and so on up the chain);
  (4) index: remove its entries (a tombstone's entry stays, due for a check
  of its forks).
- ``purge_expired``: for each batch of the expiry set, steps like delete's;
  then it finishes the changes whose marks are due.

Lost replies and re-sends. A call whose connection drops before its reply
(the server restarted or closed it, a proxy or the network cut it) is sent
again (``retries``) when that is safe, so a dropped connection costs a little
time, not an error (a call that times out is not sent again: it already
waited ``socket_timeout``; it raises, and may be retried by the caller on the
same terms). Safe to send again: reads; ``append`` when its
first event has an ``event_id`` (a re-sent append finds that id at
``expected_seq + 1`` and answers as the first send did, writing nothing);
the lease calls (the owner asking again keeps its token); ``put_blob`` and
``put_snapshot``; and every step of the writes across slots, each of which
either changes nothing when run twice or recognises its own first run: a
create's commit by its stamp, an update's and a delete's by a change id kept
in the record, a removal (no record left) by being the re-send of a delete.
One step cannot tell: a release (a fork went) that removed its parent's
tombstone answers "nothing more to release" when sent again, so the rest of
the chain (the tombstone's index entry, its own parent's hold) is left to
cleanup, which finds it at once (a tombstone's entry is always due) and
finishes it on the next ``purge_expired``: the events are kept a little
longer, nothing is lost or shown. Only an ``append`` without event ids is
never sent twice: its lost reply raises
:class:`~chatsession.errors.StoreUnavailableError` saying it may have been
applied (re-read the head before retrying). Retries used up (the server is
down) raise the same error.

Why a crash, a lost reply or a race between steps never corrupts anything:

- Listings show a member only when its session's record exists with that
  stamp, is visible and matches the filters, so a half-made session, a
  deleted one's leftovers, or a membership an interrupted update did not drop
  yet is never shown. Entries are added before a commit and dropped after it,
  so every visible session is listed.
- Nothing is removed on a guess. A mark is due 300 s after its change began,
  and every commit refuses to run (writing nothing: "took too long, retry")
  once half of that has passed, both by server clocks. So when cleanup meets
  a due mark and no record with that stamp, the record will never be
  written: it removes the leftovers (index entries, the parent's hold). When
  the record is there, it re-derives the index entries from it. Only server
  clocks are compared; they must agree within a quarter of the grace. Every
  change marks its session first, so every leftover of one cut short is
  found from the due set: cleanup never searches.
- Members name incarnations: releasing or forgetting ``ID#STAMP`` never
  touches a later session with the same id. A parent's fork count is the size
  of its forks set, so a repeated hold never counts twice.
- Deleting a parent while it is being forked: the hold (fork step 2) and the
  delete's commit are scripts on the parent's slot, so one runs first. If the
  hold does, the delete leaves a tombstone that keeps the events; the fork
  then commits and reads them, or is undone or cleaned up, which releases the
  tombstone. If the delete does, the hold finds no parent, and the fork undoes
  its index step and fails. A tombstone's keys go only in the script that
  removes its last fork, and a fork is removed from its parent only after its
  own keys are gone.
- Should a mark be lost all the same (a failover that drops the index
  primary's last writes), what is left is a parent holding a fork that never
  came to be: its events are kept longer, nothing worse. So cleanup also
  checks the forks of tombstones (up to 100 per look, in rotation, again
  every hour) and drops those older than the grace that have no record.

Other guarantees:

- Durability is the server's: with ``appendonly yes`` and ``appendfsync
  always`` an acknowledged write survives a server crash.
- The pool checks a pooled connection before it sends anything on it, and
  reconnects one the server closed (a restart, ``CLIENT KILL``, an idle
  timeout). No ``KEYS`` or ``SCAN`` anywhere.
- Sessions with ``expires_at`` get Redis's own expiry (``PEXPIREAT``) on their
  keys, and read as gone from ``expires_at`` on, even before Redis evicts
  them. So ``stats()`` rarely meets an expired session: its
  ``by_state["expired"]`` counts only those whose record Redis still holds
  (a parent kept for its forks, or one expiring past the year 10000), and is
  usually 0 (see :mod:`.stats`). A session with forks never has a native expiry (its forks read its
  events); once expired it becomes an invisible tombstone, and goes with its
  last fork. An ``expires_at`` from the year 10000 on gets no native expiry
  (Redis cannot hold it); the session is hidden and purged all the same.
- A listing reads at most ``max(10 * limit, 100)`` index members per call: a
  page that filters out many members is shorter than ``limit`` but carries a
  cursor, so paging always progresses. A listing by user (agent, window)
  reads that user's own index (by ``created_at``, the listing order), so its
  cost is the page's, whatever the number of other sessions.
- ``stats()`` reads the ``all`` index in batches of 2,000 and, per session,
  one short reply of ``count_one.lua`` on its slot (all of a batch in one
  round trip), never an event: the client's memory is flat in the number of
  sessions (see :mod:`.stats`).
- ``purge_expired`` is safe in several processes at once: each batch of the
  expiry set is *claimed* in one script (see :mod:`.cleanup`), so each
  session is deleted, and counted, by one of them; its index entries (its
  live set's too) go with it.
- Data written before layout 2 (no live sets, no figures) is upgraded in
  place, once, by the first ``create(max_per_user=)`` or ``stats()`` (see
  :mod:`.layout`).
- Connection failures, timeouts (after the re-sends), a full pool past
  ``pool_timeout``, and a server that refuses service (loading, out of memory,
  read-only, ACL denial, bad credentials) raise ``StoreUnavailableError``;
  other error replies raise :class:`~chatsession.errors.StoreError`
  (``CorruptDataError`` for a key of the wrong type), never
  ``SessionNotFoundError``. The same store object works again once the
  server is back.
"""

from __future__ import annotations

import redis as _driver  # first: without the extra, the import fails here, naming it

from .store import RedisStore

del _driver

__all__ = ["RedisStore"]

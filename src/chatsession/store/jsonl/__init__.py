"""``file:///dir``: one folder per session, readable with ``cat`` and ``jq``.

URL forms: ``file:///absolute/dir`` and ``file:relative/dir``. Layout::

    dir/
      .chatsession.lock          serialises creating, forking, updating and deleting sessions
      SESSION_ID/
        session.json             the record and its figures (replaced atomically on change)
        context.jsonl            the session's own events, one JSON object a line
        context.jsonl.corrupt    torn writes moved aside, if there ever were any
        offload/BLOB_ID          blobs (large tool outputs), named by their sha256
        lease.json               the write lease: owner, fencing token, expiry
        snapshot.bin             the latest snapshot of the folded log (derived data)
        .lock                    serialises appends to this session

Each line of ``context.jsonl`` is ``{"seq", "type", "ts", "turn_id", "v",
"data"}``; ``data`` is the payload exactly as appended. The first line of an
append of several events also carries ``"batch": N``, and an event appended
with an id carries it as ``"id"`` (so an append sent again after a lost reply
is recognised and applied once). A fork's file holds only
its own events; its ``session.json`` names the parent and the fork point.
Besides the record's fields, ``session.json`` keeps ``deleted`` (a deleted
session kept for its forks), ``children`` (its forks), ``create_id`` (a
random id given by ``create``/``fork``, so a deleted and re-created session is
never mistaken for the old one) and ``counts``: ``{"messages", "tokens",
"bytes", "head"}``, the figures of the session's own events up to seq
``head`` for ``stats()`` (a fork's start at 0).

Guarantees:

- An append is one ``write()`` of all its lines, under a cross-process lock
  (``filelock``), after checking the head: atomic and conditional like every
  backend. When it returns, the lines are in the operating system, so killing
  the writer loses nothing acknowledged. ``?fsync=1`` also ``fsync``s every
  append and header for power-loss safety. An append that fails (a full or
  read-only disk, an I/O error) is cut back off the file and raises
  :class:`~chatsession.errors.StoreUnavailableError`: nothing half-written
  stays behind.
- ``get``, ``append``, ``update``, ``fork``, ``list_sessions`` and the start
  of ``read`` walk, under the session's lock, whatever its log gained since
  this store object last looked (the whole file the first time). Only a write
  cut off by a crash is repaired: a last line without its newline, or an
  append of ``N`` events whose last lines never arrived. It is moved aside to
  ``context.jsonl.corrupt`` (never silently dropped) and reported with a
  :class:`~chatsession.errors.StoreRepairWarning`. A complete line that does
  not parse or breaks the seq order, anywhere in the file including the last
  line, is damage, not a crash: it raises
  :class:`~chatsession.errors.CorruptDataError` naming the session, the file
  and the line, and nothing is moved. So does an unreadable or ill-typed
  ``session.json``, a missing ``context.jsonl``, a damaged line met by
  ``read`` (bad JSON, a field missing or of the wrong type, a seq that
  jumps) and a fork chain whose parents are missing or loop.
- Leases: ``lease.json`` is read and written under the session's lock, the
  one every append holds, so a fenced append checks the lease in the same
  step as the head; expiry is judged by this machine's wall clock. A
  released lease keeps its token, so tokens only grow. ``snapshot.bin`` is
  written atomically (a temporary file renamed over it); a damaged one counts
  as none. Both go with the session (also when it is only kept for its forks).
- Many users: ``create(max_per_user=)`` counts the user's sessions and
  makes the new one under ``.chatsession.lock``, which every create, fork,
  update and delete of every process holds, so racing creates never pass
  the limit. An append checks the session's state (archived refuses) with
  the head, under the session's lock, then writes its figures and
  ``updated_at`` into ``session.json``; ``stats()`` reads only the headers,
  never a log line. If the header write fails or the process dies before
  it, the append stands and the next one counts what the figures miss; a
  header written before the store kept figures counts 0 in ``stats()``
  until its session's next append counts its log once. ``purge_expired``
  checks each session again under ``.chatsession.lock`` before deleting it,
  so purges running at once in several processes delete (and count) each
  session once.
- Lines are split on ``\n`` only: text holding U+2028, U+2029, NEL or other
  separators is one line, as JSON allows.
- ``list_sessions`` and ``purge_expired`` skip a session whose files are
  damaged and log a warning (logger ``chatsession.store.jsonl``) naming it,
  so one damaged session does not hide or keep the others.
- Every other operating-system failure (permissions, a full or read-only
  disk, an I/O error, a store folder that is a file) raises
  :class:`~chatsession.errors.StoreUnavailableError`, never
  :class:`~chatsession.errors.SessionNotFoundError`.
- What the store creates is its owner's only: folders ``0700``, files
  ``0600`` (an existing folder keeps its mode).
- ``read`` streams: memory is bounded by ``batch_size``, not by the history. A
  session deleted (or deleted and re-created) while it is being read raises
  ``SessionNotFoundError`` at the next batch.
- ``list_sessions``, ``stats``, ``purge_expired`` and a create with
  ``max_per_user`` read every session's header: O(number of sessions). Appends cost O(1) in history length: each store object keeps
  every session's head and file size, and reads only bytes added since. That
  knowledge is reused only while the file is the same one (device, inode and
  ``create_id``); otherwise the file is walked again from the start.

Modules: ``files`` (the folder, locks, atomic writes, OS errors), ``lines``
(the line format), ``headers`` (``session.json``), ``log`` (the session lock,
tails, torn-tail repair, appending), ``leases`` (``lease.json`` and
``snapshot.bin``), ``store`` (``JSONLStore``).
"""

from __future__ import annotations

from chatsession.store.jsonl.store import JSONLStore

__all__ = ["JSONLStore"]

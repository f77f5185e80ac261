"""One store object's connections to its SQLite file, and where their calls run.

Blocking SQLite calls never wait on the event loop:

- **Fast path.** A short call (an append, a lease, a record) runs directly on
  the calling (event loop) thread, on a connection whose busy timeout is 0:
  its ``BEGIN IMMEDIATE`` either gets the write lock at once or fails at once
  with SQLITE_BUSY. An uncontended append thus costs no thread hop.
- **Worker.** When the lock is taken (another process or this store's worker
  is writing), the call is rolled back and handed, from scratch, to the store's
  worker thread, whose connection waits up to ``busy_timeout``. Long calls
  (reads of a history, blobs, snapshots, deletes) always run there.

The fast connection does not checkpoint the WAL on commit (that would write
and sync pages on the loop): once the WAL is large the worker runs a passive
checkpoint, and calls go to the worker until it is done, so the first write
after it finds the whole WAL copied and starts the WAL over (it would grow
without end if writes went on beside the checkpoint). With ``synchronous=full`` every commit syncs the disk, so
every call runs on the worker. A ``:memory:`` database has one connection, on
the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from chatsession.errors import ChatSessionClosedError
from chatsession.store.sqlite.schema import connect, is_busy, translate

__all__ = ["Connections", "in_one_snapshot"]

T = TypeVar("T")
logger = logging.getLogger("chatsession.store.sqlite")

_CHECK_WAL_EVERY = 64  # fast commits between two looks at the WAL's size
_WAL_CHECKPOINT_BYTES = 4 << 20  # a passive checkpoint once the WAL is larger


def in_one_snapshot(fn: Callable[[sqlite3.Connection], T]) -> Callable[[sqlite3.Connection], T]:
    """``fn`` run inside one read transaction, so all its statements see the file in one state.

    Without it each statement sees the file as it is then: a read that takes a
    session's head, then its events, could see an append land in between.
    """

    def run(db: sqlite3.Connection) -> T:
        db.execute("BEGIN")
        result = fn(db)
        db.execute("COMMIT")
        return result

    return run


def _rollback(db: sqlite3.Connection) -> None:
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")


class Connections:
    """The connections of one store object and the thread each is used on.

    Args:
        path: The database file (or ``:memory:``).
        busy_timeout: Milliseconds the worker waits for another writer's lock.
        synchronous: ``normal`` or ``full``.
        url: The store's URL, for messages.
    """

    def __init__(self, path: str, busy_timeout: int, synchronous: str, url: str) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self.synchronous = synchronous
        self.url = url
        self._fast_path = path != ":memory:" and synchronous == "normal"
        self._executor: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None  # the worker's
        self._fast: sqlite3.Connection | None = None  # the loop's, busy timeout 0
        self._fast_lock = threading.Lock()  # one caller at a time on the fast connection
        self._open_lock = threading.Lock()
        self._fast_commits = 0
        self._checkpoint_due = False
        self._closed = False

    # -- the worker ----------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        with self._open_lock:
            if self._db is None:
                self._db = connect(self.path, self.busy_timeout, self.synchronous)
                if self._fast_path:
                    fast = connect(self.path, self.busy_timeout, self.synchronous, upgrade=False)
                    fast.execute("PRAGMA busy_timeout = 0")
                    fast.execute("PRAGMA wal_autocheckpoint = 0")
                    self._fast = fast
            return self._db

    def _call(self, db: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return fn(db)
        except sqlite3.Error as exc:
            _rollback(db)
            raise translate(exc, self.path, self.busy_timeout) from exc
        except BaseException:
            _rollback(db)
            raise

    def _work(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return self._call(self._open(), fn)

    def _worker(self) -> ThreadPoolExecutor:
        if self._closed:
            raise ChatSessionClosedError(f"store {self.url} is closed")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="chatsession-sqlite"
            )
        return self._executor

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` on the worker thread (rolled back if it raises).

        Raises:
            ChatSessionClosedError: The store is closed.
            StoreUnavailableError, CorruptDataError: SQLite's errors, translated.
        """
        executor = self._worker()
        return await asyncio.get_running_loop().run_in_executor(executor, self._work, fn)

    # -- the fast path -------------------------------------------------------

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a short ``fn(connection)`` on this thread if it need not wait, else on the worker.

        ``fn`` must start its writes with ``BEGIN IMMEDIATE`` and touch nothing
        but the database: when the lock is taken it is rolled back and run
        again, from the start, on the worker.
        """
        fast = self._fast
        if (
            fast is not None
            and not self._closed
            and not self._checkpoint_due
            and self._fast_lock.acquire(blocking=False)
        ):
            try:
                result = fn(fast)
            except sqlite3.Error as exc:
                _rollback(fast)
                if not is_busy(exc):
                    raise translate(exc, self.path, self.busy_timeout) from exc
            except BaseException:
                _rollback(fast)
                raise
            else:
                self._after_fast_call(fast)
                return result
            finally:
                self._fast_lock.release()
        return await self.run(fn)

    def _after_fast_call(self, fast: sqlite3.Connection) -> None:
        """Now and then, have the worker checkpoint a large WAL (the fast connection never does)."""
        self._fast_commits += 1
        if self._fast_commits % _CHECK_WAL_EVERY or self._checkpoint_due:
            return
        try:
            size = os.stat(f"{self.path}-wal").st_size
        except OSError:
            return
        if size > _WAL_CHECKPOINT_BYTES and self._executor is not None:
            self._checkpoint_due = True
            self._executor.submit(self._checkpoint)

    def _checkpoint(self) -> None:
        try:
            if self._db is not None and not self._closed:
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:  # a cache's upkeep: the next one retries
            logger.debug("checkpoint of %s failed: %s", self.path, exc)
        finally:
            self._checkpoint_due = False

    # -- closing -------------------------------------------------------------

    async def aclose(self) -> None:
        """Close both connections and stop the worker thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        executor, self._executor = self._executor, None
        if executor is None:
            return

        def close() -> None:
            with self._fast_lock:
                for db in (self._fast, self._db):
                    if db is not None:
                        db.close()
                self._fast = self._db = None

        await asyncio.get_running_loop().run_in_executor(executor, close)
        executor.shutdown(wait=False)

"""The store's folder: where each file lives, locks, atomic writes, and the OS's errors in ours."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock

from chatsession.errors import StoreUnavailableError

__all__ = [
    "CORRUPT",
    "HEADER",
    "LEASE",
    "LOCK_TIMEOUT",
    "LOG",
    "OFFLOAD",
    "SNAPSHOT",
    "TRASH",
    "Folder",
]

HEADER = "session.json"
LOG = "context.jsonl"
CORRUPT = "context.jsonl.corrupt"
OFFLOAD = "offload"
LEASE = "lease.json"
SNAPSHOT = "snapshot.bin"
LOCK_TIMEOUT = 60.0
TRASH = ".deleted-"  # a deleted session's folder is renamed to this prefix, then removed

#: What to tell the user for an operating-system error, by errno.
_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space, then retry",
    errno.EDQUOT: "the disk quota is used up: free some space or raise the quota, then retry",
    errno.EROFS: "the file system is read-only: remount it read-write, or open the store on "
    "a writable folder",
    errno.EACCES: "permission denied: make the store folder readable and writable by this user",
    errno.EPERM: "permission denied: make the store folder readable and writable by this user",
    errno.EIO: "the disk or network file system reported an I/O error: check it (dmesg, fsck), "
    "then retry",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) or close other stores",
    errno.ENFILE: "too many open files on this machine: close some, then retry",
    errno.ENAMETOOLONG: "the path is too long: open the store on a shorter path",
}


def _errno(exc: OSError) -> int | None:
    """The errno of ``exc``, also for ``OSError(errno.X)`` built with one argument."""
    if exc.errno is not None:
        return exc.errno
    if len(exc.args) == 1 and isinstance(exc.args[0], int):
        return exc.args[0]
    return None


class Folder:
    """The store's root folder and the files of its sessions.

    Args:
        root: The folder (absolute).
        fsync: Whether writes are ``fsync``\\ ed before they count as done.
    """

    def __init__(self, root: Path, fsync: bool) -> None:
        self.root = root
        self.fsync = fsync

    def dir(self, session_id: str) -> Path:
        """The session's folder."""
        return self.root / session_id

    @contextlib.contextmanager
    def root_lock(self) -> Iterator[None]:
        """Hold the store's lock (``.chatsession.lock``), across processes.

        Creating (with the count ``max_per_user`` needs), forking, updating,
        deleting and purging sessions hold it, so what one of them reads of
        the store's sessions cannot change until it is done. Take it before a
        session's lock, never after.
        """
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        with FileLock(str(self.root / ".chatsession.lock"), timeout=LOCK_TIMEOUT, mode=0o600):
            yield

    def session_lock(self, session_id: str) -> FileLock:
        """The lock that serialises the writes to one session (not yet held)."""
        return FileLock(str(self.dir(session_id) / ".lock"), timeout=LOCK_TIMEOUT, mode=0o600)

    def write_atomic(self, path: Path, data: bytes) -> None:
        """Replace ``path`` by ``data`` in one step (a temporary file renamed over it)."""
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def unavailable(self, exc: OSError, doing: str, outcome: str = "") -> StoreUnavailableError:
        """A ``StoreUnavailableError`` that says what failed, where, and what to do."""
        code = _errno(exc)
        reason = exc.strerror or (os.strerror(code) if code is not None else str(exc))
        where = f": {exc.filename}" if exc.filename else ""
        if isinstance(exc, NotADirectoryError | FileExistsError) or code in (
            errno.ENOTDIR,
            errno.EEXIST,
        ):
            if self.root.exists() and not self.root.is_dir():
                advice = f"{self.root} is a file, not a folder: open the store on a folder"
            else:
                advice = (
                    f"a file stands where the store expects a folder under {self.root}: "
                    "move it away, or open the store on another folder"
                )
        elif isinstance(exc, FileNotFoundError):
            advice = (
                f"a file under {self.root} vanished while in use: check what else removes "
                "files there, then retry"
            )
        else:
            advice = _ADVICE.get(code or 0, f"check the disk holding {self.root}, then retry")
        return StoreUnavailableError(
            f"file store {self.root}: could not {doing} ({reason}{where}); {advice}{outcome}"
        )

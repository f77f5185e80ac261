"""What the command line keeps on this machine: the last session used with each store.

The data directory is ``CHATSESSION_DATA_DIR``, else the platform's user
data directory (``~/.local/share/chatsession`` on Linux). It is created with
mode 0700, and every file written in it is created 0600 (a temporary file
opened with that mode, then renamed over the old one), so no other local user
can read it at any instant.

``last_session`` remembers, per store, the last session ``chatsession chat``
used, for ``--resume``. It holds no credentials: a store is named by the
SHA-256 of its URL with the password and secret query values replaced by
``***`` (:func:`chatsession.cli.redaction.display_url`), so a changed password still
finds the session, and the file is no help to someone who reads it. Files
written by earlier versions (the plain URL on the first line, the session id
on the second) are still read, and are rewritten in the new form the next
time a session is remembered.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from pathlib import Path

from chatsession.cli.redaction import display_url
from chatsession.settings import get_settings

__all__ = [
    "data_dir",
    "ensure_data_dir",
    "last_session",
    "remember_session",
    "store_key",
    "write_private_file",
]

LAST_SESSION_FILE = "last_session"
#: the first line of the current ``last_session`` format
HEADER = "# chatsession last_session v2: sha256 of the store URL (credentials removed), session id"
#: stores remembered at most (the most recently used are kept)
MAX_STORES = 32


def data_dir() -> Path:
    """The directory for local state (not created)."""
    configured = get_settings().data_dir
    if configured:
        return configured.expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("chatsession", appauthor=False))


def ensure_data_dir() -> Path:
    """The data directory, created with mode 0700 if it does not exist.

    An existing directory is left as it is (its owner chose its mode).

    Raises:
        OSError: The directory cannot be created.
    """
    path = data_dir()
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
    return path


def write_private_file(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically; the file is created with mode 0600.

    Raises:
        OSError: The file cannot be written (the old one, if any, is unchanged).
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    descriptor = os.open(temporary, flags, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def store_key(store_url: str) -> str:
    """How ``last_session`` names a store: ``sha256:`` and the hash of the redacted URL."""
    return "sha256:" + hashlib.sha256(display_url(store_url).encode("utf-8")).hexdigest()


def _read_entries(path: Path) -> list[tuple[str, str]]:
    """``(store key or legacy URL, session id)`` pairs, most recent first."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    if not lines:
        return []
    if lines[0] != HEADER:
        # written by an earlier version: the store URL, then the session id
        if len(lines) >= 2 and lines[0] and lines[1]:
            return [(lines[0], lines[1])]
        return []
    entries = []
    for line in lines[1:]:
        key, _, session_id = line.partition(" ")
        if key.startswith("sha256:") and session_id:
            entries.append((key, session_id))
    return entries


def _matches(entry_key: str, store_url: str, key: str) -> bool:
    return entry_key in (key, store_url) or store_key(entry_key) == key


def last_session(store_url: str) -> str | None:
    """The id of the last session used with ``store_url``, or None."""
    key = store_key(store_url)
    for entry_key, session_id in _read_entries(data_dir() / LAST_SESSION_FILE):
        if _matches(entry_key, store_url, key):
            return session_id
    return None


def remember_session(store_url: str, session_id: str) -> None:
    """Record ``session_id`` as the last session used with ``store_url``.

    Entries of earlier versions (plain URLs) are rewritten as hashes.

    Raises:
        OSError: The file cannot be written.
    """
    path = ensure_data_dir() / LAST_SESSION_FILE
    key = store_key(store_url)
    entries = [(key, session_id)]
    for entry_key, other in _read_entries(path):
        if _matches(entry_key, store_url, key):
            continue
        if not entry_key.startswith("sha256:"):
            entry_key = store_key(entry_key)
        entries.append((entry_key, other))
    body = "".join(f"{k} {v}\n" for k, v in entries[:MAX_STORES])
    write_private_file(path, f"{HEADER}\n{body}")

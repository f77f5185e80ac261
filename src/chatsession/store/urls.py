"""Showing URLs and messages without their secrets.

Re-exported by :mod:`chatsession.store.base`.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode

_SECRET_KEYS = ("password", "passwd", "pwd", "secret", "token", "api_key", "apikey", "auth")


def redact_url(url: object) -> str:
    """``url`` safe to show: its password and secret-looking query values replaced by ``***``.

    Used in every message, ``repr`` and log line that shows a store or model URL.
    A password holding characters that should have been percent-encoded
    (``/``, ``?``, ``#``, ``@``) is masked too: everything between ``user:``
    and the last ``@`` counts as the password.
    """
    if not isinstance(url, str):
        return repr(url)
    scheme, sep, rest = url.partition("://")
    at = rest.rfind("@")
    if sep and at >= 0 and not rest.startswith("/"):
        user, colon, _ = rest[:at].partition(":")
        if colon:
            rest = f"{user}:***@{rest[at + 1 :]}"
    masked = scheme + sep + rest
    base, question, query = masked.partition("?")
    if not question or not any(key in query.lower() for key in _SECRET_KEYS):
        return masked  # as given (urlunsplit would rewrite sqlite:/// and file: URLs)
    query, hash_mark, fragment = query.partition("#")
    pairs = parse_qsl(query, keep_blank_values=True)
    shown = urlencode(
        [(k, "***" if any(s in k.lower() for s in _SECRET_KEYS) else v) for k, v in pairs],
        safe="/:,*",
    )
    return f"{base}?{shown}{hash_mark}{fragment}"


_URL_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s/@:]*):[^\s@]*@")


def redact_text(text: str) -> str:
    """``text`` with every ``scheme://user:password@`` in it shown as ``scheme://user:***@``.

    For messages that quote a URL among other words (errors from drivers and
    model servers) before they are shown or stored.
    """
    return _URL_CREDENTIALS.sub(r"\1:***@", text)

"""Credentials kept out of what the command line prints.

Store URLs and model options can carry passwords, tokens and API keys. The
command line registers each of them with a :class:`Redactor` as soon as it
reads them; every message it prints (errors, warnings, the exit line) goes
through the redactor, which

- rewrites every URL in the text with :func:`display_url` (password and
  secret-looking query values shown as ``***``, as
  :func:`chatsession.store.base.redact_url` decides), and
- replaces every registered secret, wherever it appears (also percent-encoded
  or decoded), by ``***``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from chatsession.store.base import redact_url

__all__ = ["Redactor", "display_url"]

# a URL in free text; punctuation that ends a sentence or a clause is left out
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]*[^\s'\"<>`.,;:!?)\]}]")
# option names whose values are secrets (api_key, auth_token, password, ...)
_SECRET_NAME = re.compile(r"key|token|secret|passw|auth|credential", re.IGNORECASE)
#: secrets shorter than this are not searched for in free text (a one-letter
#: password would blank every such letter); URLs holding them are still redacted
MIN_SECRET_LENGTH = 4


def display_url(url: str) -> str:
    """``url`` as it may be shown: what :func:`redact_url` hides is ``***``, the rest as given.

    Only the authority and the query are taken from ``redact_url``, which
    re-joins a URL from its parts and so would show ``sqlite:///tmp/x.db`` as
    ``sqlite:/tmp/x.db``.
    """
    try:
        given = urlsplit(url)
    except ValueError:
        return redact_url(url)  # what it shows for a URL it cannot parse
    text = url
    if given.netloc:
        netloc = urlsplit(redact_url(f"x://{given.netloc}")).netloc
        if netloc != given.netloc:
            text = text.replace("//" + given.netloc, "//" + netloc, 1)
    if given.query:
        query = urlsplit(redact_url(f"x://h/?{given.query}")).query
        if query != given.query:
            text = text.replace("?" + given.query, "?" + query, 1)
    return text


class Redactor:
    """Removes registered secrets and URL credentials from text.

    Call it on any text before printing: ``click.echo(redactor(message))``.
    """

    def __init__(self) -> None:
        self._secrets: set[str] = set()

    def add_secret(self, value: object) -> None:
        """Never print ``value`` (nor its percent-encoded or decoded form)."""
        if not isinstance(value, str):
            return
        for form in (value, quote(value, safe=""), unquote(value)):
            if len(form) >= MIN_SECRET_LENGTH:
                self._secrets.add(form)

    def add_url(self, url: object) -> None:
        """Never print the password or the secret query values of ``url``."""
        if not isinstance(url, str):
            return
        try:
            parts = urlsplit(url)
            password = parts.password
        except ValueError:
            return  # not parseable: redact_url hides it whole wherever it is printed
        if password:
            self.add_secret(password)
        if parts.query:
            redacted = urlsplit(redact_url(url)).query
            given = parse_qsl(parts.query, keep_blank_values=True)
            shown = parse_qsl(redacted, keep_blank_values=True)
            if len(given) == len(shown):
                for (_, value), (_, masked) in zip(given, shown, strict=True):
                    if masked == "***" and value != "***":
                        self.add_secret(value)

    def add_options(self, options: Mapping[str, Any]) -> None:
        """Register model options: secret-looking names' values, and URL values."""
        for name, value in options.items():
            if not isinstance(value, str):
                continue
            if _SECRET_NAME.search(name):
                self.add_secret(value)
            if "://" in value:
                self.add_url(value)

    def __call__(self, text: str) -> str:
        """``text`` with URL credentials and every registered secret replaced by ``***``."""
        if "://" in text:
            text = _URL.sub(lambda match: display_url(match.group(0)), text)
        for secret in sorted(self._secrets, key=len, reverse=True):
            if secret in text:
                text = text.replace(secret, "***")
        return text

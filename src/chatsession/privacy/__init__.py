"""Privacy: secrets redacted before they are stored, and encryption at rest.

- :class:`Redactor` rewrites API keys, tokens, passwords and card numbers in
  events and values (``SessionManager(redact=...)``, ``ChatSession(redact=...)``).
- :class:`EncryptingStore` wraps any store and encrypts what it keeps with
  AES-256-GCM (``SessionManager(encryption_keys=...)``); it needs the
  ``encryption`` extra (``cryptography``), imported only when a store is made.

See ``docs/privacy.md``.
"""

from __future__ import annotations

from chatsession.privacy.crypto import KEY_BYTES, EncryptingStore, generate_key, key_id
from chatsession.privacy.redact import (
    DEFAULT_PATTERNS,
    DEFAULT_REPLACEMENT,
    DEFAULT_SENSITIVE_KEYS,
    RedactionPattern,
    Redactor,
    is_card_number,
    luhn_valid,
)

__all__ = [
    "DEFAULT_PATTERNS",
    "DEFAULT_REPLACEMENT",
    "DEFAULT_SENSITIVE_KEYS",
    "KEY_BYTES",
    "EncryptingStore",
    "RedactionPattern",
    "Redactor",
    "generate_key",
    "is_card_number",
    "key_id",
    "luhn_valid",
]

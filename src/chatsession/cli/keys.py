"""``chatsession keys create|list|revoke``: the HTTP server's API keys, in the store.

Keys are kept hashed in the store (see :mod:`chatsession.server.keys`); a new
key is printed once, by ``create``, and never again.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Awaitable, Callable
from typing import TypeVar

import click

from chatsession.cli import current_redactor, handle_errors, printable
from chatsession.errors import UsageError
from chatsession.server.keys import APIKey, KeyRing
from chatsession.store import Store, open_store

__all__ = ["keys"]

T = TypeVar("T")

_store_option = click.option(
    "--store", "store_url", metavar="URL", help="The store (default: the default SQLite store)."
)


def _with_ring(store_url: str | None, work: Callable[[KeyRing], Awaitable[T]]) -> T:
    current_redactor().add_url(store_url)

    async def run() -> T:
        store: Store = open_store(store_url)
        try:
            return await work(KeyRing(store, cache_seconds=0))
        finally:
            await store.aclose()

    return asyncio.run(run())


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


@click.group()
def keys() -> None:
    """API keys of the HTTP server (stored hashed in the store)."""


@keys.command("create")
@click.option("--user", "user_id", metavar="USER", help="The user the key acts as.")
@click.option("--admin", is_flag=True, help="May manage users and keys (/v1/admin).")
@click.option("--name", metavar="NAME", help="A label for the key.")
@_store_option
@handle_errors
def create(user_id: str | None, admin: bool, name: str | None, store_url: str | None) -> None:
    """Make a key and print it (once: only its hash is kept)."""
    if user_id is None and not admin:
        raise UsageError("keys create needs --user USER (or --admin for an admin key)")
    entry, key = _with_ring(
        store_url, lambda ring: ring.create_key(user_id, name=name, admin=admin)
    )
    click.echo(key)
    who = f"user {entry.user_id}" if entry.user_id else "no user"
    role = ", admin" if entry.admin else ""
    click.echo(
        printable(
            f"key {entry.key_id} ({who}{role}); it is shown only now: keep it", current_redactor()
        ),
        err=True,
    )


@keys.command("list")
@click.option("--user", "user_id", metavar="USER", help="Only this user's keys.")
@_store_option
@handle_errors
def list_keys(user_id: str | None, store_url: str | None) -> None:
    """List keys (ids and hints only; never the keys or their hashes)."""
    found: list[APIKey] = _with_ring(store_url, lambda ring: ring.list_keys(user_id=user_id))
    if not found:
        click.echo("no keys", err=True)
        return
    rows = [("KEY ID", "KEY", "USER", "NAME", "ADMIN", "CREATED", "REVOKED")]
    for entry in found:
        rows.append(
            (
                entry.key_id,
                entry.hint,
                entry.user_id or "-",
                entry.name or "-",
                "yes" if entry.admin else "no",
                _when(entry.created_at),
                _when(entry.revoked_at),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        click.echo(printable(line.rstrip(), current_redactor()))


@keys.command("revoke")
@click.argument("key_id")
@_store_option
@handle_errors
def revoke(key_id: str, store_url: str | None) -> None:
    """Revoke a key (servers stop accepting it within their key cache time, 2 s by default)."""
    entry = _with_ring(store_url, lambda ring: ring.revoke_key(key_id))
    if entry is None:
        raise UsageError(f"no key {key_id!r} (see 'chatsession keys list')")
    click.echo(printable(f"revoked key {entry.key_id}", current_redactor()), err=True)

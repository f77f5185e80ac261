"""The tables, as named migrations applied once each, in order, under an advisory lock."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import asyncpg.exceptions as pgerr

from chatsession.errors import CorruptDataError
from chatsession.store.postgres.errors import describe

if TYPE_CHECKING:
    from chatsession.store.postgres.connection import Conn

_MIGRATION_TIMEOUT = 3600.0  # seconds a migration statement (or the wait for one) may take


def _migration_1(s: str) -> list[str]:
    return [
        f"""CREATE TABLE {s}.sessions (
            pk bigserial PRIMARY KEY,
            id text NOT NULL UNIQUE,
            user_id text,
            agent_id text,
            window_id text,
            state text NOT NULL,
            created_at double precision NOT NULL,
            updated_at double precision NOT NULL,
            expires_at double precision,
            parent_pk bigint,
            parent_seq bigint,
            head bigint NOT NULL DEFAULT 0,
            version bigint NOT NULL DEFAULT 1,
            deleted boolean NOT NULL DEFAULT false,
            children integer NOT NULL DEFAULT 0,
            body jsonb NOT NULL DEFAULT '{{}}'
        )""",
        f"CREATE INDEX sessions_by_created ON {s}.sessions (created_at DESC, id DESC) WHERE NOT deleted",
        f"CREATE INDEX sessions_by_user ON {s}.sessions (user_id, created_at DESC, id DESC) WHERE NOT deleted",
        f"CREATE INDEX sessions_by_agent ON {s}.sessions (agent_id, created_at DESC, id DESC) WHERE NOT deleted",
        f"CREATE INDEX sessions_by_window ON {s}.sessions (window_id, created_at DESC, id DESC) WHERE NOT deleted",
        f"CREATE INDEX sessions_by_expiry ON {s}.sessions (expires_at) WHERE expires_at IS NOT NULL",
        f"""CREATE TABLE {s}.events (
            session_pk bigint NOT NULL,
            seq bigint NOT NULL,
            type text NOT NULL,
            ts double precision NOT NULL,
            turn_id text,
            v smallint NOT NULL,
            data text NOT NULL,
            PRIMARY KEY (session_pk, seq)
        )""",
        f"""CREATE TABLE {s}.blobs (
            session_pk bigint NOT NULL,
            id text NOT NULL,
            media_type text NOT NULL DEFAULT '',
            data bytea NOT NULL,
            PRIMARY KEY (session_pk, id)
        )""",
    ]


def _migration_2(s: str) -> list[str]:
    # One statement, so it is atomic; a payload that is not JSON aborts it.
    return [f"ALTER TABLE {s}.events ALTER COLUMN data TYPE jsonb USING data::jsonb"]


def _migration_3(s: str) -> list[str]:
    # Catalog changes only (a new column with a constant default is not written
    # into existing rows), plus one scan of the events table to check the new
    # constraint; no rewrite. The fillfactor applies to pages filled from now on.
    return [
        f"""ALTER TABLE {s}.events
            ALTER COLUMN data DROP NOT NULL,
            ADD COLUMN data_text text,
            ADD CONSTRAINT events_data_or_data_text CHECK ((data IS NULL) <> (data_text IS NULL))""",
        f"""ALTER TABLE {s}.sessions
            ADD COLUMN text_payloads boolean NOT NULL DEFAULT false,
            SET (fillfactor = 80)""",
    ]


def _migration_4(s: str) -> list[str]:
    # A nullable column without a default and a CHECK: catalog changes plus one
    # scan of the sessions table; no rewrite.
    return [
        f"""ALTER TABLE {s}.sessions
            ALTER COLUMN body DROP NOT NULL,
            ADD COLUMN body_text text,
            ADD CONSTRAINT sessions_body_or_body_text CHECK ((body IS NULL) <> (body_text IS NULL))"""
    ]


def _migration_5(s: str) -> list[str]:
    # Catalog changes only: new nullable columns, and one with a constant
    # default, are not written into existing rows; no scan, no rewrite. The
    # lease lives on the session's row (a row, not an advisory lock: it outlives
    # connections and works through poolers); lease_token is the highest fencing
    # token handed out (the current holder's while lease_owner is set).
    return [
        f"ALTER TABLE {s}.events ADD COLUMN event_id text",
        f"""ALTER TABLE {s}.sessions
            ADD COLUMN lease_owner text,
            ADD COLUMN lease_token bigint NOT NULL DEFAULT 0,
            ADD COLUMN lease_expires double precision""",
        f"""CREATE TABLE {s}.snapshots (
            session_pk bigint PRIMARY KEY,
            seq bigint NOT NULL,
            data bytea NOT NULL
        )""",
    ]


#: Applied in order, each once, recorded by name. Never edit or reorder: append.
MIGRATIONS: list[tuple[str, Callable[[str], list[str]]]] = [
    ("001_sessions_events_blobs", _migration_1),
    ("002_events_data_jsonb", _migration_2),
    ("003_events_data_text", _migration_3),
    ("004_sessions_body_text", _migration_4),
    ("005_leases_event_ids_snapshots", _migration_5),
]


async def migrate(conn: Conn, schema: str, address: str) -> None:
    """Create schema ``schema`` and apply the migrations it lacks, in one transaction.

    An advisory lock (held to the end of the transaction) makes processes that
    open the store at once apply each migration once.

    Raises:
        CorruptDataError: A migration cannot convert the stored data; nothing
            was changed.
    """
    s, wait = f'"{schema}"', _MIGRATION_TIMEOUT
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))", f"chatsession:{schema}", timeout=wait
        )
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {s}.chatsession_migrations "
            "(name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r[0] for r in await conn.fetch(f"SELECT name FROM {s}.chatsession_migrations")}
        for name, migration in MIGRATIONS:
            if name in done:
                continue
            try:
                for statement in migration(s):
                    await conn.execute(statement, timeout=wait)
            except (pgerr.DataError, pgerr.CheckViolationError) as exc:
                raise CorruptDataError(
                    f"PostgreSQL at {address}, schema {schema!r}: migration {name} cannot "
                    f"convert the stored data ({describe(exc)}); nothing was changed: repair "
                    "or delete the rows it names, then open the store again"
                ) from exc
            await conn.execute(f"INSERT INTO {s}.chatsession_migrations (name) VALUES ($1)", name)

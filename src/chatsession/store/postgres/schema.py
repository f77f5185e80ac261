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


# What an event adds to its session's figures (chatsession.store.types.count_events),
# for events stored before migration 006, computed from what the row keeps. A
# payload kept as text is its exact bytes; one kept as jsonb has lost its text:
# it counts its compact form (jsonb's text minus the ", " and ": " it puts between
# items), which is the text chatsession itself writes. total_tokens counts when it
# is a plain non-negative integer (an int to json.loads); in a payload kept as
# text every escape is blanked out first, so that a \u0000 or a lone surrogate
# (why it is kept as text) cannot stop the json parser; key order and duplicates
# (the last one counts) as in json.loads.
_OLD_TOKENS = """CASE
    WHEN type <> 'usage' THEN 0
    WHEN data IS NOT NULL THEN CASE
        WHEN jsonb_typeof(data -> 'total_tokens') = 'number'
            AND data ->> 'total_tokens' ~ '^[0-9]+$'
        THEN (data ->> 'total_tokens')::numeric ELSE 0 END
    ELSE (SELECT CASE
        WHEN json_typeof(j -> 'total_tokens') = 'number' AND j ->> 'total_tokens' ~ '^[0-9]+$'
        THEN (j ->> 'total_tokens')::numeric ELSE 0 END
        FROM (SELECT regexp_replace(data_text, '\\\\.', '_', 'g')::json AS j) AS blanked)
    END"""
_OLD_BYTES = """CASE WHEN data IS NULL THEN octet_length(data_text)
    ELSE octet_length(data::text) - (
        SELECT COALESCE(sum(CASE jsonb_typeof(item)
            WHEN 'object' THEN greatest(2 * (SELECT count(*) FROM jsonb_object_keys(item)) - 1, 0)
            WHEN 'array' THEN greatest(jsonb_array_length(item) - 1, 0)
            ELSE 0 END), 0)
        FROM jsonb_path_query(data, 'strict $.**') AS item)
    END"""


def _migration_6(s: str) -> list[str]:
    """Per-session figures for ``stats()``, and an index of a user's sessions by state.

    Adds ``sessions.messages``, ``tokens`` and ``bytes`` (what
    :func:`~chatsession.store.types.count_events` counts; every append adds
    to them in its own statement from now on; a fork starts at 0). Catalog
    changes first (constant defaults are not written into rows), then a
    back-fill: one pass over the events table counts what is already stored,
    once, and writes it into the sessions that have events (the others keep
    0). The back-fill is exact for ``messages``; ``tokens`` reads
    ``total_tokens`` as ``count_events`` does; ``bytes`` is exact for payloads
    kept as text and, for those kept as JSONB (which has lost their text),
    the length of their compact form, which is what chatsession itself
    writes (see ``_OLD_BYTES``). ``tokens`` is numeric: a usage event's
    ``total_tokens`` is any JSON integer.

    The index ``sessions_by_user_state`` serves listing one user's sessions
    in one state, and counting them for ``create(max_per_user=)``; its
    columns are ones an append never changes, so the append's UPDATE of
    the head stays HOT.
    """
    return [
        f"""ALTER TABLE {s}.sessions
            ADD COLUMN messages bigint NOT NULL DEFAULT 0,
            ADD COLUMN tokens numeric NOT NULL DEFAULT 0,
            ADD COLUMN bytes bigint NOT NULL DEFAULT 0""",
        f"""UPDATE {s}.sessions AS t
            SET messages = c.messages, tokens = c.tokens, bytes = c.bytes
            FROM (SELECT session_pk,
                    count(*) FILTER (WHERE type = 'message') AS messages,
                    COALESCE(sum({_OLD_TOKENS}), 0) AS tokens,
                    COALESCE(sum({_OLD_BYTES}), 0) AS bytes
                FROM {s}.events GROUP BY session_pk) AS c
            WHERE t.pk = c.session_pk""",
        f"CREATE INDEX sessions_by_user_state ON {s}.sessions "
        "(user_id, state, created_at DESC, id DESC) WHERE NOT deleted",
    ]


#: Applied in order, each once, recorded by name. Never edit or reorder: append.
MIGRATIONS: list[tuple[str, Callable[[str], list[str]]]] = [
    ("001_sessions_events_blobs", _migration_1),
    ("002_events_data_jsonb", _migration_2),
    ("003_events_data_text", _migration_3),
    ("004_sessions_body_text", _migration_4),
    ("005_leases_event_ids_snapshots", _migration_5),
    ("006_session_figures_user_states", _migration_6),
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

"""The fleet database's schema, owned and migrated by portmeter (README "A fleet in PostgreSQL"
documents the tables for panels and billing jobs that read them).

Migrations are SQL, applied in order, once per version, each in the transaction that records it.
Several nodes may start at the same moment: the first takes a transaction-scoped advisory lock,
the others wait for it and then find the schema current. A database migrated by a newer portmeter
(a version above ours) is refused with a clear reason and left as it is.
"""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection

from daemon.bounds import EARLIEST_MOMENT, LATEST_MOMENT, MAX_PORT, MAX_USAGE_BYTES, MIN_PORT

SCHEMA = "portmeter"
# pg_advisory_xact_lock keys: one per kind of work that must run on one node at a time.
MIGRATION_LOCK = 0x706D_0001
RETENTION_LOCK = 0x706D_0002

MIGRATIONS: tuple[str, ...] = (
    # 1: servers, users and their resets, keys as seen per server, the usage ledger, dedupe.
    f"""
    CREATE TABLE {SCHEMA}.servers (
        name text PRIMARY KEY,
        first_seen timestamptz NOT NULL DEFAULT now(),
        last_delivery_at timestamptz,
        public_host text,
        reality_public_key text
    );
    CREATE TABLE {SCHEMA}.users (
        name text PRIMARY KEY,
        resets integer NOT NULL DEFAULT 0,
        reset_at timestamptz NOT NULL DEFAULT '-infinity'
    );
    CREATE TABLE {SCHEMA}.server_keys (
        server text NOT NULL,
        key_id text NOT NULL,
        name text NOT NULL,
        uuid text NOT NULL,
        port integer NOT NULL,
        epoch integer NOT NULL,
        first_seen timestamptz NOT NULL DEFAULT now(),
        last_seen timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (server, key_id)
    );
    CREATE INDEX server_keys_name ON {SCHEMA}.server_keys (name);
    CREATE TABLE {SCHEMA}.usage_hourly (
        name text NOT NULL,
        server text NOT NULL,
        hour timestamptz NOT NULL,
        rx_bytes bigint NOT NULL,
        tx_bytes bigint NOT NULL,
        rx_packets bigint NOT NULL,
        tx_packets bigint NOT NULL,
        reports integer NOT NULL,
        PRIMARY KEY (name, server, hour)
    );
    CREATE INDEX usage_hourly_hour ON {SCHEMA}.usage_hourly (hour);
    CREATE TABLE {SCHEMA}.usage_daily (
        name text NOT NULL,
        server text NOT NULL,
        day date NOT NULL,
        rx_bytes bigint NOT NULL,
        tx_bytes bigint NOT NULL,
        rx_packets bigint NOT NULL,
        tx_packets bigint NOT NULL,
        reports integer NOT NULL,
        PRIMARY KEY (name, server, day)
    );
    CREATE INDEX usage_daily_day ON {SCHEMA}.usage_daily (day);
    CREATE TABLE {SCHEMA}.totals (
        name text NOT NULL,
        server text NOT NULL,
        rx_bytes bigint NOT NULL,
        tx_bytes bigint NOT NULL,
        reports bigint NOT NULL,
        port integer,
        first_at timestamptz NOT NULL,
        last_at timestamptz NOT NULL,
        PRIMARY KEY (name, server)
    );
    CREATE TABLE {SCHEMA}.reports (
        report_id text PRIMARY KEY,
        server text NOT NULL,
        received_at timestamptz NOT NULL DEFAULT now(),
        deltas integer NOT NULL
    );
    CREATE INDEX reports_received ON {SCHEMA}.reports (received_at);
    """,
    # 2: the desired keys every node follows (README "Keys created once"): `same_name` is the
    # name folded as daemon/names.py folds it, so two spellings of one name are one key; every
    # insert, change and delete notifies `portmeter_keys` with the key's id (delivered at
    # commit); `version` grows with every change. A deleted key's row is deleted: a node drops
    # the fleet keys it holds that are no longer here. server_keys gains each node's status.
    f"""
    CREATE SEQUENCE {SCHEMA}.key_versions;
    CREATE TABLE {SCHEMA}.keys (
        id text PRIMARY KEY,
        name text NOT NULL,
        same_name text NOT NULL UNIQUE,
        uuid uuid NOT NULL UNIQUE,
        sub_token text NOT NULL UNIQUE,
        short_id text NOT NULL,
        data_limit_bytes bigint,
        expire_at timestamptz,
        enabled boolean NOT NULL,
        reset_strategy text NOT NULL,
        note text NOT NULL,
        groups text[] NOT NULL,
        speed_limit_bps bigint,
        max_connections integer,
        max_ips integer,
        created_at timestamptz NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now(),
        version bigint NOT NULL DEFAULT nextval('{SCHEMA}.key_versions')
    );
    CREATE FUNCTION {SCHEMA}.key_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'UPDATE' THEN
            NEW.version := nextval('{SCHEMA}.key_versions');
            NEW.updated_at := now();
        END IF;
        IF TG_OP = 'DELETE' THEN
            PERFORM pg_notify('portmeter_keys', OLD.id);
            RETURN OLD;
        END IF;
        PERFORM pg_notify('portmeter_keys', NEW.id);
        RETURN NEW;
    END $$;
    CREATE TRIGGER keys_changed BEFORE INSERT OR UPDATE OR DELETE ON {SCHEMA}.keys
        FOR EACH ROW EXECUTE FUNCTION {SCHEMA}.key_changed();
    ALTER TABLE {SCHEMA}.server_keys ADD COLUMN status text;
    """,
    # 3: each server's heartbeat (README "Keys created once"): a server silent for long is left
    # out of the fleet's subscriptions.
    f"""
    ALTER TABLE {SCHEMA}.servers ADD COLUMN last_seen timestamptz;
    """,
)
LATEST = len(MIGRATIONS)


def sane(alias: str, moments: tuple[str, ...], port: bool = False) -> str:
    """SQL: a usage row (`totals`, `usage_hourly`, `usage_daily` as `alias`) whose figures and
    moments lie within the bounds of daemon/bounds.py. A row outside them is damage (README
    "The database is input too"): reads leave it out instead of failing or showing it."""
    figures = [
        f"{alias}.{column} BETWEEN 0 AND {MAX_USAGE_BYTES}"
        for column in ("rx_bytes", "tx_bytes", "reports")
    ]
    if port:
        figures.append(f"({alias}.port IS NULL OR {alias}.port BETWEEN {MIN_PORT} AND {MAX_PORT})")
    low, high = f"{EARLIEST_MOMENT:%Y-%m-%d}", f"{LATEST_MOMENT:%Y-%m-%d}"
    times = [f"{alias}.{moment} BETWEEN '{low}' AND '{high}'" for moment in moments]
    return "(" + " AND ".join(figures + times) + ")"


class SchemaTooNew(Exception):
    """The database was migrated by a newer portmeter: this one must not write to it."""


async def migrate(conn: AsyncConnection[Any]) -> int:
    """Bring the schema to LATEST under the migration lock; the version it is at afterwards."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_version ("
            "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cursor = await conn.execute(
            f"SELECT coalesce(max(version), 0) FROM {SCHEMA}.schema_version"
        )
        row = await cursor.fetchone()
        current = int(row[0]) if row else 0
        if current > LATEST:
            raise SchemaTooNew(
                f"the fleet database's schema is version {current}, newer than this portmeter's "
                f"{LATEST}: upgrade portmeter on this server (nothing was written)"
            )
        for version in range(current + 1, LATEST + 1):
            await conn.execute(MIGRATIONS[version - 1])
            await conn.execute(
                f"INSERT INTO {SCHEMA}.schema_version (version) VALUES (%s)", (version,)
            )
        return LATEST

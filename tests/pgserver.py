"""A real PostgreSQL 15 for the fleet tests: Debian's server binaries, a cluster made with
`initdb` in a temp dir, run as the `postgres` user, listening on a Unix socket in that dir only
(no TCP). Each test gets its own database and role (`Cluster.database()`), dropped afterwards.

The superuser `postgres` connects without a password (trust, over the socket only); every other
role needs its password (scram-sha-256), so a wrong password is a real refusal.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.netlab import unique_name

PG_BIN = Path("/usr/lib/postgresql/15/bin")
SUPERUSER = "postgres"
PASSWORD = "fleet-test-secret"


def _as_postgres(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a server binary as the postgres user (the server refuses to run as root)."""
    account = pwd.getpwnam(SUPERUSER)

    def demote() -> None:
        os.setgid(account.pw_gid)
        os.setgroups([g.gr_gid for g in grp.getgrall() if SUPERUSER in g.gr_mem])
        os.setuid(account.pw_uid)

    return subprocess.run(
        list(args), check=check, capture_output=True, text=True, preexec_fn=demote, timeout=120
    )


@dataclass
class Database:
    """One test's database: its name, a role that owns it, and libpq strings to reach it."""

    cluster: Cluster
    name: str
    role: str

    @property
    def dsn(self) -> str:
        return self.cluster.dsn(self.name, self.role, PASSWORD)

    @property
    def admin_dsn(self) -> str:
        return self.cluster.dsn(self.name)

    def sql(self, query: str) -> str:
        """Run SQL as the superuser in this database; psql's unaligned output."""
        return self.cluster.psql(query, self.name)


class Cluster:
    """A running PostgreSQL cluster in its own temp dir."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="pmpg-"))
        os.chown(self.root, pwd.getpwnam(SUPERUSER).pw_uid, -1)
        self.data = self.root / "data"
        self.socket_dir = self.root
        self.log = self.root / "server.log"

    def init(self) -> None:
        _as_postgres(
            str(PG_BIN / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "--auth-local=trust",
            "--auth-host=reject", "-E", "UTF8", "--locale=C.UTF-8",
        )
        hba = self.data / "pg_hba.conf"
        hba.write_text(
            f"local all {SUPERUSER} trust\nlocal all all scram-sha-256\n", encoding="utf-8"
        )
        with (self.data / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write(
                "listen_addresses = ''\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                "fsync = on\nmax_connections = 200\nshared_buffers = 128MB\n"
                "password_encryption = 'scram-sha-256'\n"
            )

    def start(self) -> None:
        _as_postgres(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        """`mode` immediate is a crash: no checkpoint, recovery at the next start."""
        _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        status = _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "status", check=False)
        return status.returncode == 0

    def dsn(self, dbname: str = "postgres", user: str = SUPERUSER, password: str = "") -> str:
        secret = f" password={password}" if password else ""
        return f"host={self.socket_dir} dbname={dbname} user={user}{secret}"

    def psql(self, query: str, dbname: str = "postgres") -> str:
        done = subprocess.run(
            [str(PG_BIN.parent / "bin" / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", str(self.socket_dir), "-U", SUPERUSER, "-d", dbname, "-c", query],
            check=True, capture_output=True, text=True, timeout=120,
        )
        return done.stdout.strip()

    @contextlib.contextmanager
    def database(self) -> Iterator[Database]:
        """A fresh database and its owner role, dropped (with every connection) afterwards."""
        name = unique_name("pmdb")
        role = unique_name("pmrole")
        self.psql(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'")
        self.psql(f"CREATE DATABASE {name} OWNER {role}")
        try:
            yield Database(self, name, role)
        finally:
            if self.running():
                self.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
                self.psql(f"DROP ROLE IF EXISTS {role}")

    def remove(self) -> None:
        if self.data.exists() and self.running():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def cluster() -> Iterator[Cluster]:
    """A PostgreSQL cluster for the session, removed afterwards even when a test failed."""
    if not (PG_BIN / "initdb").exists():
        raise RuntimeError(
            f"{PG_BIN / 'initdb'} is missing: install Debian's postgresql-15 (make test does)"
        )
    made = Cluster()
    try:
        made.init()
        made.start()
        yield made
    finally:
        made.remove()

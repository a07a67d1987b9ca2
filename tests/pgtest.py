"""pytest plugin: PostgreSQL for the tests (registered in conftest.py's ``pytest_plugins``).

- ``pg_url``: a fresh, empty schema (dropped afterwards) in the server at ``OUTLIERD_TEST_PG``
  (default ``postgresql://postgres@127.0.0.1:5432/test``); when that server does not answer, one
  throwaway server started from the installed binaries (``initdb``/``pg_ctl``) for the session.
- ``pg_cluster``: a throwaway server of this test module's own (tests that stop and start it).
Both skip, saying what is missing, when neither is possible.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _psycopg():
    return pytest.importorskip("psycopg", reason="psycopg 3 is not installed (pip install 'outlierd[postgres]')")


def _answers(url: str) -> str | None:
    """None when ``url`` answers a query, else why not."""
    psycopg = _psycopg()
    try:
        with psycopg.connect(url, connect_timeout=2) as c:
            c.execute("SELECT 1")
        return None
    except psycopg.Error as e:
        return str(e).strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A throwaway PostgreSQL server (its own data directory and port), run as the ``postgres``
    user when this process is root (initdb refuses root)."""

    def __init__(self) -> None:
        missing = [b for b in ("initdb", "pg_ctl") if shutil.which(b) is None]
        if missing:
            pytest.skip(f"no PostgreSQL at {DEFAULT_URL} and no {', '.join(missing)} to start one")
        self.dir = Path(tempfile.mkdtemp(prefix="outlierd-pg-"))
        self.data = self.dir / "data"
        self.port = _free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as: list[str] = []
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                pytest.skip("running as root without runuser: cannot start a throwaway PostgreSQL")
            shutil.chown(self.dir, "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]
        res = self._run(["initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
        if res.returncode != 0:
            pytest.skip(f"initdb failed: {res.stderr.strip()[-300:]}")
        self.start()

    def _run(self, args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(self._as + args, capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        res = self._run(["pg_ctl", "-D", str(self.data), "-w", "-l", str(self.dir / "log"), "-o",
                         f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off", "start"])
        if res.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {res.stderr}{(self.dir / 'log').read_text()[-500:]}")

    def stop(self, mode: str = "immediate") -> None:
        self._run(["pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop"])

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_base_url():
    """A server URL that answers: OUTLIERD_TEST_PG / the local one, else a throwaway server."""
    url = os.environ.get("OUTLIERD_TEST_PG", DEFAULT_URL)
    if _answers(url) is None:
        yield url
        return
    cluster = Cluster()
    try:
        yield cluster.url
    finally:
        cluster.destroy()


def schema_url(base: str, schema: str) -> str:
    """``base`` whose sessions use ``schema`` (libpq's ``options``)."""
    return f"{base}{'&' if '?' in base else '?'}options={quote(f'-csearch_path={schema}')}"


@pytest.fixture
def pg_url(pg_base_url):
    """A fresh schema of its own in the test server, as a URL; dropped after the test."""
    psycopg = _psycopg()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_base_url, autocommit=True) as c:
        c.execute(f"CREATE SCHEMA {schema}")
    try:
        yield schema_url(pg_base_url, schema)
    finally:
        for _ in range(3):
            try:
                with psycopg.connect(pg_base_url, autocommit=True) as c:
                    c.execute(f"DROP SCHEMA {schema} CASCADE")
                break
            except psycopg.Error:
                time.sleep(0.5)


@pytest.fixture(scope="module")
def pg_cluster():
    """A throwaway PostgreSQL server for this module (``.url``, ``.stop()``, ``.start()``)."""
    _psycopg()
    cluster = Cluster()
    try:
        yield cluster
    finally:
        cluster.destroy()

"""Shared fixtures: databases (a SQLite file; a PostgreSQL schema of its own per test) and small models."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each xdist worker owns one of the machine's cores: two workers each spinning two OpenMP threads (and the
    # CLI subprocesses they start) would fight over the same cores and run slower than one worker alone.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after OMP_NUM_THREADS: torch reads it when it starts its thread pool)

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

PG_ENV = "ADAPTER_HUB_TEST_PG"


def pg_base_url() -> str | None:
    return os.environ.get(PG_ENV) or None


def _pg_unavailable() -> str | None:
    """Why PostgreSQL tests cannot run here, or None when they can."""
    base = pg_base_url()
    if base is None:
        return f"PostgreSQL tests need {PG_ENV}=postgresql+psycopg://… (.ci/run sets it when a server answers)"
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine(base)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:  # any failure to connect means: skip, saying why
        return f"PostgreSQL at {base} does not answer: {str(exc).splitlines()[0]}"
    return None


@pytest.fixture
def _float64() -> Iterator[None]:
    """float64 as the default dtype inside the test (for modules whose references compare to 1e-10 or less)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="session")
def pg_available() -> str | None:
    return _pg_unavailable()


@pytest.fixture
def pg_url(pg_available: str | None) -> Iterator[str]:
    """A SQLAlchemy URL whose connections live in a fresh schema of the test PostgreSQL (dropped after)."""
    if pg_available is not None:
        pytest.skip(pg_available)
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    base = str(pg_base_url())
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'hub.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using it runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hub.db'}"
    return request.getfixturevalue("pg_url")

"""Migrations: they build exactly the ORM schema, keep data across an upgrade, and run once however many
processes open an empty database at the same time."""

from __future__ import annotations

import multiprocessing as mp
import re
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, text

from adapter_hub.registry import Hub, SchemaError
from adapter_hub.registry import schema as schema_mod
from adapter_hub.registry.db import make_engine
from adapter_hub.registry.models import Base

CTX = mp.get_context("forkserver")
CTX.set_forkserver_preload(["torch", "adapter_hub.model", "adapter_hub.registry", "helpers"])


def test_migrations_build_exactly_the_orm_schema(db_url: str) -> None:
    engine = make_engine(db_url)
    schema_mod.upgrade(engine)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        diff = compare_metadata(ctx, Base.metadata)
    engine.dispose()
    assert diff == []


def test_the_migration_history_is_linear_and_reaches_every_table() -> None:
    script = schema_mod.script_directory()
    assert len(script.get_heads()) == 1
    revisions = list(script.walk_revisions())
    assert [r.down_revision for r in revisions][-1] is None
    created = set()
    for rev in revisions:
        created |= set(re.findall(r'op\.create_table\(\s*"(\w+)"', Path(rev.path).read_text()))
    assert created == set(Base.metadata.tables)


V1_ROWS = [
    "INSERT INTO backbones (id, name, architecture, fingerprint, created_at) "
    "VALUES (1, 'r18', 'resnet18', '" + "ab" * 32 + "', '2024-01-01 00:00:00')",
    "INSERT INTO tasks (id, name, domain, output, direction, created_at) "
    "VALUES (1, 'digits', 'mnist', '{\"num_classes\": 10}', 'max', '2024-01-01 00:00:00')",
    "INSERT INTO adapters (id, task_id, name, created_at) VALUES (1, 1, 'lora', '2024-01-01 00:00:00')",
    "INSERT INTO versions (id, adapter_id, number, backbone_id, digest, size, config, trainable_params, created_at) "
    "VALUES (1, 1, 1, 1, '" + "11" * 32 + "', 10, '{\"r\": 8}', 100, '2024-01-01 00:00:00')",
    "INSERT INTO versions (id, adapter_id, number, backbone_id, digest, size, config, trainable_params, created_at) "
    "VALUES (2, 1, 2, 1, '" + "22" * 32 + "', 20, '{\"r\": 4}', 50, '2024-01-02 00:00:00')",
    "INSERT INTO lineage (id, child_id, parent_id, relation) VALUES (1, 2, 1, 'finetuned_from')",
]


def test_upgrade_keeps_the_data_of_an_older_database(tmp_path: Path, db_url: str) -> None:
    engine = make_engine(db_url)
    schema_mod.upgrade(engine, "0001")
    with engine.begin() as conn:
        for sql in V1_ROWS:
            conn.execute(text(sql))
    with pytest.raises(SchemaError, match=r"revision 0001, older .* run `adapter-hub db upgrade`"):
        Hub.open(tmp_path, db_url)

    schema_mod.upgrade(engine)
    if engine.dialect.name == "sqlite":  # the batch migration rebuilt `versions` under its foreign keys
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall() == []
            assert conn.exec_driver_sql("PRAGMA integrity_check").fetchall() == [("ok",)]
    with Hub.open(tmp_path, db_url) as hub:
        v1, v2 = hub.versions("digits/lora")
        assert (v1.digest, v1.size, v1.config, v1.trainable_params) == ("11" * 32, 10, {"r": 8}, 100)
        assert (v2.number, v2.status, v2.backbone, v2.fingerprint) == (2, "ready", "r18", "ab" * 32)
        assert [(e.child, e.parent, e.relation) for e in hub.lineage(v2.ref).edges] == [
            ("digits/lora:2", "digits/lora:1", "finetuned_from")
        ]
        assert hub.task("digits").output == {"num_classes": 10}
        hub.set_alias(v1.ref, "production")  # the new tables work on the old rows
        hub.log_metric(v2.ref, "val/accuracy", 0.9)
        assert hub.resolve("digits/lora@production").number == 1

    # down to the first revision and back up: the core rows survive both ways
    schema_mod.downgrade(engine, "0001")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT number, digest FROM versions ORDER BY number")).fetchall() == [
            (1, "11" * 32),
            (2, "22" * 32),
        ]
    schema_mod.upgrade(engine)
    with Hub.open(tmp_path, db_url) as hub:
        assert [v.number for v in hub.versions("digits/lora")] == [1, 2]
    engine.dispose()


def _open(home: str, url: str, barrier: Any, out: Any) -> None:
    try:
        barrier.wait(60)
        Hub.open(home, url).close()
        out.put(None)
    except BaseException as exc:  # report to the parent, whatever it was
        out.put(f"{type(exc).__name__}: {exc}")


def test_processes_opening_an_empty_database_at_once_do_not_race(tmp_path: Path, db_url: str) -> None:
    n = 6
    barrier, out = CTX.Barrier(n), CTX.Queue()
    procs = [CTX.Process(target=_open, args=(str(tmp_path), db_url, barrier, out)) for _ in range(n)]
    for p in procs:
        p.start()
    errors = [e for e in (out.get(timeout=120) for _ in procs) if e]
    for p in procs:
        p.join(60)
    assert errors == []
    engine = create_engine(db_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).fetchall() == [
            (schema_mod.head_revision(),)
        ]
    engine.dispose()

"""Packaging: every package is in the wheel, and a non-editable install finds its migrations."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT
from sqlalchemy import create_engine, text

from adapter_hub.registry import schema as schema_mod


def test_every_package_is_listed_for_the_wheel() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "adapter_hub").rglob("__init__.py")} | {
        "adapter_hub.migrations." + ".".join(p.parent.relative_to(ROOT / "migrations").parts)
        for p in (ROOT / "migrations").rglob("__init__.py")
        if p.parent != ROOT / "migrations"
    }
    on_disk.add("adapter_hub.migrations")
    missing = sorted(on_disk - listed)
    assert missing == [], f"add these packages to [tool.setuptools] packages in pyproject.toml: {missing}"


@pytest.mark.slow
def test_a_non_editable_install_finds_its_migrations(tmp_path: Path) -> None:
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "--target", str(target), str(ROOT)], check=True, capture_output=True, timeout=300)
    assert (target / "adapter_hub" / "migrations" / "env.py").is_file()
    probe = (
        "import adapter_hub, sys\n"
        "from adapter_hub.registry import Hub, schema\n"
        "hub = Hub.open(sys.argv[1])\n"
        "print(adapter_hub.__file__); print(schema.migrations_dir()); print(schema.head_revision())\n"
        "hub.close()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop("ADAPTER_HUB_DB", None)
    run = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path / "home")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    package, migrations, head = run.stdout.split()
    assert Path(package).is_relative_to(target) and Path(migrations).is_relative_to(target)
    assert head == schema_mod.head_revision()
    engine = create_engine(f"sqlite:///{tmp_path / 'home' / 'hub.db'}")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head
    engine.dispose()

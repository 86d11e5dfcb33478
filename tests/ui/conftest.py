"""The registry the web view's tests browse (see ui_registry.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from ui_registry import fill

from adapter_hub.registry import Hub


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    home = tmp_path_factory.mktemp("ui")
    with Hub.open(home, f"sqlite:///{home / 'hub.db'}") as hub:
        refs = fill(hub)
    return home, refs

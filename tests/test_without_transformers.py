"""The package works without transformers: every module imports, and a Transformers backbone asks for the extra
in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BLOCK = "import sys; sys.modules['transformers'] = None; sys.modules['tokenizers'] = None\n"


def test_every_module_imports_and_backbone_add_hf_names_the_extra(tmp_path: Path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"")
    (tmp_path / "m" / "tokenizer.json").write_text("{}")
    code = BLOCK + (
        "import adapter_hub, adapter_hub.hf, adapter_hub.text, adapter_hub.pipelines, adapter_hub.predict\n"
        "import adapter_hub.training, adapter_hub.backbones, adapter_hub.cli\n"
        "from adapter_hub.cli import main\n"
        "main(['backbone', 'add', 'x', '--hf', sys.argv[1]])\n"
    )
    env = {**os.environ, "ADAPTER_HUB_HOME": str(tmp_path / "home")}
    env.pop("ADAPTER_HUB_DB", None)
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == ("Error: Transformers backbones need the transformers package: pip install "
                                   "'adapter-hub[hf]'")  # fmt: skip

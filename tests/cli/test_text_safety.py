"""Stored text is shown, never obeyed: markup, terminal escapes and 5,000-character values in every field a
user can set print literally (escaped where needed) in every listing; export never replaces a file unasked."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from helpers import TESTS, seeded_backbone, trained_model
from rich.cells import cell_len
from sqlalchemy import String

from adapter_hub.cli import main
from adapter_hub.registry import Hub
from adapter_hub.registry.models import AliasRow, BackboneRow, EdgeRow, MetricRow, TagRow, TaskRow, VersionRow
from adapter_hub.registry.render import to_dot, to_mermaid, visible

WIDTH = 240
ENV = {"COLUMNS": str(WIDTH), "ADAPTER_HUB_TRUSTED_FACTORIES": "helpers:tiny_backbone"}

MARKUP = ("[/bold]", "[link=https://evil.example]x", "[red]x")
SGR = "\x1b[31m"  # recolours the terminal
OSC8 = "\x1b]8;;http://x\x1b\\"  # opens a terminal hyperlink
HOSTILE = f"{' '.join(MARKUP)} {SGR}red {OSC8}link \u202eevil\r\nnext"
# what the hostile text looks like once shown: markup literal, every control character a visible escape
SHOWN = ("[/bold]", "[link=https://evil.example]x", "[red]x", r"\x1b[31mred", r"\x1b]8;;http://x\x1b\link")
LONG = "L" * 5000


def longest(column: Any, char: str = "L") -> str:
    """As long a value as the column keeps: 5,000 characters in free text, the limit of a String(n)."""
    kind = column.property.columns[0].type
    return char * (kind.length if isinstance(kind, String) else 5000)


def fit(column: Any, text: str) -> str:
    """TEXT cut to what the column keeps."""
    kind = column.property.columns[0].type
    return text[: kind.length] if isinstance(kind, String) else text


def invoke(home: Path, *args: str, code: int = 0, color: bool = False) -> Result:
    env: dict[str, str | None] = {**ENV, "FORCE_COLOR": "1", "NO_COLOR": None} if color else {**ENV}
    result = CliRunner(env=env).invoke(main, ["--home", str(home), *args])
    if code == 0:
        assert result.exit_code == 0 and result.exception is None, (args, result.output, result.exception)
    else:  # a user error: exit code 1, exactly one line on stderr
        assert result.exit_code == code, (args, result.output)
        assert isinstance(result.exception, SystemExit)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.output
    return result


def assert_inert(text: str) -> None:
    """Nothing in TEXT drives a terminal: no ESC, no C1 control, no bidi override, no raw carriage return."""
    for raw in ("\x1b", "\x9b", "\u202e", "\r"):
        assert raw not in text, f"{raw!r} reached the output"


def assert_fits(text: str) -> None:
    """A table stays a table: no line wider than the terminal."""
    widest = max(cell_len(line) for line in text.splitlines())
    assert widest <= WIDTH, widest


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry holding hostile text in every free-text field, and the longest value each field keeps."""
    home = tmp_path_factory.mktemp("text") / "home"
    hostile_short = "[/m] \x1b[31m|]\"\\"
    with Hub.open(home) as hub:
        hub.add_backbone(
            "tiny", seeded_backbone(0), architecture=fit(BackboneRow.architecture, HOSTILE), description=HOSTILE
        )
        hub.add_backbone("long", "ab" * 32, architecture=longest(BackboneRow.architecture), description=LONG,
                         source={"weights": HOSTILE})  # fmt: skip
        hub.add_task("marked", domain=fit(TaskRow.domain, HOSTILE), metric=fit(TaskRow.metric, HOSTILE),
                     num_classes=10, description=HOSTILE)  # fmt: skip
        hub.add_task("long", domain=longest(TaskRow.domain), metric=longest(TaskRow.metric), description=LONG)
        metric = fit(MetricRow.name, HOSTILE)
        v1 = hub.register(trained_model(1), "a", task="marked", name="lora", metrics={metric: 0.9},
                          tags={fit(TagRow.key, HOSTILE): HOSTILE, "long": LONG},
                          description=HOSTILE, created_by=fit(VersionRow.created_by, HOSTILE))  # fmt: skip
        method = fit(EdgeRow.method, hostile_short)
        v2 = hub.register(trained_model(2), "a", task="marked", name="lora", description=LONG,
                          parents=[{"ref": v1.ref, "relation": "composed_from", "method": method, "weight": 0.5}],
                          metrics={longest(MetricRow.name, "M"): 0.1})  # fmt: skip
        hub.log_metric(v2.ref, metric, 0.95, split=fit(MetricRow.split, "[/s]\x1b[31m"))
        hub.register(trained_model(3), "a", task="long", name="x", parents=[(v2.ref, "transferred_from")],
                     tags={longest(TagRow.key, "K"): LONG}, created_by=longest(VersionRow.created_by))  # fmt: skip
        hub.set_alias(v1.ref, longest(AliasRow.name, "a"))
    return home


LISTINGS: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    # (command, what must show literally)
    (("task", "ls"), SHOWN[:3] + (r"\x1b[31mred", "(5,000 chars)")),
    (("backbone", "ls"), SHOWN[:3] + (r"\x1b[31mred",)),
    (("ls",), ("marked/lora", "long/x")),
    (("show", "marked/lora:1"), SHOWN + ("[/m]", r"\r\nnext")),
    (("show", "marked/lora:2"), ("[/m]", r"\x1b[31m|]", "(5,000 chars)")),
    (("show", "long/x:1"), ("(5,000 chars)",)),
    (("versions", "marked/lora", "--all"), ("tiny",)),
    (("lineage", "marked/lora:2"), ("marked/lora:1", "composed_from, [/m]", r"\x1b[31m|]")),
    (("metrics", "marked/lora:1", "marked/lora:2"), ("[/bold]", "[/s]", "0.95")),
]


@pytest.mark.parametrize("args,expected", LISTINGS, ids=[" ".join(a) for a, _ in LISTINGS])
def test_listings_show_stored_text_literally(home: Path, args: tuple[str, ...], expected: tuple[str, ...]) -> None:
    out = invoke(home, *args).output
    assert_inert(out)
    assert_fits(out)
    for text in expected:
        assert text in out, f"{text!r} missing from `{' '.join(args)}`:\n{out}"
    # the JSON of the same listing keeps every character (escaped by JSON, not cut)
    full = invoke(home, "--json", *args).output
    json.loads(full)
    assert_inert(full)


def test_long_values_are_cut_in_listings_and_whole_in_json(home: Path) -> None:
    out = invoke(home, "task", "ls").output
    assert "(5,000 chars)" in out
    assert out.count("L") <= 3 * 200  # domain and metric (200 each, whole) and 200 of the description
    tasks = {t["name"]: t for t in json.loads(invoke(home, "--json", "task", "ls").output)}
    assert tasks["long"]["description"] == LONG and tasks["marked"]["description"] == HOSTILE
    shown = invoke(home, "show", "long/x:1").output
    assert len(shown.splitlines()) < 120  # 5,000 characters would be over 20 screens of a folded table cell


def own_escapes_only(styled: str) -> str:
    """STYLED without rich's own SGR sequences, asserting that nothing else that drives a terminal is left."""
    assert "\x1b]" not in styled  # no hyperlink, no window title
    text = re.sub(r"\x1b\[[0-9;]*m", "", styled)
    assert_inert(text)
    return text


def test_our_own_styling_still_applies(home: Path) -> None:
    """With colours on, stored text stays plain while the best metric is bold green and a tree's root bold."""
    styled = invoke(home, "metrics", "marked/lora:1", "marked/lora:2", color=True).output
    assert re.search(r"\x1b\[[0-9;]*1;32m0\.95\b", styled) or re.search(r"\x1b\[1;32m0\.95", styled), styled
    assert "[/bold]" in own_escapes_only(styled)
    tree = invoke(home, "lineage", "marked/lora:2", color=True).output
    assert "\x1b[1mmarked/lora:2" in tree
    assert "composed_from, [/m]" in own_escapes_only(tree)


def test_tag_set_echoes_escaped(home: Path) -> None:
    out = invoke(home, "tag", "set", "long/x:1", f"note={SGR}red[/bold]").output
    assert_inert(out)
    assert r"note=\x1b[31mred[/bold]" in out


def test_graphs_quote_every_label(home: Path) -> None:
    with Hub.open(home) as hub:
        graph = hub.lineage("marked/lora:1")
    method = next(e.method for e in graph.edges if e.method)
    dot = invoke(home, "lineage", "marked/lora:1", "--format", "dot").output
    assert dot == to_dot(graph)
    assert_inert(dot)
    # every statement is one line and every label one well-formed quoted string
    body = dot.splitlines()[3:-1]
    quoted = r'"(?:[^"\\]|\\.)*"'
    for line in body:
        assert re.fullmatch(rf"  v\d+( -> v\d+)? \[label={quoted}(, \w+=\"\w+\")*\];", line), line
    labels = [re.search(quoted, line).group(0) for line in body]  # type: ignore[union-attr]
    unquoted = [re.sub(r"\\(.)", r"\1", q[1:-1]) for q in labels]
    assert f"composed_from {visible(method)} w=0.5" in unquoted
    mermaid = invoke(home, "lineage", "marked/lora:1", "--format", "mermaid").output
    assert mermaid == to_mermaid(graph)
    assert_inert(mermaid)
    entity_free = r'"[^"|\[\]{}()<>&`\\#\n]*(?:#\d+;[^"|\[\]{}()<>&`\\#\n]*)*"'
    for line in mermaid.splitlines()[1:-1]:
        assert re.fullmatch(rf"  v\d+\[{entity_free}\]|  v\d+ -->\|{entity_free}\| v\d+", line), line
    decoded = [re.sub(r"#(\d+);", lambda m: chr(int(m[1])), s[1:-1]) for s in re.findall(entity_free, mermaid)]
    assert f"composed_from {visible(method)} w=0.5" in decoded


def test_graphviz_renders_the_label_literally(home: Path, tmp_path: Path) -> None:
    import shutil

    if shutil.which("dot") is None:
        pytest.skip("Graphviz's dot is not installed")
    dot = invoke(home, "lineage", "marked/lora:1", "--format", "dot").output
    svg = subprocess.run(["dot", "-Tsvg"], input=dot, capture_output=True, text=True, check=True).stdout
    import html

    texts = [html.unescape(t) for t in re.findall(r"<text[^>]*>(.*?)</text>", svg)]
    with Hub.open(home) as hub:
        method = next(e.method for e in hub.lineage("marked/lora:1").edges if e.method)
    assert f"composed_from {visible(method)} w=0.5" in texts


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_a_real_terminal_gets_no_foreign_escape_sequence(home: Path) -> None:
    """`python -m adapter_hub.cli` on a pseudo-terminal: rich styles its own output (SGR sequences only),
    while the stored ESC, hyperlink and bidi characters arrive as visible escapes."""
    import pty

    for args in (("show", "marked/lora:1"), ("task", "ls")):
        env = {**os.environ, **ENV, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
        env.pop("NO_COLOR", None)
        env.pop("ADAPTER_HUB_DB", None)
        master, slave = pty.openpty()
        cmd = [sys.executable, "-m", "adapter_hub.cli", "--home", str(home), *args]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(master)
        assert proc.wait(timeout=120) == 0
        out = b"".join(chunks).decode().replace("\r\n", "\n")
        assert "Traceback" not in out
        assert "\x1b[" in out  # a terminal: rich styled the table
        plain = own_escapes_only(out)
        assert "[/bold]" in plain and r"\x1b[31mred" in plain and r"\u202eevil" in plain


# -- export -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tasks holding an adapter of the same name, on a backbone export --format peft can rebuild."""
    home = tmp_path_factory.mktemp("export") / "home"
    invoke(home, "backbone", "add", "tiny", "helpers:tiny_backbone", "--seed", "0")
    with Hub.open(home) as hub:
        for task, seed in (("digits", 1), ("rotated", 2)):
            hub.add_task(task, num_classes=10)
            hub.register(trained_model(seed), "a", task=task, name="lora")
    return home


def digest_of(home: Path, ref: str) -> str:
    with Hub.open(home) as hub:
        return hub.resolve(ref).digest


def test_export_names_files_by_task_and_never_overwrites(exports: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    for ref in ("digits/lora:1", "rotated/lora:1"):
        assert "exported" in invoke(exports, "export", ref, str(out)).output
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}
    assert files == {
        "digits+lora-v1.safetensors": digest_of(exports, "digits/lora:1"),
        "rotated+lora-v1.safetensors": digest_of(exports, "rotated/lora:1"),
    }
    target = out / "digits+lora-v1.safetensors"
    target.write_bytes(b"mine")
    refused = invoke(exports, "export", "digits/lora:1", str(out), code=1).stderr
    assert str(target) in refused and "--overwrite" in refused
    assert target.read_bytes() == b"mine" and sorted(p.name for p in out.iterdir()) == sorted(files)
    invoke(exports, "export", "digits/lora:1", str(out), "--overwrite")
    assert hashlib.sha256(target.read_bytes()).hexdigest() == files["digits+lora-v1.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == sorted(files)  # no temporary file left behind


def test_peft_export_refuses_a_non_empty_directory(exports: Path, tmp_path: Path) -> None:
    out = tmp_path / "peft"
    invoke(exports, "export", "digits/lora:1", str(out), "--format", "peft")
    config = out / "adapter_config.json"
    assert json.loads(config.read_text())["peft_type"] == "LORA"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    refused = invoke(exports, "export", "rotated/lora:1", str(out), "--format", "peft", code=1).stderr
    assert str(out) in refused and "--overwrite" in refused
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    invoke(exports, "export", "rotated/lora:1", str(mine), "--format", "peft", code=1)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    invoke(exports, "export", "rotated/lora:1", str(mine), "--format", "peft", "--overwrite")
    assert sorted(p.name for p in mine.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "notes.txt"]
    assert (mine / "notes.txt").read_text() == "keep"
    invoke(exports, "export", "digits/lora:1", str(out), "--format", "peft", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == sorted(before)


@pytest.mark.parametrize("fmt", ["safetensors", "peft"])
def test_export_to_an_impossible_folder_is_one_line(exports: Path, tmp_path: Path, fmt: str) -> None:
    missing = tmp_path / "missing" / "out"
    err = invoke(exports, "export", "digits/lora:1", str(missing), "--format", fmt, code=1).stderr
    assert "does not exist" in err and not missing.parent.exists()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    err = invoke(exports, "export", "digits/lora:1", str(a_file / "out"), "--format", fmt, code=1).stderr
    assert "is not a directory" in err
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root writes anywhere: a folder nobody may create in stands in
            target = Path("/proc/adapter-hub-export")
            if not Path("/proc").is_dir():
                pytest.skip("needs an unwritable folder")
        else:
            target = locked / "out"
        err = invoke(exports, "export", "digits/lora:1", str(target), "--format", fmt, code=1).stderr
        assert str(target) in err and not target.exists()
    finally:
        locked.chmod(0o700)


def test_demo_and_predict_tables_print_names_literally(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo's and predict's own tables (their computation stubbed: only the printing is under test),
    for a registry whose very folder name looks like markup and holds an escape."""
    import adapter_hub.demo as demo
    import adapter_hub.predict as predict

    home = tmp_path / f"h[/bold]{SGR}"
    with Hub.open(home) as hub:
        hub.add_backbone("tiny", seeded_backbone(0))
        hub.add_task("t")
        root = hub.register(trained_model(1), "a", task="t", name="lora").ref
    row = demo.TaskRow(task=HOSTILE, head_only=0.5, lora=0.9, full=0.91, transfer=None, merged=None, switched=0.9,
                       share_head=0.01, share_lora=0.02, steps_fresh=None, steps_transfer=None)  # fmt: skip
    result = demo.DemoResult(rows=[row], backbone="tiny", backbone_accuracy=0.9, lineage_root=root)
    monkeypatch.setattr(demo, "run_demo", lambda hub, settings: result)
    out = invoke(home, "demo", "--quiet").output
    assert "[/bold] [link=https://evil.example]x" in out and r"h[/bold]\x1b[31m" in out
    assert own_escapes_only(out)

    item = type("Item", (), {"task": HOSTILE})()
    outcome = type("Outcome", (), {"items": [item], "texts": False, "refs": {HOSTILE: f"{SGR}[/x]"},
                                   "accuracy": {f"{SGR}[/x]": 1.0}})  # fmt: skip
    monkeypatch.setattr(predict, "predict_refs", lambda *args, **kwargs: outcome)
    out = invoke(home, "predict", root, "--data", str(tmp_path)).output
    assert r"\x1b[31m[/x]" in out and "[red]x" in out and "100.00%" in out
    assert_inert(out)


def test_a_peft_export_that_peft_computes_differently_warns_in_one_line(tmp_path: Path) -> None:
    """An nn.MultiheadAttention adapter: PEFT (≤ 0.21) adds its out_proj delta twice. The export is written and
    the warning is one `warning:` line on stderr, no source location."""
    import torch

    from adapter_hub import AdapterModel, LoRAConfig
    from adapter_hub.backbones import build_backbone

    home = tmp_path / "home"
    invoke(home, "backbone", "add", "vit", "vit_small", "--num-classes", "10", "--seed", "0")
    model = AdapterModel(build_backbone({"architecture": "vit_small", "num_classes": 10, "seed": 0}))
    model.add_adapter("a", LoRAConfig(r=2, targets=["*.self_attention"], heads=["heads.head"]))
    with torch.no_grad():
        for n, p in model.adapters["a"].named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    with Hub.open(home) as hub:
        hub.add_task("digits", num_classes=10)
        hub.register(model, "a", task="digits", name="attn", backbone="vit")
    result = invoke(home, "export", "digits/attn:1", str(tmp_path / "peft"), "--format", "peft")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: adapter") and "twice" in lines[0], result.stderr
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()

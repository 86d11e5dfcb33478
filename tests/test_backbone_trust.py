"""A registry record never makes another user's process run code: a backbone's `module:callable` runs on
rebuild only where the local user allowed it (--trust-code, trust_code=True, an allow-list outside the
registry). The attack is real here: the factory lives in a module that leaves a marker file when it is
imported and another when it is called."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from helpers import TESTS, seeded_backbone

from adapter_hub import backbones, data
from adapter_hub.backbones import BackboneError, UntrustedFactory, rebuild, trusting_code
from adapter_hub.cli import main
from adapter_hub.formats import fingerprint
from adapter_hub.lora import LoRAConfig
from adapter_hub.model import AdapterModel
from adapter_hub.pipelines import model_for
from adapter_hub.registry import Hub

TRAP = "hubtrap_factories"
FACTORY = f"{TRAP}:build"
ENV = backbones.TRUSTED_FACTORIES_ENV
SOURCE = {"architecture": FACTORY, "seed": 0, "num_classes": 10, "weights": None}

TRAP_CODE = """
from pathlib import Path

MARKS = Path({marks!r})
(MARKS / "imported").touch()  # importing a module runs its code


def build(num_classes: int = 10):
    (MARKS / "called").touch()
    from helpers import tiny_backbone

    return tiny_backbone(num_classes)
"""


@dataclass(frozen=True)
class World:
    home: Path
    code: Path  # holds the trap module
    marks: Path
    data: Path  # ImageFolder with train/val/test
    pred: Path  # one folder per task, for predict
    adapter_file: Path

    def marked(self) -> list[str]:
        return sorted(p.name for p in self.marks.iterdir())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """A shared registry whose backbone 'shared' is built by the trap factory (recorded as an attacker with
    write access to the database would), two versions on it, a task and a little data."""
    root = tmp_path_factory.mktemp("trust")
    w = World(root / "home", root / "code", root / "marks", root / "data", root / "pred", root / "a.safetensors")
    w.code.mkdir()
    w.marks.mkdir()
    (w.code / f"{TRAP}.py").write_text(TRAP_CODE.format(marks=str(w.marks)))
    with Hub.open(w.home) as hub:
        hub.add_backbone("shared", seeded_backbone(0), architecture=FACTORY, source=SOURCE)
        # the same factory and seed, recorded with another fingerprint: trusting code keeps the fingerprint check
        hub.add_backbone("tampered", fingerprint(seeded_backbone(1)), architecture=FACTORY, source=SOURCE)
        hub.add_task("digits", num_classes=10)
        model = AdapterModel(seeded_backbone(0))
        for i, name in enumerate("ab"):
            model.add_adapter(name, LoRAConfig(r=2, alpha=4, targets=["0", "4"]))
            with torch.no_grad():
                for p in model.adapters[name].parameters():
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
            hub.register(model, name, task="digits", name=name)
        _, blob = hub.read_artifact("digits/a:1")
        w.adapter_file.write_bytes(blob)
    ds = data.digits("original", pool="target")
    small = data.Dataset(*(data.Split(s.x[:40], s.y[:40]) for s in (ds.train, ds.val, ds.test)), 10, "digits")
    data.write_imagefolder(small, w.data)
    shutil.copytree(w.data / "test", w.pred / "digits")
    return w


@pytest.fixture(autouse=True)
def reader(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test: a user with no allow-list (their own config dir), the trap importable, not yet imported."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv("ADAPTER_HUB_DB", raising=False)
    monkeypatch.syspath_prepend(str(world.code))
    sys.modules.pop(TRAP, None)
    for mark in world.marks.iterdir():
        mark.unlink()
    yield
    sys.modules.pop(TRAP, None)


def hub_cli(home: Path, *args: str) -> Result:
    result = CliRunner().invoke(main, ["--home", str(home), *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback a user would see
    return result


def one_line_error(result: Result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def commands(w: World, out: Path, suffix: str = "") -> dict[str, list[str]]:
    """Every command that rebuilds a registered backbone, run as a reader of the registry."""
    adapter_file = shutil.copy(w.adapter_file, out / "a.safetensors")  # an import is keyed by its source path
    return {
        "export": ["export", "digits/a:1", str(out / "peft"), "--format", "peft"],
        "import": ["import", str(adapter_file), "--task", "digits", "--adapter", f"imported{suffix}",
                   "--backbone", "shared"],
        "eval": ["eval", "digits/a:1", "--data", str(w.data)],
        "compose": ["compose", "average", "digits/a:1", "digits/b:1", "-o", f"digits/ab{suffix}"],
        "predict": ["predict", "digits/a:1", "--data", str(w.pred)],
        "train": ["train", f"digits/t{suffix}", "--backbone", "shared", "--data", str(w.data), "--epochs", "1"],
    }  # fmt: skip


def registry_state(home: Path) -> tuple[list[str], list[tuple[str, float]]]:
    with Hub.open(home) as hub:
        refs = sorted(v.ref for s in hub.ls() for v in hub.versions(f"{s.task}/{s.name}"))
        return refs, [(m.name, m.value) for m in hub.metrics("digits/a:1")]


@pytest.mark.parametrize("command", ["export", "import", "eval", "compose", "predict", "train"])
def test_a_reader_runs_no_code_the_registry_names(world: World, tmp_path: Path, command: str) -> None:
    # an allow-list inside the registry home is no allow-list: whoever writes the registry writes there too
    for place in (world.home / "trusted-factories", world.home / "adapter-hub" / "trusted-factories"):
        place.parent.mkdir(parents=True, exist_ok=True)
        place.write_text(f"{FACTORY}\n")
    before = registry_state(world.home)
    try:
        line = one_line_error(hub_cli(world.home, *commands(world, tmp_path)[command]))
    finally:
        for place in (world.home / "trusted-factories", world.home / "adapter-hub" / "trusted-factories"):
            place.unlink()
    if command == "train":  # train needs a catalogue backbone (for its head) and may say so before the gate does
        assert "'shared'" in line and (FACTORY in line or "not in the catalogue" in line), line
    else:
        assert FACTORY in line and "'shared'" in line and "--trust-code" in line and ENV in line, line
    assert world.marked() == [] and TRAP not in sys.modules, "the factory's module was neither imported nor called"
    assert registry_state(world.home) == before
    assert not (tmp_path / "peft").exists()


def _allow(how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Allow the factory as a local user does; the global options to pass."""
    if how == "env":
        monkeypatch.setenv(ENV, f"other.module:make, {FACTORY}")
    elif how == "file":
        allow = tmp_path / "config" / "adapter-hub" / "trusted-factories"
        allow.parent.mkdir(parents=True)
        allow.write_text(f"# backbones of our team\nother.module:make\n\n  {FACTORY}  \n")
    return ["--trust-code"] if how == "flag" else []


@pytest.mark.parametrize("how", ["flag", "env", "file"])
def test_an_allowed_factory_rebuilds_for_every_command(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    options = _allow(how, tmp_path, monkeypatch)
    run = {name: [*options, *args] for name, args in commands(world, tmp_path, suffix=f"-{how}").items()}
    assert "exported digits/a:1" in hub_cli(world.home, *run["export"]).stdout
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    assert world.marked() == ["called", "imported"]  # the trap is real: allowed, it runs
    imported = hub_cli(world.home, *run["import"])
    assert f"as digits/imported-{how}:1" in imported.stdout, imported.stderr
    assert "digits/a:1: test accuracy" in hub_cli(world.home, *run["eval"]).stdout
    assert f"registered digits/ab-{how}:1" in hub_cli(world.home, *run["compose"]).stdout
    assert "digits/a:1" in hub_cli(world.home, *run["predict"]).stdout
    # train's own rule (a head from the catalogue) still refuses a backbone built by a factory
    assert "not in the catalogue" in one_line_error(hub_cli(world.home, *run["train"]))


def test_trusting_code_keeps_the_fingerprint_check(world: World) -> None:
    line = one_line_error(hub_cli(world.home, "--trust-code", "import", str(world.adapter_file), "--task", "digits",
                                  "--adapter", "x", "--backbone", "tampered"))  # fmt: skip
    assert "'tampered'" in line and "fingerprint" in line and "not the recorded" in line


def test_the_allow_list_matches_exactly(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, f"{TRAP}:*,{TRAP},{FACTORY.upper()},{TRAP}:buil")
    allow = tmp_path / "config" / "adapter-hub" / "trusted-factories"
    allow.parent.mkdir(parents=True)
    allow.write_text(f"# {FACTORY}\n{FACTORY}x\n")
    with pytest.raises(UntrustedFactory, match="not allowed"):
        rebuild("shared", SOURCE, fingerprint(seeded_backbone(0)))
    assert world.marked() == [] and TRAP not in sys.modules


def test_the_api_asks_too(world: World) -> None:
    expected = fingerprint(seeded_backbone(0))
    with pytest.raises(UntrustedFactory) as refused:
        rebuild("shared", SOURCE, expected)
    assert len(str(refused.value).splitlines()) == 1 and FACTORY in str(refused.value)
    assert world.marked() == [] and TRAP not in sys.modules
    with Hub.open(world.home) as hub:
        version = hub.resolve("digits/a:1")
        with pytest.raises(UntrustedFactory):
            model_for(hub, version)
        assert world.marked() == []
        assert model_for(hub, version, trust_code=True).fingerprint == expected
    assert world.marked() == ["called", "imported"]
    assert fingerprint(rebuild("shared", SOURCE, expected, trust_code=True)) == expected
    with trusting_code():
        assert fingerprint(rebuild("shared", SOURCE, expected)) == expected
    with pytest.raises(UntrustedFactory):  # only inside the block
        rebuild("shared", SOURCE, expected)


def test_catalogue_and_torchvision_builders_run_without_asking() -> None:
    for arch in ("resnet_small", "mobilenet_v3_small"):
        source = {"architecture": arch, "num_classes": 3, "seed": 1}
        built = fingerprint(backbones.build_backbone(source))
        assert fingerprint(rebuild("b", source, built)) == built


def test_where_the_allow_list_lives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert backbones.trusted_factories_file() == tmp_path / "config" / "adapter-hub" / "trusted-factories"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/dir")  # not absolute: ignored, as the XDG spec says
    monkeypatch.setenv("HOME", str(tmp_path / "me"))
    assert backbones.trusted_factories_file() == tmp_path / "me" / ".config" / "adapter-hub" / "trusted-factories"
    backbones.trusted_factories_file().mkdir(parents=True)  # a directory where the file should be
    with pytest.raises(BackboneError, match="cannot read the trusted factories file"):
        backbones.trusted_factories()


@pytest.fixture(scope="module")
def add_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("add") / "home"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["os:getcwd"], "'os:getcwd' returned a str, not a torch.nn.Module"),
        (["torch.nn:Linear"], "missing 2 required positional arguments"),
        (["torch.nn:Linear", "--num-classes", "3"], "unexpected keyword argument 'num_classes'"),
        ([":"], "':' is not module:callable"),
        (["tempfile:mkdtemp"], "'tempfile:mkdtemp' returned a str"),
        (["math:pi"], "'math:pi' is a float, not a callable"),
        (["no_such_module_here:build"], "no module named 'no_such_module_here'"),
        (["os:no_such_function"], "os has no 'no_such_function'"),
        (["resnet_small", "--num-classes", "0"], "number of classes must be at least 1, got 0"),
        (["resnet18", "--num-classes", "-4"], "number of classes must be at least 1, got -4"),
        (["resnet_smal"], "unknown architecture 'resnet_smal'"),
    ],
)
def test_backbone_add_refuses_what_cannot_be_a_backbone(
    add_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], says: str
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # mkdtemp does run: it was the user's own choice
    line = one_line_error(hub_cli(add_home, "backbone", "add", "x", *args))
    assert says in line, line
    with Hub.open(add_home) as hub:
        assert hub.backbones() == []


def test_backbone_add_runs_the_factory_the_user_typed(world: World, tmp_path: Path) -> None:
    home = tmp_path / "own"
    added = hub_cli(home, "backbone", "add", "mine", FACTORY, "--num-classes", "10")
    assert added.exit_code == 0, added.output
    assert fingerprint(seeded_backbone(0)) in added.stdout and world.marked() == ["called", "imported"]


def _subprocess_cli(w: World, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in (ENV, "ADAPTER_HUB_DB")}
    path = os.pathsep.join([str(w.code), str(TESTS), os.environ.get("PYTHONPATH", "")])
    full = {**base, "PYTHONPATH": path, "XDG_CONFIG_HOME": str(tmp_path / "config"), **env}
    return subprocess.run([sys.executable, "-m", "adapter_hub.cli", "--home", str(w.home), *args], env=full,
                          capture_output=True, text=True, timeout=180)  # fmt: skip


def test_a_fresh_reader_process_imports_nothing_until_allowed(world: World, tmp_path: Path) -> None:
    export = ["export", "digits/b:1", str(tmp_path / "peft"), "--format", "peft"]
    refused = _subprocess_cli(world, tmp_path, *export)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and FACTORY in refused.stderr, refused.stderr
    assert world.marked() == [] and not (tmp_path / "peft").exists()
    allowed = _subprocess_cli(world, tmp_path, *export, **{ENV: FACTORY})
    assert allowed.returncode == 0, allowed.stderr
    assert world.marked() == ["called", "imported"] and (tmp_path / "peft" / "adapter_config.json").is_file()

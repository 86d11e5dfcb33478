"""What the registry can store, checked before anything is written: the same one-line error on SQLite and
PostgreSQL (where the database itself would raise a DataError, or SQLite would overflow), in the API and
the CLI. The limits are read off the schema's columns."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from helpers import seeded_backbone

from adapter_hub.cli import main
from adapter_hub.lora import LoRAConfig
from adapter_hub.model import AdapterModel
from adapter_hub.registry import Hub, NotFound, Parent, RefError, RegistryError, limits
from adapter_hub.registry.models import AliasRow, MetricRow, VersionRow

LONG = "x" * 300
NUL = "a\x00b"


def model_with(name: str = "a", seed: int = 0) -> AdapterModel:
    model = AdapterModel(seeded_backbone(0))
    model.add_adapter(name, LoRAConfig(r=2, alpha=4, targets=["0", "4"]))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for p in model.adapters[name].parameters():
            p.normal_()
    return model


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def hub(home: Path, db_url: str):
    """digits/lora with one version, on a backbone 'tiny'."""
    with Hub.open(home, db_url) as h:
        h.add_backbone("tiny", seeded_backbone(0), architecture="tiny-conv")
        h.add_task("digits", num_classes=10)
        h.register(model_with(), "a", task="digits", name="lora")
        yield h


def state(hub: Hub) -> tuple[Any, ...]:
    """Everything a refused call could have changed."""
    v = hub.resolve("digits/lora")
    return (
        [b.to_dict() for b in hub.backbones()],
        [t.to_dict() for t in hub.tasks()],
        [a.to_dict() for a in hub.ls()],
        [m.to_dict() for m in hub.metrics(v.ref)],
        v.tags,
        v.aliases,
        len(hub.versions("digits/lora")),
    )


def tail(n: int) -> str:
    return f"'{'x' * 40}…' ({n} characters) is too long: the registry keeps at most"


# (what is called, the exception type, the message: the same on every backend)
CASES: dict[str, tuple[Callable[[Hub], Any], type[Exception], str]] = {
    "alias": (
        lambda h: h.set_alias("digits/lora:1", "x" * 150),
        RegistryError,
        f"alias name {tail(150)} 100 characters",
    ),
    "alias reserved": (lambda h: h.set_alias("digits/lora:1", "latest"), RegistryError, "alias 'latest' is reserved"),
    "tag key": (lambda h: h.set_tag("digits/lora:1", LONG, "v"), RegistryError, f"tag key {tail(300)} 200 characters"),
    "tag value NUL": (
        lambda h: h.set_tag("digits/lora:1", "k", NUL),
        RegistryError,
        "tag value 'a\\x00b' contains a NUL character, which the registry cannot store",
    ),
    "task name": (lambda h: h.add_task("x" * 201), RegistryError, "task name 'xxxxxxxx"),
    "task domain": (lambda h: h.add_task("t", domain=LONG), RegistryError, f"task domain {tail(300)} 200 characters"),
    "task metric": (lambda h: h.add_task("t", metric=LONG), RegistryError, f"task metric {tail(300)} 200 characters"),
    "task description NUL": (
        lambda h: h.add_task("t", description=NUL),
        RegistryError,
        "task description 'a\\x00b' contains a NUL character",
    ),
    "task description surrogate": (
        lambda h: h.add_task("t", description="a\ud800"),
        RegistryError,
        "task description 'a\\ud800' is not valid Unicode text",
    ),
    "backbone name": (
        lambda h: h.add_backbone("b" * 201, "0" * 64),
        RegistryError,
        f"backbone name '{'b' * 40}…' (201 characters) is too long: the registry keeps at most 200 characters",
    ),
    "architecture": (
        lambda h: h.add_backbone("b", "0" * 64, architecture=LONG),
        RegistryError,
        f"architecture {tail(300)} 200 characters",
    ),
    "backbone description NUL": (
        lambda h: h.add_backbone("b", "0" * 64, description=NUL),
        RegistryError,
        "backbone description 'a\\x00b' contains a NUL character",
    ),
    "adapter description NUL": (
        lambda h: h.add_adapter("digits", "new", description=NUL),
        RegistryError,
        "adapter description 'a\\x00b' contains a NUL character",
    ),
    "adapter name with newline": (
        lambda h: h.add_adapter("digits", "new\n"),
        RegistryError,
        "invalid adapter name 'new\\n'",
    ),
    "task lookup NUL": (lambda h: h.task(NUL), RegistryError, "invalid task name 'a\\x00b'"),
    "backbone lookup NUL": (lambda h: h.backbone(NUL), RegistryError, "invalid backbone name 'a\\x00b'"),
    "metric name": (
        lambda h: h.log_metric("digits/lora:1", LONG, 1.0),
        RegistryError,
        f"metric name {tail(300)} 200 characters",
    ),
    "metric split": (
        lambda h: h.log_metric("digits/lora:1", "acc", 1.0, split="s" * 65),
        RegistryError,
        "metric split 'sssss",
    ),
    "metric dataset": (
        lambda h: h.log_metric("digits/lora:1", "acc", 1.0, dataset=LONG),
        RegistryError,
        f"metric dataset {tail(300)} 200 characters",
    ),
    "metric step high": (
        lambda h: h.log_metric("digits/lora:1", "acc", 1.0, step=2**31),
        RegistryError,
        "metric step 2147483648 is out of range: it must be between -2147483648 and 2147483647",
    ),
    "metric step low": (
        lambda h: h.log_metric("digits/lora:1", "acc", 1.0, step=-(2**31) - 1),
        RegistryError,
        "metric step -2147483649 is out of range: it must be between -2147483648 and 2147483647",
    ),
    "metric step float": (
        lambda h: h.log_metric("digits/lora:1", "acc", 1.0, step=1.5),
        RegistryError,
        "metric step must be a whole number, got 1.5",
    ),
    "metric value inf": (
        lambda h: h.log_metric("digits/lora:1", "acc", float("inf")),
        RegistryError,
        "value of metric 'acc' must be a finite number, got inf",
    ),
    "metric value text": (
        lambda h: h.log_metric("digits/lora:1", "acc", "high"),
        RegistryError,
        "value of metric 'acc' must be a number, got 'high'",
    ),
    "compared metric NUL": (
        lambda h: h.compare_metrics(["digits/lora:1"], [NUL]),
        RegistryError,
        "metric name 'a\\x00b' contains a NUL character",
    ),
    "register metric split": (
        lambda h: h.register(model_with(), "a", task="digits", name="lora", metrics={"s" * 65 + "/acc": 1.0}),
        RegistryError,
        f"metric split '{'s' * 40}…' (65 characters) is too long: the registry keeps at most 64 characters",
    ),
    "register metric value": (
        lambda h: h.register(model_with(), "a", task="digits", name="lora", metrics={"val/acc": float("nan")}),
        RegistryError,
        "value of metric 'val/acc' must be a finite number, got nan",
    ),
    "register metric without a name": (
        lambda h: h.register(model_with(), "a", task="digits", name="lora", metrics={"": 1.0}),
        RegistryError,
        "every metric needs a name",
    ),
    "register task NUL": (
        lambda h: h.register(model_with(), "a", task=NUL, name="lora", key="k1"),
        RegistryError,
        "invalid task name 'a\\x00b'",
    ),
    "register tag key": (
        lambda h: h.register(model_with(), "a", task="digits", name="lora", tags={LONG: "v"}),
        RegistryError,
        f"tag key {tail(300)} 200 characters",
    ),
    "register description NUL": (
        lambda h: h.register(model_with(), "a", task="digits", name="lora", description=NUL),
        RegistryError,
        "version description 'a\\x00b' contains a NUL character",
    ),
    "register created_by": (
        lambda h: h.register(model_with(), "a", task="digits", name="lora", created_by=LONG),
        RegistryError,
        f"created_by {tail(300)} 200 characters",
    ),
    "register lineage weight": (
        lambda h: h.register(
            model_with(), "a", task="digits", name="lora",
            parents=[Parent("digits/lora:1", "composed_from", weight=float("nan"))],
        ),  # fmt: skip
        RegistryError,
        "lineage weight must be a finite number, got nan",
    ),
    "register lineage method": (
        lambda h: h.register(
            model_with(), "a", task="digits", name="lora", parents=[Parent("digits/lora:1", method="m" * 65)]
        ),
        RegistryError,
        "lineage method 'mmmm",
    ),
    "register adapter name": (
        lambda h: h.register(model_with(), "a", task="digits", name="n" * 201),
        RegistryError,
        "adapter name 'nnnn",
    ),
    "ref version 2**31": (
        lambda h: h.resolve("digits/lora:2147483648"),
        RefError,
        "malformed ref 'digits/lora:2147483648': version number 2147483648 is out of range: it must be between 1 "
        "and 2147483647",
    ),
    "ref version 2**66": (
        lambda h: h.resolve("digits/lora:99999999999999999999"),
        RefError,
        "malformed ref 'digits/lora:99999999999999999999': version number 99999999999999999999 is out of range",
    ),
    "ref alias": (
        lambda h: h.resolve("digits/lora@" + "x" * 101),
        RefError,
        "alias name 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx…' (101 characters) is too long",
    ),
    "ref thousands of digits": (
        lambda h: h.resolve("digits/lora:" + "9" * 5000),
        RefError,
        "a version number of 5000 digits",
    ),
    "versions of a version that does not exist": (
        lambda h: h.versions("digits/lora:99"),
        NotFound,
        "digits/lora:99 does not exist: digits/lora has versions 1..1",
    ),
    "versions of an unknown alias": (
        lambda h: h.versions("digits/lora@prod"),
        NotFound,
        "digits/lora has no alias 'prod'; it has no aliases",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_value_the_registry_cannot_store_is_refused_the_same_way_on_every_backend(hub: Hub, case: str) -> None:
    call, kind, message = CASES[case]
    before = state(hub)
    with pytest.raises(kind) as info:
        call(hub)
    assert message in str(info.value)
    assert "\n" not in str(info.value) and len(str(info.value)) < 400
    assert state(hub) == before, "nothing was written"


def test_values_at_the_columns_limits_are_stored(hub: Hub) -> None:
    """The limits are the columns' own: exactly at them, PostgreSQL takes every value."""
    hub.set_alias("digits/lora:1", "a" * 100)
    hub.set_tag("digits/lora:1", "k" * 200, "v" * 10_000)
    hub.log_metric("digits/lora:1", "m" * 200, 1.0, split="s" * 64, dataset="d" * 200, step=2**31 - 1)
    hub.log_metric("digits/lora:1", "low", 0.0, step=-(2**31))
    hub.add_task("t" * 200, domain="d" * 200, metric="m" * 200, description="é" * 1000)
    hub.add_backbone("b" * 200, "0" * 64, architecture="a" * 200)
    v = hub.register(model_with(), "a", task="digits", name="n" * 200, created_by="c" * 200,
                     metrics={"s" * 64 + "/acc": 0.5}, parents=[Parent("digits/lora:1", method="m" * 64)])  # fmt: skip
    assert hub.resolve(f"digits/{'n' * 200}:1") == v
    assert hub.resolve("digits/lora@" + "a" * 100).number == 1
    assert {m.step for m in hub.metrics("digits/lora:1")} == {2**31 - 1, -(2**31)}
    assert hub.versions("digits/lora:1")[0].number == 1  # a version that exists names its adapter


def test_the_limits_are_read_off_the_schema() -> None:
    assert limits.max_length("alias name") == AliasRow.__table__.c.name.type.length == 100
    assert limits.max_length("metric split") == MetricRow.__table__.c.split.type.length == 64
    assert limits.max_length("tag value") is None  # Text: no length, but no NUL either
    assert limits.int_range("version number") == (-(2**31), 2**31 - 1)
    assert limits.int_range("metric step") == (-(2**31), 2**31 - 1)
    assert limits.column("version number") is VersionRow.__table__.c.number
    for field in limits.FIELDS:  # every field maps onto a column whose type the check understands
        assert limits.check(field, None) is None


def cli(home: Path, db_url: str, *args: str) -> Any:
    return CliRunner().invoke(main, ["--home", str(home), "--db", db_url, *args])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("show", "digits/lora:99999999999999999999"), "version number 99999999999999999999 is out of range"),
        (("versions", "digits/lora:99"), "digits/lora:99 does not exist: digits/lora has versions 1..1"),
        (("alias", "set", "digits/lora:1", "x" * 150), "alias name 'xxxx"),
        (("tag", "set", "digits/lora:1", f"{LONG}=v"), "tag key 'xxxx"),
        (("task", "add", "t", "--domain", LONG), "task domain 'xxxx"),
        (("backbone", "add", "b", "--fingerprint", "0" * 64, "--description", "ok", "x" * 201), "architecture 'x"),
        (("metrics", "digits/lora@" + "x" * 101), "alias name 'xxxx"),
    ],
)
def test_the_cli_refuses_them_in_one_line(hub: Hub, home: Path, db_url: str, args: tuple[str, ...], message: str):
    before = state(hub)
    result = cli(home, db_url, *args)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr
    assert state(hub) == before

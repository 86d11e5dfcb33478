"""`adapter-hub predict`: a Switch over registered versions, routed per folder or per CSV row, checked
against a per-sample loop over the library."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from adapter_hub import AdapterModel, Hub, LoRAConfig, backbones, data
from adapter_hub.cli import main
from adapter_hub.predict import predict_refs

SOURCE = {"architecture": "resnet_small", "num_classes": 10, "seed": 5, "weights": None}


def _registered(home: Path) -> AdapterModel:
    """Two tasks of different widths (10 digits, 2 parities), an adapter each with non-zero deltas."""
    model = AdapterModel(backbones.build_backbone(SOURCE))
    with Hub.open(home) as hub:
        hub.add_backbone("small", model, architecture="resnet_small", source=SOURCE)
        hub.add_task("rot", num_classes=10)
        hub.add_task("par", num_classes=2)
        cfg = LoRAConfig(r=2, targets=["layer4.*.conv*"], heads=["fc"])
        for name, task, head in (("a", "rot", None), ("b", "par", nn.Linear(512, 2))):
            model.add_adapter(name, cfg, head_modules={"fc": head} if head is not None else None)
            with torch.no_grad():
                for i, p in enumerate(model.adapters[name].parameters()):
                    p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
            hub.register(model, name, task=task, name=name)
    return model


def _write(images: torch.Tensor, labels: torch.Tensor, folder: Path) -> list[tuple[Path, int]]:
    from torchvision.utils import save_image

    out = []
    for i, (img, y) in enumerate(zip(images, labels.tolist())):
        path = folder / f"{y:02d}" / f"{i:03d}.png"  # numbered: a subset of classes
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(img, path)
        out.append((path, y))
    return out


def test_predict_routes_each_input_to_its_tasks_adapter(tmp_path: Path):
    home = tmp_path / "home"
    model = _registered(home)
    ds = data.digits("rotated", pool="target")
    x, y = ds.test.x[:24], ds.test.y[:24]
    files = {"rot": _write(x[:14], y[:14], tmp_path / "in" / "rot"),
             "par": _write(x[14:], y[14:] % 2, tmp_path / "in" / "par")}  # fmt: skip

    env = {**os.environ, "ADAPTER_HUB_HOME": str(home)}
    done = subprocess.run([sys.executable, "-m", "adapter_hub.cli", "--json", "predict", "rot/a", "par/b", "--data",
                           str(tmp_path / "in"), "-o", str(tmp_path / "p.csv")],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    got = {(Path(r["path"]).resolve(), r["ref"]): r["predicted"] for r in report["predictions"]}
    assert len(got) == 24

    # reference: each image read on its own, through its own adapter alone
    transform = data.image_transform()
    expected, correct = {}, {"rot/a:1": 0, "par/b:1": 0}
    for task, name, ref in (("rot", "a", "rot/a:1"), ("par", "b", "par/b:1")):
        model.activate(name)
        for path, label in files[task]:
            with Image.open(path) as img, torch.no_grad():
                pred = int(model(transform(img)[None]).argmax())
            expected[(path.resolve(), ref)] = pred
            correct[ref] += int(pred == label)
    assert got == expected
    assert report["accuracy"] == {"rot/a:1": correct["rot/a:1"] / 14, "par/b:1": correct["par/b:1"] / 10}
    with (tmp_path / "p.csv").open() as f:
        assert [(Path(r["path"]).resolve(), r["ref"], int(r["predicted"])) for r in csv.DictReader(f)] == [
            (p, ref, v) for (p, ref), v in got.items()]  # fmt: skip

    # one version at a time gives the same; a CSV task column routes like the folders
    with (tmp_path / "in.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "task", "label"])
        rows = [(p, t, lbl) for t in ("par", "rot") for p, lbl in files[t]]
        writer.writerows((os.path.relpath(p, tmp_path), t, lbl) for p, t, lbl in rows)
    with Hub.open(home) as hub:
        one_by_one = predict_refs(hub, ["rot/a", "par/b"], tmp_path / "in", switch=False)
        by_column = predict_refs(hub, ["rot/a", "par/b"], tmp_path / "in.csv")
    assert {(it.path.resolve(), one_by_one.refs[it.task]): p for it, p in zip(one_by_one.items, one_by_one.predicted)} \
        == expected
    assert [expected[(p.resolve(), by_column.refs[t])] for p, t, _ in rows] == by_column.predicted
    assert by_column.accuracy == report["accuracy"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("rot/a", "--data", "{tmp}/nothing"), "does not exist"),
        (("rot/a", "--data", "{tmp}/in"), "names tasks ['par'] that none of the versions is for"),
        (("rot/a", "rot/a", "--data", "{tmp}/in"), "are both for task 'rot'"),
        (("rot/zzz", "--data", "{tmp}/in"), "zzz"),
        (("rot/a", "--data", "{tmp}/empty"), "has no task folders"),
        (("rot/a", "--data", "{tmp}/named"), "has 1 class folders, task 'rot' has 10 classes"),
    ],
)
def test_predict_bad_input_is_one_line(tmp_path: Path, args: tuple[str, ...], message: str):
    home = tmp_path / "home"
    _registered(home)
    ds = data.digits("rotated", pool="target")
    _write(ds.test.x[:2], ds.test.y[:2], tmp_path / "in" / "rot")
    _write(ds.test.x[:2], ds.test.y[:2] % 2, tmp_path / "in" / "par")
    (tmp_path / "empty").mkdir()
    (tmp_path / "named" / "rot" / "cat").mkdir(parents=True)
    next((tmp_path / "in" / "rot").rglob("*.png")).rename(tmp_path / "named" / "rot" / "cat" / "000.png")
    result = CliRunner().invoke(main, ["--home", str(home), "predict", *(a.format(tmp=tmp_path) for a in args)])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output

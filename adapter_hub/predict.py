"""Predict with several registered versions at once: a Switch over them, each input routed to its task's
adapter and head, in mixed batches.

Inputs name their task either by folder (``DIR/<task>/...``, any depth; an ImageFolder under the task
folder also gives labels) or by a column (a CSV file with ``path,task`` and optionally ``label``).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checks
from .data import DataError, image_transform
from .errors import ConfigError
from .registry import Hub
from .registry.records import Version

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True)
class Item:
    path: Path
    task: str
    label: int | None
    class_folders: int | None = None  # how many named class folders the label was numbered among


@dataclass
class PredictResult:
    """One prediction per input, in input order, and the accuracy per version where labels are known."""

    items: list[Item]
    refs: dict[str, str]  # task -> ref
    predicted: list[int]
    accuracy: dict[str, float | None] = field(default_factory=dict)
    switched: bool = True

    def rows(self) -> list[dict[str, object]]:
        return [{"path": str(it.path), "task": it.task, "ref": self.refs[it.task], "predicted": p, "label": it.label}
                for it, p in zip(self.items, self.predicted)]  # fmt: skip


def read_inputs(source: str | Path, tasks: Sequence[str]) -> list[Item]:
    """The inputs of ``source``: a CSV file (``path,task[,label]``, paths relative to the file) or a
    directory holding one folder per task."""
    source = Path(source)
    if not source.exists():
        raise DataError(f"data {source} does not exist")
    items = _from_csv(source) if source.is_file() else _from_folders(source, tasks)
    if not items:
        raise DataError(f"{source} holds no images")
    unknown = sorted({it.task for it in items} - set(tasks))
    if unknown:
        raise DataError(f"{source} names tasks {unknown} that none of the versions is for (tasks: {sorted(tasks)})")
    return items


def _from_csv(path: Path) -> list[Item]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "task"} <= set(reader.fieldnames):
            raise DataError(f"{path} needs the columns path and task (and optionally label)")
        items = []
        for line, row in enumerate(reader, start=2):
            label = (row.get("label") or "").strip()
            if label and not label.lstrip("-").isdigit():
                raise DataError(f"{path}:{line}: label {label!r} is not a class index")
            target = (path.parent / row["path"]).resolve()
            items.append(Item(target, row["task"].strip(), int(label) if label else None))
    return items


def _from_folders(root: Path, tasks: Sequence[str]) -> list[Item]:
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise DataError(f"{root} has no task folders: give one folder per task ({', '.join(tasks)})")
    items = []
    for folder in folders:
        images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        # folder/<class>/image: an ImageFolder. Class folders named by numbers (as `adapter-hub data` writes
        # them) are the class indices themselves, so a folder may hold some classes only; other names are
        # numbered in sorted order, as torchvision's ImageFolder does, and must then be all the classes.
        labelled = all(len(p.relative_to(folder).parts) == 2 for p in images)
        classes = sorted({p.relative_to(folder).parts[0] for p in images}) if labelled else []
        numeric = all(c.isdigit() for c in classes)
        for p in images:
            name = p.relative_to(folder).parts[0]
            label = (int(name) if numeric else classes.index(name)) if labelled else None
            items.append(Item(p, folder.name, label, None if numeric or not labelled else len(classes)))
    return items


def predict_refs(
    hub: Hub,
    refs: Sequence[str],
    source: str | Path,
    *,
    switch: bool = True,
    batch_size: int = 256,
    output: str | Path | None = None,
) -> PredictResult:
    """Route every input of ``source`` to the version for its task and predict a class.

    ``switch=True`` runs mixed batches through a Switch over all versions (one forward per batch);
    ``switch=False`` runs each version on its own inputs in turn. Both give the same predictions.
    ``output``: a CSV file the predictions are written to (its folder is checked before any work)."""
    from .compose import Switch
    from .pipelines import model_for

    if not refs:
        raise ConfigError("predict needs at least one version")
    batch_size = checks.whole("batch_size", batch_size, low=1)
    if output is not None:
        checks.writable_file(output, "-o")
    versions = [hub.resolve(ref) for ref in refs]
    by_task: dict[str, Version] = {}
    for v in versions:
        if v.task in by_task:
            raise ConfigError(f"{by_task[v.task].ref} and {v.ref} are both for task {v.task!r}: routing by task "
                              "needs one version per task")  # fmt: skip
        by_task[v.task] = v
    if len({v.fingerprint for v in versions}) > 1:
        raise ConfigError("the versions were made for different backbones; one Switch needs one backbone")
    items = read_inputs(source, list(by_task))
    for it in items:
        classes = (hub.task(it.task).output or {}).get("num_classes")
        if it.label is not None and classes is not None and not 0 <= it.label < classes:
            raise DataError(f"{it.path}: label {it.label} is outside task {it.task!r}'s {classes} classes")
        if it.class_folders is not None and classes is not None and it.class_folders != classes:
            raise DataError(f"{it.path.parent.parent} has {it.class_folders} class folders, task {it.task!r} has "
                            f"{classes} classes (name class folders 0, 1, ... to give a subset)")  # fmt: skip

    model = model_for(hub, versions[0])
    names = {task: f"task{i}" for i, task in enumerate(by_task)}  # registry names may repeat across tasks
    for task, v in by_task.items():
        hub.load_into(model, v.ref, name=names[task])
    model.eval()
    transform = image_transform()
    predicted: list[int] = []
    with torch.no_grad():
        if switch:
            model.activate(Switch(*names.values()))
            for i in range(0, len(items), batch_size):
                chunk = items[i : i + batch_size]
                out = model(_load(chunk, transform), route=[names[it.task] for it in chunk])
                predicted += [int(row.argmax()) for row in out]
        else:
            by_row: dict[int, int] = {}
            for task, name in names.items():
                model.activate(name)
                rows = [j for j, it in enumerate(items) if it.task == task]
                for i in range(0, len(rows), batch_size):
                    chunk = rows[i : i + batch_size]
                    logits = model(_load([items[j] for j in chunk], transform))
                    by_row.update(zip(chunk, logits.argmax(-1).tolist()))
            predicted = [by_row[j] for j in range(len(items))]
    result = PredictResult(items, {t: v.ref for t, v in by_task.items()}, predicted, switched=switch)
    for task, v in by_task.items():
        pairs = [(p, it.label) for it, p in zip(items, predicted) if it.task == task]
        labelled = bool(pairs) and all(y is not None for _, y in pairs)
        result.accuracy[v.ref] = sum(p == y for p, y in pairs) / len(pairs) if labelled else None
    if output is not None:
        write_predictions(result, output)
    return result


def _load(items: Sequence[Item], transform) -> torch.Tensor:
    from PIL import Image

    tensors = []
    for it in items:
        try:
            with Image.open(it.path) as img:
                tensors.append(transform(img))
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read image {it.path}: {exc}") from None
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise DataError(f"the images differ in size ({sorted(shapes)}); resize them to one size")
    return torch.stack(tensors)


def write_predictions(result: PredictResult, path: str | Path) -> Path:
    """One CSV row per input: path, task, ref, predicted class, label (empty where unknown)."""
    path = Path(path)
    try:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["path", "task", "ref", "predicted", "label"])
            writer.writeheader()
            writer.writerows(result.rows())
    except OSError as exc:  # checked before predicting, but a disk can still fill up
        raise ConfigError(f"cannot write predictions to {path}: {exc.strerror or exc}") from None
    return path

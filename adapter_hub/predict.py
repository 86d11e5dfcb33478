"""Predict with several registered versions at once: a Switch over them, each input routed to its task's
adapter and head, in mixed batches.

Images name their task either by folder (``DIR/<task>/...``, any depth; an ImageFolder under the task
folder also gives labels) or by a column (a CSV file with ``path,task`` and optionally ``label``). Texts, for
versions on a Transformers backbone, are rows of a CSV or JSONL file with ``text`` and optionally ``task``
(required with several versions) and ``label`` (a class name or index, as the version was trained).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import checks, text
from .data import DataError
from .errors import ConfigError
from .hf import is_transformers
from .registry import Hub
from .registry.records import Version

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True)
class Item:
    path: Path | None  # an image; None for a text
    task: str
    label: int | None
    class_folders: int | None = None  # how many named class folders the label was numbered among
    text: str | None = None
    line: int | None = None  # the text's line in its file


@dataclass
class PredictResult:
    """One prediction per input, in input order, and the accuracy per version where labels are known.
    ``classes`` holds a text task's class names (predictions and labels print as names)."""

    items: list[Item]
    refs: dict[str, str]  # task -> ref
    predicted: list[int]
    accuracy: dict[str, float | None] = field(default_factory=dict)
    switched: bool = True
    classes: dict[str, list[str] | None] = field(default_factory=dict)

    @property
    def texts(self) -> bool:
        return any(it.text is not None for it in self.items)

    def rows(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for it, p in zip(self.items, self.predicted):
            where: dict[str, object] = {"path": str(it.path)} if it.text is None else {"line": it.line, "text": it.text}
            out.append({**where, "task": it.task, "ref": self.refs[it.task], "predicted": self.name(it.task, p),
                        "label": self.name(it.task, it.label)})  # fmt: skip
        return out

    def name(self, task: str, index: int | None) -> object:
        """A class as printed: its name where the task's version has class names, else its index."""
        names = self.classes.get(task)
        return names[index] if names is not None and index is not None else index


def read_inputs(source: str | Path, tasks: Sequence[str]) -> list[Item]:
    """The inputs of ``source``: a CSV file (``path,task[,label]``, paths relative to the file) or a
    directory holding one folder per task."""
    source = Path(source)
    if not source.exists():
        raise DataError(f"data {source} does not exist")
    if not (source.is_file() or source.is_dir()):  # a device or a pipe (/dev/zero) could be read without end
        raise DataError(f"data {source} is neither a regular file nor a folder")
    items = _from_csv(source) if source.is_file() else _from_folders(source, tasks)
    if not items:
        raise DataError(f"{source} holds no images")
    unknown = sorted({it.task for it in items} - set(tasks))
    if unknown:
        raise DataError(f"{source} names tasks {unknown} that none of the versions is for (tasks: {sorted(tasks)})")
    return items


def _from_csv(path: Path) -> list[Item]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # utf-8-sig: a byte-order mark is dropped
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"path", "task"} <= set(reader.fieldnames):
                raise DataError(f"{path} needs the columns path and task (and optionally label)")
            items = []
            for line, row in enumerate(reader, start=2):
                if None in row or any(row.get(k) is None for k in ("path", "task")):
                    raise DataError(f"{path}:{line}: the row's fields do not match the header's columns")
                label = (row.get("label") or "").strip()
                if label and not (label.lstrip("-").isdecimal() and label.lstrip("-").isascii()):
                    raise DataError(f"{path}:{line}: label {label!r:.60} is not a class index")
                if "\0" in row["path"] or not row["path"].strip():
                    raise DataError(f"{path}:{line}: the path is empty or holds a NUL character")
                target = (path.parent / row["path"]).resolve()
                items.append(Item(target, row["task"].strip(), int(label) if label else None))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a UTF-8 text file (byte {exc.start}: {exc.reason})") from None
    except csv.Error as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc})") from None
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
    ``output``: a CSV file the predictions are written to (its folder is checked before any work). Images
    are resized and normalised as the backbone records (:func:`adapter_hub.backbones.recorded_inputs`)."""
    from .backbones import image_transform_for
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
    record = hub.backbone(versions[0].backbone)
    if is_transformers(record.source):
        result = _predict_texts(hub, record.name, by_task, source, switch=switch, batch_size=batch_size)
        if output is not None:
            write_predictions(result, output)
        return result
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
    transform = image_transform_for(record)  # as training saw the images: the backbone's recorded inputs
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
    _score(result)
    if output is not None:
        write_predictions(result, output)
    return result


def _score(result: PredictResult) -> None:
    """The accuracy of each version on its inputs, where every one of them has a label."""
    for task, ref in result.refs.items():
        pairs = [(p, it.label) for it, p in zip(result.items, result.predicted) if it.task == task]
        labelled = bool(pairs) and all(y is not None for _, y in pairs)
        result.accuracy[ref] = sum(p == y for p, y in pairs) / len(pairs) if labelled else None


def read_texts(source: str | Path, tasks: Sequence[str]) -> list[tuple[Item, object]]:
    """The rows of a text file as items (label still as written: the second element) in file order. The
    ``task`` column may be left out when there is one task."""
    path = Path(source)
    if not path.is_file() or path.suffix.lower() not in text.SUFFIXES:
        what = "does not exist" if not path.exists() else "is not a .csv or .jsonl file"
        raise DataError(f"data {path} {what}: texts to predict are a .csv or .jsonl file with a text column "
                        "(and task, label)")  # fmt: skip
    columns, rows = text.read_rows(path, required=("text",))
    if "task" not in columns and len(tasks) > 1:
        raise DataError(f"{path} has no task column: with several versions each row names its task "
                        f"(found: {', '.join(columns)})")  # fmt: skip
    out = []
    for row in rows:
        task = str(row.values.get("task") or "").strip() if "task" in columns else tasks[0]
        if not task:
            raise DataError(f"{path}:{row.line}: no task")
        out.append((Item(None, task, None, text=row.values["text"], line=row.line), row.values.get("label")))
    unknown = sorted({it.task for it, _ in out} - set(tasks))
    if unknown:
        raise DataError(f"{path} names tasks {unknown} that none of the versions is for (tasks: {sorted(tasks)})")
    return out


def _predict_texts(
    hub: Hub, backbone: str, by_task: dict[str, Version], source: str | Path, *, switch: bool, batch_size: int
) -> PredictResult:
    """Texts routed per row to their task's version on a Transformers backbone. Each row is tokenised with
    its version's max_length; a batch is padded on the right to its longest row."""
    from .compose import Switch
    from .pipelines import model_for, text_settings, tokenizer_for

    rows = read_texts(source, list(by_task))
    model = model_for(hub, backbone)
    names = {task: f"task{i}" for i, task in enumerate(by_task)}  # registry names may repeat across tasks
    for task, v in by_task.items():
        hub.load_into(model, v.ref, name=names[task])
    tokenizer = tokenizer_for(hub, backbone)
    settings = {task: text_settings(model, names[task]) for task in by_task}
    tokens = {task: text.Tokenization(tokenizer, max_length) for task, (_, max_length, _) in settings.items()}
    items = [it for it, _ in rows]
    for task in by_task:  # labels become class indices the way the task's version numbers them
        classes, _, width = settings[task]
        known = [j for j, (it, label) in enumerate(rows) if it.task == task and not text.blank(label)]
        where = [f"{source}:{items[j].line}" for j in known]
        labels = [text.label_value(rows[j][1], at) for j, at in zip(known, where)]
        index, _, _ = text.class_indices(labels, where, classes=classes, num_classes=None if classes else width)
        for j, k in zip(known, index):
            items[j] = replace(items[j], label=k)
    encoded: list[dict[str, list[int]]] = [{} for _ in items]
    for task in by_task:
        at = [j for j, it in enumerate(items) if it.task == task]
        for j, row in zip(at, tokens[task].encode([items[j].text or "" for j in at])):
            encoded[j] = row
    pad = next(iter(tokens.values())).pad
    model.eval()
    predicted: list[int] = []
    with torch.no_grad():
        if switch:
            model.activate(Switch(*names.values()))
            for i in range(0, len(items), batch_size):
                chunk = range(i, min(i + batch_size, len(items)))
                out = model(**pad([encoded[j] for j in chunk]), route=[names[items[j].task] for j in chunk])
                predicted += [int(row.argmax()) for row in out]
        else:
            by_row: dict[int, int] = {}
            for task, name in names.items():
                model.activate(name)
                at = [j for j, it in enumerate(items) if it.task == task]
                for i in range(0, len(at), batch_size):
                    chunk = at[i : i + batch_size]
                    logits = model(**pad([encoded[j] for j in chunk]))
                    by_row.update(zip(chunk, logits.argmax(-1).tolist()))
            predicted = [by_row[j] for j in range(len(items))]
    result = PredictResult(items, {t: v.ref for t, v in by_task.items()}, predicted, switched=switch,
                           classes={task: settings[task][0] for task in by_task})  # fmt: skip
    _score(result)
    return result


def _load(items: Sequence[Item], transform) -> torch.Tensor:
    from .data import read_image, stack_images

    return stack_images([(str(it.path), transform(read_image(it.path))) for it in items])


def write_predictions(result: PredictResult, path: str | Path) -> Path:
    """One CSV row per input: path (texts: line and text), task, ref, predicted class, label (empty where
    unknown); a text task trained on class names prints names."""
    path = Path(path)
    where = ["line", "text"] if result.texts else ["path"]
    try:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[*where, "task", "ref", "predicted", "label"])
            writer.writeheader()
            writer.writerows(result.rows())
    except OSError as exc:  # checked before predicting, but a disk can still fill up
        raise ConfigError(f"cannot write predictions to {path}: {exc.strerror or exc}") from None
    return path

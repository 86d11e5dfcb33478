"""Text data for Transformers backbones: CSV or JSONL files of ``text,label`` rows, class names or indices,
train/val/test splits, and tokenisation into padded batches.

A data source is one file (split 60/20/20 by a seeded permutation, as one ImageFolder folder is) or a folder
holding ``train``, ``val`` and ``test`` files. Labels are class indices (integers) or class names (any other
text); names are numbered in sorted order and that order is recorded with the adapter, so that predictions
print names. Every problem with a file is one DataError line naming the file (and the line where it has one).
This module never imports transformers: the tokenizer it is given is used through its ``__call__``."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data import DataError

SUFFIXES = (".csv", ".jsonl")
SPLITS = ("train", "val", "test")
MAX_CLASSES = 10_000  # more distinct labels than this is a column of something else, not classes
DEFAULT_MAX_LENGTH = 128


def is_text_source(path: str | Path) -> bool:
    """A .csv / .jsonl file, or a folder holding text split files (``train.csv`` or ``train.jsonl``)."""
    path = Path(path)
    if path.suffix.lower() in SUFFIXES and not path.is_dir():
        return True
    return path.is_dir() and any((path / f"train{s}").is_file() for s in SUFFIXES)


@dataclass(frozen=True)
class Row:
    """One record of a text file: its line number (1-based, where the record ends) and its columns."""

    line: int
    values: dict[str, Any]


def read_rows(path: str | Path, required: Sequence[str] = ("text", "label")) -> tuple[list[str], list[Row]]:
    """The columns and rows of a CSV file (with a header line) or a JSONL file (one JSON object a line).
    Each of ``required`` must be a column (the message names the columns found); a file without rows,
    a line that is not a JSON object, or a text that is not a non-empty string is refused."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if path.is_dir():
        raise DataError(f"{path} is a folder; text data is a .csv or .jsonl file")
    if not path.is_file():  # a device or a pipe (/dev/zero) could be read without end
        raise DataError(f"{path} is not a regular file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: text data is a .csv or .jsonl file, got {suffix or 'no suffix'}")
    try:
        columns, rows = _csv(path) if suffix == ".csv" else _jsonl(path)
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not rows:
        raise DataError(f"{path} holds no rows")
    missing = [c for c in required if c not in columns]
    if missing:
        found = ", ".join(columns) or "none"
        raise DataError(f"{path} has no column {', '.join(missing)}: it needs {', '.join(required)} (found: {found})")
    for row in rows:
        if "text" in required:
            text = row.values.get("text")
            if not isinstance(text, str):
                raise DataError(f"{path}:{row.line}: text must be a string, got {_shown(text)}")
            if not text.strip():
                raise DataError(f"{path}:{row.line}: the text is empty")
        for column in required:
            if column != "text" and blank(row.values.get(column)):
                raise DataError(f"{path}:{row.line}: no {column}")
    return columns, rows


def _csv(path: Path) -> tuple[list[str], list[Row]]:
    with path.open(newline="", encoding="utf-8-sig") as f:  # utf-8-sig: a byte-order mark (Excel) is dropped
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise DataError(f"{path} is empty: a CSV file needs a header line (text,label)")
        columns = [c.strip() for c in reader.fieldnames]
        rows = []
        try:
            for record in reader:
                if None in record:  # DictReader keeps the fields beyond the header under None
                    raise DataError(
                        f"{path}:{reader.line_num}: {len(columns) + len(record[None])} fields for a header of "
                        f"{len(columns)} (quote a text that holds commas)"
                    )
                values = {k.strip(): v for k, v in record.items()}
                if all(blank(v) for v in values.values()):
                    continue  # a blank line
                rows.append(Row(reader.line_num, values))
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from None
    return columns, rows


def _jsonl(path: Path) -> tuple[list[str], list[Row]]:
    columns: dict[str, None] = {}
    rows = []
    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            except RecursionError:
                raise DataError(f"{path}:{number}: JSON nested too deeply") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object with text and label, got {_shown(record)}")
            columns.update(dict.fromkeys(record))
            rows.append(Row(number, record))
    return list(columns), rows


def blank(value: Any) -> bool:
    """A missing value: None or only whitespace."""
    return value is None or (isinstance(value, str) and not value.strip())


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "…"


def label_value(value: Any, where: str) -> int | str:
    """A label as written: an int for a whole number (``3``, ``"3"``, ``3.0``), else its stripped text."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DataError(f"{where}: a label is a whole number or a class name, got {_shown(value)}")
    if isinstance(value, float):
        if not value.is_integer():
            raise DataError(f"{where}: label {value!r} is neither a class index nor a class name")
        return int(value)
    if isinstance(value, int):
        return value
    text = value.strip()
    return int(text) if text.lstrip("-").isdigit() else text


def class_indices(
    labels: Sequence[int | str],
    where: Sequence[str],
    *,
    num_classes: int | None = None,
    classes: Sequence[str] | None = None,
    min_classes: int = 1,
    source: str = "the data",
) -> tuple[list[int], list[str] | None, int]:
    """(class index per label, class names or None, number of classes).

    - ``classes`` (the names a version was trained with): each label must be one of them;
    - else ``num_classes`` (the task's): each label must be an index 0..num_classes-1;
    - else the data decides: whole numbers are indices (max + 1 classes), any other label makes every label
      a name, numbered in sorted order. More than MAX_CLASSES classes, or fewer than ``min_classes``, is
      refused."""
    if classes is not None:
        index = {name: i for i, name in enumerate(classes)}
        out = []
        for label, at in zip(labels, where):
            if str(label) not in index:
                raise DataError(f"{at}: label {str(label)!r} is not one of the classes {list(classes)}")
            out.append(index[str(label)])
        return out, list(classes), len(classes)
    if num_classes is not None:
        for label, at in zip(labels, where):
            if not isinstance(label, int):
                raise DataError(f"{at}: label {label!r} is not a class index: the task has {num_classes} classes, "
                                f"numbered 0 to {num_classes - 1}")  # fmt: skip
            if not 0 <= label < num_classes:
                raise DataError(f"{at}: label {label} is outside the task's {num_classes} classes (0 to "
                                f"{num_classes - 1})")  # fmt: skip
        return list(labels), None, num_classes  # type: ignore[arg-type]
    if all(isinstance(label, int) for label in labels):
        negative = next(((label, at) for label, at in zip(labels, where) if label < 0), None)  # type: ignore[operator]
        if negative is not None:
            raise DataError(f"{negative[1]}: label {negative[0]} is negative; class indices start at 0")
        count = max(labels) + 1  # type: ignore[type-var, operator]
        names = None
    else:
        names = sorted({str(label) for label in labels})
        count = len(names)
    if count > MAX_CLASSES:
        raise DataError(f"{source}: too many classes ({count}); at most {MAX_CLASSES} (is the "
                        "label column a label?)")  # fmt: skip
    if count < min_classes:
        raise DataError(f"{source}: the labels name {count} class(es); a classifier needs at least "
                        f"{min_classes}")  # fmt: skip
    if names is None:
        return list(labels), None, count  # type: ignore[arg-type]
    index = {name: i for i, name in enumerate(names)}
    return [index[str(label)] for label in labels], names, count


class Tokenization:
    """A tokenizer with a maximum length: :meth:`encode` turns texts into token rows (special tokens added,
    truncated at ``max_length``), :meth:`pad` makes a batch of them, padded on the right to its longest row.

    Padded positions carry the pad token (id 0 when the tokenizer has none) and attention mask 0, so no real
    token attends to them and poolings skip them; right padding keeps every real token at the position it has
    when its text runs alone (absolute position embeddings, as GPT-2's, see the same positions)."""

    def __init__(self, tokenizer: Any, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        pad_id = getattr(tokenizer, "pad_token_id", None)
        self.fill = {"input_ids": int(pad_id) if pad_id is not None else 0, "attention_mask": 0,
                     "token_type_ids": int(getattr(tokenizer, "pad_token_type_id", 0) or 0)}  # fmt: skip

    def encode(self, texts: Sequence[str]) -> list[dict[str, list[int]]]:
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, padding=False)
        keys = [k for k in self.fill if k in enc]
        rows = [{k: list(enc[k][i]) for k in keys} for i in range(len(texts))]
        for text, row in zip(texts, rows):
            if not row.get("input_ids"):
                raise DataError(f"the tokenizer makes no tokens of the text {_shown(text)}")
            row.setdefault("attention_mask", [1] * len(row["input_ids"]))
        return rows

    def pad(self, rows: Sequence[Mapping[str, list[int]]]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        return {key: torch.tensor([list(r[key]) + [fill] * (longest - len(r[key])) for r in rows], dtype=torch.long)
                for key, fill in self.fill.items() if key in rows[0]}  # fmt: skip

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.pad(self.encode(texts))


@dataclass(frozen=True)
class TextSplit:
    """Texts as token rows and their labels; :meth:`batches` yields (inputs, labels) with ``inputs`` the
    keyword arguments of the classifier (input_ids, attention_mask[, token_type_ids]), padded per batch."""

    texts: list[str]
    rows: list[dict[str, list[int]]]
    y: torch.Tensor
    tokens: Tokenization

    def __len__(self) -> int:
        return len(self.y)

    def batches(
        self, size: int, *, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for i in range(0, len(self), size):
            idx = order[i : i + size]
            yield self.tokens.pad([self.rows[j] for j in idx.tolist()]), self.y[idx]

    def subset(self, index: Sequence[int]) -> TextSplit:
        return TextSplit([self.texts[i] for i in index], [self.rows[i] for i in index], self.y[list(index)],
                         self.tokens)  # fmt: skip


@dataclass(frozen=True)
class TextDataset:
    train: TextSplit
    val: TextSplit
    test: TextSplit
    num_classes: int
    name: str
    classes: list[str] | None  # class names in index order; None when the labels are indices

    def split(self, name: str) -> TextSplit:
        """``train``, ``val``, ``test``, or ``all`` (the three together)."""
        if name == "all":
            parts = (self.train, self.val, self.test)
            return TextSplit([t for p in parts for t in p.texts], [r for p in parts for r in p.rows],
                             torch.cat([p.y for p in parts]), self.train.tokens)  # fmt: skip
        if name not in SPLITS:
            raise DataError(f"split must be train, val, test or all, got {name!r}")
        return getattr(self, name)


def split_files(source: Path) -> list[Path]:
    """The train, val and test files of a folder (each a .csv or .jsonl)."""
    files = []
    for split in SPLITS:
        found = [source / f"{split}{s}" for s in SUFFIXES if (source / f"{split}{s}").is_file()]
        if len(found) != 1:
            what = "no" if not found else "two"
            raise DataError(f"{source} has {what} {split} file: a text data folder holds one each of "
                            f"train, val and test (.csv or .jsonl)")  # fmt: skip
        files.append(found[0])
    return files


def load_text(
    source: str | Path,
    tokens: Tokenization,
    *,
    num_classes: int | None = None,
    classes: Sequence[str] | None = None,
    min_classes: int = 2,
    seed: int = 0,
    fractions: tuple[float, float] = (0.6, 0.2),
    need: Sequence[str] = SPLITS,
) -> TextDataset:
    """A text data source as train/val/test: one file split by a seeded permutation (``fractions`` for train
    and val, the rest test), or a folder of train/val/test files. Labels become class indices as
    :func:`class_indices` says, over all the rows at once (so every split numbers the classes alike).
    Each split named in ``need`` must hold at least one row."""
    source = Path(source)
    if not source.exists():
        raise DataError(f"data {source} does not exist")
    files = split_files(source) if source.is_dir() else [source]
    texts: list[str] = []
    labels: list[int | str] = []
    where: list[str] = []
    sizes = []
    for path in files:
        _, rows = read_rows(path)
        for row in rows:
            at = f"{path}:{row.line}"
            texts.append(row.values["text"])
            labels.append(label_value(row.values["label"], at))
            where.append(at)
        sizes.append(len(rows))
    index, names, count = class_indices(labels, where, num_classes=num_classes, classes=classes,
                                        min_classes=min_classes, source=str(source))  # fmt: skip
    whole = TextSplit(texts, tokens.encode(texts), torch.tensor(index, dtype=torch.long), tokens)
    if len(files) == 3:
        a, b = sizes[0], sizes[0] + sizes[1]
        parts = [list(range(0, a)), list(range(a, b)), list(range(b, len(texts)))]
    else:
        perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
        a, b = int(fractions[0] * len(perm)), int((fractions[0] + fractions[1]) * len(perm))
        parts = [perm[:a], perm[a:b], perm[b:]]
    for split, part in zip(SPLITS, parts):
        if split in need and not part:
            raise DataError(f"{source} has {len(texts)} rows: too few for a {split} split (split 60/20/20; give "
                            "more rows or a folder with train, val and test files)")  # fmt: skip
    train, val, test = (whole.subset(p) for p in parts)
    return TextDataset(train, val, test, num_classes=count, name=source.stem, classes=names)

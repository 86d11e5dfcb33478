"""What the registry can store, read off the schema's own columns: one check per value a user sets, made
before anything is written, with the same message on every database.

SQLite takes a 300-character alias or a 2**40 version number where PostgreSQL raises a DataError, and
PostgreSQL refuses a NUL character in any text, so the limits are enforced here rather than by the
database. Lengths come from ``String(n)``, integer ranges from the column's SQL type (a PostgreSQL
``integer`` is 32 bits, ``bigint`` 64), so a migration that widens a column widens the check with it."""

from __future__ import annotations

import json
import math
import operator
from typing import Any

from sqlalchemy import BigInteger, Column, Float, Integer, SmallInteger, String
from sqlalchemy.orm import InstrumentedAttribute

from .errors import LimitError
from .models import AdapterRow, AliasRow, BackboneRow, EdgeRow, MetricRow, TagRow, TaskRow, VersionRow

# Every column a user sets, by the words a message calls it.
FIELDS: dict[str, InstrumentedAttribute[Any]] = {
    "backbone name": BackboneRow.name,
    "architecture": BackboneRow.architecture,
    "backbone description": BackboneRow.description,
    "task name": TaskRow.name,
    "task domain": TaskRow.domain,
    "task metric": TaskRow.metric,
    "task description": TaskRow.description,
    "adapter name": AdapterRow.name,
    "adapter description": AdapterRow.description,
    "version number": VersionRow.number,
    "version description": VersionRow.description,
    "created_by": VersionRow.created_by,
    "lineage weight": EdgeRow.weight,
    "lineage method": EdgeRow.method,
    "metric name": MetricRow.name,
    "metric value": MetricRow.value,
    "metric split": MetricRow.split,
    "metric dataset": MetricRow.dataset,
    "metric step": MetricRow.step,
    "alias name": AliasRow.name,
    "tag key": TagRow.key,
    "tag value": TagRow.value,
}

_BITS = ((SmallInteger, 16), (BigInteger, 64), (Integer, 32))  # subclasses of Integer first


def column(field: str) -> Column[Any]:
    return FIELDS[field].property.columns[0]


def max_length(field: str) -> int | None:
    """The most characters the field's column holds (None: unlimited text)."""
    kind = column(field).type
    return kind.length if isinstance(kind, String) else None


def int_range(field: str) -> tuple[int, int]:
    kind = column(field).type
    bits = next(b for t, b in _BITS if isinstance(kind, t))
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def shown(value: Any, width: int = 40) -> str:
    """``repr`` cut to a readable width, so that a 10,000-character value still makes a one-line message."""
    if isinstance(value, str) and len(value) > width:
        return repr(value[:width] + "…") + f" ({len(value)} characters)"
    if isinstance(value, int) and value.bit_length() > 1000:  # repr refuses ints of over 4,300 digits
        return f"{'a negative' if value < 0 else 'an'} integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= width + 2 else text[:width] + "…"


def check(field: str, value: Any, *, minimum: int | None = None, label: str | None = None) -> Any:
    """``value`` if the registry can store it in ``field``'s column (None passes: every such column is
    optional or filled in by the registry), else LimitError. ``minimum`` narrows an integer column
    further (version numbers start at 1); ``label`` names the value in the message (default: field)."""
    if value is None:
        return None
    kind = column(field).type
    if isinstance(kind, Integer):
        return _integer(label or field, value, minimum, int_range(field))
    if isinstance(kind, Float):
        return _finite(label or field, value)
    return _text(label or field, value, max_length(field))


def _text(field: str, value: Any, limit: int | None) -> str:
    if not isinstance(value, str):
        raise LimitError(f"{field} must be text, got {type(value).__name__} {shown(value)}")
    if "\x00" in value:  # PostgreSQL refuses it in any text; SQLite would keep a string C tools cut short
        raise LimitError(f"{field} {shown(value)} contains a NUL character, which the registry cannot store")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no database encoding can hold it
        raise LimitError(f"{field} {shown(value)} is not valid Unicode text") from None
    if limit is not None and len(value) > limit:
        raise LimitError(f"{field} {shown(value)} is too long: the registry keeps at most {limit} characters")
    return value


def _integer(field: str, value: Any, minimum: int | None, bounds: tuple[int, int]) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)  # ints and numpy integers, not floats
    except TypeError:
        raise LimitError(f"{field} must be a whole number, got {shown(value)}") from None
    lo, hi = bounds
    lo = max(lo, minimum) if minimum is not None else lo
    if not lo <= number <= hi:
        raise LimitError(f"{field} {shown(number)} is out of range: it must be between {lo} and {hi}")
    return number


def _finite(field: str, value: Any) -> float:
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise LimitError(f"{field} must be a number, got {shown(value)}") from None
    if not math.isfinite(number):
        raise LimitError(f"{field} must be a finite number, got {number}")
    return number


def metric(name: Any, value: Any, *, split: Any = None, dataset: Any = None, step: Any = None) -> float:
    """The value of a metric the registry can store (name, split, dataset and step checked too)."""
    check("metric name", name)
    check("metric split", split)
    check("metric dataset", dataset)
    check("metric step", step)
    return float(check("metric value", value, label=f"value of metric {shown(name)}"))


def tag(key: Any, value: Any) -> None:
    check("tag key", key)
    check("tag value", value)


def json_value(field: str, value: Any) -> None:
    """A value for a JSON column (a backbone's source, a task's output, lineage parameters): plain JSON with
    finite numbers and no NUL character, which PostgreSQL refuses and SQLite would keep."""
    if value is None:
        return
    try:
        encoded = json.dumps(value, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise LimitError(f"{field} must be plain JSON with finite numbers: {exc}") from None
    if "\\u0000" in encoded:
        raise LimitError(f"{field} contains a NUL character, which the registry cannot store")

"""Checks of call arguments and command options, made before any long work (training, rebuilding a
backbone, loading data): each bad value is one ConfigError line, never a traceback after minutes."""

from __future__ import annotations

import math
import operator
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError

# torch.manual_seed and torch.Generator take a 64-bit seed; a non-negative int64 fits them all.
SEED_MAX = 2**63 - 1


def number(name: str, value: Any, *, above: float | None = None, at_most: float | None = None) -> float:
    """``value`` as a finite float, greater than ``above`` and at most ``at_most`` where given."""
    try:
        if isinstance(value, (str, bytes, bool)):
            raise TypeError
        result = float(value)
    except OverflowError:  # an int too large for a float
        raise ConfigError(f"{name} must be a finite number, got {_shown(value)}") from None
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {_shown(value)}") from None
    if not math.isfinite(result):
        raise ConfigError(f"{name} must be a finite number, got {result}")
    if above is not None and not result > above:
        raise ConfigError(f"{name} must be greater than {above:g}, got {result:g}")
    if at_most is not None and not result <= at_most:
        raise ConfigError(f"{name} must be at most {at_most:g}, got {result:g}")
    return result


def whole(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in [low, high] (numpy integers too; no floats, no bools)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        result = operator.index(value)
    except TypeError:
        raise ConfigError(f"{name} must be a whole number, got {_shown(value)}") from None
    if (low is not None and result < low) or (high is not None and result > high):
        lo = "" if low is None else f"at least {low}"
        hi = "" if high is None else f"at most {high}"
        raise ConfigError(f"{name} must be {' and '.join(x for x in (lo, hi) if x)}, got {_shown(result)}")
    return result


def _shown(value: Any) -> str:
    """A value for a one-line message: repr cut to 40 characters (str() refuses ints of 4,300+ digits)."""
    if isinstance(value, int) and value.bit_length() > 1000:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "…"


def num_classes(value: Any, error: type[Exception] = ConfigError) -> int:
    """A number of classes: a whole number (or its text, as a recorded source may hold) of at least 1."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = int(value) if isinstance(value, str) else operator.index(value)
    except (TypeError, ValueError):
        raise error(f"the number of classes must be a whole number, got {_shown(value)}") from None
    if number < 1:
        raise error(f"the number of classes must be at least 1, got {number}")
    if number > MAX_CLASSES:
        raise error(f"the number of classes must be at most {MAX_CLASSES:,}, got {_shown(number)}")
    return number


def patterns(name: str, values: Any) -> list[str]:
    """Module patterns (targets, heads): a non-empty list of non-empty strings — an empty list or an empty
    entry (``--targets ''``, ``a,,b``) is refused rather than read as "the defaults" or as nothing."""
    if isinstance(values, str) or not all(isinstance(v, str) for v in values):
        raise ConfigError(f"{name} must be a list of module patterns, got {_shown(values)}")
    values = [v.strip() for v in values]
    if not values or not all(values):
        raise ConfigError(f"{name} has an empty pattern: give module names or patterns separated by commas")
    return values


# A task's or a backbone's number of classes: a head of more outputs is not a classifier this product trains.
MAX_CLASSES = 1_000_000
# Bounds of the training options: finite values beyond these only allocate, overflow or never finish.
MAX_RANK = 4096  # above any layer width the catalogue adapts
MAX_ALPHA = 1e6  # s = α/r: already 10⁶× the delta at r = 1
MAX_LR = 10.0  # a step of 10× the gradient diverges for every parameter group
MAX_EPOCHS = 100_000


def seed(value: Any, name: str = "seed") -> int:
    return whole(name, value, low=0, high=SEED_MAX)


def weights(values: Any, count: int) -> list[float] | None:
    """One finite weight per combined version (None: the method's default)."""
    if values is None:
        return None
    result = [number("each weight", w) for w in values]
    if len(result) != count:
        raise ConfigError(f"{len(result)} weights for {count} versions: give one weight per version")
    return result


def _given(path: str | Path, what: str) -> Path:
    if not str(path).strip():  # Path("") is the current folder: an empty value is a mistake, not "here"
        raise ConfigError(f"{what} is empty: give a path")
    return Path(path)


def directory(path: str | Path, what: str = "data directory") -> Path:
    path = _given(path, what)
    if not path.is_dir():
        raise ConfigError(f"{what} {path} {'is not a directory' if path.exists() else 'does not exist'}")
    return path


def writable_file(path: str | Path, what: str = "output file") -> Path:
    """A file that can be written: not a directory, in an existing folder this process may write (a device such
    as /dev/null or a named pipe is written as Unix writes them)."""
    path = _given(path, what)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory")
    if not parent.is_dir():
        raise ConfigError(f"{what} {path}: folder {parent} does not exist")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{what} {path} is not writable")
    if not path.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: folder {parent} is not writable")
    return path


def writable_dir(path: str | Path, what: str = "folder") -> Path:
    """A folder that exists and can be written, or can be created: its nearest existing ancestor is a
    writable folder. Nothing is created here."""
    path = _given(path, what)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: {existing} is not writable")
    return path

"""Refs: TASK/ADAPTER (latest), TASK/ADAPTER:N (version N), TASK/ADAPTER@ALIAS."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from . import limits
from .errors import RefError, RegistryError

# The characters of a name; its length is its column's (limits.py): 200 for most names, 100 for aliases.
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.\-]*"
_NAME = re.compile(rf"^{NAME_PATTERN}$")
_REF = re.compile(
    rf"^(?P<task>{NAME_PATTERN})/(?P<adapter>{NAME_PATTERN})(?::(?P<number>\d+)|@(?P<alias>{NAME_PATTERN}))?$"
)
REF_FORMS = "TASK/ADAPTER, TASK/ADAPTER:N or TASK/ADAPTER@ALIAS"
LATEST = "latest"


@dataclass(frozen=True)
class Ref:
    task: str
    adapter: str
    number: int | None = None
    alias: str | None = None

    @property
    def adapter_path(self) -> str:
        return f"{self.task}/{self.adapter}"

    def __str__(self) -> str:
        if self.number is not None:
            return f"{self.adapter_path}:{self.number}"
        if self.alias is not None:
            return f"{self.adapter_path}@{self.alias}"
        return self.adapter_path


def parse_ref(text: str | Ref) -> Ref:
    """A Ref from its text, checked against what the registry can hold (a name's length, a version
    number's range), so that a ref no database could answer is one RefError on every backend."""
    if isinstance(text, Ref):
        return _checked(text, str(text))
    m = _REF.match(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise RefError(f"malformed ref {limits.shown(text)}: expected {REF_FORMS}")
    digits = m["number"]
    if digits is not None and len(digits) > 1000:  # int() refuses thousands of digits with a ValueError
        raise RefError(f"malformed ref {limits.shown(text)}: a version number of {len(digits)} digits")
    number = int(digits) if digits is not None else None
    if number == 0:
        raise RefError(f"malformed ref {text!r}: version numbers start at 1")
    alias = None if m["alias"] == LATEST else m["alias"]
    return _checked(Ref(m["task"], m["adapter"], number, alias), text)


def _checked(ref: Ref, text: str) -> Ref:
    try:
        for kind, name in (("task", ref.task), ("adapter", ref.adapter), ("alias", ref.alias)):
            if name is not None:
                check_name(kind, name)
        limits.check("version number", ref.number, minimum=1)
    except RegistryError as exc:
        raise RefError(f"malformed ref {limits.shown(text)}: {exc}") from None
    return ref


def adapter_path(text: str, what: str = "the output") -> tuple[str, str]:
    """TASK and ADAPTER of ``text``, the name a new version goes under, checked by the registry's name
    rules (``TASK/ADAPTER``, no version or alias: the registry numbers it)."""
    parts = text.split("/") if isinstance(text, str) else []
    if len(parts) != 2 or not all(parts) or any(c in parts[1] for c in ":@"):
        raise RefError(f"{what} takes TASK/ADAPTER (the registry numbers the version), got {limits.shown(text)}")
    return check_name("task", parts[0]), check_name("adapter", parts[1])


def format_ref(task: str, adapter: str, number: int) -> str:
    return f"{task}/{adapter}:{number}"


def check_name(kind: str, name: str) -> str:
    """``name`` if it is a valid backbone, task, adapter or alias name: its characters, and its length
    within its column's."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):  # match's $ lets a final newline in
        raise RegistryError(
            f"invalid {kind} name {limits.shown(name)}: use letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return str(limits.check(f"{kind} name", name))


def suggest(name: str, candidates: Iterable[str]) -> str:
    """' (did you mean a, b?)' for close matches, else ''."""
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


KEY_LENGTH = 64  # versions.token


def check_key(key: str) -> str:
    """A registration key: 1 to 64 printable ASCII characters without spaces."""
    if not isinstance(key, str) or not 0 < len(key) <= KEY_LENGTH or not all(
        c.isascii() and c.isprintable() and c != " " for c in key
    ):
        raise RegistryError(f"a registration key is 1 to {KEY_LENGTH} printable ASCII characters, got {key!r}"[:300])
    return key

"""Refs: TASK/ADAPTER (latest), TASK/ADAPTER:N (version N), TASK/ADAPTER@ALIAS."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import RefError, RegistryError

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}"
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
    if isinstance(text, Ref):
        return text
    m = _REF.match(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise RefError(f"malformed ref {text!r}: expected {REF_FORMS}")
    number = int(m["number"]) if m["number"] is not None else None
    if number == 0:
        raise RefError(f"malformed ref {text!r}: version numbers start at 1")
    alias = None if m["alias"] == LATEST else m["alias"]
    return Ref(m["task"], m["adapter"], number, alias)


def format_ref(task: str, adapter: str, number: int) -> str:
    return f"{task}/{adapter}:{number}"


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise RegistryError(
            f"invalid {kind} name {name!r}: use letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def suggest(name: str, candidates: Iterable[str]) -> str:
    """' (did you mean a, b?)' for close matches, else ''."""
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""

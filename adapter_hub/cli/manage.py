"""adapter-hub alias set|rm, tag set, rm, verify, gc"""

from __future__ import annotations

import click

from ..registry.errors import RegistryError
from ._app import CELL_LIMIT, State, emit_json, json_option, pass_state, plain, size


@click.group()
def alias() -> None:
    """Named pointers to versions (production, staging…)."""


@alias.command("set")
@click.argument("ref")
@click.argument("name")
@pass_state
def alias_set(state: State, ref: str, name: str) -> None:
    """Point alias NAME of REF's adapter at REF."""
    v = state.hub().set_alias(ref, name)
    click.echo(f"{v.task}/{v.adapter}@{name} -> {v.ref}")


@alias.command("rm")
@click.argument("ref")
@pass_state
def alias_rm(state: State, ref: str) -> None:
    """Remove alias TASK/ADAPTER@NAME."""
    state.hub().remove_alias(ref)
    click.echo(f"removed {plain(ref)}")


@click.group()
def tag() -> None:
    """Free-form key=value tags on versions."""


@tag.command("set")
@click.argument("ref")
@click.argument("pairs", nargs=-1, required=True)
@pass_state
def tag_set(state: State, ref: str, pairs: tuple[str, ...]) -> None:
    """Set tags KEY=VALUE... on REF."""
    parsed = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise RegistryError(f"tags are KEY=VALUE, got {pair!r}")
        parsed.append((key, value))
    hub = state.hub()
    for key, value in parsed:
        v = hub.set_tag(ref, key, value)
    shown = (f"{plain(k, CELL_LIMIT)}={plain(val, CELL_LIMIT)}" for k, val in v.tags.items())
    click.echo(f"{v.ref}: " + ", ".join(shown))


@click.command()
@click.argument("ref")
@json_option
@pass_state
def rm(state: State, ref: str) -> None:
    """Delete version REF (soft: its number is never reused; `gc --purge-deleted` frees its blob)."""
    v = state.hub().delete(ref)
    if state.json:
        emit_json(v.to_dict())
    else:
        click.echo(f"deleted {v.ref}")


@click.command()
@click.argument("ref", required=False)
@click.option("--all", "check_all", is_flag=True, help="Every version (the default without REF).")
@json_option
@pass_state
def verify(state: State, ref: str | None, check_all: bool) -> None:
    """Check artifacts against their sha256 digests; exit 1 if any is missing or corrupt."""
    if ref and check_all:
        raise RegistryError("give a REF or --all, not both")
    problems = state.hub().verify(ref)
    if state.json:
        emit_json({"ok": not problems, "problems": [p.to_dict() for p in problems]})
    else:
        for p in problems:
            click.echo(f"{p.ref}: {plain(p.problem)}", err=True)
        if not problems:
            click.echo(f"{ref or 'all artifacts'}: ok")
    if problems:
        raise click.exceptions.Exit(1)


@click.command()
@click.option("--grace", type=float, default=3600.0, show_default=True, help="Keep blobs younger than this (s).")
@click.option("--purge-deleted", is_flag=True, help="Also free the blobs of deleted versions.")
@click.option("--dry-run", is_flag=True, help="Report, remove nothing.")
@json_option
@pass_state
def gc(state: State, grace: float, purge_deleted: bool, dry_run: bool) -> None:
    """Remove artifact blobs that no version references."""
    report = state.hub().gc(grace_s=grace, purge_deleted=purge_deleted, dry_run=dry_run)
    if state.json:
        emit_json(report.to_dict())
        return
    verb = "would remove" if dry_run else "removed"
    click.echo(
        f"{verb} {len(report.removed)} blob(s) and {report.temp_files} temp file(s), {size(report.freed_bytes)}"
        + (f"; purged {len(report.purged_versions)} deleted version(s)" if report.purged_versions else "")
        + (f"; expired {report.expired_uploads} unfinished upload(s)" if report.expired_uploads else "")
    )

"""A registered version written out: its verified adapter file, or a PEFT LoRA directory. An existing file
or a non-empty directory is replaced only when asked, and a refused or failed export leaves nothing behind."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import RegistryError
from .records import Version
from .render import visible

if TYPE_CHECKING:
    from .hub import Hub

FORMATS = ("safetensors", "peft")


def export_file_name(version: Version) -> str:
    """TASK+ADAPTER-vN.safetensors. Task and adapter names hold only letters, digits, '.', '_' and '-', so the
    '+' cannot occur inside either and each file name maps back to one version; every character in it is safe
    on common filesystems. A task with adapters of the same name no longer overwrites another's file."""
    return f"{version.task}+{version.adapter}-v{version.number}.safetensors"


def export_version(
    hub: Hub,
    ref: str,
    dest: str | os.PathLike[str],
    *,
    fmt: str = "safetensors",
    overwrite: bool = False,
    model_for: Callable[[str], Any] | None = None,
) -> tuple[Version, Path]:
    """Write version REF into directory DEST and return it with the path written.

    safetensors: DEST/TASK+ADAPTER-vN.safetensors, the stored bytes after their digest is checked. peft: DEST
    itself becomes a PEFT LoRA directory (adapter_config.json, adapter_model.safetensors), built on the model
    that `model_for(backbone_name)` returns. DEST is created when missing, its parent never is. Without
    OVERWRITE an existing target file, or a non-empty DEST for peft, is refused before anything is written;
    with it, only the exported files are replaced (other files in DEST stay)."""
    if fmt not in FORMATS:
        raise RegistryError(f"unknown export format {fmt!r}: expected {' or '.join(FORMATS)}")
    if not str(dest).strip():  # Path("") is the current folder: an empty DEST is a mistake, not "here"
        raise RegistryError("the export destination is empty: give a folder")
    out = Path(dest)
    create = _check_folder(out)
    if fmt == "safetensors":
        version, data = hub.read_artifact(ref)
        target = out / export_file_name(version)
        if target.is_dir():
            raise RegistryError(f"{_shown(target)} is a directory; export to another DEST")
        if target.exists() and not overwrite:
            raise RegistryError(f"{_shown(target)} already exists; pass --overwrite to replace it")
        with _one_line_os_errors(out, create):
            _write_file(target, data, overwrite=overwrite)
        return version, target
    if model_for is None:
        raise ValueError("a PEFT export needs model_for: the backbone the adapter is loaded onto")
    version = hub.resolve(ref)
    if not create and not overwrite and any(out.iterdir()):
        raise RegistryError(f"{_shown(out)} is not empty; pass --overwrite to replace its PEFT files")
    model = model_for(version.backbone)
    hub.load_into(model, version.ref, name=version.adapter)
    with _one_line_os_errors(out, False):
        _write_peft(model, version, out, create=create, overwrite=overwrite)
    return version, out


def _shown(path: Path) -> str:
    return visible(str(path))


def _check_folder(out: Path) -> bool:
    """Whether OUT must be created; a user error when it cannot be."""
    if out.exists():
        if not out.is_dir():
            raise RegistryError(f"{_shown(out)} exists and is not a directory")
        if not os.access(out, os.W_OK | os.X_OK):
            raise RegistryError(f"cannot write into {_shown(out)}: permission denied")
        return False
    parent = out.absolute().parent
    if not parent.is_dir():
        why = "is not a directory" if parent.exists() else "does not exist"
        raise RegistryError(f"cannot create {_shown(out)}: its parent {_shown(parent)} {why}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RegistryError(f"cannot create {_shown(out)}: {_shown(parent)} is not writable")
    return True


@contextmanager
def _one_line_os_errors(out: Path, created: bool) -> Iterator[None]:
    """An OSError while writing (disk full, a name too long…) becomes a one-line user error naming DEST; a
    DEST this export created is removed again (only while empty: nothing of anyone else's is deleted)."""
    try:
        yield
    except BaseException as exc:
        if created:
            with suppress(OSError):
                out.rmdir()
        if isinstance(exc, OSError):
            raise RegistryError(f"cannot export to {_shown(out)}: {exc.strerror or exc}") from None
        raise


def _temp_beside(path: Path) -> Path:
    # not tempfile's: its files and folders are private (0600/0700), an export gets the usual permissions
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def _write_file(target: Path, data: bytes, *, overwrite: bool) -> None:
    target.parent.mkdir(exist_ok=True)
    if not overwrite:
        # exclusive creation: a file that appeared since the check is still never replaced
        try:
            with open(target, "xb") as f:
                f.write(data)
        except FileExistsError:
            raise RegistryError(f"{_shown(target)} already exists; pass --overwrite to replace it") from None
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        return
    # a replaced file is swapped in whole, so a failed write never leaves the old one half overwritten
    tmp = _temp_beside(target)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_peft(model: Any, version: Version, out: Path, *, create: bool, overwrite: bool) -> None:
    """Export into a staging folder next to (or inside) OUT, then move it into place, so a failure midway
    leaves neither a half-written PEFT directory nor a half-replaced one."""
    stage = _temp_beside(out.absolute()) if create else _temp_beside(out / "peft")
    stage.mkdir()
    try:
        model.export_peft(version.adapter, stage, base_model_name_or_path=version.backbone)
        if create:
            os.rename(stage, out)
            return
        for item in sorted(stage.iterdir()):
            if overwrite:
                os.replace(item, out / item.name)
                continue
            try:  # a file that appeared in DEST since the check is still never replaced
                os.link(item, out / item.name)
            except FileExistsError:
                shown = _shown(out / item.name)
                raise RegistryError(f"{shown} appeared meanwhile; pass --overwrite to replace it") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)

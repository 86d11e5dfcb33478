"""What the CLI does across the registry and the composition engine, as plain library functions."""

from __future__ import annotations

from collections.abc import Sequence

from .backbones import rebuild
from .errors import ConfigError
from .model import AdapterModel
from .registry import Hub
from .registry.records import Parent, Version


def model_for(hub: Hub, version: Version) -> AdapterModel:
    """An AdapterModel on the backbone a version was made for, rebuilt from the registry's record."""
    record = hub.backbone(version.backbone)
    return AdapterModel(rebuild(record.name, record.source, record.fingerprint))


def compose_refs(
    hub: Hub,
    refs: Sequence[str],
    output: str,
    *,
    weights: Sequence[float] | None = None,
    method: str = "linear",
    density: float | None = None,
    rank: int | None = None,
    head: str | None = None,
    seed: int = 0,
) -> Version:
    """Combine registered versions into a new registered version ``output`` (TASK/ADAPTER), with a
    ``composed_from`` edge to each source carrying its weight, the method and its parameters."""
    task, _, name = output.partition("/")
    if not task or not name or "@" in name or ":" in name:
        raise ConfigError(f"-o takes TASK/ADAPTER, got {output!r}")
    if len(refs) < 2:
        raise ConfigError("compose needs at least two versions")
    versions = [hub.resolve(ref) for ref in refs]
    fingerprints = {v.fingerprint for v in versions}
    if len(fingerprints) > 1:
        raise ConfigError("the versions were made for different backbones; they cannot be combined")
    model = model_for(hub, versions[0])
    names = [f"source{i}" for i in range(len(versions))]
    for version, local in zip(versions, names):
        hub.load_into(model, version.ref, name=local)
    head_name = head
    if head:
        wanted = hub.resolve(head).ref
        refs_in = [v.ref for v in versions]
        if wanted not in refs_in:
            raise ConfigError(f"--head {head} is not one of the composed versions")
        head_name = names[refs_in.index(wanted)]
    params = {"density": density, "rank": rank, "seed": seed, "head": head_name}
    combined = model.combine("combined", names, weights, method, **{k: v for k, v in params.items() if v is not None})
    recipe = combined.metadata["recipe"]
    parents = [
        Parent(v.ref, "composed_from", weight=w, method=method, params=recipe["params"])
        for v, w in zip(versions, recipe["weights"])
    ]
    return hub.register(model, "combined", task=task, name=name, parents=parents,
                        metrics={"compose/rel_error": recipe["rel_error"]},
                        description=f"{method} of {', '.join(v.ref for v in versions)}")  # fmt: skip

"""A registry shaped like the one `adapter-hub demo` fills, built in a second from tiny adapters: domain tasks
with LoRA adapters of several versions (metrics logged with steps, aliases, tags), a transfer between domains,
a TIES combination of three adapters with its recipe, a deleted version, and hostile text in every kind of
stored string."""

from __future__ import annotations

from typing import Any

import torch
from helpers import seeded_backbone

from adapter_hub.lora import LoRAConfig
from adapter_hub.model import AdapterModel
from adapter_hub.registry import Hub, Parent

DOMAINS = ("rotated", "inverted", "noisy")
XSS = "<script>alert(1)</script>"
HOSTILE_TAG = '<img src=x onerror="alert(2)">'
HOSTILE_METRIC = "val/<b>bold</b>"


def _adapter(model: AdapterModel, name: str, seed: int, r: int = 4) -> None:
    model.add_adapter(name, LoRAConfig(r=r, alpha=2 * r, targets=["0", "4"]))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for p in model.adapters[name].parameters():
            p.normal_(std=0.1)


def _curve(hub: Hub, ref: str, final: float, steps: int = 5) -> None:
    """val/accuracy logged at each step, rising to FINAL (a training curve, as the demo logs it)."""
    for step in range(steps):
        hub.log_metric(ref, "val/accuracy", final - 0.3 * (1 - step / (steps - 1)) ** 2, split="val", step=step * 50)


def fill(hub: Hub, *, hostile: bool = True) -> dict[str, Any]:
    """Fill HUB; returns the refs the tests look at."""
    model = AdapterModel(seeded_backbone(0))
    hub.add_backbone("digits-resnet_small", model, architecture="resnet_small")
    seed = 0
    refs: dict[str, Any] = {}
    for i, domain in enumerate(DOMAINS + ("rotated-noisy",)):
        hub.add_task(f"digits-{domain}", domain=domain, num_classes=10, metric="val/accuracy",
                     description=f"handwritten digits, {domain}")  # fmt: skip
        if domain == "rotated-noisy":
            continue
        previous = None
        for number in (1, 2):
            seed += 1
            _adapter(model, f"{domain}-{number}", seed)
            accuracy = 0.80 + 0.05 * number + 0.01 * i
            v = hub.register(model, f"{domain}-{number}", task=f"digits-{domain}", name="lora-r4",
                             metrics={"test/accuracy": accuracy - 0.02, "train/loss": 0.5 / number},
                             parents=[(previous, "finetuned_from")] if previous else [],
                             tags={"owner": "vision", "recipe": f"lora-{domain}"},
                             description=f"LoRA r=4 on {domain} digits")  # fmt: skip
            _curve(hub, v.ref, accuracy)
            previous = v.ref
        hub.set_alias(previous, "demo")
        refs[domain] = previous
        seed += 1
        _adapter(model, f"{domain}-probe", seed, r=1)
        probe = hub.register(model, f"{domain}-probe", task=f"digits-{domain}", name="probe",
                             metrics={"val/accuracy": 0.6 + 0.01 * i, "test/accuracy": 0.58})  # fmt: skip
        refs[f"{domain}-probe"] = probe.ref
    hub.set_alias("digits-rotated/lora-r4:1", "production")
    seed += 1
    _adapter(model, "transfer", seed)
    transfer = hub.register(model, "transfer", task="digits-rotated-noisy", name="lora-r4-from-rotated",
                            parents=[Parent(refs["rotated"], "transferred_from")],
                            metrics={"test/accuracy": 0.83}, tags={"owner": "vision"})  # fmt: skip
    _curve(hub, transfer.ref, 0.86)
    refs["transfer"] = transfer.ref
    hub.add_task("digits-multitask", num_classes=10, metric="val/accuracy", description="TIES of three domains")
    model.combine("multitask", [f"{d}-2" for d in DOMAINS], [0.7, 0.7, 0.7], method="ties", density=0.5)
    recipe = model.adapters["multitask"].metadata["recipe"]
    merged = hub.register(model, "multitask", task="digits-multitask", name="ties-r12",
                          parents=[Parent(refs[d], "composed_from", weight=w, method="ties", params=recipe["params"])
                                   for d, w in zip(DOMAINS, recipe["weights"])],
                          metrics={"val/accuracy": 0.84},
                          description="TIES average of three domain adapters")  # fmt: skip
    hub.set_alias(merged.ref, "demo")
    refs["merged"] = merged.ref
    seed += 1
    _adapter(model, "gone", seed)
    gone = hub.register(model, "gone", task="digits-noisy", name="lora-r4", parents=[(refs["noisy"], "finetuned_from")])
    hub.delete(gone.ref)
    refs["deleted"] = gone.ref
    if hostile:
        hub.add_task("hostile", domain=XSS, metric=HOSTILE_METRIC, description=XSS)
        seed += 1
        _adapter(model, "hostile", seed)
        bad = hub.register(model, "hostile", task="hostile", name="x", tags={"owner": HOSTILE_TAG},
                           metrics={HOSTILE_METRIC: 0.5}, description=XSS,
                           parents=[Parent(refs["noisy"], "composed_from", weight=1.0, method="<i>m</i>",
                                           params={XSS: XSS})])  # fmt: skip
        refs["hostile"] = bad.ref
    return refs


def more_versions(hub: Hub, ref: str, values: list[float | None], *, metric: str = "val/accuracy",
                  split: str | None = None, status: str = "ready") -> list[str]:  # fmt: skip
    """Versions of REF's adapter numbered on from its newest, one a value (METRIC logged unless None), sharing
    REF's blob and backbone: a thousand in a few statements, as a registry grows over months."""
    from sqlalchemy import func, insert, select

    from adapter_hub.registry import parse_ref
    from adapter_hub.registry import queries as q
    from adapter_hub.registry.models import MetricRow, VersionRow

    with hub._session(write=True) as s:
        row = q.resolve_row(s, parse_ref(ref), include_deleted=True)
        start = s.scalar(select(func.max(VersionRow.number)).where(VersionRow.adapter_id == row.adapter_id)) or 0
        rows = [{"adapter_id": row.adapter_id, "number": start + i + 1, "backbone_id": row.backbone_id,
                 "digest": row.digest, "size": row.size, "config": row.config, "status": status,
                 "trainable_params": row.trainable_params} for i in range(len(values))]  # fmt: skip
        s.execute(insert(VersionRow), rows)
        numbered = select(VersionRow.number, VersionRow.id).where(VersionRow.adapter_id == row.adapter_id)
        ids = {n: i for n, i in s.execute(numbered)}
        metrics = [{"version_id": ids[start + i + 1], "name": metric, "value": value, "split": split}
                   for i, value in enumerate(values) if value is not None]  # fmt: skip
        if metrics:
            s.execute(insert(MetricRow), metrics)
    path = ref.split(":")[0].split("@")[0]
    return [f"{path}:{start + i + 1}" for i in range(len(values))]

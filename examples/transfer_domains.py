"""Transfer across domains: start the rotated-and-noisy digits adapter from the rotated one and count the
steps to the accuracy a fresh adapter reaches; the lineage is recorded by itself."""

import tempfile

import torch

from adapter_hub import AdapterModel, Hub, LoRAConfig, backbones, data, training

torch.manual_seed(0)
source = data.digits("original", pool="source")
backbone = backbones.build_backbone({"architecture": "resnet_small", "num_classes": 10})
training.fit(backbone, source.train, source.val, epochs=2, progress=False)  # the shared backbone
model = AdapterModel(backbone)
config = LoRAConfig(r=8, alpha=16, targets=["layer*.*.conv*"], heads=["fc"])
rotated, both = data.digits("rotated", pool="target"), data.digits("rotated-noisy", pool="target")

model.add_adapter("rotated", config)
model.activate("rotated")
training.fit(model, rotated.train, rotated.val, epochs=3, progress=False)

model.add_adapter("fresh", config)
model.activate("fresh")
fresh = training.fit(model, both.train, both.val, epochs=3, eval_every=3, progress=False)
training.transfer_init(model, "rotated", "transfer")
model.activate("transfer")
moved = training.fit(model, both.train, both.val, epochs=3, eval_every=3, progress=False)
target = 0.95 * fresh.best_accuracy
print(f"steps to {target:.1%} validation accuracy: fresh {fresh.steps_to(target)}, transfer {moved.steps_to(target)}")

with tempfile.TemporaryDirectory() as home:
    hub = Hub.open(home)
    hub.add_backbone("digits-resnet", model)
    for task in ("digits-rotated", "digits-rotated-noisy"):
        hub.add_task(task, num_classes=10)
    parent = hub.register(model, "rotated", task="digits-rotated", name="lora")
    child = hub.register(model, "transfer", task="digits-rotated-noisy", name="lora",
                         parents=[(parent.ref, "transferred_from")])
    print("lineage:", [(e.child, e.relation, e.parent) for e in hub.lineage(child.ref).edges])
    hub.close()

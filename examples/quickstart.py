"""The API in about 40 lines: two adapters on one frozen backbone, stacked, switched, combined, saved."""

import tempfile
from pathlib import Path

import torch

from adapter_hub import AdapterModel, Hub, LoRAConfig, Stack, Switch, backbones, data, training

torch.manual_seed(0)
backbone = backbones.build_backbone({"architecture": "resnet_small", "num_classes": 10})
model = AdapterModel(backbone)  # every backbone parameter is frozen from here on
config = LoRAConfig(r=8, alpha=16, targets=["layer*.*.conv*"], heads=["fc"])

for domain in ("rotated", "inverted"):
    ds = data.digits(domain)
    model.add_adapter(domain, config)
    model.activate(domain)  # only this adapter's deltas and head are trainable
    training.fit(model, ds.train, ds.val, epochs=1, progress=False)
    print(f"{domain}: test accuracy {training.evaluate(model, ds.test):.1%}")

x = data.digits("rotated").test.x[:6]
model.activate(Stack("rotated", "inverted", weights=[1.0, 0.5], head="rotated"))
print("stacked logits", tuple(model(x).shape))
model.activate(Switch("rotated", "inverted"))
out = model(x, route=["rotated", "inverted", "rotated", None, "inverted", "rotated"])
print("routed rows per adapter", {k: v.tolist() for k, v in out.rows.items()})
model.combine("both", ["rotated", "inverted"], method="ties", density=0.5, head="rotated")
model.merge("both")
model.unmerge()  # bit-exact

with tempfile.TemporaryDirectory() as home:
    hub = Hub.open(home)
    hub.add_backbone("digits-resnet", model)
    hub.add_task("digits-rotated", domain="rotated", num_classes=10)
    version = hub.register(model, "rotated", task="digits-rotated", name="lora-r8", metrics={"val/accuracy": 0.9})
    hub.set_alias(version.ref, "production")
    model.save_adapter("rotated", Path(home) / "rotated.safetensors")
    print("registered", version.ref, "as", hub.resolve("digits-rotated/lora-r8@production").ref)
    hub.close()

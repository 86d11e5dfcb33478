"""Multi-task training with a Switch: one mixed batch, each sample through its own task's adapter and head
(heads of different sizes), one optimizer step updating each adapter from its own samples."""

import torch
import torch.nn.functional as F
from torch import nn

from adapter_hub import AdapterModel, LoRAConfig, Switch, backbones, data

torch.manual_seed(0)
model = AdapterModel(backbones.build_backbone({"architecture": "resnet_small", "num_classes": 10}))
config = LoRAConfig(r=4, targets=["layer*.*.conv*"], heads=["fc"])
model.add_adapter("digit", config)
model.add_adapter("parity", config, head_modules={"fc": nn.Linear(512, 2)})  # another output size
digit, parity = data.digits("rotated"), data.digits("rotated", labels="parity")

model.activate(Switch("digit", "parity"))
for p in model.adapters.parameters():  # both adapters learn in the same step
    p.requires_grad_(True)
optimizer = torch.optim.AdamW(model.adapters.parameters(), lr=3e-3)
model.train()
for step in range(20):
    rows = torch.randint(0, len(digit.train), (32,))
    x = digit.train.x[rows]
    route = ["digit" if i % 2 else "parity" for i in range(32)]
    labels = {"digit": digit.train.y[rows], "parity": parity.train.y[rows]}
    out = model(x, route=route)
    loss = sum(F.cross_entropy(out.by_adapter[n], labels[n][out.rows[n]]) for n in ("digit", "parity"))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 5 == 0:
        print(f"step {step}: loss {loss.item():.3f}")

model.eval()
with torch.no_grad():
    x = digit.test.x
    out = model(x, route=["parity"] * len(x))
    print(f"parity accuracy {(out.stack().argmax(-1) == parity.test.y).float().mean():.1%}")

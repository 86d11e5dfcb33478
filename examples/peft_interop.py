"""PEFT interop: an adapter made here loads in PEFT with the same outputs, and back."""

import copy
import tempfile

import torch
import torchvision

from adapter_hub import AdapterModel, LoRAConfig

try:
    from peft import PeftModel
except ImportError:  # the peft extra: pip install 'adapter-hub[peft]'
    raise SystemExit("this example needs peft: pip install 'adapter-hub[peft]'") from None

torch.manual_seed(0)
backbone = torchvision.models.resnet18(num_classes=10).eval()
model = AdapterModel(copy.deepcopy(backbone))
model.add_adapter("task", LoRAConfig(r=8, alpha=16, targets=["conv1", "layer*.conv*", "fc"]))
with torch.no_grad():  # stand-in for training: give the deltas some weight
    for p in model.adapters["task"].parameters():
        p.add_(torch.randn_like(p) * 0.02)
model.activate("task")
x = torch.randn(2, 3, 32, 32)

with tempfile.TemporaryDirectory() as directory:
    model.export_peft("task", directory, base_model_name_or_path="resnet18")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(backbone), directory).eval()
    print("PEFT vs adapter-hub, max difference:", (peft_model(x) - model(x)).abs().max().item())
    back = AdapterModel(copy.deepcopy(backbone))
    back.import_peft(directory, "task")
    back.activate("task")
    print("round trip, max difference:", (back(x) - model(x)).abs().max().item())

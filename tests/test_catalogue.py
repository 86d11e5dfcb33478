"""The backbone catalogue against the models torchvision builds: every entry's targets reach LoRA layers whose
delta is no larger than the layer (depthwise convs are left out), its head is the classifier, and nothing
else is left out unannounced. Built on the meta device (no memory, no init), so ViT-L costs nothing; a few
small ones are built for real and go through AdapterModel. Also: the warning an explicit oversized target
gives, and the head helpers that `train` uses for architectures outside the catalogue."""

from __future__ import annotations

import math
import warnings
from fnmatch import fnmatchcase

import pytest
import torch
import torchvision
from helpers import tiny_backbone
from torch import nn

from adapter_hub import AdapterModel, LoRAConfig, backbones
from adapter_hub.errors import BackboneError
from adapter_hub.lora import lora_class_for, matches
from adapter_hub.model import OversizedDeltaWarning

R = 8  # the CLI's default rank

# What each entry leaves out on purpose besides the depthwise convs (whose delta is at least the layer's):
# squeeze-excitation 1x1 convs, patch embeddings and downsampling layers, Swin V2's position-bias MLP.
LEFT_OUT = {
    "regnet_y_400mf": ["*.se.fc1", "*.se.fc2"],
    "mobilenet_v3_small": ["*.block.*.fc1", "*.block.*.fc2"],
    "mobilenet_v3_large": ["*.block.*.fc1", "*.block.*.fc2"],
    "efficientnet_b0": ["*.block.*.fc1", "*.block.*.fc2"],
    "efficientnet_v2_s": ["*.block.*.fc1", "*.block.*.fc2"],
    "convnext_tiny": ["features.0.0", "features.[246].1"],
    "convnext_small": ["features.0.0", "features.[246].1"],
    "vit_b_16": ["conv_proj"],
    "vit_b_32": ["conv_proj"],
    "vit_l_16": ["conv_proj"],
    "vit_small": ["conv_proj"],
    "swin_t": ["features.0.0", "features.*.reduction"],
    "swin_s": ["features.0.0", "features.*.reduction"],
    "swin_v2_t": ["features.0.0", "features.*.reduction", "*.attn.cpb_mlp.*"],
    "resnet_small": ["layer*.*.downsample.0"],
}


def delta_size(module: nn.Module, r: int) -> int:
    """Parameters of a rank-r delta, by the layer maths: Linear r(in+out); a conv with g groups has rank
    g·⌈r/g⌉, A (rank, in/g, *k), B (out, rank/g); MultiheadAttention adapts in_proj (3E×E) and out_proj (E×E)."""
    if isinstance(module, nn.MultiheadAttention):
        e = module.embed_dim
        return r * (e + 3 * e) + r * (e + e)
    if isinstance(module, nn.Linear):
        return r * (module.in_features + module.out_features)
    g = module.groups
    rank = g * math.ceil(r / g)
    return rank * (module.in_channels // g) * math.prod(module.kernel_size) + module.out_channels * (rank // g)


def base_size(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build(name: str, device: str = "meta") -> nn.Module:
    try:
        with torch.device(device):
            return backbones.build_backbone({"architecture": name, "num_classes": 10})
    except NotImplementedError:  # RegNet computes its widths with tensors, which meta cannot read back
        return backbones.build_backbone({"architecture": name, "num_classes": 10})


def resolved(model: nn.Module, entry: backbones.Entry) -> set[str]:
    """AdapterModel.resolve_targets' answer without an AdapterModel (which fingerprints real weights): each
    pattern's LoRA-capable matches, without the head and MultiheadAttention's out_proj (adapted through it)."""
    named = [(p, m) for p, m in model.named_modules() if p]
    attention = {p for p, m in named if isinstance(m, nn.MultiheadAttention)}
    found: set[str] = set()
    for pattern in entry.targets:
        hits = {p for p, m in named if matches(pattern, p, m) and lora_class_for(m) is not None
                and p.rpartition(".")[0] not in attention and p != entry.head}  # fmt: skip
        assert hits, f"target {pattern!r} matches no LoRA-capable module"
        found |= hits
    return found


@pytest.mark.parametrize("name", sorted(backbones.CATALOGUE))
def test_catalogue_targets_are_lora_layers_no_larger_than_themselves(name: str):
    entry = backbones.entry(name)
    model = build(name)
    head = model.get_submodule(entry.head)
    assert type(head) is nn.Linear and head.out_features == 10, "the head is the classifier"
    assert backbones.find_head(model, 10) == entry.head, "the automatic head agrees with the catalogue"
    targets = resolved(model, entry)
    named = dict(model.named_modules())
    for path in sorted(targets):
        module = named[path]
        with torch.device("meta"):
            layer = lora_class_for(module)(module, r=R, alpha=2 * R)
        assert sum(p.numel() for p in layer.parameters()) == delta_size(module, R), path
        assert delta_size(module, R) <= base_size(module), f"{path}: delta larger than the layer"
    attention = {p for p, m in named.items() if isinstance(m, nn.MultiheadAttention)}
    for path, module in named.items():
        if not path or path in targets or path == entry.head or lora_class_for(module) is None:
            continue
        if path.rpartition(".")[0] in attention:
            continue
        depthwise = getattr(module, "groups", 1) > 1 and delta_size(module, R) >= base_size(module)
        by_design = any(fnmatchcase(path, pattern) for pattern in LEFT_OUT.get(name, []))
        assert depthwise or by_design, f"{path} ({type(module).__name__}) is left out of the targets unannounced"


@pytest.mark.parametrize("name", ["resnet_small", "vit_small", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf"])
def test_built_for_real_the_default_adapter_covers_the_same_layers_without_a_warning(name: str):
    entry = backbones.entry(name)
    model = AdapterModel(build(name, "cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", OversizedDeltaWarning)
        adapter = model.add_adapter("a", LoRAConfig(r=R, targets=entry.targets, heads=[entry.head]))
    assert {p for p, _ in adapter.layer_items()} == resolved(model.backbone, entry)
    assert [p for p, _ in adapter.head_items()] == [entry.head]


def test_an_explicit_depthwise_target_warns_with_the_numbers_and_the_default_leaves_them_out():
    model = AdapterModel(torchvision.models.mobilenet_v2(num_classes=10))
    entry = backbones.entry("mobilenet_v2")
    depthwise = [m for m in model.backbone.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    # rank ⌈8/C⌉ = 1 per channel: A (C, 1, 3, 3) and B (C, 1, 1, 1) against the layer's (C, 1, 3, 3)
    delta = sum(m.out_channels * 9 + m.out_channels for m in depthwise)
    base = sum(m.weight.numel() for m in depthwise)
    assert (len(depthwise), delta, base) == (17, 71_360, 64_224)
    with pytest.warns(OversizedDeltaWarning) as caught:
        model.add_adapter("all", LoRAConfig(r=R, targets=["Conv2d"], heads=[entry.head]))
    assert len(caught) == 1
    message = str(caught[0].message)
    assert f"17 target layer(s) get a delta larger than the layer itself ({delta:,} delta parameters against " \
           f"{base:,} in those layers; features.1.conv.0.0: 320 against 288)" in message  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error", OversizedDeltaWarning)
        model.add_adapter("default", LoRAConfig(r=R, targets=entry.targets, heads=[entry.head]))
        model.adapter_from_bytes("reloaded", model.adapter_to_bytes("all"))  # a file's layers: warned when made
    counts = model.parameter_counts()
    assert counts["all"]["lora"] - counts["default"]["lora"] == delta, "the default differs by the depthwise deltas"
    small = AdapterModel(nn.Sequential(nn.Conv2d(4, 4, 3, groups=4, bias=False), nn.Linear(3, 2)))
    with pytest.warns(OversizedDeltaWarning, match=r"1 target layer\(s\) .*\(40 delta parameters against 36 "):
        small.add_adapter("dw", LoRAConfig(r=1, targets=["0"]))


def test_find_head_takes_the_last_linear_only_when_nothing_else_can_be_meant():
    assert backbones.find_head(tiny_backbone(10), 10) == "4"
    assert backbones.find_head(tiny_backbone(10)) == "4"
    with pytest.raises(BackboneError, match="last Linear 4 outputs 10, not the backbone's 5 classes"):
        backbones.find_head(tiny_backbone(10), 5)
    with torch.device("meta"):
        squeezenet = torchvision.models.squeezenet1_1(num_classes=10)
    with pytest.raises(BackboneError, match="has no nn.Linear .* pass --head"):
        backbones.find_head(squeezenet)
    trailing = nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.Unflatten(1, (10, 1)), nn.Conv1d(10, 10, 1))
    with pytest.raises(BackboneError, match=r"last Linear 1 is followed by 3 \(Conv1d\); pass --head"):
        backbones.find_head(trailing)


def test_head_layer_refuses_what_a_fresh_head_cannot_replace_and_new_head_keeps_the_geometry():
    with torch.device("meta"):
        squeezenet = torchvision.models.squeezenet1_1(num_classes=10)
    with pytest.raises(BackboneError, match=r"'classifer.1' is not a module of the backbone \(close: classifier.1"):
        backbones.head_layer(squeezenet, "classifer.1")
    with pytest.raises(BackboneError, match="'classifier' is a Sequential, a module without a weight .* classifier.1"):
        backbones.head_layer(squeezenet, "classifier")
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.BatchNorm2d(4))
    for path, kind in (("0", r"grouped Conv2d \(groups=2\)"), ("1", "BatchNorm2d")):
        with pytest.raises(BackboneError, match=f"'{path}' is a {kind}: a head must be a Linear or an ungrouped"):
            backbones.head_layer(grouped, path)
    conv = torchvision.models.squeezenet1_1(num_classes=10).classifier[1]
    fresh = backbones.new_head(backbones.head_layer(nn.Sequential(conv), "0"), 3)
    assert type(fresh) is nn.Conv2d and fresh.weight.shape == (3, 512, 1, 1) and fresh.bias is not None
    assert (fresh.kernel_size, fresh.stride, fresh.padding) == (conv.kernel_size, conv.stride, conv.padding)
    linear = backbones.new_head(nn.Linear(6, 4, bias=False, dtype=torch.float64), 2)
    assert linear.weight.shape == (2, 6) and linear.bias is None and linear.weight.dtype == torch.float64


def test_choose_head_prefers_the_given_then_the_inherited_then_the_catalogues_then_the_found():
    model = tiny_backbone(10)
    assert backbones.choose_head(model, given="4", inherited=["4"]) == ("4", None)
    with pytest.raises(BackboneError, match=r"'0' is not a head of the adapter training starts from \(its heads: 4"):
        backbones.choose_head(model, given="0", inherited=["4"])
    assert backbones.choose_head(model, inherited=["4"], default="0") == ("4", None)
    assert backbones.choose_head(model, default="4") == ("4", None)
    path, note = backbones.choose_head(model, num_classes=10)
    assert path == "4" and note is not None and "head: 4, the backbone's last Linear" in note


def test_check_head_output_tells_a_misplaced_head_from_images_the_backbone_cannot_take():
    squeezenet = AdapterModel(torchvision.models.squeezenet1_1(num_classes=10))
    squeezenet.add_adapter("a", LoRAConfig(r=2, targets=["features.0"], heads=["classifier.1"]),
                           head_modules={"classifier.1": nn.Conv2d(512, 3, 1)})  # fmt: skip
    squeezenet.activate("a")
    backbones.check_head_output(squeezenet, torch.randn(2, 3, 64, 64), "classifier.1", 3)
    with pytest.raises(
        BackboneError, match=r"does not run on the data's \(3, 8, 8\) images: RuntimeError: .*too small"
    ):
        backbones.check_head_output(squeezenet, torch.randn(2, 3, 8, 8), "classifier.1", 3)
    assert squeezenet.training, "the mode is restored"
    unflat = AdapterModel(nn.Sequential(nn.Linear(4, 5), nn.Unflatten(1, (-1, 1))))
    unflat.add_adapter("a", LoRAConfig(heads=["0"]), head_modules={"0": nn.Linear(4, 3)})
    unflat.activate("a")
    with pytest.raises(BackboneError, match=r"head at 0 the backbone outputs \(2, 3, 1\), not \(2, 3\)"):
        backbones.check_head_output(unflat, torch.randn(2, 4), "0", 3)

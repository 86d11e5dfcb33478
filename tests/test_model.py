"""AdapterModel on real torchvision backbones: targets, activation, gradients, heads, merge/unmerge."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from adapter_hub import AdapterModel, LoRAConfig
from adapter_hub.errors import AdapterNotFound, ConfigError, MergeError, TargetError
from adapter_hub.lora import LoRAConfigError, LoRAConv2d, LoRALinear


def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def randomize(model: AdapterModel, name: str, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapters[name].layers.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_wrapping_freezes_backbone_and_keeps_its_state_dict(x):
    bb = resnet()
    keys = list(bb.state_dict())
    reference = copy.deepcopy(bb)
    model = AdapterModel(bb)
    model.add_adapter("a", LoRAConfig(targets=["layer*.conv*"], heads=["fc"]))
    model.activate("a")
    assert all(not p.requires_grad for p in bb.parameters())
    assert list(bb.state_dict()) == keys
    assert all(type(m) is type(r) for m, r in zip(bb.modules(), reference.modules()))
    assert torch.equal(model(x), reference(x)), "a new adapter changes nothing"


def test_targets_by_glob_and_by_class():
    model = AdapterModel(resnet())
    a = model.add_adapter("globs", LoRAConfig(targets=["layer1.*.conv1", "fc"]))
    assert sorted(p for p, _ in a.layer_items()) == ["fc", "layer1.0.conv1", "layer1.1.conv1"]
    b = model.add_adapter("classes", LoRAConfig(targets=[nn.Linear]))
    assert [p for p, _ in b.layer_items()] == ["fc"]
    c = model.add_adapter("all_convs", LoRAConfig(targets=["Conv2d"]))
    assert len(list(c.layer_items())) == 20  # 17 convs + 3 downsample convs
    assert isinstance(dict(c.layer_items())["conv1"], LoRAConv2d)


def test_per_module_rank_and_alpha_overrides():
    model = AdapterModel(resnet())
    cfg = LoRAConfig(r=4, alpha=8, targets=["layer1.0.conv1", "fc"], rank_pattern={"fc": 2}, alpha_pattern={"fc": 1})
    layers = dict(model.add_adapter("a", cfg).layer_items())
    assert layers["layer1.0.conv1"].lora_A.weight.shape[0] == 4 and layers["layer1.0.conv1"].scaling == 2.0
    assert isinstance(layers["fc"], LoRALinear)
    assert layers["fc"].lora_A.weight.shape == (2, 512) and layers["fc"].scaling == 0.5


def test_heads_are_per_adapter_copies_and_get_no_delta(x):
    bb = resnet()
    model = AdapterModel(bb)
    a = model.add_adapter("a", LoRAConfig(targets=["layer4.*.conv*", "fc"], heads=["fc"]))
    assert "fc" not in dict(a.layer_items())
    head = dict(a.head_items())["fc"]
    assert head is not bb.fc and torch.equal(head.weight, bb.fc.weight)
    with torch.no_grad():
        head.weight.add_(1.0)
    model.activate("a")
    features = torch.flatten(bb.avgpool(bb.layer4(bb.layer3(bb.layer2(bb.layer1(bb.maxpool(bb.relu(bb.bn1(
        bb.conv1(x))))))))), 1)  # fmt: skip
    torch.testing.assert_close(model(x), head(features))
    with model.disable_adapters():
        torch.testing.assert_close(model(x), nn.functional.linear(features, bb.fc.weight, bb.fc.bias))


def test_head_module_of_another_size(x):
    model = AdapterModel(resnet())
    model.add_adapter(
        "parity", LoRAConfig(targets=["layer4.*.conv*"], heads=["fc"]), head_modules={"fc": nn.Linear(512, 2)}
    )
    model.activate("parity")
    assert model(x).shape == (2, 2)


def test_activate_trains_only_that_adapter_and_gradients_reach_only_it(x):
    model = AdapterModel(resnet())
    cfg = LoRAConfig(r=2, targets=["layer*.conv*"], heads=["fc"])
    model.add_adapter("a", cfg)
    model.add_adapter("b", cfg)
    model.activate("a")
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("adapters.a.") for n in trainable)
    model(x).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(n.startswith("adapters.a.") for n in grads)
    # B starts at zero so the first step moves B (A's gradient is s·Bᵀ·… = 0): both get a gradient tensor
    assert any(".lora_B." in n and g.abs().sum() > 0 for n, g in grads.items())


def test_batchnorm_statistics_of_the_backbone_do_not_move_in_training(x):
    bb = resnet().train()  # wrapped while in training mode, and never .train()-ed again
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    model = AdapterModel(bb)
    model.add_adapter("a", LoRAConfig(targets=["layer*.conv*"], heads=["fc"]))
    model.activate("a")
    model(x).sum().backward()
    model.train()
    model(x).sum().backward()
    assert all(torch.equal(before[k], v) for k, v in bb.state_dict().items())


def test_switching_adapters_and_deleting(x):
    model = AdapterModel(resnet())
    cfg = LoRAConfig(r=2, targets=["layer*.conv*"])
    model.add_adapter("a", cfg)
    model.add_adapter("b", cfg)
    randomize(model, "a", 1)
    randomize(model, "b", 2)
    model.activate("a")
    ya = model(x)
    model.activate("b")
    yb = model(x)
    assert not torch.allclose(ya, yb)
    model.activate("a")
    assert torch.equal(model(x), ya)
    model.delete_adapter("a")
    assert "a" not in model.adapters and model.active is None
    with model.disable_adapters():
        bare = model(x)
    assert torch.equal(model(x), bare)
    model.delete_adapter("b")
    assert all("forward" not in m.__dict__ for m in model.backbone.modules()), "no site left behind"


def test_parameter_counts():
    model = AdapterModel(resnet())
    model.add_adapter("a", LoRAConfig(r=4, targets=["fc"], heads=[], norm_layers="frozen"))
    counts = model.parameter_counts()["a"]
    assert counts["lora"] == 4 * 512 + 10 * 4 == model.num_trainable_parameters("a")
    assert counts["norms"] == 0
    model.add_adapter("b", LoRAConfig(r=4, targets=["fc"], heads=[]))  # owns every BatchNorm by default
    bn = sum(p.numel() for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    counts = model.parameter_counts()["b"]
    assert counts["norms"] == bn > 0 and counts["total"] == 4 * 512 + 10 * 4 + bn == model.num_trainable_parameters("b")
    assert counts["share"] == pytest.approx(counts["total"] / sum(p.numel() for p in model.backbone.parameters()))


def test_merge_equals_unmerged_and_unmerge_is_bit_exact(x):
    bb = resnet()
    original = {k: v.clone() for k, v in bb.state_dict().items()}
    model = AdapterModel(bb)
    model.add_adapter("a", LoRAConfig(r=4, targets=["conv1", "layer*.conv*", "layer*.downsample.0", "fc"]))
    randomize(model, "a")
    model.activate("a")
    unmerged = model(x)
    model.merge("a")
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
    with model.disable_adapters():
        bare = model(x)
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)  # re-merged after the block
    with pytest.raises(MergeError, match="unmerge"):  # a new layer would read the merged weights as the base
        model.add_adapter("b", LoRAConfig(r=2, targets=["fc"], use_dora=True))
    assert list(model.adapters) == ["a"]
    model.unmerge()
    assert all(torch.equal(original[k], v) for k, v in bb.state_dict().items())
    with model.disable_adapters():
        assert torch.equal(model(x), bare)
    model.add_adapter("b", LoRAConfig(r=2, targets=["fc"], use_dora=True))
    model.activate("b")
    assert torch.equal(model(x), bare), "a new DoRA adapter (m = ‖W‖ of the original W, B = 0) changes nothing"


def test_bad_configurations_are_clear_errors():
    model = AdapterModel(resnet())
    with pytest.raises(TargetError, match=r"'layer9\*' matches no module.*close module names"):
        model.add_adapter("a", LoRAConfig(targets=["layer9*"]))
    supported = "supported: Linear, Conv1d/2d/3d, Embedding, MultiheadAttention and transformers' Conv1D"
    with pytest.raises(TargetError, match=r"BatchNorm2d \(bn1\); " + supported):
        model.add_adapter("a", LoRAConfig(targets=["bn1"]))
    with pytest.raises(LoRAConfigError, match="positive"):
        LoRAConfig(r=0)
    with pytest.raises(LoRAConfigError, match="positive"):
        LoRAConfig(rank_pattern={"fc": -1})
    with pytest.raises(AdapterNotFound, match="no adapter named 'zz'"):
        model.activate("zz")
    model.add_adapter("a", LoRAConfig(targets=["fc"]))
    with pytest.raises(ConfigError, match="already exists"):
        model.add_adapter("a", LoRAConfig(targets=["fc"]))
    assert list(model.adapters) == ["a"], "failed calls added nothing"


def test_attention_out_proj_is_adapted_through_its_attention_module():
    vit = torchvision.models.VisionTransformer(16, 4, 1, 2, 8, 16, num_classes=3)
    model = AdapterModel(vit)
    with pytest.raises(TargetError, match="target encoder.layers.encoder_layer_0.self_attention itself"):
        model.add_adapter("a", LoRAConfig(targets=["*.out_proj"]))
    a = model.add_adapter("a", LoRAConfig(targets=["*self_attention", "*.out_proj"]))
    assert [p for p, _ in a.layer_items()] == ["encoder.layers.encoder_layer_0.self_attention"]


def test_grouped_conv_crossing_groups_refuses_to_merge():
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    model = AdapterModel(net)
    model.add_adapter("a", LoRAConfig(targets=["0"]), layer_specs={"0": {"r": 2, "alpha": 2, "a_groups": 1}})
    model.activate("a")
    before = net[0].weight.clone()
    with pytest.raises(MergeError, match="mixes input channels across"):
        model.merge("a")
    assert torch.equal(net[0].weight, before) and model.merged is None


def test_gaussian_init_and_dropout(x):
    model = AdapterModel(resnet())
    adapter = model.add_adapter("g", LoRAConfig(r=8, targets=["fc"], init="gaussian", dropout=0.5))
    layer = dict(adapter.layer_items())["fc"]
    a = layer.lora_A.weight
    assert torch.equal(layer.lora_B.weight, torch.zeros_like(layer.lora_B.weight))
    assert abs(a.std().item() - 1 / 8) < 0.01, "gaussian init draws A from N(0, 1/r²)"
    randomize(model, "g")
    model.activate("g")
    model.eval()
    assert torch.equal(model(x), model(x)), "no dropout in eval mode"
    model.train()
    torch.manual_seed(0)
    first = model(x)
    torch.manual_seed(1)
    assert not torch.equal(first, model(x)), "dropout on the delta's input in training mode"
    with pytest.raises(LoRAConfigError, match="unknown init"):
        LoRAConfig(init="orthogonal")

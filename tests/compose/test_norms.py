"""Normalisation layers owned per adapter (``LoRAConfig.norm_layers``) against independent references: a copy
of the backbone with the deltas folded in by hand and the adapter's norm state loaded, each group of rows
run alone, the real ``peft`` package; training never touches the backbone or another adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from adapter_hub import AdapterModel, LoRAConfig, Stack, Switch
from adapter_hub.errors import CombineError, ConfigError
from adapter_hub.lora import LoRAConfigError

TARGETS = ["0", "3", "8"]
HEAD = "10"
G = torch.Generator().manual_seed(5)
X = torch.randn(6, 3, 8, 8, generator=G)
Y = torch.tensor([0, 1, 2, 3, 4, 0])


def backbone() -> nn.Module:
    """Every kind of norm: BatchNorm2d (running statistics), GroupNorm and LayerNorm (per sample)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 5),
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # source-domain statistics that are not the defaults
        net[1].running_mean.uniform_(-0.5, 0.5, generator=g)
        net[1].running_var.uniform_(0.5, 2.0, generator=g)
    return net.eval()


def add(model: AdapterModel, name: str, seed: int, **cfg) -> None:
    model.add_adapter(name, LoRAConfig(r=2, targets=TARGETS, heads=[HEAD], **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every parameter and running statistic away from its start, so nothing is zero
        for p in model.adapters[name].parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
        for n, b in model.adapters[name].named_buffers():
            if n.endswith("running_mean"):
                b.add_(torch.randn(b.shape, generator=g) * 0.3)
            elif n.endswith("running_var"):
                b.mul_(torch.rand(b.shape, generator=g) + 0.5)


def folded(layer) -> torch.Tensor:
    """(α/r)·B·A of a Linear or Conv2d layer, written out here from its factors."""
    a, b = layer.lora_A.weight, layer.lora_B.weight
    delta = (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:]) if a.dim() == 4 else b @ a
    return layer.scaling * delta


def sgd_steps(model: nn.Module, steps: int) -> None:
    """Plain SGD on whatever requires grad, in training mode, then back to eval."""
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), Y).backward()
        opt.step()
    model.eval()


def reference(model: AdapterModel, name: str) -> nn.Module:
    """The backbone copied, each delta folded into its weight by hand (W + (α/r)·B·A, written out here), the
    adapter's head and norms loaded in place of the backbone's."""
    ref = copy.deepcopy(model.backbone)
    for m in ref.modules():
        m.__dict__.pop("forward", None)  # the copy runs its own modules, not the sites
    adapter = model.adapters[name]
    with torch.no_grad():
        for path, layer in adapter.layer_items():
            ref.get_submodule(path).weight.add_(folded(layer))
        for path, module in [*adapter.head_items(), *adapter.norm_items()]:
            ref.get_submodule(path).load_state_dict(module.state_dict())
    return ref


def test_defaults_and_choices():
    model = AdapterModel(backbone())
    model.add_adapter("bn", LoRAConfig(targets=TARGETS))
    model.add_adapter("all", LoRAConfig(targets=TARGETS, norm_layers="all"))
    model.add_adapter("frozen", LoRAConfig(targets=TARGETS, norm_layers="frozen"))
    assert [p for p, _ in model.adapters["bn"].norm_items()] == ["1"]
    assert [p for p, _ in model.adapters["all"].norm_items()] == ["1", "4", "9"]
    assert list(model.adapters["frozen"].norm_items()) == []
    with pytest.raises(LoRAConfigError, match="unknown norm_layers 'some'; choose one of batchnorm, all, frozen"):
        LoRAConfig(norm_layers="some")
    # a norm inside a head is part of the head; a config that owns only norms is an adapter too
    model.add_adapter("norms-only", LoRAConfig(targets=[], norm_layers="all"))
    assert len(model.adapters["norms-only"].norms) == 3
    # a stored config without the field was written when norms were frozen
    assert LoRAConfig.from_dict({"r": 4}).norm_layers == "frozen"


@pytest.mark.parametrize("norm_layers", ["batchnorm", "all", "frozen"])
def test_eval_output_equals_the_folded_reference(norm_layers):
    model = AdapterModel(backbone())
    add(model, "a", 1, norm_layers=norm_layers)
    model.activate("a")
    with torch.no_grad():
        got = model(X)
    with torch.no_grad(), model.disable_adapters():
        bare = model(X)
    want = reference(model, "a")(X)
    assert want.abs().min() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, bare, atol=1e-3)


@pytest.mark.parametrize("norm_layers", ["batchnorm", "all", "frozen"])
def test_training_one_adapter_changes_nothing_else(norm_layers):
    """The invariant: training A (in training mode, so its BatchNorm moves its own running statistics)
    leaves the backbone's state dict bit-exact and adapter B's outputs bit-exact."""
    model = AdapterModel(backbone())
    add(model, "a", 1, norm_layers=norm_layers)
    add(model, "b", 2, norm_layers=norm_layers)
    backbone_state = copy.deepcopy(model.backbone.state_dict())
    b_state = copy.deepcopy(model.adapters["b"].state_dict())
    model.activate("b")
    with torch.no_grad():
        b_before = model(X)
    a_stats = copy.deepcopy(model.adapters["a"].state_dict())
    model.activate("a")
    sgd_steps(model, 3)
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, backbone_state[k]), k
    for k, v in model.adapters["b"].state_dict().items():
        assert torch.equal(v, b_state[k]), k
    model.activate("b")
    with torch.no_grad():
        assert torch.equal(model(X), b_before)
    moved = [k for k, v in model.adapters["a"].state_dict().items() if not torch.equal(v, a_stats[k])]
    if norm_layers == "frozen":
        assert not any(k.startswith("norms.") for k in moved)
    else:  # A's own BatchNorm statistics moved, and its affine parameters trained
        assert {"norms.1.running_mean", "norms.1.running_var", "norms.1.weight"} <= set(moved)


def test_training_mode_forward_and_gradients_equal_the_reference():
    """In training mode the adapter's BatchNorm normalises with the batch's statistics and updates its own
    running statistics as the same module in a plain network does; gradients agree too."""
    model = AdapterModel(backbone())
    add(model, "a", 1, norm_layers="all")
    model.activate("a")
    ref = reference(model, "a").train().requires_grad_(True)
    model.train()
    out = model(X)
    want = ref(X)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    nn.functional.cross_entropy(out, Y).backward()
    nn.functional.cross_entropy(want, Y).backward()
    norms = dict(model.adapters["a"].norm_items())
    for path in ("1", "4", "9"):
        torch.testing.assert_close(norms[path].weight.grad, ref.get_submodule(path).weight.grad, rtol=1e-4, atol=1e-6)
        assert norms[path].weight.grad.abs().sum() > 0
    torch.testing.assert_close(norms["1"].running_mean, ref[1].running_mean)
    torch.testing.assert_close(norms["1"].running_var, ref[1].running_var)
    assert model.backbone[1].weight.grad is None


def test_switch_gives_each_group_of_rows_its_adapters_norms_in_training_too():
    route = ["a", "b", "a", None, "b", "a"]
    outs = {}
    for mode in ("eval", "train"):
        model = AdapterModel(backbone())
        add(model, "a", 1, norm_layers="all")
        add(model, "b", 2, norm_layers="all")
        alone = copy.deepcopy(model)
        model.activate(Switch("a", "b"))
        model.train(mode == "train")
        got = model(X, route=route).padded
        alone.train(mode == "train")
        for name in ("a", "b", None):
            rows = [i for i, r in enumerate(route) if r == name]
            alone.activate(name)
            want = alone(X[rows])  # the group alone: in training mode, its own batch statistics
            torch.testing.assert_close(got[rows], want, rtol=1e-5, atol=1e-5)
            if name is not None:
                want.sum().backward()
        got.sum().backward()
        for name in ("a", "b"):
            mine, theirs = model.adapters[name], alone.adapters[name]
            for (k, p), (_, q) in zip(mine.named_parameters(), theirs.named_parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=k)
            torch.testing.assert_close(mine.norms["1"].running_var, theirs.norms["1"].running_var)
        outs[mode] = got.detach()
    assert not torch.allclose(outs["eval"], outs["train"], atol=1e-3), "batch statistics were used in training"


def test_a_single_row_of_an_adapter_owning_batchnorm1d_is_refused_naming_it_in_training_only():
    torch.manual_seed(0)
    model = AdapterModel(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).eval())
    for name in ("a", "b"):
        model.add_adapter(name, LoRAConfig(r=2, targets=["0"], heads=["3"], norm_layers="batchnorm"))
    model.activate(Switch("a", "b"))
    x, route = torch.randn(6, 4, generator=G), ["a", "b", "a", None, "a", "a"]
    before = {k: v.clone() for k, v in model.adapters["b"].state_dict().items()}
    model.train()
    with pytest.raises(ConfigError, match=r"adapter 'b' has a single row .* BatchNorm1d at '1'"):
        model(x, route=route)
    assert all(torch.equal(v, model.adapters["b"].state_dict()[k]) for k, v in before.items())
    model.eval()  # running statistics: one row is fine
    out = model(x, route=route).padded
    assert torch.isfinite(out).all() and out.abs().sum() > 0


def test_stack_runs_the_norms_of_the_adapter_whose_head_runs():
    model = AdapterModel(backbone())
    add(model, "a", 1)
    add(model, "b", 2)
    model.activate(Stack("a", "b", head="b"))
    with torch.no_grad():
        got = model(X)
    ref = reference(model, "b")
    with torch.no_grad():  # a's delta on top of b's folded reference
        for path, layer in model.adapters["a"].layer_items():
            ref.get_submodule(path).weight.add_(folded(layer))
        torch.testing.assert_close(got, ref(X), rtol=1e-5, atol=1e-5)


def test_merge_keeps_the_norms_and_is_exact():
    model = AdapterModel(backbone())
    add(model, "a", 1)
    model.activate("a")
    with torch.no_grad():
        unmerged = model(X)
    state = copy.deepcopy(model.backbone.state_dict())
    model.merge("a")
    with torch.no_grad():
        torch.testing.assert_close(model(X), unmerged, rtol=1e-5, atol=1e-5)
    model.unmerge()
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_combine_averages_affine_parameters_and_running_statistics():
    model = AdapterModel(backbone())
    add(model, "a", 1)
    add(model, "b", 2)
    na, nb = model.adapters["a"].norms["1"], model.adapters["b"].norms["1"]
    new = model.combine("ab", ["a", "b"], [0.75, 0.5], method="linear")
    norm = new.norms["1"]
    for key in ("weight", "bias", "running_mean", "running_var"):
        want = (0.75 * getattr(na, key) + 0.5 * getattr(nb, key)) / 1.25
        torch.testing.assert_close(getattr(norm, key), want)
    assert new.metadata["recipe"]["method"] == "linear"
    model.activate("ab")
    with torch.no_grad():
        torch.testing.assert_close(model(X), reference(model, "ab")(X), rtol=1e-5, atol=1e-5)
    taken = model.combine("ab-b", ["a", "b"], [0.75, 0.5], norms="b")
    assert torch.equal(taken.norms["1"].running_var, nb.running_var)
    assert len(model.combine("ab-none", ["a", "b"], norms="").norms) == 0
    with pytest.raises(ConfigError, match="norms 'c' is not one of the combined adapters"):
        model.combine("bad", ["a", "b"], norms="c")
    with torch.no_grad():
        nb.running_var.mul_(4.0)
    with pytest.raises(CombineError, match="running variance of the norms at 1 is not positive"):
        model.combine("neg", ["a", "b"], [1.0, -0.5], method="linear")
    assert "neg" not in model.adapters


def test_file_round_trip_keeps_the_norms(tmp_path):
    model = AdapterModel(backbone())
    add(model, "a", 1, norm_layers="all")
    model.activate("a")
    with torch.no_grad():
        want = model(X)
    model.save_adapter("a", tmp_path / "a.safetensors")
    other = AdapterModel(backbone())
    other.load_adapter("a", tmp_path / "a.safetensors")
    other.activate("a")
    with torch.no_grad():
        assert torch.equal(other(X), want)
    assert other.adapter_config("a").norm_layers == "all"
    assert other.adapter_to_bytes("a") == model.adapter_to_bytes("a")


def test_peft_modules_to_save_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    model = AdapterModel(backbone())
    add(model, "a", 1)
    model.activate("a")
    with torch.no_grad():
        want = model(X)
    model.export_peft("a", tmp_path / "out")
    loaded = peft.PeftModel.from_pretrained(backbone(), str(tmp_path / "out")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), want, rtol=1e-5, atol=1e-5)

    # PEFT trains a BatchNorm in modules_to_save (its running statistics move in its copy): read back exactly
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, modules_to_save=["1", HEAD],
                          init_lora_weights=False)  # fmt: skip
    theirs = peft.get_peft_model(backbone(), cfg)
    sgd_steps(theirs, 2)
    theirs.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        peft_out = theirs(X)
    mine = AdapterModel(backbone())
    adapter = mine.import_peft(tmp_path / "theirs", "p")
    assert [p for p, _ in adapter.norm_items()] == ["1"] and [p for p, _ in adapter.head_items()] == [HEAD]
    assert not torch.equal(adapter.norms["1"].running_mean, mine.backbone[1].running_mean)
    mine.activate("p")
    with torch.no_grad():
        torch.testing.assert_close(mine(X), peft_out, rtol=1e-5, atol=1e-5)


def test_registry_round_trip_keeps_the_norms(tmp_path):
    from adapter_hub.registry import Hub

    model = AdapterModel(backbone())
    add(model, "a", 1)
    model.activate("a")
    with torch.no_grad():
        want = model(X)
    with Hub.open(tmp_path / "home") as hub:
        hub.add_backbone("toy", model.backbone, architecture="toy")
        hub.add_task("t", num_classes=5)
        version = hub.register(model, "a", task="t", name="lora")
        other = AdapterModel(backbone())
        hub.load_into(other, version.ref, name="b")
    assert [p for p, _ in other.adapters["b"].norm_items()] == ["1"]
    other.activate("b")
    with torch.no_grad():
        assert torch.equal(other(X), want)


def test_one_adapters_head_may_be_another_adapters_norm():
    """A BatchNorm listed in one adapter's heads and owned as a norm by another: one site serves both, and a
    Switch over them gives each group of rows its adapter's own copy (same width: nothing padded or trimmed)."""
    model = AdapterModel(backbone())
    model.add_adapter("h", LoRAConfig(r=2, targets=TARGETS, heads=["1"], norm_layers="frozen"))
    add(model, "n", 2)
    with torch.no_grad():
        model.adapters["h"].heads["1"].weight.mul_(3.0)
    route = ["h", "n", "h", "n", "n", "h"]
    model.activate(Switch("h", "n"))
    with torch.no_grad():
        got = model(X, route=route).padded
        for name in ("h", "n"):
            rows = [i for i, r in enumerate(route) if r == name]
            model.activate(name)
            torch.testing.assert_close(got[rows], model(X[rows]), rtol=1e-5, atol=1e-5)
            model.activate(Switch("h", "n"))
    model.delete_adapter("h")
    model.delete_adapter("n")
    assert all("forward" not in m.__dict__ for m in model.backbone.modules()), "no site left behind"


def test_a_stack_that_would_drop_an_adapters_norms_is_refused_and_combine_counts_the_backbones():
    model = AdapterModel(backbone())
    add(model, "frozen", 1, norm_layers="frozen")
    add(model, "own", 2)
    with pytest.raises(ConfigError, match="cannot stack 'own': it owns the norm at 1"):
        model.activate(Stack("frozen", "own"))  # the head (and so the norms) would be 'frozen''s
    with pytest.raises(ConfigError, match="cannot stack 'own'"):
        model.merge(Stack("frozen", "own"))
    assert model.merged is None
    model.activate(Stack("frozen", "own", head="own"))  # said which: it runs
    # a source without a norm there ran the backbone's: that is what it brings to the average
    new = model.combine("avg", ["own", "frozen"], [0.5, 0.5])
    mine, base = model.adapters["own"].norms["1"], model.backbone[1]
    for key in ("weight", "running_mean", "running_var"):
        torch.testing.assert_close(getattr(new.norms["1"], key), (getattr(mine, key) + getattr(base, key)) / 2)

"""Learning rates by what is trained: the parameter groups, the warm-up and cosine schedule fit really applies,
explicit overrides, and a real run with the defaults."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from adapter_hub import AdapterModel, LoRAConfig, Switch, data, training
from adapter_hub.errors import AdapterHubError, ConfigError


class Net(nn.Module):
    """conv → BatchNorm → relu → pool → LayerNorm → Linear → Linear: every kind of layer the groups tell apart."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.ln = nn.LayerNorm(32)
        self.hidden = nn.Linear(32, 16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(F.relu(self.bn(self.conv(x)))).flatten(1)
        return self.fc(F.relu(self.hidden(self.ln(h))))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def _by_name(model: nn.Module) -> dict[str, set[str]]:
    """The reference: each trainable parameter's group read from its name in the AdapterModel's state."""
    groups: dict[str, set[str]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = name.split(".")[2] if name.startswith("adapters.") else None
        group = {"layers": "lora", "heads": "head", "norms": "norm"}.get(part or "", "other")
        groups.setdefault(group, set()).add(name)
    return groups


def _names(model: nn.Module, groups: dict[str, list[nn.Parameter]]) -> dict[str, set[str]]:
    named = {id(p): n for n, p in model.named_parameters()}
    return {g: {named[id(p)] for p in ps} for g, ps in groups.items()}


@pytest.mark.parametrize("dora", [False, True])
def test_an_adapter_model_groups_lora_factors_heads_and_norms(dora: bool):
    model = AdapterModel(_net())
    config = LoRAConfig(r=2, targets=["conv", "hidden"], heads=["fc"], norm_layers="all", use_dora=dora)
    model.add_adapter("a", config)
    model.add_adapter("b", config)  # inactive: none of its parameters trains
    model.activate("a")
    groups = _names(model, training.parameter_groups(model))
    assert groups == _by_name(model)
    assert groups["lora"] == {f"adapters.a.layers.{m}.lora_{f}.weight" for m in ("conv", "hidden") for f in "AB"} | (
        {f"adapters.a.layers.{m}.lora_magnitude_vector" for m in ("conv", "hidden")} if dora else set()
    )
    assert groups["head"] == {"adapters.a.heads.fc.weight", "adapters.a.heads.fc.bias"}
    assert groups["norm"] == {f"adapters.a.norms.{m}.{t}" for m in ("bn", "ln") for t in ("weight", "bias")}
    assert "other" not in groups  # the backbone is frozen
    model.activate(Switch("a", "b"))
    both = _names(model, training.parameter_groups(model))
    assert both["head"] == {f"adapters.{a}.heads.fc.{t}" for a in "ab" for t in ("weight", "bias")}
    assert len(both["lora"]) == 2 * len(groups["lora"]) and len(both["norm"]) == 8


def test_a_norm_layer_inside_a_head_is_a_norm_and_unfrozen_backbone_parameters_are_other():
    model = AdapterModel(_net())
    model.add_adapter("a", LoRAConfig(r=2, targets=["conv"], heads=["ln", "fc"], norm_layers="frozen"))
    model.activate("a")
    model.backbone.hidden.weight.requires_grad_(True)  # unfrozen by hand: trained as a plain parameter
    groups = _names(model, training.parameter_groups(model))
    assert groups == {
        "lora": {"adapters.a.layers.conv.lora_A.weight", "adapters.a.layers.conv.lora_B.weight"},
        "head": {"adapters.a.heads.fc.weight", "adapters.a.heads.fc.bias"},
        "norm": {"adapters.a.heads.ln.weight", "adapters.a.heads.ln.bias"},
        "other": {"backbone.hidden.weight"},
    }


def test_a_plain_module_is_one_group_of_what_requires_grad():
    net = _net()
    net.bn.requires_grad_(False)
    groups = training.parameter_groups(net)
    assert list(groups) == ["other"]
    assert [id(p) for p in groups["other"]] == [id(p) for n, p in net.named_parameters() if not n.startswith("bn.")]
    net.requires_grad_(False)
    assert training.parameter_groups(net) == {}
    with pytest.raises(AdapterHubError, match="nothing to train"):
        training.fit(net, _split(8), _split(8), epochs=1, progress=False)


def _split(n: int, seed: int = 0) -> data.Split:
    ds = data.digits("original", pool="target", seed=seed)
    return data.Split(ds.train.x[:n], ds.train.y[:n])


@pytest.fixture
def lr_log() -> Iterator[list[dict[str, float]]]:
    """The learning rate of every group at every optimizer step taken inside the test."""
    seen: list[dict[str, float]] = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append({g["name"]: g["lr"] for g in opt.param_groups})
    )
    yield seen
    handle.remove()


def _adapter_model() -> AdapterModel:
    model = AdapterModel(_net())
    model.add_adapter("a", LoRAConfig(r=2, targets=["conv", "hidden"], heads=["fc"], norm_layers="batchnorm"))
    model.activate("a")
    return model


def test_fit_warms_up_linearly_then_decays_as_a_cosine(lr_log: list[dict[str, float]]):
    model = _adapter_model()
    planned = training.learning_rates(None, model)
    result = training.fit(model, _split(40), _split(16), epochs=8, batch_size=8, progress=False)
    assert result.lrs == planned  # what can be said before training is what fit used
    total = 8 * 5
    warmup = max(1, math.ceil(training.WARMUP_FRACTION * total))
    assert result.steps == total == len(lr_log) and result.warmup_steps == warmup >= 1
    expected = {g: training.DEFAULTS[g].lr for g in ("lora", "head", "norm")}
    assert result.lrs == expected and set(lr_log[0]) == set(expected)
    for group, peak in expected.items():
        at = [step[group] for step in lr_log]
        assert at[0] == pytest.approx(peak / (warmup + 1))  # below the peak from the very first step
        assert at[warmup - 1] == pytest.approx(peak * warmup / (warmup + 1))
        assert at[warmup] == pytest.approx(peak)  # the end of the warm-up: the peak, where the cosine starts
        last = peak * 0.5 * (1 + math.cos(math.pi * (total - 1 - warmup) / (total - warmup)))
        assert at[total - 1] == pytest.approx(last)
        assert max(at) == pytest.approx(peak) and at[-1] < 0.01 * peak
        assert all(a < b for a, b in zip(at[:warmup], at[1 : warmup + 1]))
        assert all(a > b for a, b in zip(at[warmup:], at[warmup + 1 :]))


def test_one_step_of_training_is_all_warm_up(lr_log: list[dict[str, float]]):
    net = _net()
    result = training.fit(net, _split(8), _split(8), epochs=1, batch_size=8, progress=False)
    assert result.warmup_steps == 1 and lr_log == [{"other": training.DEFAULTS["other"].lr / 2}]


def test_an_explicit_lr_overrides_the_defaults_and_keeps_the_warm_up(lr_log: list[dict[str, float]]):
    model = _adapter_model()
    one = training.fit(model, _split(16), _split(8), epochs=2, batch_size=8, lr=2e-2, progress=False)
    assert one.lrs == {"lora": 2e-2, "head": 2e-2, "norm": 2e-2}
    assert lr_log[0] == pytest.approx(dict.fromkeys(one.lrs, 2e-2 / (one.warmup_steps + 1)))
    lr_log.clear()
    some = training.fit(_adapter_model(), _split(16), _split(8), epochs=2, batch_size=8, lr={"lora": 7e-4},
                        weight_decay={"head": 0.1}, progress=False)  # fmt: skip
    assert some.lrs == {"lora": 7e-4, "head": training.DEFAULTS["head"].lr, "norm": training.DEFAULTS["norm"].lr}
    assert some.weight_decays == {"lora": training.DEFAULTS["lora"].weight_decay, "head": 0.1,
                                  "norm": training.DEFAULTS["norm"].weight_decay}  # fmt: skip
    assert lr_log[some.warmup_steps]["lora"] == pytest.approx(7e-4)


@pytest.mark.parametrize(
    ("lr", "message"),
    [(0.0, "lr must be greater than 0"), (-1e-3, "lr must be greater than 0"), (float("nan"), "finite"),
     ("fast", "lr must be a number"), ({"lora": 0}, r"lr\['lora'\] must be greater than 0"),
     ({"decoder": 1e-3}, "unknown parameter group.*'decoder'.*lora, head, norm, other")],
)  # fmt: skip
def test_bad_learning_rates_are_refused_before_any_step(lr: object, message: str, lr_log: list):
    with pytest.raises(ConfigError, match=message):
        training.fit(_adapter_model(), _split(8), _split(8), epochs=1, lr=lr, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="weight_decay must be at least 0"):
        training.fit(_adapter_model(), _split(8), _split(8), epochs=1, weight_decay=-0.1, progress=False)
    assert lr_log == []


def test_the_defaults_train_an_adapter_and_never_touch_the_backbone():
    torch.manual_seed(0)
    pre = _net()  # "pretrained" on the original digits, then frozen under the adapter
    source = _split(256)
    training.fit(pre, source, source, epochs=10, lr=1e-2, batch_size=32, progress=False)
    assert all(p.grad is None for p in pre.parameters())  # fit lets go of the last step's gradients
    model = AdapterModel(pre)
    model.add_adapter("a", LoRAConfig(r=4, targets=["conv", "hidden"], heads=["fc"]))  # norms: its own BatchNorm
    model.activate("a")
    ds = data.digits("rotated", pool="target")
    train = data.Split(ds.train.x[:256], ds.train.y[:256])
    before = copy.deepcopy(model.backbone.state_dict())
    adapter_before = {n: p.detach().clone() for n, p in model.adapters.named_parameters()}

    def loss() -> float:
        with torch.no_grad():
            model.eval()
            return F.cross_entropy(model(train.x), train.y).item()

    start, start_accuracy = loss(), training.evaluate(model, train)
    result = training.fit(model, train, train, epochs=6, batch_size=32, progress=False)
    assert result.lrs == {g: training.DEFAULTS[g].lr for g in ("lora", "head", "norm")}
    assert loss() < 0.7 * start and result.best_accuracy > start_accuracy + 0.1
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())  # running stats too
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())  # none ever reached it
    moved = {n for n, p in model.adapters.named_parameters() if not torch.equal(p, adapter_before[n])}
    assert moved == set(adapter_before)  # every factor, head and norm parameter trained


def test_fit_multitask_reports_the_learning_rates_it_used():
    model = AdapterModel(_net())
    for name in ("x", "y"):
        model.add_adapter(name, LoRAConfig(r=2, targets=["conv"], heads=["fc"], norm_layers="frozen"))
    tasks = {"x": (_split(16), _split(8)), "y": (_split(16, seed=1), _split(8, seed=1))}
    result = training.fit_multitask(model, tasks, epochs=1, batch_size=8, lr={"head": 1e-2}, progress=False)
    assert result.lrs == {"lora": training.DEFAULTS["lora"].lr, "head": 1e-2} and result.warmup_steps == 1
    assert training.format_lrs(result.lrs) == f"lora {training.DEFAULTS['lora'].lr:g}, head 0.01"


def test_the_train_command_help_names_the_defaults():
    from adapter_hub.cli.train_cmds import train

    parsed = train.make_context("train", ["task/a", "--backbone", "b", "--data", "d"]).params
    assert parsed["lr"] is None  # the defaults by group, as training.fit(lr=None)
    (option,) = [p for p in train.params if p.name == "lr"]
    help_text = " ".join(option.help.split())
    for group, words in (("lora", "LoRA factors"), ("head", "head"), ("norm", "norms")):
        shown = f"{training.DEFAULTS[group].lr:.0e}".replace("e-0", "e-")  # 5e-04 -> 5e-4
        assert f"{words} {shown}" in help_text, (group, help_text)
    assert f"warm-up over {training.WARMUP_FRACTION:.0%} of the steps" in help_text

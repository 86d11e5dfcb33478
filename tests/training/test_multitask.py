"""Multi-task training over a Switch: one backward over a mixed batch against a per-adapter reference."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from adapter_hub import AdapterModel, LoRAConfig, Switch, backbones, data, training


def _model() -> AdapterModel:
    torch.manual_seed(0)
    model = AdapterModel(backbones.build_backbone({"architecture": "resnet_small", "num_classes": 10, "seed": 1}))
    cfg = LoRAConfig(r=2, targets=["layer3.*.conv*", "layer4.*.conv*"], heads=["fc"])
    model.add_adapter("digit", cfg)
    model.add_adapter("parity", cfg, head_modules={"fc": nn.Linear(512, 2)})  # a head of another width
    with torch.no_grad():  # B ≠ 0, so that A receives gradients too
        for p in model.adapters.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model


def test_one_backward_over_a_mixed_batch_gives_each_adapter_its_own_samples_gradient():
    model = _model()
    ds = data.digits("rotated", pool="target")
    x, digit = ds.train.x[:14], ds.train.y[:14]
    codes = torch.tensor([0, 1, 1, 0, 0, 1, 0, 1, 1, 1, 0, 0, 1, 0])
    y = torch.where(codes == 0, digit, digit % 2)
    names = ["digit", "parity"]
    model.activate(Switch(*names))
    training.multitask_loss_sum(model, names, (x, y, codes)).backward()
    mixed = {n: p.grad.clone() for n, p in model.adapters.named_parameters()}

    for i, name in enumerate(names):  # reference: each adapter alone on its own rows, in input order
        model.zero_grad(set_to_none=True)
        model.activate(name)
        rows = (codes == i).nonzero().flatten()
        F.cross_entropy(model(x[rows]), y[rows], reduction="sum").backward()
        own = {n: p.grad for n, p in model.adapters.named_parameters() if n.startswith(name + ".")}
        assert own and all(g is not None for g in own.values())
        for n, g in own.items():
            torch.testing.assert_close(mixed[n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_fit_multitask_improves_every_task_and_leaves_the_backbone_alone():
    model = _model()
    rot, inv = data.digits("rotated", pool="target"), data.digits("inverted", labels="parity", pool="target")
    tasks = {"digit": (data.Split(rot.train.x[:128], rot.train.y[:128]), data.Split(rot.val.x[:96], rot.val.y[:96])),
             "parity": (data.Split(inv.train.x[:128], inv.train.y[:128]), data.Split(inv.val.x[:96], inv.val.y[:96]))}
    before = copy.deepcopy(model.backbone.state_dict())
    model.activate(Switch("digit", "parity"))
    start = {n: training.evaluate_routed(model, n, val) for n, (_, val) in tasks.items()}
    result = training.fit_multitask(model, tasks, epochs=3, lr=3e-3, batch_size=32, eval_every=6, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())
    assert result.best_accuracy == max(acc for _, acc in result.history)
    for name, (_, val) in tasks.items():
        # the best state is restored: its accuracies are the ones reported, and better than at the start
        assert training.evaluate_routed(model, name, val) == result.per_task[name] > start[name]
    assert result.best_accuracy == sum(result.per_task.values()) / 2

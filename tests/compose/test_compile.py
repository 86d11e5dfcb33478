"""``torch.compile`` of an AdapterModel, and activation checkpointing through conv layers.

A compiled AdapterModel must compute what the eager one computes: outputs with one adapter active (non-zero B),
outputs after another adapter is activated, adapters are disabled or a per-sample Switch is active (the compiled
code must not keep a stale composition), and the loss and gradients of a training step. Two small backbones: a
CNN (Conv2d with reflect padding, BatchNorm, Linear) and a Transformer-like block (LayerNorm, q/k/v/o and MLP
Linear layers, scaled dot-product attention). The backends are ``eager`` (Dynamo's graph capture and guards) and
``aot_eager`` (AOTAutograd also traces the backward, custom autograd Functions included); inductor is left out:
compiling its C++ takes about a minute per model on a small CPU machine.

Checkpointing: tests/compose/test_checkpointing.py covers Linear-only models (an MLP, a tiny BERT); here a
checkpointed conv net, whose convs take the training fast path, gets the gradients of an uncheckpointed run.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from adapter_hub import AdapterModel, LoRAConfig, Switch

TOL = {"rtol": 1e-5, "atol": 1e-6}


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, padding_mode="reflect")
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv1(x)))
        h = F.adaptive_avg_pool2d(F.relu(self.conv2(h)), 2)
        return self.fc(h.flatten(1))


class Block(nn.Module):
    """Pre-norm self-attention and MLP, mean-pooled into a classifier."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).reshape(n, length, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, dim)
        x = x + self.o(attn)
        x = x + self.down(F.gelu(self.up(self.norm2(x))))
        return self.head(x.mean(dim=1))


BACKBONES = {
    "cnn": (CNN, ["conv1", "conv2", "fc"], [], (6, 3, 8, 8)),
    "block": (Block, ["q", "v", "o", "up", "down"], ["head"], (4, 12, 16)),
}


def _model(kind: str) -> tuple[AdapterModel, torch.Tensor]:
    """The backbone with adapters "a" and "b" (random non-zero factors), and an input; the same every call."""
    build, targets, heads, shape = BACKBONES[kind]
    torch.manual_seed(0)
    model = AdapterModel(build())
    g = torch.Generator().manual_seed(1)
    for name in ("a", "b"):
        model.add_adapter(name, LoRAConfig(r=2, alpha=4, targets=targets, heads=heads))
        with torch.no_grad():
            for p in model.adapters[name].layers.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model, torch.randn(shape, generator=g)


def _grads(model: AdapterModel) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    """No compiled code or recompile budget carried in from another test, nor left to the next."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow  # Dynamo traces each adapted layer's forward apart: about 5-10 s per model on 2 cores
@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("kind", list(BACKBONES))
def test_compiled_outputs_follow_the_live_composition(kind: str) -> None:
    model, x = _model(kind)
    model.eval()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        outs = {}
        for spec in ("a", "b"):  # compiled with "a" active: "b" must not run a's deltas from a stale trace
            model.activate(spec)
            outs[spec] = compiled(x)
            torch.testing.assert_close(outs[spec], model(x), **TOL, msg=spec)
        with model.disable_adapters():
            bare = compiled(x)
            torch.testing.assert_close(bare, model(x), **TOL)
        assert all((out - bare).abs().max() > 1e-3 for out in outs.values()), "each adapter changes the output"
        assert (outs["a"] - outs["b"]).abs().max() > 1e-3
        model.activate(Switch("a", "b"))
        route = ["b", None, "a", "b", "a", None][: x.shape[0]]
        torch.testing.assert_close(compiled(x, route=route).padded, model(x, route=route).padded, **TOL)


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("kind", list(BACKBONES))
def test_a_compiled_training_step_gives_the_eager_gradients(kind: str) -> None:
    """One adapter in train mode through AOTAutograd: the loss and every gradient of eager, none on the backbone."""
    runs = {}
    for compiled in (False, True):
        model, x = _model(kind)
        model.train().activate("a")
        run = torch.compile(model, backend="aot_eager") if compiled else model
        loss = F.cross_entropy(run(x), torch.arange(x.shape[0]) % 3)
        loss.backward()
        assert all(p.grad is None for p in model.backbone.parameters())
        runs[compiled] = (loss.detach(), _grads(model))
    (loss, grads), (c_loss, c_grads) = runs[False], runs[True]
    torch.testing.assert_close(c_loss, loss, **TOL)
    lora = [n for n in grads if "lora_" in n]
    assert lora and all(grads[n].abs().max() > 0 for n in lora), "every LoRA tensor gets a gradient"
    assert c_grads.keys() == grads.keys()
    for n, g in grads.items():
        torch.testing.assert_close(c_grads[n], g, **TOL, msg=n)


# --- activation checkpointing through convs -------------------------------------------------------------------
class CheckpointedCNN(nn.Module):
    """Two conv blocks, each run under torch.utils.checkpoint when ``mode`` says so, and a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_in, 8, 3, padding=1, padding_mode=pm), nn.ReLU())
            for c_in, pm in ((3, "zeros"), (8, "circular"))
        )
        self.fc = nn.Linear(8, 4)
        self.mode: str | None = None  # None, "reentrant" or "non-reentrant"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "reentrant" and not x.requires_grad:
            x = x.detach().requires_grad_()  # a reentrant checkpoint needs an input that requires grad
        for block in self.blocks:
            x = block(x) if self.mode is None else checkpoint(block, x, use_reentrant=self.mode == "reentrant")
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
@pytest.mark.parametrize("spec", ["single", "switch"])
def test_checkpointed_convs_give_the_gradients_of_a_plain_backward(mode: str, spec: str) -> None:
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    route = ["b", "a", None, "a"]
    results = {}
    for run_mode in (None, mode):
        torch.manual_seed(0)
        model = AdapterModel(CheckpointedCNN())
        g = torch.Generator().manual_seed(1)
        for name in ("a", "b"):
            model.add_adapter(name, LoRAConfig(r=2, alpha=4, targets=["blocks.*.0"], heads=["fc"]))
            with torch.no_grad():
                for p in model.adapters[name].layers.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        model.backbone.mode = run_mode
        model.train()
        if spec == "switch":
            model.activate(Switch("a", "b"))
            out = model(x, route=route)
            loss = sum(o.pow(2).sum() for o in out.by_adapter.values())
        else:
            model.activate("a")
            loss = model(x).pow(2).sum()
        loss.backward()
        assert all(p.grad is None for p in model.backbone.parameters())
        results[run_mode] = _grads(model)
    expected, got = results[None], results[mode]
    lora = [n for n in expected if "lora_" in n]
    assert lora and all(expected[n].abs().max() > 0 for n in lora)
    assert got.keys() == expected.keys()
    for n, g in expected.items():
        torch.testing.assert_close(got[n], g, rtol=1e-5, atol=1e-6, msg=n)

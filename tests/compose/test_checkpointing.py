"""Activation checkpointing: the backward pass runs checkpointed layers again, after the forward returned.

Single adapters, Stacks and per-sample Switches must get exactly the gradients they get without
checkpointing — with torch.utils.checkpoint (reentrant and not) and Hugging Face's gradient_checkpointing_enable.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from adapter_hub import AdapterModel, LoRAConfig, Stack, Switch
from adapter_hub.errors import CheckpointRoutingError

ROUTE = ["b", "a", None, "a", "b", "b"]


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.tanh(self.up(x)))


class Net(nn.Module):
    """Three blocks, each run under torch.utils.checkpoint when ``mode`` says so."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Linear(5, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(3))
        self.fc = nn.Linear(width, 3)
        self.mode: str | None = None  # None, "reentrant" or "non-reentrant"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        if self.mode == "reentrant" and not h.requires_grad:
            h = h.detach().requires_grad_()  # PyTorch's rule for reentrant checkpoints: an input that needs grad
        for block in self.blocks:
            if self.mode is None:
                h = block(h)
            else:
                h = checkpoint(block, h, use_reentrant=self.mode == "reentrant")
        return self.fc(h)


def _model() -> AdapterModel:
    torch.manual_seed(0)
    model = AdapterModel(Net())
    heads = {"a": nn.Linear(8, 3), "b": nn.Linear(8, 5)}  # heads of different widths
    for name in ("a", "b"):
        model.add_adapter(name, LoRAConfig(r=2, alpha=4, targets=["blocks.*.up", "blocks.*.down"], heads=["fc"]),
                          head_modules={"fc": heads[name]})  # fmt: skip
        with torch.no_grad():  # non-zero B: every A gets a gradient too
            for n, p in model.adapters[name].named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3)
    return model.train()


def _loss(model: AdapterModel, spec, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.activate(spec)
    if isinstance(spec, Switch):
        out = model(x, route=ROUTE)
        return sum(F.cross_entropy(logits, y[out.rows[n]] % logits.shape[-1]) for n, logits in out.by_adapter.items()
                   if n is not None)  # fmt: skip
    return F.cross_entropy(model(x), y)


def _grads(model: AdapterModel) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


SPECS = {"single": "a", "stack": Stack("a", "b", weights=[0.7, -0.4], head="b"), "switch": Switch("a", "b")}


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
@pytest.mark.parametrize("spec", list(SPECS))
def test_torch_checkpoint_gives_the_gradients_of_a_plain_backward(mode: str, spec: str) -> None:
    x, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    expected = {}
    for run_mode in (None, mode):
        model = _model()
        model.backbone.mode = run_mode
        _loss(model, SPECS[spec], x, y).backward()
        grads = _grads(model)
        if run_mode is None:
            expected = grads
            lora = [n for n in grads if "lora_" in n]
            assert lora and all(grads[n].abs().max() > 0 for n in lora), "every trained LoRA tensor gets a gradient"
        else:
            assert grads.keys() == expected.keys()
            for n in expected:
                torch.testing.assert_close(grads[n], expected[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_activating_another_composition_before_backward_is_refused(mode: str) -> None:
    x, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    model = _model()
    model.backbone.mode = mode
    loss = _loss(model, SPECS["switch"], x, y)
    model.activate("b")  # changes which parameters train: the recomputation could not be the forward's
    with pytest.raises(CheckpointRoutingError, match="activated"):
        loss.backward()


def test_one_backward_through_two_forwards_with_different_routes_is_refused() -> None:
    x, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    model = _model()
    model.backbone.mode = "non-reentrant"
    model.activate(Switch("a", "b"))
    first = model(x, route=ROUTE).padded.sum()
    second = model(x, route=["a", "a", "a", "a", "b", None]).padded.sum()
    with pytest.raises(CheckpointRoutingError, match="different adapters or routes"):
        (first + second).backward()
    # routes with the same adapter counts sort into the same layout: one composition, allowed, and the
    # same route twice gives twice one backward
    model.zero_grad()
    (model(x, route=ROUTE).padded.sum() * 2).backward()
    once = _grads(model)
    model.zero_grad()
    (model(x, route=ROUTE).padded.sum() + model(x, route=ROUTE).padded.sum()).backward()
    for n, g in once.items():
        torch.testing.assert_close(model.get_parameter(n).grad, g, rtol=1e-5, atol=1e-6, msg=n)
    del y


def _tiny_bert(checkpointing: dict | str | None):
    """A two-layer BERT; ``checkpointing`` is None (off), "default" (gradient_checkpointing_enable()) or its kwargs."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)  # fmt: skip
    torch.manual_seed(0)
    bert = transformers.BertModel(config, add_pooling_layer=True)
    if checkpointing == "default":
        bert.gradient_checkpointing_enable()
    elif checkpointing is not None:
        bert.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    model = AdapterModel(bert)
    for i, name in enumerate(("a", "b")):
        targets = ["*.attention.self.query", "*.attention.self.value", "*.output.dense"]
        model.add_adapter(name, LoRAConfig(r=2, alpha=4, targets=targets, heads=["pooler.dense"]))
        with torch.no_grad():
            for n, p in model.adapters[name].named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3 + i)
    return model.train()


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("checkpointing", ["default", {"use_reentrant": True}], ids=["default", "reentrant"])
@pytest.mark.parametrize("spec", list(SPECS))
def test_hugging_face_gradient_checkpointing_gives_the_same_gradients(checkpointing: dict | str, spec: str) -> None:
    ids = torch.randint(1, 50, (6, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(6, 7, dtype=torch.long)
    mask[2, 4:] = mask[4, 2:] = 0  # padded rows: the mask must travel with its sample

    def run(model: AdapterModel) -> dict[str, torch.Tensor]:
        model.activate(SPECS[spec])
        kwargs = {"route": ROUTE} if spec == "switch" else {}
        out = model(input_ids=ids, attention_mask=mask, **kwargs)
        (out.pooler_output.pow(2).sum() + out.last_hidden_state.sum()).backward()
        return _grads(model)

    expected, got = run(_tiny_bert(None)), run(_tiny_bert(checkpointing))
    lora = [n for n in expected if "lora_" in n]
    assert lora and all(expected[n].abs().max() > 0 for n in lora)
    assert got.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-6, msg=n)

"""Training on batches of any structure: a mapping of tensors (a tokenizer's output) or a tuple is passed to the
model as keywords or positional arguments; the gradients equal the per-sample loop, and data-parallel sharding
cuts every tensor of the structure."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hf_helpers import save_bert, save_gpt2, sentences
from torch import nn

from adapter_hub import AdapterModel, Hub, LoRAConfig, distributed, hf, pipelines, text, training
from adapter_hub.errors import AdapterHubError

pytest.importorskip("transformers", reason="the Transformers tests need the hf extra (pip install 'adapter-hub[hf]')")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[AdapterModel, text.Tokenization]]:
    """A BERT-like and a GPT-2-like text classifier, each with one adapter of non-zero deltas and head."""
    root = tmp_path_factory.mktemp("tm")
    out = {}
    with Hub.open(root / "home") as hub:
        for kind, save in (("bert", save_bert), ("gpt2", save_gpt2)):
            pipelines.add_transformers_backbone(hub, kind, save(root / kind))
            model = pipelines.model_for(hub, kind)
            model.add_adapter("a", LoRAConfig(r=2, targets=hf.default_targets(kind), heads=[hf.HEAD]),
                              head_modules={hf.HEAD: nn.Linear(32, 3)})  # fmt: skip
            g = torch.Generator().manual_seed(5)
            with torch.no_grad():
                for p in model.adapters["a"].parameters():
                    p.add_(0.2 * torch.randn(p.shape, generator=g))
            model.activate("a")
            out[kind] = (model.double(), text.Tokenization(pipelines.tokenizer_for(hub, kind), 10))
    return out


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_a_padded_dict_batch_gives_the_gradients_of_the_per_sample_loop(models: dict, kind: str):
    model, tokens = models[kind]
    model.train()
    texts = [t for t, _ in sentences(9, seed=7)]
    y = torch.tensor([0, 2, 1, 1, 0, 2, 2, 1, 0])
    batch = tokens(texts)
    assert batch["attention_mask"].min() == 0, "the rows differ in length: the batch is padded"
    training.loss_sum(model, (batch, y)).backward()
    batched = _grads(model)
    for t, label in zip(texts, y):  # each sample alone, unpadded
        F.cross_entropy(model(**tokens([t])), label[None], reduction="sum").backward()
    alone = _grads(model)
    assert batched.keys() == alone.keys() and len(alone) == 10  # 2 layers × 2 projections × (A, B) + head
    for k in alone:
        assert alone[k].abs().sum() > 0
        torch.testing.assert_close(batched[k], alone[k], rtol=1e-9, atol=1e-9)


def test_sharding_cuts_every_tensor_and_two_shards_sum_to_the_whole_batch(models: dict, monkeypatch):
    """fit's first step in a simulated 2-process world: each process's gradient (its rows of every tensor of
    the dict batch, loss scaled by the global batch) sums to the one-process gradient."""
    model, tokens = models["bert"]
    texts = [t for t, _ in sentences(7, seed=2)]
    split = text.TextSplit(texts, tokens.encode(texts), torch.tensor([0, 1, 2, 0, 1, 2, 0]), tokens)
    start = {k: v.clone() for k, v in model.adapters.state_dict().items()}

    class Stop(Exception):
        pass

    def first_step(world: tuple[int, int]) -> dict[str, torch.Tensor]:
        model.load_state_dict({**model.state_dict(), **{f"adapters.{k}": v for k, v in start.items()}})
        seen: dict[str, torch.Tensor] = {}

        def capture(params):
            seen.update({str(i): p.grad.clone() for i, p in enumerate(params) if p.grad is not None})
            raise Stop

        monkeypatch.setattr(distributed, "world", lambda: world)
        monkeypatch.setattr(distributed, "broadcast_parameters", lambda params: None)
        monkeypatch.setattr(distributed, "all_reduce_gradients", capture)
        with pytest.raises(Stop):
            training.fit(model, split, split, epochs=1, batch_size=7, progress=False)
        return seen

    whole = first_step((0, 1))
    parts = [first_step((rank, 2)) for rank in (0, 1)]
    assert len(whole) == 10
    for k, g in whole.items():
        torch.testing.assert_close(parts[0][k] + parts[1][k], g, rtol=1e-9, atol=1e-9)
        assert not torch.equal(parts[0][k], g)


def test_rows_of_a_nested_structure_and_a_structure_that_cannot_be_split():
    batch = ({"ids": torch.arange(10).view(5, 2), "mask": torch.ones(5, 2)}, (torch.zeros(5),), torch.arange(5))
    assert training.batch_rows(batch) == 5
    cut = training.take_rows(batch, slice(1, 3))
    assert cut[0]["ids"].tolist() == [[2, 3], [4, 5]] and cut[1][0].shape == (2,) and cut[2].tolist() == [1, 2]
    with pytest.raises(AdapterHubError, match=r"samples as its first dimension; got first dimensions \[3, 5\]"):
        training.batch_rows(({"ids": torch.zeros(5, 2), "table": torch.zeros(3, 2)}, torch.zeros(5)))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(z)


class Pairs:
    """Batches whose inputs are a tuple: fit passes them as positional arguments."""

    def __init__(self, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.z, self.y = x, z, y

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, size: int, *, shuffle: bool = False, generator: torch.Generator | None = None):
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for i in range(0, len(self), size):
            rows = order[i : i + size]
            yield (self.x[rows], self.z[rows]), self.y[rows]


def test_fit_and_evaluate_take_tuple_inputs(tmp_path: Path):
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(40, 3, generator=g), torch.randn(40, 4, generator=g)
    y = ((x[:, 0] + z[:, 1]) > 0).long()
    torch.manual_seed(0)
    net = TwoInputs()
    data = Pairs(x, z, y)
    before = training.evaluate(net, data)
    assert before == int((net(x, z).argmax(-1) == y).sum()) / 40
    result = training.fit(net, data, data, epochs=20, lr=0.1, batch_size=8, progress=False)
    assert result.best_accuracy == training.evaluate(net, data) > max(before, 0.9)

"""Per-sample routing over any inputs and outputs: every per-sample tensor travels with its sample, at any depth
of the arguments, and every output structure comes back in input order — checked against running each sample
alone with its adapter active (outputs and gradients)."""

from __future__ import annotations

import dataclasses
from collections import namedtuple
from typing import Any

import pytest
import torch
from torch import nn

from adapter_hub import AdapterModel, LoRAConfig, Switch
from adapter_hub.errors import ConfigError

ROUTE = ["b", "a", "b", "a"]
Pair = namedtuple("Pair", ["main", "extra"])


class ScaleNet(nn.Module):
    """forward(x, scale): the output depends on a second per-sample tensor given positionally or by keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        return self.lin(x) * scale


class NestedNet(nn.Module):
    """Nested inputs (a dict holding a tuple) and a structured output (a dict holding a named tuple and a
    tensor that is not per-sample)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.other = nn.Linear(6, 5)

    def forward(self, inputs: dict[str, Any], *, mask: torch.Tensor) -> dict[str, Any]:
        x, (y, z) = inputs["x"], inputs["pair"]
        main = self.lin(x) * mask + self.other(y) - z
        return {"out": Pair(main, main.sum(-1)), "total": main.sum(), "table": torch.ones(3, 2)}


def _adapted(backbone: nn.Module, targets: list[str]) -> AdapterModel:
    torch.manual_seed(0)
    model = AdapterModel(backbone)
    for name in ("a", "b"):
        model.add_adapter(name, LoRAConfig(r=2, alpha=4, targets=targets))
        with torch.no_grad():
            for p in model.adapters[name].parameters():
                p.normal_()  # non-zero deltas: a zero B would make every comparison pass
    model.activate(Switch("a", "b"))
    return model


def _alone(model: AdapterModel, name: str, fn: Any) -> Any:
    switch = model.active
    model.activate(name)
    try:
        return fn()
    finally:
        model.activate(switch)


def test_a_second_input_by_position_or_keyword_travels_with_its_sample() -> None:
    torch.manual_seed(1)
    model = _adapted(ScaleNet(), ["lin"])
    x, scale = torch.randn(4, 6), torch.randn(4, 1) * 10
    by_keyword = model(x, scale=scale, route=ROUTE).stack()
    by_position = model(x, scale, route=ROUTE).stack()
    kwargs_only = model(x=x, scale=scale, route=ROUTE).stack()
    for i, name in enumerate(ROUTE):
        expected = _alone(model, name, lambda i=i: model(x[i : i + 1], scale=scale[i : i + 1]))[0]
        assert expected.abs().max() > 1e-3
        for got in (by_keyword, by_position, kwargs_only):
            torch.testing.assert_close(got[i], expected)
    with model.disable_adapters():
        bare = model(x, scale=scale)
    assert (by_keyword - bare).abs().max() > 1e-3  # the adapters change the output


def test_the_backbone_called_directly_under_a_switch_is_refused_not_run_bare() -> None:
    model = _adapted(ScaleNet(), ["lin"])
    with pytest.raises(ConfigError, match="carries no route"):
        model.backbone(torch.randn(4, 6), scale=torch.ones(4, 1))


def test_nested_inputs_and_a_structured_output_come_back_in_input_order() -> None:
    torch.manual_seed(2)
    model = _adapted(NestedNet(), ["lin", "other"])
    x, y, z, mask = (torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 5), torch.rand(4, 1))
    out = model({"x": x, "pair": (y, z)}, mask=mask, route=ROUTE)
    assert isinstance(out, dict) and isinstance(out["out"], Pair)
    torch.testing.assert_close(out["table"], torch.ones(3, 2))  # not per-sample: passed through as it is
    for i, name in enumerate(ROUTE):
        alone = _alone(model, name, lambda i=i: model({"x": x[i : i + 1], "pair": (y[i : i + 1], z[i : i + 1])},
                                                      mask=mask[i : i + 1]))  # fmt: skip
        torch.testing.assert_close(out["out"].main[i], alone["out"].main[0])
        torch.testing.assert_close(out["out"].extra[i], alone["out"].extra[0])


def test_gradients_of_a_routed_batch_equal_the_per_sample_loop() -> None:
    torch.manual_seed(3)
    model = _adapted(ScaleNet(), ["lin"])
    model.train()
    x, scale, target = torch.randn(4, 6), torch.randn(4, 1), torch.randn(4, 5)
    model.zero_grad()
    ((model(x, scale=scale, route=ROUTE).stack() - target) ** 2).sum().backward()
    routed = {n: p.grad.clone() for n, p in model.adapters.named_parameters()}
    model.zero_grad()
    for i, name in enumerate(ROUTE):
        model.activate(name)
        ((model(x[i : i + 1], scale=scale[i : i + 1]) - target[i : i + 1]) ** 2).sum().backward()
    for n, p in model.adapters.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, n
        torch.testing.assert_close(routed[n], p.grad, msg=n)


def test_a_tensor_that_only_looks_per_sample_is_named_unrouted() -> None:
    class TableNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(6, 4)

        def forward(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
            return self.lin(x) @ table  # table: (4, 4), shared by every sample; 4 is also the batch size

    torch.manual_seed(4)
    model = _adapted(TableNet(), ["lin"])
    x, table = torch.randn(4, 6), torch.randn(4, 4)
    kept = model(x, table=table, unrouted=["table"], route=ROUTE).stack()
    for i, name in enumerate(ROUTE):
        torch.testing.assert_close(kept[i], _alone(model, name, lambda i=i: model(x[i : i + 1], table=table))[0])
    moved = model(x, table=table, route=ROUTE).stack()  # the documented rule: its rows were sorted too
    assert (moved - kept).abs().max() > 1e-3
    with pytest.raises(ConfigError, match=r"unrouted names \['mask'\]"):
        model(x, table=table, unrouted=["mask"], route=ROUTE)
    with pytest.raises(ConfigError, match="route has 3 entries for a batch of 4 samples"):
        model(x, table=table, route=ROUTE[:3])
    model.activate("a")
    with pytest.raises(ConfigError, match="only means something with route="):
        model(x, table=table, unrouted=["table"])


def test_a_hugging_face_encoder_with_padding_masks_routes_per_sample() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)  # fmt: skip
    torch.manual_seed(5)
    model = _adapted(transformers.BertModel(config).eval(), ["*.query", "*.value"])
    ids = torch.randint(1, 50, (4, 7))
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [1] * 5 + [0] * 2, [1] * 2 + [0] * 5])
    batch = transformers.BatchEncoding({"input_ids": ids, "attention_mask": mask})
    out = model(**batch, route=ROUTE)
    assert type(out).__name__ == "BaseModelOutputWithPoolingAndCrossAttentions"
    for i, name in enumerate(ROUTE):
        alone = _alone(model, name, lambda i=i: model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]))
        keep = mask[i].bool()
        torch.testing.assert_close(out.last_hidden_state[i][keep], alone.last_hidden_state[0][keep])
        torch.testing.assert_close(out.pooler_output[i], alone.pooler_output[0])
    with torch.no_grad(), model.disable_adapters():
        bare = model(**batch)
    assert (out.last_hidden_state - bare.last_hidden_state).abs().max() > 1e-3
    # a BatchEncoding given whole (to a backbone that takes one) is routed inside and keeps its type
    from adapter_hub.compose.routing import restore_order, route_inputs

    perm = torch.tensor([1, 3, 0, 2])
    (routed,), _ = route_inputs((batch,), {}, perm, 4)
    assert type(routed) is transformers.BatchEncoding and torch.equal(routed["input_ids"], ids[perm])
    assert torch.equal(restore_order(routed, perm, 4)["attention_mask"], mask)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers renames past_key_values to cache
def test_a_key_value_cache_travels_with_its_rows_through_two_decoding_steps() -> None:
    """GPT-2 with use_cache: the cache a routed forward returns is in input order, and a cache given to a routed
    forward is reordered with the batch and put back, so step 2 of every row equals that row decoded alone."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = _adapted(transformers.GPT2Model(config).eval(), ["*.attn.c_attn", "*.mlp.c_fc"])
    route = ["b", None, "a", "b"]
    first, second = torch.randint(1, 40, (4, 5)), torch.randint(1, 40, (4, 1))
    with torch.no_grad():
        step1 = model(input_ids=first, use_cache=True, route=route)
        cache = step1.past_key_values
        keys_after_step1 = cache.layers[0].keys.clone()
        step2 = model(input_ids=second, past_key_values=cache, use_cache=True, route=route)  # appends to cache
        for i, name in enumerate(route):
            previous = model.active
            model.activate(name)
            alone1 = model.backbone(input_ids=first[i : i + 1], use_cache=True)
            torch.testing.assert_close(keys_after_step1[i], alone1.past_key_values.layers[0].keys[0])
            alone2 = model.backbone(input_ids=second[i : i + 1], past_key_values=alone1.past_key_values)
            model.activate(previous)
            assert alone2.last_hidden_state.abs().max() > 1e-3
            torch.testing.assert_close(step2.last_hidden_state[i], alone2.last_hidden_state[0])
            torch.testing.assert_close(cache.layers[1].values[i], alone2.past_key_values.layers[1].values[0])


def test_a_layer_that_sees_the_batch_off_dimension_0_is_refused_naming_it() -> None:
    class SeqFirst(nn.Module):  # (batch, seq, dim) turned into (seq, batch, dim) before the adapted layer
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(6, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x.transpose(0, 1)).transpose(0, 1)

    model = _adapted(SeqFirst(), ["lin"])
    with pytest.raises(ConfigError, match="lin got 3 rows for a batch of 4"):
        model(torch.randn(4, 3, 6), route=ROUTE)


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    note: str = "plain dataclass, not a mapping"


@dataclasses.dataclass
class Extra:
    scale: torch.Tensor


class DataclassNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor, extra: Extra) -> Out:
        return Out(self.lin(x) * extra.scale)


def test_plain_dataclasses_in_and_out_travel_with_their_samples() -> None:
    torch.manual_seed(3)
    model = _adapted(DataclassNet(), ["lin"])
    x, scale = torch.randn(4, 6), torch.randn(4, 1) * 10
    out = model(x, extra=Extra(scale), route=ROUTE)
    assert isinstance(out, Out) and out.note == "plain dataclass, not a mapping"
    for i, name in enumerate(ROUTE):
        alone = _alone(model, name, lambda i=i: model(x[i : i + 1], Extra(scale[i : i + 1])))
        assert alone.logits.abs().max() > 1e-3
        torch.testing.assert_close(out.logits[i], alone.logits[0])


class Holder:  # tensors in a plain object's attributes: out of routing's reach
    def __init__(self, scale: torch.Tensor) -> None:
        self.scale = scale


class HolderNet(DataclassNet):
    def forward(self, x: torch.Tensor, holder: Holder) -> torch.Tensor:  # type: ignore[override]
        return self.lin(x) * holder.scale


class PerSampleListNet(DataclassNet):
    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:  # type: ignore[override]
        return [{"score": row.sum()} for row in self.lin(x)]  # one dict per sample, as detection models return


def test_tensors_routing_cannot_reach_are_refused_not_left_in_sorted_order() -> None:
    model = _adapted(HolderNet(), ["lin"])
    with pytest.raises(ConfigError, match="a Holder in the inputs holds tensors"):
        model(torch.randn(4, 6), holder=Holder(torch.randn(4, 1)), route=ROUTE)
    model = _adapted(PerSampleListNet(), ["lin"])
    with pytest.raises(ConfigError, match="a sequence of 4 entries that hold tensors"):
        model(torch.randn(4, 6), route=ROUTE)


def test_a_model_loss_over_heads_of_different_widths_is_refused() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, num_labels=5)  # fmt: skip
    torch.manual_seed(0)
    model = AdapterModel(transformers.BertForSequenceClassification(config).eval())
    for name, width in (("a", 3), ("b", 5)):
        model.add_adapter(name, LoRAConfig(r=2, targets=["*.query"], heads=["classifier"]),
                          head_modules={"classifier": nn.Linear(8, width)})  # fmt: skip
    model.activate(Switch("a", "b"))
    ids, labels = torch.randint(1, 30, (4, 6)), torch.tensor([0, 1, 2, 1])
    with pytest.raises(ConfigError, match="its own loss over heads of different widths"):
        model(input_ids=ids, labels=labels, route=ROUTE)
    out = model(input_ids=ids, route=ROUTE)  # without labels: logits, zero-padded to the widest head
    assert out.logits.shape == (4, 5) and out.loss is None


def test_a_cache_of_another_batch_size_is_refused_and_left_as_it_was() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)  # fmt: skip
    model = _adapted(transformers.GPT2Model(config).eval(), ["*.attn.c_attn"])
    with torch.no_grad():
        cache = model(input_ids=torch.randint(1, 40, (4, 3)), use_cache=True, route=ROUTE).past_key_values
        before = cache.layers[0].keys.clone()
        for ids, route in ((torch.randint(1, 40, (4, 1)), ROUTE[:3]), (torch.randint(1, 40, (4, 1)), ROUTE + ["a"]),
                           (torch.randint(1, 40, (2, 1)), ROUTE[:2])):  # fmt: skip
            with pytest.raises(ConfigError, match="entries|rows for a route"):
                model(input_ids=ids, past_key_values=cache, route=route)
            assert torch.equal(cache.layers[0].keys, before), "a refused call leaves the cache as it was"

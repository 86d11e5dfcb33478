"""LoRA on transformers' Conv1D (GPT-2's attention and MLP: a linear layer stored (in, out)), on a tiny GPT-2
built from a config: the dense reference W0 + ΔW folded by hand, merge/unmerge bit for bit, a Switch against each
sample alone, the adapter file, and the real peft package in both directions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapter_hub import AdapterModel, LoRAConfig, Switch
from adapter_hub.lora import LoRATransposedLinear, lora_class_for

transformers = pytest.importorskip("transformers")
TARGETS = ["*.c_attn", "*.c_proj", "*.c_fc"]


def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    return transformers.GPT2Model(config).eval()


def adapted(names: tuple[str, ...] = ("a",)) -> AdapterModel:
    model = AdapterModel(gpt2())
    for i, name in enumerate(names):
        model.add_adapter(name, LoRAConfig(r=4, alpha=8, targets=TARGETS))
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in model.adapters[name].parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)  # non-zero B: the delta is really there
    return model


IDS = torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(1))


def test_conv1d_gets_the_transposed_layer_without_importing_transformers_in_lora() -> None:
    conv = transformers.pytorch_utils.Conv1D(7, 5)  # nf=7 outputs, nx=5 inputs: weight (5, 7)
    assert lora_class_for(conv) is LoRATransposedLinear
    layer = LoRATransposedLinear(conv, 3, 6)
    torch.nn.init.normal_(layer.lora_B.weight)
    assert layer.delta_weight().shape == conv.weight.shape == (5, 7)
    x = torch.randn(2, 5)
    torch.testing.assert_close(conv(x) + layer(x), x @ (conv.weight + layer.delta_weight()) + conv.bias)
    import adapter_hub.lora as lora_pkg

    assert "transformers" not in (lora_pkg.__file__ or "") and not hasattr(lora_pkg, "transformers")


def test_gpt2_with_lora_equals_the_weights_folded_by_hand_and_merges_bit_exactly() -> None:
    model = adapted()
    model.activate("a")
    out = model(IDS).last_hidden_state
    dense = gpt2()  # the same weights, without the adapter sites
    with torch.no_grad():
        for path, layer in model.adapters["a"].layer_items():
            assert isinstance(layer, LoRATransposedLinear)
            a, b = layer.lora_A.weight, layer.lora_B.weight
            dense.get_submodule(path).weight += (b @ a).t() * (8 / 4)  # ΔW = s·(B·A)ᵀ, s = α/r
        with model.disable_adapters():
            bare = model(IDS).last_hidden_state
    torch.testing.assert_close(out, dense(IDS).last_hidden_state, rtol=1e-5, atol=1e-5)
    assert (out - bare).abs().max() > 1e-2
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model.merge("a")
    torch.testing.assert_close(model(IDS).last_hidden_state, out, rtol=1e-5, atol=1e-5)
    model.unmerge()
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())


def test_a_switch_over_gpt2_adapters_equals_each_sample_alone_and_trains_them_apart() -> None:
    model = adapted(("a", "b"))
    route = ["b", "a", "a", "b"]
    model.activate(Switch("a", "b"))
    routed = model(IDS, route=route).last_hidden_state
    for i, name in enumerate(route):
        model.activate(name)
        torch.testing.assert_close(routed[i], model(IDS[i : i + 1]).last_hidden_state[0], rtol=1e-5, atol=1e-5)
    model.activate(Switch("a", "b"))
    model.train()
    model(IDS, route=route).last_hidden_state.pow(2).sum().backward()
    for name in ("a", "b"):
        grads = [p.grad for p in model.adapters[name].parameters()]
        assert all(g is not None and g.abs().max() > 0 for g in grads)


def test_the_adapter_file_round_trips(tmp_path: Path) -> None:
    model = adapted()
    model.activate("a")
    expected = model(IDS).last_hidden_state
    model.save_adapter("a", tmp_path / "a.safetensors")
    again = AdapterModel(gpt2())
    again.load_adapter("a", tmp_path / "a.safetensors")
    again.activate("a")
    torch.testing.assert_close(again(IDS).last_hidden_state, expected)


def test_peft_reads_our_export_and_we_read_peft_with_the_same_outputs(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = adapted()
    model.activate("a")
    expected = model(IDS).last_hidden_state
    model.export_peft("a", tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(gpt2(), tmp_path / "ours").eval()
    torch.testing.assert_close(theirs(IDS).last_hidden_state, expected, rtol=1e-5, atol=1e-5)

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    native = peft.get_peft_model(gpt2(), config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in native.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    native.eval()
    reference = native(IDS).last_hidden_state
    native.save_pretrained(tmp_path / "native")
    imported = AdapterModel(gpt2())
    imported.import_peft(tmp_path / "native", "p")
    imported.activate("p")
    torch.testing.assert_close(imported(IDS).last_hidden_state, reference, rtol=1e-5, atol=1e-5)
    with imported.disable_adapters():
        assert (imported(IDS).last_hidden_state - reference).abs().max() > 1e-2


def test_combining_gpt2_adapters_equals_stacking_them() -> None:
    from adapter_hub import Stack

    model = adapted(("a", "b"))
    model.activate(Stack("a", "b", weights=[0.7, -0.4]))
    stacked = model(IDS).last_hidden_state
    model.combine("ab", ["a", "b"], [0.7, -0.4], method="linear")
    assert all(isinstance(layer, LoRATransposedLinear) for _, layer in model.adapters["ab"].layer_items())
    model.activate("ab")
    torch.testing.assert_close(model(IDS).last_hidden_state, stacked, rtol=1e-5, atol=1e-5)
    with model.disable_adapters():
        assert (model(IDS).last_hidden_state - stacked).abs().max() > 1e-2

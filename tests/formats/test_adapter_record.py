"""The adapter record: the model's export/import verbs, and the codecs that work on records alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from adapter_hub import AdapterModel, LoRAConfig
from adapter_hub.compose.combine import combine
from adapter_hub.errors import AdapterFileError, AdapterNotFound, FingerprintMismatch, TargetError
from adapter_hub.formats import AdapterRecord, adapter_file, peft


class Net(nn.Module):
    """Every LoRA layer kind whose file keys differ: embedding, grouped conv, attention, plus a head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1, groups=2)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)
        x, _ = self.attn(x, x, x)
        return self.fc(x.mean(1))


CFG = LoRAConfig(r=2, alpha=4, targets=["emb", "conv", "attn"], heads=["fc"], rank_pattern={"conv": 4})
IDS = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(1))


def backbone(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Net().eval()


def model_with(name: str = "a", seed: int = 3) -> AdapterModel:
    model = AdapterModel(backbone())
    model.add_adapter(name, CFG)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapters[name].parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def output(model: AdapterModel, name: str) -> torch.Tensor:
    model.activate(name)
    with torch.no_grad():
        return model(IDS)


def test_export_record_is_a_snapshot_of_the_adapter() -> None:
    model = model_with()
    record = model.export_record("a")
    adapter = model.adapters["a"]
    assert record.layers == {p: m.spec() for p, m in adapter.layer_items()}
    assert record.layers["conv"] == {"type": "LoRAConv1d", "r": 4, "alpha": 4.0, "rank": 4, "a_groups": 2}
    assert record.heads == ["fc"] and record.fingerprint == model.fingerprint
    assert set(record.tensors) == {
        "emb.lora_A.weight", "emb.lora_B.weight", "conv.lora_A.weight", "conv.lora_B.weight",
        "attn.lora_A.weight", "attn.lora_B.weight", "attn.out_proj.lora_A.weight", "attn.out_proj.lora_B.weight",
        "fc.weight", "fc.bias",
    }  # fmt: skip
    before = record.tensors["fc.bias"].clone()
    with torch.no_grad():
        adapter.heads["fc"].bias.add_(1.0)
    adapter.metadata["note"] = "later"
    assert torch.equal(record.tensors["fc.bias"], before), "the record holds copies, not the live tensors"
    assert "note" not in record.metadata


def test_record_round_trips_through_bytes_and_back_into_a_model() -> None:
    model = model_with()
    expected = output(model, "a")
    data = model.adapter_to_bytes("a")
    record = adapter_file.decode(data)
    assert adapter_file.encode(record) == data, "decode then encode gives the very same bytes"
    assert adapter_file.encode(model.export_record("a")) == data
    other = AdapterModel(backbone())
    added = other.add_adapter_from_record("b", record)
    assert added is other.adapters["b"]
    assert torch.equal(output(other, "b"), expected)
    assert other.adapter_config("b").heads == ["fc"]
    assert record.config.heads == ["fc"] and record.config is not added.config


def test_save_and_load_go_through_the_file_helpers(tmp_path: Path) -> None:
    model = model_with()
    adapter_file.save(model.export_record("a"), tmp_path / "a.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == model.adapter_to_bytes("a")
    record = adapter_file.load(tmp_path / "a.safetensors")
    assert record.source == str(tmp_path / "a.safetensors") and record.fingerprint == model.fingerprint
    with pytest.raises(AdapterFileError, match="cannot read"):
        adapter_file.load(tmp_path / "absent.safetensors")


def _edited(record: AdapterRecord, changes: dict[str, torch.Tensor | None]) -> AdapterRecord:
    """A copy of ``record`` with tensors replaced (None: removed)."""
    tensors = dict(record.tensors)
    for key, value in changes.items():
        if value is None:
            tensors.pop(key)
        else:
            tensors[key] = value
    return AdapterRecord(record.config, record.layers, record.heads, tensors, record.metadata, record.fingerprint)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"conv.lora_B.weight": None}, "adapter data: missing key conv.lora_B.weight$"),
        ({"emb.lora_A.weight": None, "conv.lora_A.weight": None}, r"missing key conv.lora_A.weight \(and 1 more\)"),
        ({"conv.lora_C.weight": torch.zeros(1)}, "unexpected key conv.lora_C.weight$"),
        ({"attn.out_proj.lora_A.weight": torch.zeros(2, 3)}, r"key attn.out_proj.lora_A.weight has shape \(2, 3\)"),
        ({"fc.weight": torch.zeros(5, 2)}, r"key fc.weight has shape \(5, 2\), expected \(3, 8\)"),
    ],
)
def test_a_bad_record_names_the_first_bad_key_and_adds_nothing(changes, message) -> None:
    model = model_with()
    other = AdapterModel(backbone())
    with pytest.raises(AdapterFileError, match=message):
        other.add_adapter_from_record("b", _edited(model.export_record("a"), changes))
    assert "b" not in other.adapters
    assert all("forward" not in m.__dict__ for m in other.backbone.modules()), "no site left behind"


def test_a_record_for_another_backbone_is_refused_unless_forced() -> None:
    record = model_with().export_record("a")
    other = AdapterModel(backbone(seed=1))
    fp = record.fingerprint
    with pytest.raises(FingerprintMismatch, match=f"made for backbone {fp[:12]}…, this backbone is .*force=True"):
        other.add_adapter_from_record("a", record)
    assert "a" not in other.adapters
    other.add_adapter_from_record("a", record, force=True)
    assert "a" in other.adapters


def test_decode_refuses_malformed_metadata() -> None:
    record = model_with().export_record("a")
    header = adapter_file.header_metadata(record)
    for key, value, pattern in [
        ("adapter_hub.format_version", "one", "format version is not a number"),
        ("adapter_hub.layers", "[1, 2]", "adapter_hub.layers must be a JSON object, got list"),
        ("adapter_hub.config", "{", "malformed adapter_hub metadata"),
    ]:
        data = adapter_file.canonical_safetensors(record.tensors, {**header, key: value})
        with pytest.raises(AdapterFileError, match=pattern):
            adapter_file.decode(data, "x.safetensors")


def test_peft_codec_round_trips_a_record_without_a_model(tmp_path: Path) -> None:
    model = model_with()
    record = model.export_record("a")
    peft.export_peft(record, tmp_path / "p")
    back = peft.import_peft(backbone(), tmp_path / "p")
    assert back.fingerprint == "" and back.heads == ["fc"]
    assert back.layers["conv"]["a_groups"] == 2, "the block-diagonal full A is read back as grouped"
    assert back.layers["emb"]["type"] == "LoRAEmbedding"
    assert set(back.tensors) == set(record.tensors)
    for key, t in record.tensors.items():
        assert torch.equal(back.tensors[key], t), key
    with pytest.raises(FingerprintMismatch):
        model.add_adapter_from_record("b", back)
    model.import_peft(tmp_path / "p", "b")
    assert torch.equal(output(model, "b"), output(model, "a"))


def test_set_head_replaces_one_head() -> None:
    model = model_with()
    wide = nn.Linear(8, 5)
    model.set_head("a", "fc", wide)
    assert model.adapters["a"].heads["fc"] is wide
    assert not wide.weight.requires_grad, "an inactive adapter's head is frozen, as when it was added"
    assert output(model, "a").shape == (2, 5)
    assert wide.weight.requires_grad, "activating the adapter makes the new head trainable"
    with pytest.raises(TargetError, match="adapter 'a' has no head 'conv' \\(heads: fc\\)"):
        model.set_head("a", "conv", nn.Linear(8, 5))
    with pytest.raises(AdapterNotFound, match="no adapter named 'z'"):
        model.set_head("z", "fc", nn.Linear(8, 5))


def test_combine_is_a_function_of_adapters_that_leaves_the_generators_alone() -> None:
    model = model_with()
    model.add_adapter("b", CFG)
    sources = [("a", model.adapters["a"]), ("b", model.adapters["b"])]
    state = torch.get_rng_state()
    record = combine(sources, [0.5, 0.5], "svd", rank=1, base_for=model.backbone.get_submodule, fingerprint="fp")
    assert torch.equal(torch.get_rng_state(), state)
    assert record.fingerprint == "fp" and record.metadata["recipe"]["method"] == "svd"
    assert record.layers["conv"]["r"] == 2 and record.layers["conv"]["a_groups"] == 2  # rank 1 per group
    made = model.combine("c", ["a", "b"], [0.5, 0.5], "svd", rank=1)
    for key, t in model.export_record("c").tensors.items():
        assert torch.equal(record.tensors[key], t), key
    assert made.metadata == record.metadata

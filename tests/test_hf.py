"""Transformers backbones: the sequence classifier (pooling, default LoRA targets), `add_transformers_backbone`
(fingerprint, rebuild, the tokenizer kept in the registry), per-row routing against each row run alone, and a
directory that does not load registers nothing."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from hf_helpers import bert_tokenizer, gpt2_tokenizer, save_bert, save_gpt2, sentences

from adapter_hub import AdapterModel, Hub, LoRAConfig, hf, pipelines, text
from adapter_hub.backbones import BackboneError
from adapter_hub.compose import Switch
from adapter_hub.errors import ConfigError

transformers = pytest.importorskip("transformers", reason="the Transformers tests need the hf extra "
                                   "(pip install 'adapter-hub[hf]')")  # fmt: skip


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"bert": save_bert(root / "bert"), "gpt2": save_gpt2(root / "gpt2")}


def _nonzero(model: AdapterModel, name: str, seed: int) -> None:
    """Random LoRA B (and A, head): the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapters[name].parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def test_pooling_is_the_masked_mean_or_the_last_real_token():
    h = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0]])  # right, none, and odd padding
    mean = torch.stack([h[i, mask[i].bool()].mean(0) for i in range(3)])
    last = torch.stack([h[0, 2], h[1, 4], h[2, 3]])
    torch.testing.assert_close(hf.pool(h, mask, "mean"), mean)
    torch.testing.assert_close(hf.pool(h, mask, "last"), last)
    with pytest.raises(ConfigError, match="unknown pooling 'max'"):
        hf.pool(h, mask, "max")


@pytest.mark.parametrize(
    ("model_type", "size"),
    [("bert", {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}),
     ("roberta", {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}),
     ("distilbert", {"dim": 16, "n_heads": 2, "hidden_dim": 32, "n_layers": 2}),
     ("gpt2", {"n_embd": 16, "n_head": 2, "n_layer": 2}),
     ("llama", {"hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 32}),
     ("mistral", {"hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 32}),
     ("qwen2", {"hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 32})],
)  # fmt: skip
def test_default_targets_hit_two_attention_projections_per_layer(model_type: str, size: dict):
    layers = {"num_hidden_layers": 2} if "n_layer" not in size and "n_layers" not in size else {}
    config = transformers.AutoConfig.for_model(model_type, vocab_size=50, **size, **layers)
    base = transformers.AutoModel.from_config(config)
    model = AdapterModel(hf.SequenceClassifier(base, config.hidden_size, 2, hf.default_pooling(model_type)))
    model.add_adapter("a", LoRAConfig(r=2, targets=hf.default_targets(model_type), heads=[hf.HEAD]))
    layers_adapted = [path for path, _ in model.adapters["a"].layer_items()]
    assert len(layers_adapted) == 4, layers_adapted  # 2 layers × 2 projections
    assert hf.default_pooling(model_type) == ("last" if model_type in ("gpt2", "llama", "mistral", "qwen2") else "mean")
    offset = config.pad_token_id + 1 if model_type == "roberta" else 0  # RoBERTa numbers positions after the pad
    assert hf.max_positions(config.to_dict()) == config.max_position_embeddings - offset


def test_a_model_type_without_defaults_asks_for_targets():
    with pytest.raises(ConfigError, match=r"no default LoRA targets for model type 'mpnet' .*pass --targets"):
        hf.default_targets("mpnet")


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_backbone_add_records_a_fingerprint_that_rebuilds_and_the_tokenizer_in_the_registry(
    dirs: dict[str, Path], tmp_path: Path, kind: str
):
    model_dir = tmp_path / kind
    shutil.copytree(dirs[kind], model_dir)
    original = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    probe = [t for t, _ in sentences(6, seed=1)] + ["zzz unknown wordsé"]
    with Hub.open(tmp_path / "home") as hub:
        record = pipelines.add_transformers_backbone(hub, "tb", model_dir, seed=4)
        assert record.architecture == {"bert": "transformers/BertModel", "gpt2": "transformers/GPT2Model"}[kind]
        assert record.source["hf"]["pooling"] == {"bert": "mean", "gpt2": "last"}[kind]
        digest = record.source["files"]["sha256"]
        assert hub.store.path(digest).is_file() and hashlib.sha256(hub.backbone_files("tb")).hexdigest() == digest
        first = pipelines.model_for(hub, "tb")
        assert first.fingerprint == record.fingerprint == pipelines.model_for(hub, "tb").fingerprint

        # the directory's tokenizer goes away, then another one takes its place: the registry's is used
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (model_dir / f).unlink()
        assert pipelines.tokenizer_for(hub, "tb")("good film")["input_ids"] == original("good film")["input_ids"]
        (bert_tokenizer() if kind == "gpt2" else gpt2_tokenizer()).save_pretrained(model_dir)
        restored = pipelines.tokenizer_for(hub, "tb")
        assert [restored(t)["input_ids"] for t in probe] == [original(t)["input_ids"] for t in probe]
        changed = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        assert [changed(t)["input_ids"] for t in probe] != [original(t)["input_ids"] for t in probe]

        # a changed config.json does not change the network: the recorded configuration builds it
        config = json.loads((model_dir / "config.json").read_text())
        (model_dir / "config.json").write_text(json.dumps({**config, "layer_norm_eps": 0.5, "layer_norm_epsilon": 0.5}))
        tokens = text.Tokenization(restored, 16)
        batch = tokens(probe)
        again = pipelines.model_for(hub, "tb")
        with torch.no_grad():
            torch.testing.assert_close(again(**batch), first(**batch), rtol=0, atol=0)

        # other weights under the same directory are refused on rebuild
        weights = transformers.AutoModel.from_pretrained(model_dir, local_files_only=True)
        with torch.no_grad():
            next(weights.parameters()).add_(1e-3)
        weights.save_pretrained(model_dir)
        with pytest.raises(BackboneError, match=r"backbone 'tb' rebuilt from .* has fingerprint .*not the recorded"):
            pipelines.model_for(hub, "tb")


def test_weights_missing_from_the_files_are_seeded_so_the_fingerprint_is_stable(tmp_path: Path):
    save_bert(tmp_path / "nopooler", pooler=False)  # AutoModel adds a pooler the files lack
    with Hub.open(tmp_path / "home") as hub:
        record = pipelines.add_transformers_backbone(hub, "np", tmp_path / "nopooler")
        assert pipelines.model_for(hub, "np").fingerprint == record.fingerprint


def _refused(hub: Hub, path: Path, message: str) -> None:
    with pytest.raises(BackboneError) as info:
        pipelines.add_transformers_backbone(hub, "x", path)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert hub.backbones() == [] and not hub.store.has_blobs(), "nothing was registered or stored"


def test_a_directory_that_does_not_load_registers_nothing(dirs: dict[str, Path], tmp_path: Path):
    def copy(name: str, drop: tuple[str, ...] = ()) -> Path:
        target = tmp_path / name
        shutil.copytree(dirs["bert"], target, ignore=shutil.ignore_patterns(*drop))
        return target

    with Hub.open(tmp_path / "home") as hub:
        _refused(hub, tmp_path / "nothere", "does not exist")
        (tmp_path / "file.txt").write_text("x")
        _refused(hub, tmp_path / "file.txt", "is not a directory")
        _refused(hub, copy("noconfig", ("config.json",)), "holds no config.json: it is not a Transformers model")
        _refused(hub, copy("noweights", ("*.safetensors",)), "holds no .safetensors weights")
        _refused(hub, copy("notok", ("tokenizer*",)), "holds no tokenizer")
        broken = copy("broken")
        (broken / "model.safetensors").write_bytes(b"not safetensors")
        _refused(hub, broken, "cannot load the weights in")
        other = copy("other")
        config = json.loads((other / "config.json").read_text())
        (other / "config.json").write_text(json.dumps({**config, "hidden_size": 64, "intermediate_size": 128}))
        _refused(hub, other, "cannot load the weights in")
        unknown = copy("unknown")
        (unknown / "config.json").write_text(json.dumps({**config, "model_type": "no-such-model"}))
        _refused(hub, unknown, "cannot read the model configuration in")
        t5 = tmp_path / "t5"
        transformers.T5Model(transformers.T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1,
                                                   num_heads=2)).save_pretrained(t5)  # fmt: skip
        bert_tokenizer().save_pretrained(t5)
        _refused(hub, t5, "holds an encoder-decoder model (t5)")


def test_each_row_routed_through_a_switch_equals_the_row_alone_with_its_adapter(dirs: dict[str, Path],
                                                                               tmp_path: Path):  # fmt: skip
    """Two adapters with heads of 2 and 3 classes and non-zero deltas, rows of different lengths padded
    together: each row's logits equal the row tokenised and run alone with its own adapter (also its
    gradients, in training mode). In float64, so that only a real difference could exceed the tolerance."""
    with Hub.open(tmp_path / "home") as hub:
        for kind in ("bert", "gpt2"):
            pipelines.add_transformers_backbone(hub, kind, dirs[kind])
            model = pipelines.model_for(hub, kind)
            tokens = text.Tokenization(pipelines.tokenizer_for(hub, kind), 12)
            for name, classes, seed in (("a", 2, 1), ("b", 3, 2)):
                model.add_adapter(name, LoRAConfig(r=2, targets=hf.default_targets(kind), heads=[hf.HEAD]),
                                  head_modules={hf.HEAD: torch.nn.Linear(32, classes)})  # fmt: skip
                _nonzero(model, name, seed)
            model.double()
            texts = [t for t, _ in sentences(7, seed=3)] + ["good"]
            route = ["a", "b", "b", None, "a", "b", "a", "b"]
            model.activate(Switch("a", "b"))
            model.train()
            out = model(**tokens(texts), route=route)
            loss = sum(row.square().sum() for row in out)
            loss.backward()
            routed_grads = {k: p.grad.clone() for k, p in model.adapters.named_parameters() if p.grad is not None}
            model.zero_grad()
            for i, (t, name) in enumerate(zip(texts, route)):
                if name is None:
                    with model.disable_adapters():
                        alone = model(**tokens([t]))[0]
                else:
                    model.activate(name)
                    alone = model(**tokens([t]))[0]
                torch.testing.assert_close(out[i], alone, rtol=1e-9, atol=1e-9)
                assert alone.abs().sum() > 0
                if name is not None:
                    alone.square().sum().backward()
            alone_grads = {k: p.grad for k, p in model.adapters.named_parameters() if p.grad is not None}
            assert alone_grads.keys() == routed_grads.keys() and len(alone_grads) > 4
            for k, g in alone_grads.items():
                torch.testing.assert_close(routed_grads[k], g, rtol=1e-9, atol=1e-9)


def test_a_route_that_does_not_fit_the_batch_of_keyword_inputs_is_refused(dirs: dict[str, Path], tmp_path: Path):
    with Hub.open(tmp_path / "home") as hub:
        pipelines.add_transformers_backbone(hub, "tb", dirs["bert"])
        model = pipelines.model_for(hub, "tb")
        model.add_adapter("a", LoRAConfig(r=2, targets=hf.default_targets("bert"), heads=[hf.HEAD]))
        model.activate(Switch("a"))
        batch = text.Tokenization(pipelines.tokenizer_for(hub, "tb"), 8)(["good film", "bad", "fine plot"])
        with pytest.raises(ConfigError, match="route has 2 entries for a batch of 3 samples"):
            model(**batch, route=["a", "a"])

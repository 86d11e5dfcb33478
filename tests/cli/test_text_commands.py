"""Text tasks through the CLI: `backbone add --hf`, `train`, `eval` and `predict` on CSV/JSONL files, checked
against each text run alone through the library; lineage with --from; one clear line for every bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from hf_helpers import save_bert, save_gpt2, sentences, write_csv, write_jsonl

from adapter_hub import AdapterModel, Hub, LoRAConfig, hf, pipelines, text

pytest.importorskip("transformers", reason="the Transformers tests need the hf extra (pip install 'adapter-hub[hf]')")


def run(home: Path, *args: str, ok: bool = True) -> Any:
    from adapter_hub.cli import main

    result = CliRunner().invoke(main, ["--home", str(home), *args])
    if ok:
        assert result.exit_code == 0, (args, result.output, result.exception)
    return result


def refused(home: Path, args: list[str], message: str) -> None:
    with Hub.open(home) as hub:
        before = [(v.ref, v.digest) for s in hub.ls() for v in hub.versions(f"{s.task}/{s.name}")]
        backbones = [b.name for b in hub.backbones()]
    result = run(home, *args, ok=False)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), (args, result.output)
    assert message in lines[0], lines[0]
    with Hub.open(home) as hub:
        assert [(v.ref, v.digest) for s in hub.ls() for v in hub.versions(f"{s.task}/{s.name}")] == before
        assert [b.name for b in hub.backbones()] == backbones


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A registry with a BERT-like (tb) and a GPT-2-like (tg) backbone added through the CLI, and data files."""
    root = tmp_path_factory.mktemp("text")
    home = root / "home"
    added = run(home, "backbone", "add", "tb", "--hf", str(save_bert(root / "bert")))
    assert added.output.startswith("backbone tb: fingerprint ")
    added = json.loads(run(home, "backbone", "add", "tg", "--hf", str(save_gpt2(root / "gpt2")), "--json").output)
    assert added["architecture"] == "transformers/GPT2Model" and added["source"]["hf"]["pooling"] == "last"
    run(home, "task", "add", "senti")  # class names from the data
    run(home, "task", "add", "flags", "--num-classes", "2")  # class indices
    write_csv(root / "senti.csv", sentences(40, seed=1))
    write_jsonl(root / "flags.jsonl", [{"text": t, "label": int(y == "pos")} for t, y in sentences(40, seed=2)])
    return home, root


def _alone(model: AdapterModel, tokens: text.Tokenization, adapter: str, texts: list[str]) -> list[torch.Tensor]:
    """Each text tokenised and run on its own with ``adapter`` active: the reference for every batched path."""
    model.activate(adapter)
    model.eval()
    with torch.no_grad():
        return [model(**tokens([t]))[0] for t in texts]


def _loaded(home: Path, backbone: str, refs: dict[str, str]) -> tuple[AdapterModel, dict[str, text.Tokenization]]:
    with Hub.open(home) as hub:
        model = pipelines.model_for(hub, backbone)
        tokenizer = pipelines.tokenizer_for(hub, backbone)
        tokens = {}
        for name, ref in refs.items():
            hub.load_into(model, ref, name=name)
            tokens[name] = text.Tokenization(tokenizer, pipelines.text_settings(model, name)[1])
    return model, tokens


def test_train_eval_predict_on_text_with_class_names(setup: tuple[Path, Path]):
    home, root = setup
    trained = run(home, "train", "senti/lora", "--backbone", "tb", "--data", str(root / "senti.csv"), "--epochs",
                  "8", "--lr", "0.03", "--rank", "4", "--max-length", "12")  # fmt: skip
    assert "registered senti/lora:1: test accuracy" in trained.output
    with Hub.open(home) as hub:
        metrics = {m.name: m.value for m in hub.metrics("senti/lora:1")}
    model, tokens = _loaded(home, "tb", {"a": "senti/lora:1"})
    meta = model.adapters["a"].metadata["text"]
    assert meta == {"classes": ["neg", "pos"], "max_length": 12}

    # the recorded test accuracy: the seeded 60/20/20 split, each text run alone
    rows = sentences(40, seed=1)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0)).tolist()
    test = [rows[i] for i in perm[32:]]
    logits = _alone(model, tokens["a"], "a", [t for t, _ in test])
    expected = sum(meta["classes"][int(lg.argmax())] == y for lg, (_, y) in zip(logits, test)) / len(test)
    assert metrics["test/accuracy"] == pytest.approx(expected)
    assert "val/accuracy" in metrics and metrics["train/steps"] == 8

    done = run(home, "eval", "senti/lora", "--data", str(root / "senti.csv"), "--split", "all")
    logits = _alone(model, tokens["a"], "a", [t for t, _ in rows])
    everything = sum(meta["classes"][int(lg.argmax())] == y for lg, (_, y) in zip(logits, rows)) / len(rows)
    assert done.output.strip() == f"senti/lora:1: all accuracy {everything:.2%}"

    new = sentences(8, seed=9)
    write_csv(root / "new.csv", new)
    shown = run(home, "predict", "senti/lora", "--data", str(root / "new.csv"))
    assert "predictions" in shown.output and " pos " in shown.output  # names, not indices
    out = root / "pred.csv"
    run(home, "predict", "senti/lora", "--data", str(root / "new.csv"), "-o", str(out))
    with out.open() as f:
        printed = list(csv.DictReader(f))
    logits = _alone(model, tokens["a"], "a", [t for t, _ in new])
    assert [r["predicted"] for r in printed] == [meta["classes"][int(lg.argmax())] for lg in logits]
    assert [(r["text"], r["label"], r["line"]) for r in printed] == [(t, y, str(i + 2)) for i, (t, y) in enumerate(new)]


def test_continuing_a_task_keeps_its_classes_in_their_order(setup: tuple[Path, Path]):
    """--from a version of the same task: the file's labels are read as that version's class names, so a file
    that holds only some of them (or would sort them otherwise) neither drops a class nor renumbers one."""
    home, root = setup
    run(home, "train", "senti/c", "--backbone", "tb", "--data", str(root / "senti.csv"), "--epochs", "1")
    only_pos = [(t, "pos") for t, _ in sentences(12, seed=4)]
    write_csv(root / "pos.csv", only_pos)
    run(home, "train", "senti/c", "--backbone", "tb", "--data", str(root / "pos.csv"), "--from", "senti/c:1",
        "--epochs", "1")  # fmt: skip
    model, _ = _loaded(home, "tb", {"c": "senti/c:2"})
    assert model.adapters["c"].metadata["text"]["classes"] == ["neg", "pos"]
    assert dict(model.adapters["c"].head_items())["classifier"].out_features == 2
    write_csv(root / "other.csv", [(t, "meh") for t, _ in sentences(12, seed=5)])
    refused(home, ["train", "senti/c", "--backbone", "tb", "--data", str(root / "other.csv"), "--from", "senti/c:1"],
            "label 'meh' is not one of the classes ['neg', 'pos']")


def test_from_records_lineage_and_a_mixed_file_is_routed_per_row(setup: tuple[Path, Path]):
    """GPT-2-like backbone: an adapter per task (names, indices), a transfer and a fine-tune with --from, and a
    predict over both tasks in one file whose rows are each routed to their task's version."""
    home, root = setup
    common = ["--backbone", "tg", "--epochs", "3", "--lr", "0.03"]  # --from keeps the parent's rank
    run(home, "train", "senti/g", "--data", str(root / "senti.csv"), "--rank", "2", *common)
    run(home, "train", "flags/g", "--data", str(root / "flags.jsonl"), "--from", "senti/g", *common)
    run(home, "train", "flags/g", "--data", str(root / "flags.jsonl"), "--from", "flags/g:1", *common)
    with Hub.open(home) as hub:
        edges = {(e.child, e.parent, e.relation) for e in hub.lineage("flags/g:2").edges}
        assert edges == {("flags/g:1", "senti/g:1", "transferred_from"), ("flags/g:2", "flags/g:1", "finetuned_from")}
        assert "transfer/start_accuracy" in {m.name for m in hub.metrics("flags/g:1")}
    model, tokens = _loaded(home, "tg", {"s": "senti/g:1", "f": "flags/g:2"})
    assert model.adapters["f"].metadata["text"] == {"classes": None, "max_length": 64}  # the model's 64 positions

    mixed = [(t, "senti", y) for t, y in sentences(5, seed=11)] + [(t, "flags", int(y == "pos"))
                                                                    for t, y in sentences(6, seed=12)]  # fmt: skip
    mixed = [mixed[i] for i in (0, 5, 6, 1, 7, 2, 8, 9, 3, 10, 4)]  # interleaved tasks
    write_csv(root / "mixed.csv", mixed, ("text", "task", "label"))
    routed = json.loads(run(home, "--json", "predict", "senti/g", "flags/g", "--data", str(root / "mixed.csv")).output)
    by_one = json.loads(run(home, "--json", "predict", "senti/g", "flags/g", "--data", str(root / "mixed.csv"),
                            "--one-by-one").output)  # fmt: skip
    names = {"senti": ("s", ["neg", "pos"]), "flags": ("f", None)}
    expected = []
    for t, task, _ in mixed:
        adapter, classes = names[task]
        index = int(_alone(model, tokens[adapter], adapter, [t])[0].argmax())
        expected.append(classes[index] if classes else index)
    assert [r["predicted"] for r in routed["predictions"]] == expected
    assert [r["predicted"] for r in by_one["predictions"]] == expected
    assert [r["ref"] for r in routed["predictions"]] == [{"senti": "senti/g:1", "flags": "flags/g:2"}[t]
                                                         for _, t, _ in mixed]  # fmt: skip
    for ref, task in (("senti/g:1", "senti"), ("flags/g:2", "flags")):
        pairs = [(p, y) for p, (_, k, y) in zip(expected, mixed) if k == task]
        assert routed["accuracy"][ref] == pytest.approx(sum(p == y for p, y in pairs) / len(pairs))


def test_bad_text_input_is_one_line_and_registers_nothing(setup: tuple[Path, Path], tmp_path: Path):
    home, root = setup
    run(home, "backbone", "add", "img", "resnet_small", "--num-classes", "2")
    train = ["train", "senti/x", "--epochs", "1"]
    (tmp_path / "images").mkdir()
    refused(home, [*train, "--backbone", "img", "--data", str(root / "senti.csv")],
            "backbone 'img' takes images: the data must be an ImageFolder directory, not the text data")  # fmt: skip
    refused(home, [*train, "--backbone", "tb", "--data", str(tmp_path / "images")],
            "backbone 'tb' is a Transformers backbone: the data must be a .csv or .jsonl file")  # fmt: skip
    refused(home, [*train, "--backbone", "img", "--data", str(tmp_path / "images"), "--max-length", "8"],
            "--max-length is for text data")  # fmt: skip
    refused(home, [*train, "--backbone", "tb", "--data", str(root / "senti.csv"), "--max-length", "65"],
            "--max-length 65 is more than backbone 'tb''s 64 positions")  # fmt: skip
    refused(home, [*train, "--backbone", "tb", "--data", str(tmp_path / "none.csv")], "does not exist")
    write_csv(tmp_path / "cols.csv", [("good", 1)], ("sentence", "y"))
    refused(home, [*train, "--backbone", "tb", "--data", str(tmp_path / "cols.csv")],
            "has no column text, label: it needs text, label (found: sentence, y)")  # fmt: skip
    refused(home, ["train", "flags/x", "--backbone", "tb", "--data", str(root / "senti.csv")],
            "senti.csv:2: label 'neg' is not a class index: the task has 2 classes")  # fmt: skip
    (tmp_path / "bad.jsonl").write_text('{"text": "good", "label": 1}\n{"text": oops}\n')
    refused(home, [*train, "--backbone", "tb", "--data", str(tmp_path / "bad.jsonl")], "bad.jsonl:2: not valid JSON")

    with Hub.open(home) as hub:  # two text versions on tb, registered through the library
        model = pipelines.model_for(hub, "tb")
        for task, classes in (("senti", ["neg", "pos"]), ("flags", None)):
            model.add_adapter(task, LoRAConfig(r=2, targets=hf.default_targets("bert"), heads=[hf.HEAD]),
                              head_modules={hf.HEAD: torch.nn.Linear(32, 2)})  # fmt: skip
            model.adapters[task].metadata = {"text": {"classes": classes, "max_length": 16}}
            hub.register(model, task, task=task, name="err")
    write_csv(tmp_path / "odd.csv", [("good film", "pos"), ("bad", "meh")])
    refused(home, ["eval", "senti/err", "--data", str(tmp_path / "odd.csv"), "--split", "all"],
            "odd.csv:3: label 'meh' is not one of the classes ['neg', 'pos']")  # fmt: skip
    refused(home, ["eval", "flags/err", "--data", str(tmp_path / "odd.csv"), "--split", "all"],
            "odd.csv:2: label 'pos' is not a class index: the task has 2 classes")  # fmt: skip
    refused(home, ["predict", "senti/err", "flags/err", "--data", str(tmp_path / "odd.csv")],
            "odd.csv has no task column: with several versions each row names its task (found: text, "
            "label)")  # fmt: skip
    refused(home, ["predict", "senti/err", "--data", str(tmp_path / "images")], "is not a .csv or .jsonl file")
    write_csv(tmp_path / "tasks.csv", [("good film", "nope")], ("text", "task"))
    refused(home, ["predict", "senti/err", "--data", str(tmp_path / "tasks.csv")], "names tasks ['nope'] that none")
    refused(home, [*train, "--backbone", "tb", "--data", str(root / "senti.csv"), "--targets", "*.attention.self"],
            "matches only layer types without a LoRA variant: BertSelfAttention (base.encoder.layer.0.attention.self), "
            "BertSelfAttention (base.encoder.layer.1.attention.self); supported: Linear")  # fmt: skip

    # a combined text adapter keeps the class names and max_length of the head it takes
    run(home, "combine", "senti/err", "flags/err", "--head", "senti/err", "-o", "senti/comb")
    model, _ = _loaded(home, "tb", {"c": "senti/comb:1"})
    assert model.adapters["c"].metadata["text"] == {"classes": ["neg", "pos"], "max_length": 16}

    refused(home, ["backbone", "add", "x", "--hf", str(tmp_path / "nothere")], "does not exist")
    refused(home, ["backbone", "add", "x", "resnet18", "--hf", str(root / "bert")], "--hf DIR takes no ARCHITECTURE")
    refused(home, ["backbone", "add", "x", "resnet18", "--pooling", "mean"], "--pooling is for a Transformers")
    from hf_helpers import bert_tokenizer
    from transformers import ElectraConfig, ElectraModel

    electra = tmp_path / "electra"
    ElectraModel(ElectraConfig(vocab_size=40, embedding_size=16, hidden_size=16, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=16)).save_pretrained(electra)  # fmt: skip
    bert_tokenizer().save_pretrained(electra)
    run(home, "backbone", "add", "el", "--hf", str(electra))
    refused(home, [*train, "--backbone", "el", "--data", str(root / "senti.csv")],
            "no default LoRA targets for model type 'electra'")  # fmt: skip


def test_a_bad_model_directory_is_one_line_in_a_real_process(tmp_path: Path):
    env = {**os.environ, "ADAPTER_HUB_HOME": str(tmp_path / "home")}
    env.pop("ADAPTER_HUB_DB", None)
    (tmp_path / "m").mkdir()
    args = [sys.executable, "-m", "adapter_hub.cli", "backbone", "add", "x", "--hf", str(tmp_path / "m")]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"Error: {tmp_path / 'm'} holds no config.json: it is not a Transformers model " \
        "directory"  # fmt: skip

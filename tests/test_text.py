"""Text data: CSV/JSONL rows, labels as indices or names, deterministic splits, tokenisation into right-padded
batches, and one clear line for every bad file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_helpers import bert_tokenizer, sentences, write_csv, write_jsonl

from adapter_hub import text
from adapter_hub.data import DataError

pytest.importorskip("transformers", reason="the Transformers tests need the hf extra (pip install 'adapter-hub[hf]')")


@pytest.fixture(scope="module")
def tokens() -> text.Tokenization:
    return text.Tokenization(bert_tokenizer(), max_length=6)


def test_csv_and_jsonl_give_the_same_dataset_and_the_split_is_seeded(tmp_path: Path, tokens: text.Tokenization):
    rows = sentences(20)
    a = text.load_text(write_csv(tmp_path / "d.csv", rows), tokens)
    b = text.load_text(write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": y, "x": 1} for t, y in rows]), tokens)
    assert a.classes == b.classes == ["neg", "pos"] and a.num_classes == 2
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0)).tolist()  # as load_imagefolder splits
    assert a.train.texts == [rows[i][0] for i in perm[:12]] == b.train.texts
    assert a.val.texts == [rows[i][0] for i in perm[12:16]] and a.test.texts == [rows[i][0] for i in perm[16:]]
    assert a.test.y.tolist() == [["neg", "pos"].index(rows[i][1]) for i in perm[16:]]
    assert len(a.split("all")) == 20 and a.split("all").texts[:12] == a.train.texts


def test_a_folder_of_train_val_test_files_is_taken_as_split(tmp_path: Path, tokens: text.Tokenization):
    write_csv(tmp_path / "train.csv", [("good film", "pos"), ("bad film", "neg")])
    write_jsonl(tmp_path / "val.jsonl", [{"text": "fine plot", "label": "pos"}])
    write_csv(tmp_path / "test.csv", [("awful", "mid")])  # a class only the test file has: numbered with the rest
    ds = text.load_text(tmp_path, tokens)
    assert ds.classes == ["mid", "neg", "pos"] and ds.train.y.tolist() == [2, 1] and ds.test.y.tolist() == [0]


def test_labels_are_indices_names_or_refused(tmp_path: Path):
    where = ["f:2", "f:3", "f:4"]
    assert text.class_indices([0, 2, 1], where) == ([0, 2, 1], None, 3)
    assert text.class_indices(["b", "a", "b"], where) == ([1, 0, 1], ["a", "b"], 2)
    assert text.class_indices([1, "a", 1], where) == ([0, 1, 0], ["1", "a"], 2)  # any name makes all names
    assert text.class_indices(["pos", "neg", "pos"], where, classes=["pos", "neg"]) == ([0, 1, 0], ["pos", "neg"], 2)
    assert [text.label_value(v, "f:1") for v in (3, "3", 3.0, " pos ", "-1")] == [3, 3, 3, "pos", -1]
    with pytest.raises(DataError, match=r"f:3: label 'pos' is not a class index: the task has 2 classes"):
        text.class_indices([0, "pos"], where[:2], num_classes=2)
    with pytest.raises(DataError, match=r"f:3: label 5 is outside the task's 2 classes \(0 to 1\)"):
        text.class_indices([0, 5], where[:2], num_classes=2)
    with pytest.raises(DataError, match=r"f:3: label 'meh' is not one of the classes \['neg', 'pos'\]"):
        text.class_indices(["pos", "meh"], where[:2], classes=["neg", "pos"])
    with pytest.raises(DataError, match=r"data.csv: too many classes \(20001\); at most 10000"):
        text.class_indices([0, 20000], where[:2], source="data.csv")
    with pytest.raises(DataError, match=r"the labels name 1 class\(es\); a classifier needs at least 2"):
        text.class_indices(["pos", "pos"], where[:2], min_classes=2)
    with pytest.raises(DataError, match="f:2: label -1 is negative"):
        text.class_indices([-1, 1], where[:2])
    with pytest.raises(DataError, match=r"f:1: label 1.5 is neither"):
        text.label_value(1.5, "f:1")
    with pytest.raises(DataError, match=r"f:1: a label is a whole number or a class name, got True"):
        text.label_value(True, "f:1")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.csv", None, "a.csv does not exist"),
        ("a.txt", "text,label\nx,1\n", "text data is a .csv or .jsonl file, got .txt"),
        ("a.csv", "", "is empty: a CSV file needs a header line"),
        ("a.csv", "text,label\n", "holds no rows"),
        ("a.csv", "sentence,y\nhello,1\n", "has no column text, label: it needs text, label (found: sentence, y)"),
        ("a.csv", "text,y\nhello,1\n", "has no column label: it needs text, label (found: text, y)"),
        ("a.csv", "text,label\nhello,1\nbye,\n", "a.csv:3: no label"),
        ("a.csv", "text,label\nhello,1\n  ,0\n", "a.csv:3: the text is empty"),
        ("a.csv", "text,label\nthe movie, was bad,neg\n", "a.csv:2: 3 fields for a header of 2 (quote a text"),
        ("a.jsonl", '{"text": "x", "label": 1}\n{"text": "y", "label": 0\n', "a.jsonl:2: not valid JSON"),
        ("a.jsonl", '{"text": "x", "label": 1}\n[1, 2]\n', "a.jsonl:2: expected a JSON object with text and label"),
        ("a.jsonl", '{"text": 5, "label": 1}\n', "a.jsonl:1: text must be a string, got 5"),
        ("a.jsonl", '{"txt": "x", "label": 1}\n', "has no column text: it needs text, label (found: txt, label)"),
        ("a.jsonl", "\n\n", "holds no rows"),
        ("a.csv", "text,label\nx,1\ny,2\n", "has 2 rows: too few for a val split"),
        ("a.csv", "text,label\n" + "".join(f"x{i},{i % 2}\n" for i in range(9)) + "y,pos\n",
         "is not a class index: the task has 2 classes"),
    ],
)
def test_a_bad_text_file_is_one_line(tmp_path: Path, tokens: text.Tokenization, name: str, content: str | None,
                                     message: str):  # fmt: skip
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content.encode())
    with pytest.raises(DataError) as info:
        text.load_text(path, tokens, num_classes=2 if "task has" in message else None)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_byte_order_mark_is_dropped_and_quoted_commas_are_text(tmp_path: Path, tokens: text.Tokenization):
    rows = "".join(f'"well, {w}",{w}\n' for w in ("good", "bad", "fine", "poor", "great", "awful"))
    (tmp_path / "a.csv").write_bytes(b"\xef\xbb\xbf" + f"text,label\n{rows}".encode())  # as Excel saves it
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(
        json.dumps({"text": f"well, {w}", "label": w}) + "\n" for w in ("good", "bad", "fine", "poor", "great", "awful")
    ).encode())  # fmt: skip
    from_csv, from_jsonl = text.load_text(tmp_path / "a.csv", tokens), text.load_text(tmp_path / "a.jsonl", tokens)
    assert sorted(from_csv.split("all").texts) == sorted(f"well, {w}" for w in ("good", "bad", "fine", "poor",
                                                                              "great", "awful"))  # fmt: skip
    assert from_csv.classes == from_jsonl.classes == sorted(["good", "bad", "fine", "poor", "great", "awful"])


def test_a_file_that_is_not_utf8_and_a_folder_without_split_files(tmp_path: Path, tokens: text.Tokenization):
    (tmp_path / "a.csv").write_bytes(b"text,label\n\xff\xfe,1\n")
    with pytest.raises(DataError, match="is not UTF-8 text"):
        text.load_text(tmp_path / "a.csv", tokens)
    folder = tmp_path / "f"
    folder.mkdir()
    write_csv(folder / "train.csv", [("good", 1), ("bad", 0)])
    write_csv(folder / "val.csv", [("good", 1)])
    with pytest.raises(DataError, match="has no test file: a text data folder holds one each of train, val and test"):
        text.load_text(folder, tokens)


def test_batches_are_padded_right_to_their_longest_row_and_truncated(tokens: text.Tokenization):
    tok = tokens.tokenizer
    rows = tokens.encode(["good", "the movie was really very good indeed"])
    assert [len(r["input_ids"]) for r in rows] == [3, 6]  # [CLS] good [SEP]; cut at max_length 6
    assert rows[1]["input_ids"] == tok("the movie was really very good indeed", truncation=True, max_length=6)[
        "input_ids"]  # fmt: skip
    batch = tokens.pad(rows)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
    assert batch["input_ids"][0].tolist() == rows[0]["input_ids"] + [tok.pad_token_id] * 3
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    split = text.TextSplit(["good", "x y"], rows, torch.tensor([1, 0]), tokens)
    (inputs, y), = list(split.batches(8))
    assert torch.equal(inputs["input_ids"], batch["input_ids"]) and y.tolist() == [1, 0]

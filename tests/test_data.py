"""The digits domains (real images, shifted) and ImageFolder trees."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sklearn.datasets import load_digits

from adapter_hub import data
from adapter_hub.data import DataError


def test_digits_domains_are_the_real_images_shifted():
    raw = torch.tensor(load_digits().images, dtype=torch.float32) / 16.0
    ds = data.digits("original", pool="all", seed=3)
    rot = data.digits("rotated", pool="all", seed=3)
    inv = data.digits("inverted", pool="all", seed=3)
    assert ds.train.x.shape[1:] == (3, 8, 8) and len(ds.train) + len(ds.val) + len(ds.test) == len(raw)
    # every training image is one of scikit-learn's digits, with its own label
    flat = raw.flatten(1)
    for img, label in list(zip(ds.train.x[:20], ds.train.y[:20])):
        match = (flat == img[0].flatten()).all(1).nonzero().flatten()
        assert len(match) >= 1 and int(load_digits().target[match[0]]) == int(label)
    torch.testing.assert_close(rot.train.x, torch.rot90(ds.train.x, 1, dims=(-2, -1)))
    torch.testing.assert_close(inv.train.x, 1 - ds.train.x)


def test_parity_labels_pools_and_noise():
    digit = data.digits("noisy", seed=1)
    parity = data.digits("noisy", labels="parity", seed=1)
    assert torch.equal(parity.train.y, digit.train.y % 2) and parity.num_classes == 2
    assert torch.equal(digit.train.x, data.digits("noisy", seed=1).train.x), "seeded noise is reproducible"
    source, target = data.digits(pool="source"), data.digits(pool="target")
    src = {tuple(x.flatten().tolist()) for s in (source.train, source.val, source.test) for x in s.x}
    tgt = {tuple(x.flatten().tolist()) for s in (target.train, target.val, target.test) for x in s.x}
    assert len(src & tgt) <= 5, "the pools are disjoint halves (a few digits appear twice in the data set)"
    with pytest.raises(DataError, match="unknown digits domain 'upside'"):
        data.digits("upside")


def test_imagefolder_round_trip_and_bad_directories(tmp_path: Path):
    ds = data.digits("rotated", pool="target")
    small = data.Dataset(*(data.Split(s.x[:30], s.y[:30]) for s in (ds.train, ds.val, ds.test)), 10, "x")
    root = data.write_imagefolder(small, tmp_path / "rot")
    back = data.load_imagefolder(root)
    classes = sorted({int(y) for y in small.train.y})
    # ImageFolder orders files by class folder: compare as sorted multisets of (label, image)
    for a, b in [(small.train, back.train), (small.test, back.test)]:
        ka = sorted((classes.index(int(y)), x[0].mul(255).round().flatten().tolist()) for x, y in zip(a.x, a.y))
        kb = sorted((int(y), x[0].mul(255).round().flatten().tolist()) for x, y in zip(b.x, b.y))
        assert [k for k, _ in ka] == [k for k, _ in kb]
        assert all(max(abs(u - v) for u, v in zip(p, q)) <= 1 for (_, p), (_, q) in zip(ka, kb))
    with pytest.raises(DataError, match="classes, the task expects 2"):
        data.load_imagefolder(root, num_classes=2)
    with pytest.raises(DataError, match="does not exist"):
        data.load_imagefolder(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError):
        data.load_imagefolder(tmp_path / "empty")


def _grey_tree(root: Path, splits: dict[str, dict[str, int]]) -> dict[int, str]:
    """Write ``root/<split>/<class>/<i>.png``, one solid grey 4×4 image per file, every file its own grey level;
    returns grey level -> class folder name, so a loaded image says which folder it came from."""
    from PIL import Image

    folder_of: dict[int, str] = {}
    for split, counts in splits.items():
        for name, count in counts.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                level = 10 + 5 * len(folder_of)  # distinct, and far apart after the /255 round trip
                Image.new("L", (4, 4), level).save(root / split / name / f"{i}.png")
                folder_of[level] = name
    return folder_of


def test_imagefolder_splits_keep_the_training_numbering(tmp_path: Path):
    """val lacks class 03 and test lacks 00 and 02: every image's label is still its folder's number,
    the training split's (ImageFolder alone would number val's 04 as 3)."""
    classes = ["00", "01", "02", "03", "04"]
    folder_of = _grey_tree(tmp_path, {
        "train": {c: 2 for c in classes},
        "val": {"00": 1, "01": 2, "02": 1, "04": 3},
        "test": {"01": 1, "03": 2, "04": 1},
    })  # fmt: skip
    loaded = data.load_imagefolder(tmp_path, num_classes=5)
    assert loaded.num_classes == 5
    for split, n, present in [("train", 10, set(classes)), ("val", 7, {"00", "01", "02", "04"}),
                              ("test", 4, {"01", "03", "04"})]:  # fmt: skip
        s = loaded.split(split)
        assert len(s) == n and s.x.shape[1:] == (3, 4, 4)
        names = [folder_of[round(float(x[0, 0, 0]) * 255)] for x in s.x]  # which file each image is
        assert set(names) == present
        assert s.y.tolist() == [int(name) for name in names], split
    assert 4 in loaded.val.y.tolist() and 3 not in loaded.val.y.tolist()


def test_imagefolder_named_classes_number_from_the_training_split(tmp_path: Path):
    """Class names that are not numbers: the label is the folder's place among train's sorted folders."""
    train = ["cat", "dog", "eel", "fox"]
    folder_of = _grey_tree(tmp_path, {"train": {c: 1 for c in train}, "val": {"eel": 2, "fox": 1},
                                      "test": {"dog": 1, "fox": 2}})  # fmt: skip
    loaded = data.load_imagefolder(tmp_path)
    for s in (loaded.val, loaded.test):
        names = [folder_of[round(float(x[0, 0, 0]) * 255)] for x in s.x]
        assert s.y.tolist() == [train.index(name) for name in names] and min(s.y.tolist()) >= 1


def test_imagefolder_refuses_a_class_the_training_split_lacks(tmp_path: Path):
    _grey_tree(tmp_path / "a", {"train": {"00": 1, "01": 1}, "val": {"00": 1}, "test": {"01": 1, "05": 1}})
    with pytest.raises(DataError) as caught:
        data.load_imagefolder(tmp_path / "a")
    message = str(caught.value)
    assert "\n" not in message
    assert message == (f"{tmp_path / 'a' / 'test'} has class folder ['05'] that the training split does not have "
                       "(training classes: ['00', '01'])")  # fmt: skip
    # many training classes: the message names the first 20 and counts the rest
    many = {f"c{i:02d}": 1 for i in range(25)}
    _grey_tree(tmp_path / "b", {"train": many, "val": {"c00": 1, "x": 1, "y": 1}, "test": {"c01": 1}})
    with pytest.raises(DataError, match=r"val has class folders \['x', 'y'\] .*'c19'\] and 5 more\)$"):
        data.load_imagefolder(tmp_path / "b")


def test_imagefolder_bad_files_and_missing_splits_are_one_line(tmp_path: Path):
    _grey_tree(tmp_path / "a", {"train": {"00": 1, "01": 1}, "val": {"00": 1}})
    with pytest.raises(DataError, match=r"test: .*No such file") as caught:
        data.load_imagefolder(tmp_path / "a")
    assert "\n" not in str(caught.value)
    _grey_tree(tmp_path / "b", {"train": {"00": 1, "01": 1}, "val": {"00": 1}, "test": {"01": 1}})
    (tmp_path / "b" / "val" / "00" / "0.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"0\.png: not a readable image \(") as caught:
        data.load_imagefolder(tmp_path / "b")
    assert "\n" not in str(caught.value)
    (tmp_path / "b" / "val" / "00" / "0.png").unlink()  # a class folder with no image in it
    with pytest.raises(DataError, match=r"val: Found no valid file for the classes 00"):
        data.load_imagefolder(tmp_path / "b")


def test_imagefolder_classes_named_by_numbers_are_their_own_labels_as_predict_reads_them(tmp_path: Path):
    """Unpadded 0..11: sorted as text, ImageFolder would number folder 10 as 2; training and predict must both
    read it as class 10, or every accuracy predict reports for such a task is silently wrong."""
    from adapter_hub.predict import _from_folders

    names = [str(i) for i in range(12)]
    folder_of = _grey_tree(tmp_path / "a", {s: {c: 1 for c in names} for s in ("train", "val", "test")})
    loaded = data.load_imagefolder(tmp_path / "a", num_classes=12)
    for s in (loaded.train, loaded.val, loaded.test):
        got = [folder_of[round(float(x[0, 0, 0]) * 255)] for x in s.x]
        assert s.y.tolist() == [int(name) for name in got] and 10 in s.y.tolist()
    items = _from_folders(tmp_path / "a", ["test"])  # the task folder "test", its class folders 0..11
    assert sorted((it.path.parent.name, it.label) for it in items if it.task == "test") == sorted(
        (n, int(n)) for n in names
    )
    # numbers that are not 0..N-1 once each cannot be the labels: refused, saying why
    _grey_tree(tmp_path / "b", {"train": {str(i): 1 for i in range(1, 11)}})
    with pytest.raises(DataError, match=r"must be 0\.\.9 once each for 10 classes; found \['1', '10', '2'"):
        data.load_imagefolder(tmp_path / "b")
    _grey_tree(tmp_path / "c", {"train": {"0": 1, "1": 1, "01": 1}})
    with pytest.raises(DataError, match="class folders named by numbers are the class indices"):
        data.load_imagefolder(tmp_path / "c")

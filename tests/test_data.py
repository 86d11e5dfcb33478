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

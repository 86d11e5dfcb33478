"""The input transform an image backbone records (size, resize, interpolation, mean, std): read off
torchvision's weights enums (compared with the enums' own transforms, nothing downloaded), checked, kept in
the registry's source, and applied where images enter: train, eval and predict, and tensor batches.

What the backbone sees is recorded by a forward pre-hook on every ResNet and compared, row by row, with
images transformed by hand: PIL's resize, a crop at torchvision's rounded offsets, /255, (x − mean) / std."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.models import EfficientNet_B0_Weights, ResNet18_Weights, ViT_B_16_Weights
from torchvision.models.resnet import ResNet
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from adapter_hub import Hub, backbones, data, pipelines, predict
from adapter_hub.errors import BackboneError, ConfigError

MEAN, STD = (0.2, 0.4, 0.6), (0.5, 0.25, 0.125)  # far from 0/1 in every channel: a missed step shows


# -- references, computed by hand ----------------------------------------------------------------------------


def by_hand(path: Path, size: int | None, mean: Any = None, std: Any = None, resize: int | None = None) -> torch.Tensor:
    """An image file as a backbone with these inputs should see it, without adapter_hub or torchvision: PIL's
    bilinear resize of the shorter side, the centre crop at round((H − size) / 2), /255, (x − mean) / std."""
    with Image.open(path) as img:
        img = img.convert("RGB")
    if size is not None:
        side = resize or size
        w, h = img.size
        long = int(side * max(w, h) / min(w, h))
        img = img.resize((side, long) if w <= h else (long, side), Image.BILINEAR)
        w, h = img.size
        left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    if mean is not None:
        x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return x


def files(split_dir: Path) -> list[Path]:
    """An ImageFolder split's files in ImageFolder's order (class folders sorted, then files sorted)."""
    return sorted(split_dir.rglob("*.png"))


@contextmanager
def backbone_inputs() -> Iterator[list[tuple[torch.Tensor, bool, bool]]]:
    """Every batch a ResNet is called with, while inside: (inputs, training mode, grad enabled)."""
    seen: list[tuple[torch.Tensor, bool, bool]] = []

    def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if isinstance(module, ResNet):
            seen.append((args[0].detach().clone(), module.training, torch.is_grad_enabled()))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def matches(rows: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """For each row, the index of the reference row it equals (to float32 rounding); fails if any has none."""
    gaps = (rows.flatten(1)[:, None, :] - reference.flatten(1)[None, :, :]).abs().amax(-1)
    best = gaps.min(1)
    assert float(best.values.max()) < 1e-5, f"a row the backbone saw is no reference image: {best.values.max()}"
    return best.indices


# -- the weights' transform ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("architecture", "name", "member"),
    [
        ("resnet18", "DEFAULT", ResNet18_Weights.DEFAULT),
        ("resnet18", "ResNet18_Weights.IMAGENET1K_V1", ResNet18_Weights.IMAGENET1K_V1),
        ("vit_b_16", "IMAGENET1K_SWAG_E2E_V1", ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1),  # 384 px, bicubic
        ("efficientnet_b0", "DEFAULT", EfficientNet_B0_Weights.DEFAULT),
    ],
)
def test_weights_inputs_are_the_enums_own(
    architecture: str, name: str, member: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # a download would land here
    preset = member.transforms()
    got = backbones.weights_inputs(architecture, name)
    assert got.size == preset.crop_size[0] and got.resize == preset.resize_size[0]
    assert got.mean == pytest.approx(tuple(preset.mean)) and got.std == pytest.approx(tuple(preset.std))
    assert got.interpolation == preset.interpolation.value
    assert not (tmp_path / "torch").exists()  # only the enum's metadata was read


def test_weights_inputs_refusals() -> None:
    with pytest.raises(BackboneError, match=r"resnet18 has no torchvision weights 'NOPE' \(its weights: DEFAULT, "):
        backbones.weights_inputs("resnet18", "NOPE")
    with pytest.raises(BackboneError, match="torchvision.models architecture, not 'resnet_small'"):
        backbones.weights_inputs("resnet_small", "DEFAULT")
    with pytest.raises(BackboneError, match="not 'helpers:tiny_backbone'"):
        backbones.weights_inputs("helpers:tiny_backbone", "DEFAULT")


def test_choose_inputs_given_values_override_the_weights() -> None:
    source = {"architecture": "resnet18", "torchvision_weights": "DEFAULT"}
    preset = ResNet18_Weights.DEFAULT.transforms()
    weights = backbones.choose_inputs(source)
    assert (weights.size, weights.resize) == (preset.crop_size[0], preset.resize_size[0])
    sized = backbones.choose_inputs(source, image_size=64)  # the whole image at 64: no 256→224 margin
    assert (sized.size, sized.resize, sized.mean) == (64, 64, weights.mean)
    mean_only = backbones.choose_inputs(source, mean=0.5)  # the weights' std stays
    assert mean_only.mean == (0.5, 0.5, 0.5) and mean_only.std == pytest.approx(tuple(preset.std))
    assert backbones.choose_inputs({"architecture": "resnet18"}).empty
    with pytest.raises(ConfigError, match="std must be greater than 0"):  # said before the weights are read
        backbones.choose_inputs({**source, "torchvision_weights": "NOPE"}, std=0)


# -- the values and their checks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 0}, "image size must be at least 1 and at most 4096, got 0"),
        ({"size": 4097}, "image size must be at least 1 and at most 4096, got 4097"),
        ({"size": 2.5}, "image size must be a whole number"),
        ({"mean": [0.5, 0.5], "std": 1}, "mean takes 3 numbers"),
        ({"mean": [0.5] * 4, "std": 1}, "mean takes 3 numbers"),
        ({"mean": float("nan"), "std": 1}, "mean must be a finite number, got nan"),
        ({"mean": "0.5", "std": 1}, "mean must be a number"),
        ({"mean": 0, "std": [1, 0, 1]}, r"std must be greater than 0 in every channel, got \[1.0, 0.0, 1.0\]"),
        ({"mean": 0, "std": -1}, "std must be greater than 0"),
        ({"mean": 0, "std": float("inf")}, "std must be a finite number"),
        ({"mean": 0.5}, "mean and std go together"),
        ({"std": 0.5}, "mean and std go together"),
        ({"size": 8, "resize": 4}, "resize must be at least 8"),
        ({"resize": 8}, "a resize needs an image size"),
        ({"size": 8, "interpolation": "nearest"}, "interpolation must be bilinear or bicubic"),
    ],
)
def test_bad_values_are_one_line(kwargs: dict[str, Any], message: str) -> None:
    size = kwargs.pop("size", None)
    with pytest.raises(ConfigError, match=message) as caught:
        data.ImageInputs.of(size, **kwargs)
    assert "\n" not in str(caught.value)


def test_one_number_is_every_channel_and_json_round_trips() -> None:
    inputs = data.ImageInputs.of(32, 0.5, [0.2, 0.3, 0.4], resize=40, interpolation="bicubic")
    assert inputs.mean == (0.5, 0.5, 0.5) and inputs.std == (0.2, 0.3, 0.4)
    assert data.ImageInputs.from_json(inputs.to_json()) == inputs
    assert data.ImageInputs.from_json(None) == data.ImageInputs() and data.ImageInputs().empty
    assert data.ImageInputs.from_json({"size": 8}) == data.ImageInputs.of(8)  # resize defaults to size
    with pytest.raises(ConfigError, match=r"unknown keys \['crop'\]"):
        data.ImageInputs.from_json({"size": 8, "crop": 4})
    with pytest.raises(BackboneError, match="backbone 'b' records inputs that do not hold: image size"):
        backbones.recorded_inputs(type("Record", (), {"name": "b", "source": {"inputs": {"size": -1}}})())


# -- tensors and files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_batch_transform_is_torchvisions(mode: str) -> None:
    x = torch.rand(4, 3, 20, 13, generator=torch.Generator().manual_seed(0))  # not square: resize, then crop
    got = data.transform_images(x, data.ImageInputs.of(8, MEAN, STD, resize=11, interpolation=mode))
    resized = TF.resize(x, [11], interpolation=InterpolationMode(mode), antialias=True)
    want = TF.normalize(TF.center_crop(resized, [8]), list(MEAN), list(STD))
    assert got.shape == (4, 3, 8, 8)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert float(want.abs().min()) >= 0 and float(want.abs().max()) > 1  # normalised: values outside [0, 1]
    assert data.transform_images(x, None) is x and data.transform_images(x, data.ImageInputs()) is x


def test_digits_dataset_transformed_as_each_image_by_hand() -> None:
    """The built-in digits (3×8×8 tensors in [0, 1]) go to 32 px as each image alone would, normalised."""
    ds = data.digits("original", pool="source")
    small = data.Dataset(*(data.Split(s.x[:5], s.y[:5]) for s in (ds.train, ds.val, ds.test)), 10, "d")
    inputs = data.ImageInputs.of(32, MEAN, STD)
    out = data.transform_dataset(small, inputs, batch_size=2)  # batches of 2 and a rest
    for before, after in zip((small.train, small.val, small.test), (out.train, out.val, out.test)):
        assert torch.equal(after.y, before.y)
        for x, y in zip(before.x, after.x):
            want = TF.normalize(TF.resize(x[None], [32], antialias=True), list(MEAN), list(STD))[0]
            torch.testing.assert_close(y, want, rtol=0, atol=1e-6)
    assert data.transform_dataset(small, data.ImageInputs()) is small


def test_load_imagefolder_transforms_as_by_hand(tmp_path: Path) -> None:
    """Non-square colour images through load_imagefolder(inputs=) equal the PIL-by-hand reference."""
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for label in ("00", "01"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i, (h, w) in enumerate([(14, 9), (10, 17)]):
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    inputs = data.ImageInputs.of(6, MEAN, STD, resize=8)
    loaded = data.load_imagefolder(tmp_path, inputs=inputs)
    for split in ("train", "val", "test"):
        want = torch.stack([by_hand(p, 6, MEAN, STD, resize=8) for p in files(tmp_path / split)])
        torch.testing.assert_close(loaded.split(split).x, want, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="give size or inputs, not both"):
        data.load_imagefolder(tmp_path, size=8, inputs=inputs)


# -- the registry and the pipelines --------------------------------------------------------------------------


def fake_cached_weights(torch_home: Path, member: Any, architecture: str) -> None:
    """torchvision's cache holding a file for MEMBER (a seeded model's own weights): torchvision loads a cached
    file without downloading, so building with torchvision_weights works offline."""
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = torchvision.models.get_model(architecture, num_classes=len(member.meta["categories"]))
    torch.save(model.state_dict(), folder / Path(member.url).name)


def test_recorded_inputs_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    fake_cached_weights(tmp_path / "torch", torchvision.models.SqueezeNet1_1_Weights.DEFAULT, "squeezenet1_1")
    preset = torchvision.models.SqueezeNet1_1_Weights.DEFAULT.transforms()
    with Hub.open(tmp_path / "home") as hub:
        given = pipelines.add_image_backbone(hub, "rs", "resnet_small", num_classes=10, image_size=32, mean=MEAN,
                                             std=0.5)  # fmt: skip
        weighted = pipelines.add_image_backbone(hub, "sq", "squeezenet1_1", torchvision_weights="DEFAULT", std=0.3)
        bare = pipelines.add_image_backbone(hub, "plain", "resnet_small", num_classes=10)
    with Hub.open(tmp_path / "home") as hub:  # read back from the database
        rs, sq, plain = hub.backbone("rs"), hub.backbone("sq"), hub.backbone("plain")
    assert rs.source["inputs"] == {"size": 32, "resize": 32, "interpolation": "bilinear", "mean": list(MEAN),
                                   "std": [0.5, 0.5, 0.5]}  # fmt: skip
    assert backbones.recorded_inputs(rs) == data.ImageInputs.of(32, MEAN, 0.5)
    assert sq.source["torchvision_weights"] == "DEFAULT"
    assert sq.source["inputs"] == {"size": preset.crop_size[0], "resize": preset.resize_size[0],
                                   "interpolation": preset.interpolation.value, "mean": list(preset.mean),
                                   "std": [0.3, 0.3, 0.3]}  # fmt: skip
    # without any of it: the source today's CLI wrote, and images as they are
    assert plain.source == {"architecture": "resnet_small", "weights": None, "seed": 0, "num_classes": 10}
    assert backbones.recorded_inputs(plain).empty
    for record in (given, weighted, bare):
        assert record.source == {"rs": rs, "sq": sq, "plain": plain}[record.name].source


def test_add_image_backbone_refuses_before_building(tmp_path: Path) -> None:
    with Hub.open(tmp_path / "home") as hub:
        with pytest.raises(ConfigError, match="image size must be at least 1"):
            pipelines.add_image_backbone(hub, "rs", "resnet_small", num_classes=10, image_size=0)
        with pytest.raises(BackboneError, match="resnet18 has no torchvision weights 'NOPE'"):
            pipelines.add_image_backbone(hub, "r", "resnet18", torchvision_weights="NOPE")
        with pytest.raises(ConfigError, match="local weights or torchvision weights, not both"):
            pipelines.add_image_backbone(hub, "r", "resnet18", weights=str(tmp_path), torchvision_weights="DEFAULT")
        assert hub.backbones() == []


@pytest.fixture(scope="module")
def digits_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small digits ImageFolder (8×8 PNGs; train 48, val 16, test 16) and the same test images as a predict
    folder (one folder per task)."""
    root = tmp_path_factory.mktemp("inputs")
    ds = data.digits("original", pool="target")
    small = data.Dataset(*(data.Split(s.x[:n], s.y[:n]) for s, n in ((ds.train, 48), (ds.val, 16), (ds.test, 16))),
                         10, "d")  # fmt: skip
    folder = data.write_imagefolder(small, root / "digits")
    shutil.copytree(folder / "test", root / "predict" / "digits")
    return folder, root / "predict"


@pytest.mark.parametrize(
    ("options", "size", "mean", "std"),
    [({"image_size": 16, "mean": MEAN, "std": STD}, 16, MEAN, STD), ({}, None, None, None)],
    ids=["recorded", "none-recorded"],
)
def test_train_eval_predict_feed_the_backbone_its_inputs(
    digits_folders: tuple[Path, Path], tmp_path: Path, options: dict[str, Any], size: int | None, mean: Any, std: Any
) -> None:
    """The backbone sees, in every training step (training mode, gradients on), in validation, in eval and in
    predict, exactly the images transformed by hand; a backbone without recorded inputs sees the 8×8 images
    in [0, 1], as before. Accuracies and predictions equal the model's on the hand-made tensors."""
    folder, predict_dir = digits_folders
    splits = ("train", "val", "test")
    reference = {s: torch.stack([by_hand(p, size, mean, std) for p in files(folder / s)]) for s in splits}
    side = size or 8
    with Hub.open(tmp_path / "home") as hub:
        pipelines.add_image_backbone(hub, "rs", "resnet_small", num_classes=10, **options)
        hub.add_task("digits", num_classes=10)
        with backbone_inputs() as seen:
            version = pipelines.train_adapter(hub, "digits/lora", backbone="rs", data_dir=str(folder), epochs=1,
                                              progress=False)  # fmt: skip
        assert version is not None
        steps = [x for x, training, grad in seen if training and grad]
        assert steps and all(x.shape[1:] == (3, side, side) for x, _, _ in seen)
        trained_on = matches(torch.cat(steps), reference["train"])
        assert sorted(trained_on.tolist()) == list(range(len(reference["train"])))  # each train image once
        matches(torch.cat([x for x, training, _ in seen if not training]), torch.cat(list(reference.values())))

        model = pipelines.model_for(hub, version)
        hub.load_into(model, version.ref, name="adapter")
        model.activate("adapter")
        model.eval()
        with torch.no_grad():
            hand = model(reference["test"]).argmax(-1)
        present = sorted({p.parent.name for p in files(folder / "train")})  # the training split's numbering
        labels = torch.tensor([present.index(p.parent.name) for p in files(folder / "test")])

        with backbone_inputs() as seen:
            _, accuracy = pipelines.evaluate_ref(hub, version.ref, str(folder), split="test")
        torch.testing.assert_close(torch.cat([x for x, _, _ in seen]), reference["test"], rtol=0, atol=1e-5)
        assert accuracy == pytest.approx(float((hand == labels).float().mean()))

        with backbone_inputs() as seen:
            result = predict.predict_refs(hub, [version.ref], predict_dir)
        by_file = {p.relative_to(predict_dir / "digits"): i for i, p in enumerate(files(predict_dir / "digits"))}
        order = [by_file[it.path.relative_to(predict_dir / "digits")] for it in result.items]
        torch.testing.assert_close(torch.cat([x for x, _, _ in seen]), reference["test"][order], rtol=0, atol=1e-5)
        assert result.predicted == hand[order].tolist()

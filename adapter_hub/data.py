"""Data: the built-in digits domains (real handwritten digits, shifted) and any ImageFolder directory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .errors import AdapterHubError


class DataError(AdapterHubError, ValueError):
    """A data directory that is missing, empty or does not fit the task."""


def _rotated(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.rot90(x, 1, dims=(-2, -1))


def _inverted(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return 1.0 - x


def _noisy(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return (x + 0.35 * torch.randn(x.shape, generator=g)).clamp(0, 1)


def _scaled(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    big = F.interpolate(x, scale_factor=1.5, mode="bilinear", align_corners=False)  # 12×12, zoomed in
    return big[..., 2:10, 2:10]


# Each shift is a deterministic function of the images (and a seeded generator for the noise).
DOMAINS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "original": lambda x, g: x,
    "rotated": _rotated,
    "inverted": _inverted,
    "noisy": _noisy,
    "scaled": _scaled,
    "rotated-noisy": lambda x, g: _noisy(_rotated(x, g), g),
}
LABELS = ("digit", "parity")


@dataclass(frozen=True)
class Split:
    """Images (N, 3, H, W) in [0, 1] and integer labels."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, size: int, *, shuffle: bool = False, generator: torch.Generator | None = None):
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for i in range(0, len(self), size):
            rows = order[i : i + size]
            yield self.x[rows], self.y[rows]


@dataclass(frozen=True)
class Dataset:
    train: Split
    val: Split
    test: Split
    num_classes: int
    name: str

    def split(self, name: str) -> Split:
        """``train``, ``val``, ``test``, or ``all`` (the three together)."""
        if name == "all":
            parts = (self.train, self.val, self.test)
            return Split(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))
        if name not in ("train", "val", "test"):
            raise DataError(f"split must be train, val, test or all, got {name!r}")
        return getattr(self, name)


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()  # 1,797 real 8×8 handwritten digits, shipped with scikit-learn
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(digits.target, dtype=torch.long)


def digits(
    domain: str = "original",
    *,
    labels: str = "digit",
    pool: str = "all",
    seed: int = 0,
    fractions: tuple[float, float] = (0.6, 0.2),
) -> Dataset:
    """scikit-learn's digits under a domain shift, split train/val/test with a seeded permutation.

    ``pool="source"`` / ``"target"`` take two disjoint halves of the 1,797 images, so that a backbone
    trained on the source pool never saw the target tasks' images in any domain.
    """
    if domain not in DOMAINS:
        raise DataError(f"unknown digits domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    if labels not in LABELS:
        raise DataError(f"unknown digits labels {labels!r}; choose one of {', '.join(LABELS)}")
    x, y = _digits()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))  # fixed pools
    half = len(y) // 2
    rows = {"all": order, "source": order[:half], "target": order[half:]}.get(pool)
    if rows is None:
        raise DataError(f"unknown pool {pool!r}; choose all, source or target")
    x, y = x[rows], y[rows]
    g = torch.Generator().manual_seed(seed)
    x = DOMAINS[domain](x, g).expand(-1, 3, -1, -1).contiguous()
    if labels == "parity":
        y = y % 2
    perm = torch.randperm(len(y), generator=g)
    n_train, n_val = int(fractions[0] * len(y)), int(fractions[1] * len(y))
    parts = perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]
    splits = [Split(x[p], y[p]) for p in parts]
    return Dataset(*splits, num_classes=10 if labels == "digit" else 2, name=f"digits-{domain}")


def write_imagefolder(dataset: Dataset, directory: str | Path) -> Path:
    """Write ``train/``, ``val/`` and ``test/`` ImageFolder trees of PNG files (one folder per class)."""
    from torchvision.utils import save_image

    root = Path(directory)
    for split_name in ("train", "val", "test"):
        split: Split = getattr(dataset, split_name)
        for i, (img, label) in enumerate(zip(split.x, split.y.tolist())):
            folder = root / split_name / f"{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            save_image(img, folder / f"{i:05d}.png")
    return root


def _rgb(image: Any) -> Any:
    return image.convert("RGB")  # grey images get three equal channels; colour stays colour


def image_transform(size: int | None = None) -> Callable[[Any], torch.Tensor]:
    """PIL image -> 3-channel tensor in [0, 1], resized (shorter side) to ``size`` when given."""
    from torchvision import transforms

    steps: list[Any] = [_rgb] if size is None else [_rgb, transforms.Resize(size), transforms.CenterCrop(size)]
    return transforms.Compose([*steps, transforms.ToTensor()])


def load_imagefolder(
    directory: str | Path, *, num_classes: int | None = None, size: int | None = None, seed: int = 0
) -> Dataset:
    """An ImageFolder directory: ``train/``, ``val/``, ``test/`` subfolders, or one folder of classes
    split 60/20/20 with a seeded permutation. Images become 3-channel tensors in [0, 1]."""
    from torchvision import datasets

    root = Path(directory)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist")
    tf = image_transform(size)

    def read(path: Path) -> tuple[Split, list[str]]:
        try:
            folder = datasets.ImageFolder(str(path), transform=tf)
        except (FileNotFoundError, RuntimeError) as exc:
            raise DataError(f"{path}: {str(exc).splitlines()[0]}") from None
        if len(folder) == 0:
            raise DataError(f"{path} holds no images")
        xs, ys = zip(*(folder[i] for i in range(len(folder))))
        return Split(torch.stack(xs), torch.tensor(ys)), folder.classes

    if (root / "train").is_dir():
        (train, classes), (val, _), (test, _) = (read(root / s) for s in ("train", "val", "test"))
    else:
        whole, classes = read(root)
        perm = torch.randperm(len(whole), generator=torch.Generator().manual_seed(seed))
        a, b = int(0.6 * len(perm)), int(0.8 * len(perm))
        train, val, test = (Split(whole.x[p], whole.y[p]) for p in (perm[:a], perm[a:b], perm[b:]))
    if num_classes is not None and len(classes) != num_classes:
        raise DataError(f"{root} has {len(classes)} classes, the task expects {num_classes}")
    return Dataset(train, val, test, num_classes=len(classes), name=root.name)

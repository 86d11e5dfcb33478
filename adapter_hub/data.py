"""Data: the built-in digits domains (real handwritten digits, shifted), any ImageFolder directory, and the
input transform a backbone expects (resize, centre crop, normalisation) for images and tensor batches."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import checks
from .errors import AdapterHubError, ConfigError


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
    seed = checks.seed(seed)
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
    """Write ``train/``, ``val/`` and ``test/`` ImageFolder trees of PNG files (one folder per class) into
    ``directory``: a new folder (its parent must exist) or an empty one — images written over an earlier tree
    would mix with what is left of it."""
    from torchvision.utils import save_image

    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise DataError(f"{root} is a file, not a folder")
    if root.is_dir() and any(root.iterdir()):
        raise DataError(f"{root} is not empty: write the images into a new or empty folder")
    if not root.is_dir():
        checks.writable_file(root, "output folder")  # its parent exists and may be written
    elif not os.access(root, os.W_OK | os.X_OK):
        raise DataError(f"{root} is not writable")
    for split_name in ("train", "val", "test"):
        split: Split = getattr(dataset, split_name)
        for i, (img, label) in enumerate(zip(split.x, split.y.tolist())):
            folder = root / split_name / f"{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            save_image(img, folder / f"{i:05d}.png")
    return root


def _rgb(image: Any) -> Any:
    return image.convert("RGB")  # grey images get three equal channels; colour stays colour


INTERPOLATIONS = ("bilinear", "bicubic")  # what torchvision's classification weights use
MAX_IMAGE_SIZE = 4096
_INPUT_KEYS = ("size", "resize", "interpolation", "mean", "std")


def _three(name: str, value: Any) -> tuple[float, float, float]:
    """One finite number per RGB channel: three, or one given for all three."""
    if hasattr(value, "tolist"):  # a tensor or numpy array
        value = value.tolist()
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) not in (1, 3):
        raise ConfigError(f"{name} takes 3 numbers (one per RGB channel) or 1 for all three, got {len(values)}")
    r, g, b = [checks.number(name, v) for v in values] * (3 if len(values) == 1 else 1)
    return r, g, b


@dataclass(frozen=True)
class ImageInputs:
    """What a backbone expects of an image, as torchvision's weights' ``transforms()`` give it.

    Applied in this order to an RGB image with values in [0, 1]: the shorter side is resized to ``resize``
    (the longer one keeps the aspect ratio, ``int(resize · long / short)``), the centre ``size``×``size`` is
    cropped, then each channel c becomes ``(x_c − mean_c) / std_c``. ``size`` None: images are taken at
    their own size; ``mean``/``std`` None: values stay in [0, 1]. The empty ``ImageInputs()`` changes
    nothing. Build one with :meth:`of`, which checks every value."""

    size: int | None = None
    resize: int | None = None  # the shorter side before the crop: at least size (torchvision: 256 for 224)
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @classmethod
    def of(
        cls,
        size: int | None = None,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        *,
        resize: int | None = None,
        interpolation: str | None = None,
    ) -> ImageInputs:
        """Checked values: ``size`` and ``resize`` whole numbers in 1..4096 (``resize`` defaults to ``size``
        and is at least ``size``), ``mean`` and ``std`` three finite numbers or one for all channels, given
        together, ``std`` > 0, ``interpolation`` bilinear or bicubic. A bad value is one ConfigError line."""
        if size is not None:
            size = checks.whole("image size", size, low=1, high=MAX_IMAGE_SIZE)
        if resize is not None:
            if size is None:
                raise ConfigError("a resize needs an image size to crop to")
            resize = checks.whole("resize", resize, low=size, high=MAX_IMAGE_SIZE)
        interpolation = interpolation or "bilinear"
        if interpolation not in INTERPOLATIONS:
            raise ConfigError(f"interpolation must be {' or '.join(INTERPOLATIONS)}, got {interpolation!r}")
        if (mean is None) != (std is None):
            raise ConfigError("mean and std go together: give both (or neither)")
        mean3 = _three("mean", mean) if mean is not None else None
        std3 = _three("std", std) if std is not None else None
        if std3 is not None and min(std3) <= 0:
            raise ConfigError(f"std must be greater than 0 in every channel, got {list(std3)}")
        return cls(size, resize if resize is not None else size, interpolation, mean3, std3)

    @classmethod
    def from_json(cls, value: Any) -> ImageInputs:
        """The inputs a backbone record holds (:meth:`to_json`'s dict; None: none), checked again: a record
        may come from another version or be edited by hand. ConfigError names what is wrong."""
        if value is None:
            return cls()
        if not isinstance(value, dict):
            raise ConfigError(f"recorded inputs must be a JSON object, got {type(value).__name__}")
        unknown = sorted(set(value) - set(_INPUT_KEYS))
        if unknown:
            raise ConfigError(f"recorded inputs have unknown keys {unknown} (known: {', '.join(_INPUT_KEYS)})")
        return cls.of(value.get("size"), value.get("mean"), value.get("std"), resize=value.get("resize"),
                      interpolation=value.get("interpolation"))  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        """The set values as a JSON object (``{}`` for the empty one), for a backbone's source."""
        out: dict[str, Any] = {}
        if self.size is not None:
            out.update(size=self.size, resize=self.resize, interpolation=self.interpolation)
        if self.mean is not None and self.std is not None:
            out.update(mean=list(self.mean), std=list(self.std))
        return out

    @property
    def empty(self) -> bool:
        """Whether images go in as they are (no resize, no normalisation)."""
        return self.size is None and self.mean is None

    def transform(self) -> Callable[[Any], torch.Tensor]:
        """PIL image -> (3, size, size) tensor, resized, cropped and normalised (see the class)."""
        from torchvision import transforms
        from torchvision.transforms import InterpolationMode

        steps: list[Any] = [_rgb]
        if self.size is not None:
            mode = InterpolationMode(self.interpolation)
            steps += [transforms.Resize(self.resize or self.size, interpolation=mode), transforms.CenterCrop(self.size)]
        steps.append(transforms.ToTensor())
        if self.mean is not None and self.std is not None:
            steps.append(transforms.Normalize(self.mean, self.std))
        return transforms.Compose(steps)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """A batch (N, 3, H, W) of values in [0, 1] transformed as :meth:`transform` transforms one image,
        with ``torch.nn.functional.interpolate`` (antialiased) for the resize. Returns ``x`` itself when
        the inputs are empty."""
        if x.ndim != 4 or not x.is_floating_point():
            raise DataError(f"images must be a float batch (N, C, H, W), got {x.dtype} of shape {tuple(x.shape)}")
        if self.size is not None:
            x = _center_crop(_resize_shorter(x, self.resize or self.size, self.interpolation), self.size)
        if self.mean is not None and self.std is not None:
            if x.shape[1] != 3:
                raise DataError(f"normalising takes 3-channel images, got {x.shape[1]} channels")
            mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            x = (x - mean) / std
        return x


def _resize_shorter(x: torch.Tensor, side: int, mode: str) -> torch.Tensor:
    """Shorter side to ``side``, the longer one ``int(side · long / short)``: torchvision's rule."""
    h, w = x.shape[-2:]
    short, long = min(h, w), max(h, w)
    other = int(side * long / short)
    size = (side, other) if h <= w else (other, side)
    if size == (h, w):
        return x
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)


def _center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The centre size×size, offsets rounded as torchvision's CenterCrop rounds them."""
    h, w = x.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top : top + size, left : left + size]


def image_transform(
    size: int | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    *,
    resize: int | None = None,
    interpolation: str | None = None,
) -> Callable[[Any], torch.Tensor]:
    """PIL image -> 3-channel tensor: values in [0, 1], resized (shorter side to ``resize``, default
    ``size``, then the centre ``size``×``size``) when ``size`` is given, normalised ``(x − mean) / std``
    when ``mean`` and ``std`` are (see :class:`ImageInputs`)."""
    return ImageInputs.of(size, mean, std, resize=resize, interpolation=interpolation).transform()


def transform_images(x: torch.Tensor, inputs: ImageInputs | None) -> torch.Tensor:
    """A tensor batch (N, 3, H, W) in [0, 1] resized and normalised as ``inputs`` says (see
    :meth:`ImageInputs.apply`); ``None`` or empty inputs return ``x`` unchanged."""
    return x if inputs is None else inputs.apply(x)


def transform_dataset(dataset: Dataset, inputs: ImageInputs | None, *, batch_size: int = 256) -> Dataset:
    """``dataset`` (e.g. :func:`digits`) with every split's images transformed by ``inputs``, a batch at a
    time; the same dataset when the inputs are empty."""
    if inputs is None or inputs.empty:
        return dataset

    def split(s: Split) -> Split:
        x = torch.cat([inputs.apply(s.x[i : i + batch_size]) for i in range(0, len(s), batch_size)])
        return Split(x, s.y)

    return Dataset(split(dataset.train), split(dataset.val), split(dataset.test), dataset.num_classes, dataset.name)


_SHOWN_CLASSES = 20  # class names an error message lists before it only counts the rest


def _shown_classes(classes: Sequence[str]) -> str:
    """Class names for a one-line message: all of them, or the first few and how many there are."""
    if len(classes) <= _SHOWN_CLASSES:
        return str(list(classes))
    return f"{list(classes[:_SHOWN_CLASSES])} and {len(classes) - _SHOWN_CLASSES} more"


def _class_folders(path: Path) -> list[str]:
    """The class folders of one split, sorted, as torchvision's ImageFolder finds them."""
    from torchvision.datasets.folder import find_classes

    try:
        return find_classes(str(path))[0]
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise DataError(f"{path}: {str(exc).splitlines()[0]}") from None


def _class_numbers(root: Path, classes: list[str]) -> dict[str, int]:
    """Folder name -> label. Names are numbered in sorted order, as torchvision's ImageFolder numbers them,
    except class folders that are all named by numbers (as ``adapter-hub data`` writes them, ``00``..``09``):
    those numbers are the labels themselves, as ``predict`` reads them, so they must be 0..N-1 each once.
    (Sorted as text, unpadded ``0``..``11`` would number ``10`` as 2, and predict would read it as 10.)"""
    if not classes or not all(c.isascii() and c.isdecimal() for c in classes):
        return {name: i for i, name in enumerate(classes)}
    numbers = {name: int(name) for name in classes}
    if sorted(numbers.values()) != list(range(len(classes))):
        raise DataError(
            f"{root}: class folders named by numbers are the class indices (predict reads them so), and must be "
            f"0..{len(classes) - 1} once each for {len(classes)} classes; found {_shown_classes(classes)}: rename "
            "them, or give the classes names"
        )
    return numbers


def _read_split(path: Path, class_to_idx: dict[str, int], transform: Callable[[Any], torch.Tensor]) -> Split:
    """One split's images with labels from ``class_to_idx`` (folder name -> label), files ordered as
    ImageFolder orders them (class folders sorted, then files sorted). Every folder named in
    ``class_to_idx`` must be in ``path`` and hold at least one image."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    try:
        samples = make_dataset(str(path), class_to_idx, IMG_EXTENSIONS)
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"{path}: {str(exc).splitlines()[0]}") from None
    if not samples:
        raise DataError(f"{path} holds no images")
    return Split(stack_images([(file, _image(file, transform)) for file, _ in samples]),
                 torch.tensor([label for _, label in samples]))  # fmt: skip


def stack_images(images: Sequence[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """The images as one batch; the first whose shape differs from the first image's is a DataError naming
    both files (images of several sizes need an input size: ``backbone add --image-size``)."""
    first_file, first = images[0]
    for file, image in images:
        if image.shape != first.shape:
            raise DataError(
                f"{file}: image of {_size(image)}, but {first_file} is {_size(first)}; images of several sizes "
                "need an input size to be resized to (record one with the backbone: backbone add --image-size)"
            )
    return torch.stack([image for _, image in images])


def _size(image: torch.Tensor) -> str:
    return f"{image.shape[-1]}×{image.shape[-2]} px" + (f" ({image.shape[0]} channels)" if image.dim() == 3 else "")


def _image(file: str, transform: Callable[[Any], torch.Tensor]) -> torch.Tensor:
    """One image file through ``transform``; a file PIL cannot read is a DataError naming it."""
    return transform(read_image(file))


def read_image(file: str | Path) -> Any:
    """The PIL image in ``file``, as RGB. A file PIL cannot read (not an image, truncated) or an image of more
    pixels than PIL's ``Image.MAX_IMAGE_PIXELS`` (a decompression bomb: a small file that decodes to
    gigabytes) is a DataError naming the file; nothing is skipped, so a run never trains on fewer images
    than the folder holds without saying so."""
    import warnings

    from PIL import Image

    try:
        if not stat.S_ISREG(os.stat(file).st_mode):  # a FIFO would block, a device be read without end
            raise DataError(f"{file} is not a regular file")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as img:
                return _rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{file}: refused, {str(exc).splitlines()[0]}") from None
    except (OSError, ValueError, SyntaxError) as exc:  # UnidentifiedImageError is an OSError; PIL's plugins
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__  # raise the other two too
        raise DataError(f"{file}: not a readable image ({reason})") from None


def _read_held_out(path: Path, train_classes: dict[str, int], transform: Callable[[Any], torch.Tensor]) -> Split:
    """``val/`` or ``test/`` labelled with the training split's numbers (``train_classes``: folder name ->
    label): its own class folders, which may be fewer, keep those numbers; one the training split lacks is
    a DataError naming it and the training classes."""
    present = _class_folders(path)
    extra = [name for name in present if name not in train_classes]
    if extra:
        raise DataError(f"{path} has class folder{'s' if len(extra) > 1 else ''} {extra} that the training split "
                        f"does not have (training classes: {_shown_classes(list(train_classes))})")  # fmt: skip
    return _read_split(path, {name: train_classes[name] for name in present}, transform)


def load_imagefolder(
    directory: str | Path,
    *,
    num_classes: int | None = None,
    size: int | None = None,
    seed: int = 0,
    inputs: ImageInputs | None = None,
) -> Dataset:
    """An ImageFolder directory: ``train/``, ``val/``, ``test/`` subfolders, or one folder of classes
    split 60/20/20 with a seeded permutation. Images become 3-channel tensors in [0, 1], transformed by
    ``inputs`` (a backbone's: :func:`adapter_hub.backbones.recorded_inputs`) or resized to ``size``.

    Labels: the training split's class folders, sorted, are numbered 0, 1, ... (as ImageFolder numbers
    them) — folders all named by numbers are their own labels (:func:`_class_numbers`) — and ``val/`` and
    ``test/`` take the same numbers, so a split may lack some classes (folder
    "04" is label 4 of 00..09 in every split). A ``val/`` or ``test/`` class folder that ``train/`` does
    not have is refused: it has no label the trained head could give."""
    if inputs is not None and size is not None:
        raise ConfigError("give size or inputs, not both (inputs hold a size of their own)")
    root = Path(directory)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist")
    tf = inputs.transform() if inputs is not None else image_transform(size)

    split_dirs = (root / "train").is_dir()
    classes = _class_folders(root / "train" if split_dirs else root)
    if num_classes is not None and len(classes) != num_classes:  # before any image is read
        raise DataError(f"{root} has {len(classes)} classes, the task expects {num_classes}")
    class_to_idx = _class_numbers(root, classes)
    if split_dirs:
        train = _read_split(root / "train", class_to_idx, tf)
        val, test = (_read_held_out(root / s, class_to_idx, tf) for s in ("val", "test"))
    else:
        whole = _read_split(root, class_to_idx, tf)
        perm = torch.randperm(len(whole), generator=torch.Generator().manual_seed(seed))
        a, b = int(0.6 * len(perm)), int(0.8 * len(perm))
        train, val, test = (Split(whole.x[p], whole.y[p]) for p in (perm[:a], perm[a:b], perm[b:]))
    return Dataset(train, val, test, num_classes=len(classes), name=root.name)

"""Backbones: the catalogue of torchvision models with sensible LoRA targets, where a new adapter's task head
goes on any other model, building a recorded source (a catalogue or torchvision name, module:callable behind a
trust gate, or a Transformers directory through adapter_hub.hf), loading weights, rebuilding a record
under its fingerprint, and the input transform (size, mean, std) an image backbone records."""

from __future__ import annotations

import difflib
import importlib
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import checks, hf
from .data import ImageInputs
from .errors import BackboneError, ConfigError, UntrustedFactory, first_line

if TYPE_CHECKING:
    from .model import AdapterModel
    from .registry.records import Backbone


@dataclass(frozen=True)
class Entry:
    """How to build one backbone and where its LoRA deltas and its task head go."""

    builder: str  # torchvision.models name, or a function of this module
    targets: list[str]
    head: str
    kwargs: dict[str, Any] = field(default_factory=dict)


def resnet_small(num_classes: int = 10, blocks: tuple[int, int, int, int] = (1, 1, 1, 1)) -> nn.Module:
    """A torchvision ResNet for 8–32 px inputs: 3×3 stride-1 stem, no max-pool."""
    from torchvision.models.resnet import BasicBlock, ResNet

    model = ResNet(BasicBlock, list(blocks), num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def vit_small(
    num_classes: int = 10, image_size: int = 16, patch_size: int = 4, hidden_dim: int = 128, mlp_dim: int = 512
) -> nn.Module:
    """A torchvision VisionTransformer for small images: 16 px in 4×4 patches (16 tokens and the class token),
    4 layers of width 128 with 4 heads and an MLP of 512 (0.8 M parameters). The demo resizes its 8 px digits
    to 16 px on the data side (recorded with the backbone as its ``inputs``); 16 px patches of 4 see the same
    4×4 grid as 8 px patches of 2 at the same cost, and leave room for sub-pixel augmentation."""
    from torchvision.models import VisionTransformer

    return VisionTransformer(
        image_size=image_size, patch_size=patch_size, num_layers=4, num_heads=4, hidden_dim=hidden_dim,
        mlp_dim=mlp_dim, num_classes=num_classes,
    )  # fmt: skip


# Default targets: every layer whose low-rank delta is smaller than the layer itself. A depthwise conv
# (groups = channels) gets rank ⌈r/g⌉ = 1 per channel, so its delta (C·k² + C) outgrows its weight (C·k²):
# MobileNet/EfficientNet depthwise convs, ConvNeXt's 7×7 ones (equal size: nothing saved) and the
# squeeze-excitation 1×1 convs are left out. Grouped convs with wider groups (ResNeXt, RegNet) stay in:
# their delta is a fraction of the weight. fnmatch's ``*`` crosses dots, so the MobileNet patterns name
# block numbers where the depthwise conv's index depends on the block.
_RESNET = ["conv1", "layer*.*.conv*", "layer*.*.downsample.0"]
_REGNET = ["stem.0", "trunk_output.*.proj.0", "trunk_output.*.f.a.0", "trunk_output.*.f.b.0", "trunk_output.*.f.c.0"]
_CONVNEXT = ["features.*.*.block.3", "features.*.*.block.5"]
_VIT = ["*.self_attention", "*.mlp.0", "*.mlp.3"]
_SWIN = ["features.*.*.attn.qkv", "features.*.*.attn.proj", "features.*.*.mlp.0", "features.*.*.mlp.3"]
# MobileNetV2: features.1's block has no expansion (conv.0 is depthwise, conv.1 the projection); later
# blocks expand (conv.0.0), go depthwise (conv.1.0) and project (conv.2).
_MOBILENET_V2 = ["features.0.0", "features.1.conv.1", "features.[2-9].conv.0.0", "features.1[0-7].conv.0.0",
                 "features.*.conv.2", "features.18.0"]  # fmt: skip
# MobileNetV3: block.0.0 expands except in features.1 (depthwise there); the projection is block.2.0, or
# block.3.0 after a squeeze-excitation (large's features.1: block.1.0).
_MOBILENET_V3_SMALL = ["features.0.0", "features.[2-9].block.0.0", "features.1[01].block.0.0", "features.*.block.2.0",
                       "features.*.block.3.0", "features.12.0", "classifier.0"]  # fmt: skip
_MOBILENET_V3_LARGE = ["features.0.0", "features.1.block.1.0", "features.[2-9].block.0.0",
                       "features.1[0-5].block.0.0", "features.*.block.2.0", "features.*.block.3.0", "features.16.0",
                       "classifier.0"]  # fmt: skip
# EfficientNet MBConv: expand block.0.0, depthwise block.1.0, squeeze-excitation block.2, project block.3.0
# (stage 1 does not expand: depthwise block.0.0, project block.2.0). EfficientNetV2's stages 1-3 are fused
# MBConvs: full 3×3 convs, all targeted.
_EFFICIENTNET_B0 = ["features.0.0", "features.1.*.block.2.0", "features.[2-7].*.block.0.0",
                    "features.[2-7].*.block.3.0", "features.8.0"]  # fmt: skip
_EFFICIENTNET_V2_S = ["features.0.0", "features.[1-3].*.block.*.0", "features.[4-6].*.block.0.0",
                      "features.[4-6].*.block.3.0", "features.7.0"]  # fmt: skip
CATALOGUE: dict[str, Entry] = {
    "resnet18": Entry("resnet18", _RESNET, "fc"),
    "resnet34": Entry("resnet34", _RESNET, "fc"),
    "resnet50": Entry("resnet50", _RESNET, "fc"),
    "resnext50_32x4d": Entry("resnext50_32x4d", _RESNET, "fc"),
    "regnet_y_400mf": Entry("regnet_y_400mf", _REGNET, "fc"),
    "regnet_x_400mf": Entry("regnet_x_400mf", _REGNET, "fc"),
    "mobilenet_v2": Entry("mobilenet_v2", _MOBILENET_V2, "classifier.1"),
    "mobilenet_v3_small": Entry("mobilenet_v3_small", _MOBILENET_V3_SMALL, "classifier.3"),
    "mobilenet_v3_large": Entry("mobilenet_v3_large", _MOBILENET_V3_LARGE, "classifier.3"),
    "efficientnet_b0": Entry("efficientnet_b0", _EFFICIENTNET_B0, "classifier.1"),
    "efficientnet_v2_s": Entry("efficientnet_v2_s", _EFFICIENTNET_V2_S, "classifier.1"),
    "convnext_tiny": Entry("convnext_tiny", _CONVNEXT, "classifier.2"),
    "convnext_small": Entry("convnext_small", _CONVNEXT, "classifier.2"),
    "vit_b_16": Entry("vit_b_16", _VIT, "heads.head"),
    "vit_b_32": Entry("vit_b_32", _VIT, "heads.head"),
    "vit_l_16": Entry("vit_l_16", _VIT, "heads.head"),
    "swin_t": Entry("swin_t", _SWIN, "head"),
    "swin_s": Entry("swin_s", _SWIN, "head"),
    "swin_v2_t": Entry("swin_v2_t", _SWIN, "head"),
    "resnet_small": Entry("resnet_small", ["conv1", "layer*.*.conv*"], "fc"),
    "vit_small": Entry("vit_small", _VIT, "heads.head"),
}


def entry(architecture: str) -> Entry:
    if architecture not in CATALOGUE:
        raise BackboneError(f"unknown backbone {architecture!r}; the catalogue has {', '.join(CATALOGUE)}")
    return CATALOGUE[architecture]


def find_head(model: nn.Module, num_classes: int | None = None) -> str:
    """The path of ``model``'s classifier when it can be told without asking: its last ``nn.Linear`` (in
    ``named_modules`` order), provided no module with parameters comes after it and, when ``num_classes`` is
    known, it outputs that many classes. Anything else is refused in one line asking for ``--head``: a model
    without a Linear (SqueezeNet's classifier is a conv), or one whose last Linear is not its output."""
    owners = [(p, m) for p, m in model.named_modules() if p and any(True for _ in m.parameters(recurse=False))]
    linears = [(p, m) for p, m in owners if type(m) is nn.Linear]  # not MultiheadAttention's out_proj
    if not linears:
        raise BackboneError("the backbone has no nn.Linear to train as its head: pass --head PATH, the module "
                            "that outputs the classes")  # fmt: skip
    path, module = linears[-1]
    last = owners[-1][0]
    if last != path and not last.startswith(f"{path}."):
        raise BackboneError(f"cannot tell the backbone's head: its last Linear {path} is followed by {last} "
                            f"({type(owners[-1][1]).__name__}); pass --head PATH")  # fmt: skip
    if num_classes is not None and module.out_features != num_classes:
        raise BackboneError(f"cannot tell the backbone's head: its last Linear {path} outputs {module.out_features}, "
                            f"not the backbone's {num_classes} classes; pass --head PATH")  # fmt: skip
    return path


def choose_head(
    model: nn.Module,
    *,
    given: str | None = None,
    default: str | None = None,
    inherited: Sequence[str] = (),
    num_classes: int | None = None,
) -> tuple[str, str | None]:
    """Where a new adapter's task head goes, and, when nobody named it, a line saying how it was found.

    ``given`` (``--head``) wins, and must be one of ``inherited`` (the heads of the adapter training starts
    from) when there are any; else the single inherited head; else the catalogue's ``default``; else
    :func:`find_head`. The path is checked by :func:`head_layer`."""
    note = None
    if given is not None:
        if inherited and given not in inherited:
            raise BackboneError(f"head {given!r} is not a head of the adapter training starts from (its heads: "
                                f"{', '.join(inherited)})")  # fmt: skip
        path = given
    elif len(inherited) == 1:
        path = inherited[0]
    elif default is not None:
        path = default
    else:
        path = find_head(model, num_classes)
        note = f"head: {path}, the backbone's last Linear (found by itself; --head PATH names another)"
    head_layer(model, path)
    return path, note


_HEAD_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def head_layer(model: nn.Module, path: str) -> nn.Module:
    """The module at ``path``, checked to be a layer a fresh head can replace: a Linear, or an ungrouped
    Conv1d/2d/3d (SqueezeNet's 1×1 classifier). Anything else is refused in one line: a path that is not a
    module (with close names), a container without a weight of its own (with the layer inside it to name
    instead), another kind of layer."""
    if not path.strip():
        raise BackboneError("the head path is empty: name the layer that outputs the classes (e.g. fc)")
    try:
        layer = model.get_submodule(path)
    except AttributeError:
        close = difflib.get_close_matches(path, [p for p, _ in model.named_modules() if p], n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise BackboneError(f"head {path!r} is not a module of the backbone{hint}") from None
    kind = type(layer).__name__
    if type(layer) in _HEAD_TYPES and getattr(layer, "groups", 1) == 1:
        return layer
    if not isinstance(getattr(layer, "weight", None), torch.Tensor):
        inner = [p for p, m in layer.named_modules() if p and type(m) in _HEAD_TYPES]
        hint = f", e.g. {'.'.join(p for p in (path, inner[-1]) if p)}" if inner else ""
        raise BackboneError(f"head {path!r} is a {kind}, a module without a weight of its own: name the layer "
                            f"that outputs the classes{hint}")  # fmt: skip
    groups = getattr(layer, "groups", 1)
    if groups != 1:
        kind = f"grouped {kind} (groups={groups})"
    raise BackboneError(f"head {path!r} is a {kind}: a head must be a Linear or an ungrouped Conv1d/2d/3d layer "
                        "whose outputs are the classes")  # fmt: skip


def new_head(layer: nn.Module, num_classes: int) -> nn.Module:
    """A fresh head for ``num_classes`` classes in place of ``layer`` (checked by :func:`head_layer`): a Linear
    with the same inputs, or a conv with the same kernel, stride, padding, dilation and padding mode; with a
    bias when the layer has one, on its weight's device and dtype, drawn by torch's default init (seed torch
    first)."""
    factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.in_features, num_classes, bias=bias, **factory)
    if isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return type(layer)(layer.in_channels, num_classes, layer.kernel_size, stride=layer.stride,
                           padding=layer.padding, dilation=layer.dilation, bias=bias, padding_mode=layer.padding_mode,
                           **factory)  # fmt: skip
    raise BackboneError(f"a head must be a Linear or a conv layer, not a {type(layer).__name__}")


def check_head_output(model: AdapterModel, inputs: torch.Tensor, head: str, num_classes: int) -> None:
    """Run ``model`` (the new adapter active) once on a few inputs, in eval mode and without gradients, and
    refuse in one line when its output is not ``(batch, num_classes)``: a head named inside the network (a
    conv whose outputs feed a batch norm) breaks the forward or the output's width, and is better said before
    training than as a traceback in its first step. When the bare backbone fails on the inputs too, the
    images are the problem (too small for its downsampling, say), and that is what the line says."""
    was_training = model.training
    model.eval()
    called: list[bool] = []  # a head the forward never calls would train without changing any output
    hook = model.backbone.get_submodule(head).register_forward_hook(lambda *_: called.append(True))
    try:
        with torch.no_grad():
            try:
                out = model(inputs)
            except Exception as exc:  # any layer after a misplaced head may fail, with any type
                try:
                    with model.disable_adapters():
                        model(inputs)
                except Exception as bare:  # the backbone's own code, on these inputs
                    raise BackboneError(f"the backbone does not run on the data's {tuple(inputs.shape[1:])} images: "
                                        f"{first_line(bare)}") from None  # fmt: skip
                why = first_line(exc)
                raise BackboneError(f"the backbone does not run with a {num_classes}-class head at {head} ({why}): "
                                    "the head must be the layer that outputs the classes") from None  # fmt: skip
    finally:
        hook.remove()
        model.train(was_training)
    if not called:
        raise BackboneError(f"the backbone's forward never calls {head}: the head must be the layer that outputs "
                            "the classes (pass --head PATH)")  # fmt: skip
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    wanted = (len(inputs), num_classes)
    if shape != wanted:
        raise BackboneError(f"with a {num_classes}-class head at {head} the backbone outputs {shape}, not {wanted}: "
                            "the head must be the layer that outputs the classes")  # fmt: skip


TRUSTED_FACTORIES_ENV = "ADAPTER_HUB_TRUSTED_FACTORIES"
_TRUST_CODE: ContextVar[bool] = ContextVar("adapter_hub_trust_code", default=False)


def is_factory(architecture: str) -> bool:
    """Whether an architecture is ``module:callable`` (code to import and run) rather than a catalogue or
    torchvision name (a builder that ships with the package or with torchvision)."""
    return ":" in architecture


def trusted_factories_file() -> Path:
    """``$XDG_CONFIG_HOME/adapter-hub/trusted-factories`` (``~/.config/...`` by default): one
    ``module:callable`` per line that rebuilds may run."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".config"  # a relative value is ignored (XDG)
    return root / "adapter-hub" / "trusted-factories"


def trusted_factories() -> set[str]:
    """The factories the local user allows: ``$ADAPTER_HUB_TRUSTED_FACTORIES`` (comma-separated) and the
    lines of :func:`trusted_factories_file` (``#`` starts a comment line). Never read from the registry
    home or database: whoever can write those must not be able to allow their own code."""
    names = {name.strip() for name in os.environ.get(TRUSTED_FACTORIES_ENV, "").split(",")}
    path = trusted_factories_file()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        lines = []
    except (OSError, UnicodeDecodeError) as exc:
        raise BackboneError(f"cannot read the trusted factories file {path}: {first_line(exc)}") from None
    names.update(line.strip() for line in lines if not line.lstrip().startswith("#"))
    names.discard("")
    return names


@contextmanager
def trusting_code(trust: bool = True) -> Iterator[None]:
    """Inside this block :func:`rebuild` runs any factory a registry record names, as ``trust_code=True``
    does for one call (the CLI's ``--trust-code``)."""
    token = _TRUST_CODE.set(trust)
    try:
        yield
    finally:
        _TRUST_CODE.reset(token)


def check_trusted(name: str, architecture: str, *, trust_code: bool = False) -> None:
    """Refuse to run a registry record's ``module:callable`` unless the local user allowed it. Called before
    anything is imported: importing a module runs its code too."""
    if not is_factory(architecture) or trust_code or _TRUST_CODE.get():
        return
    if architecture in trusted_factories():
        return
    raise UntrustedFactory(
        f"backbone {name!r} is built by {architecture!r}, code named by the registry that you have not allowed "
        f"to run; allow it with --trust-code (trust_code=True in Python), or add {architecture} to "
        f"${TRUSTED_FACTORIES_ENV} or to {trusted_factories_file()}"
    )


def load_factory(architecture: str) -> Callable[..., Any]:
    """Import ``module:callable`` and return the callable. This runs the module's code: a registry record's
    factory passes :func:`check_trusted` first."""
    module_name, _, attr = architecture.partition(":")
    if not all(part.isidentifier() for part in module_name.split(".")) or not attr.isidentifier():
        raise BackboneError(f"backbone factory {architecture!r} is not module:callable (e.g. mypackage.nets:build)")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise BackboneError(f"cannot import backbone factory {architecture!r}: no module named {exc.name!r}") from None
    except Exception as exc:  # a module's code may raise anything while it is imported
        raise BackboneError(f"cannot import backbone factory {architecture!r}: {first_line(exc)}") from None
    if not hasattr(module, attr):
        raise BackboneError(f"cannot import backbone factory {architecture!r}: {module_name} has no {attr!r}")
    factory = getattr(module, attr)
    if not callable(factory):
        raise BackboneError(f"backbone factory {architecture!r} is a {type(factory).__name__}, not a callable")
    return factory


def build_backbone(source: dict[str, Any]) -> nn.Module:
    """Build a backbone from its recorded source: ``architecture`` (a catalogue name, any
    torchvision.models name, or ``module:callable``), ``num_classes``, ``seed`` of the initialisation,
    ``weights`` (a local .safetensors or torchvision .pth file) or ``torchvision_weights`` (a torchvision
    weights name, downloaded by torchvision where there is internet). A source with ``hf`` is a
    Transformers model directory (see :func:`from_transformers`).

    A ``module:callable`` is imported and called here without asking: this is for an architecture the
    caller chose. A registry record is rebuilt with :func:`rebuild`, which asks first."""
    if hf.is_transformers(source):
        return hf.build(source)
    arch = source.get("architecture")
    if not arch:
        raise BackboneError("the backbone records no architecture to build it from")
    if not isinstance(arch, str):
        raise BackboneError(f"the backbone's architecture must be a name or module:callable, got {arch!r}")
    kwargs: dict[str, Any] = {}
    if source.get("num_classes") is not None:
        kwargs["num_classes"] = checks.num_classes(source["num_classes"])
    factory = load_factory(arch) if is_factory(arch) else None  # before seeding: importing may draw numbers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(source.get("seed") or 0))
        if factory is not None:
            try:
                model = factory(**kwargs)
            except (Exception, SystemExit) as exc:  # the factory is code of any kind: its failure (even an exit) is
                # reported, not raised
                given = f" with {', '.join(f'{k}={v!r}' for k, v in kwargs.items())}" if kwargs else ""
                raise BackboneError(f"calling backbone factory {arch!r}{given} failed: {first_line(exc)}") from None
        elif arch in ("resnet_small", "vit_small"):
            model = globals()[arch](**kwargs)
        else:
            import torchvision

            if arch not in torchvision.models.list_models():
                raise BackboneError(
                    f"unknown architecture {arch!r}: give a catalogue name ({', '.join(CATALOGUE)}), a "
                    "torchvision.models name or module:callable"
                )
            try:
                weights = source.get("torchvision_weights")
                model = torchvision.models.get_model(arch, weights=weights, **kwargs)
            except (ValueError, TypeError) as exc:  # weights that do not exist or do not fit num_classes
                raise BackboneError(f"cannot build torchvision {arch!r}: {first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise BackboneError(f"backbone factory {arch!r} returned a {type(model).__name__}, not a torch.nn.Module")
    if source.get("weights"):
        load_weights(model, source["weights"])
    return model.eval()


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local weights file: safetensors, or a torchvision .pth read with weights_only=True (no
    arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file {path} {'is not a regular file' if path.exists() else 'does not exist'}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors and torch.load raise several types for a bad file
        raise BackboneError(f"cannot read weights {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise BackboneError(f"weights {path} hold no state dict")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of another shape
        detail = str(exc).splitlines()[-1].strip()
        raise BackboneError(f"weights {path} do not fit the architecture: {detail}") from None
    if missing or unexpected:
        raise BackboneError(
            f"weights {path} do not fit the architecture: {len(missing)} missing, {len(unexpected)} unexpected keys"
            + (f" (first missing: {missing[0]})" if missing else "")
        )


def save_weights(model: nn.Module, path: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def rebuild(name: str, source: dict[str, Any] | None, fingerprint: str, *, trust_code: bool = False) -> nn.Module:
    """A registered backbone rebuilt from its record, refused unless its fingerprint is the recorded one.

    The registry may be shared, so a record's ``module:callable`` runs only where the local user allowed it:
    ``trust_code=True`` (or inside :func:`trusting_code`), or the factory listed in
    ``$ADAPTER_HUB_TRUSTED_FACTORIES`` or :func:`trusted_factories_file`. Otherwise UntrustedFactory is
    raised before the module is imported. Catalogue and torchvision names always build."""
    from .formats import fingerprint as fingerprint_of

    if not source:
        raise BackboneError(f"backbone {name!r} was recorded by fingerprint only; it cannot be rebuilt here")
    architecture = source.get("architecture")
    if isinstance(architecture, str):
        check_trusted(name, architecture, trust_code=trust_code)
    model = build_backbone(source)
    actual = fingerprint_of(model)
    if actual != fingerprint:
        raise BackboneError(
            f"backbone {name!r} rebuilt from {source} has fingerprint {actual[:12]}…, "
            f"not the recorded {fingerprint[:12]}…"
        )
    return model


# -- the input transform an image backbone records ---------------------------------------------------------

INPUTS_KEY = "inputs"  # a backbone source's entry: ImageInputs.to_json(); absent: images go in as they are


def weights_inputs(architecture: str, weights: str) -> ImageInputs:
    """The input transform of torchvision weights ``weights`` (``DEFAULT``, ``IMAGENET1K_V1`` or
    ``ResNet18_Weights.IMAGENET1K_V1``) of ``architecture``, read off the weights enum's ``transforms()``:
    ``crop_size`` (size), ``resize_size`` (resize), ``interpolation``, ``mean`` and ``std``. Only the enum's
    metadata is read: nothing is downloaded. Unknown weights, or a transform that is not an image
    classifier's (video, segmentation), are one BackboneError line."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(architecture)
    except (ValueError, KeyError, AttributeError):  # not a torchvision.models name
        raise BackboneError(f"torchvision weights are for a torchvision.models architecture, not {architecture!r}"
                            ) from None  # fmt: skip
    try:
        chosen = enum.verify(weights)
    except (KeyError, ValueError, TypeError):
        names = ", ".join(["DEFAULT", *enum.__members__])
        raise BackboneError(f"{architecture} has no torchvision weights {weights!r} (its weights: {names})") from None
    if chosen is None:
        raise BackboneError(f"name the torchvision weights of {architecture} (e.g. DEFAULT)")
    preset = chosen.transforms()
    crop, resize = getattr(preset, "crop_size", None), getattr(preset, "resize_size", None)
    mean, std = getattr(preset, "mean", None), getattr(preset, "std", None)
    if not crop or not resize or mean is None or std is None:
        raise BackboneError(f"the transform of {chosen} ({type(preset).__name__}) is not an image classifier's: "
                            "give the image size, mean and std yourself")  # fmt: skip
    mode = getattr(getattr(preset, "interpolation", None), "value", None)
    try:
        return ImageInputs.of(crop[0], mean, std, resize=resize[0], interpolation=mode)
    except ConfigError as exc:
        raise BackboneError(f"the transform of {chosen}: {exc}") from None


def choose_inputs(
    source: dict[str, Any],
    *,
    image_size: int | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
) -> ImageInputs:
    """The input transform to record with an image backbone built from ``source``: its torchvision weights'
    (when ``torchvision_weights`` names some, see :func:`weights_inputs`), with each value given here in
    place of theirs. ``image_size`` S resizes the shorter side to S and crops S×S (the whole image, not
    torchvision's 256→224 margin); ``mean``/``std`` are three numbers or one for all channels. Empty
    (nothing recorded, images taken as they are) when neither weights nor values are given. The values are
    checked (:meth:`ImageInputs.of`) before the weights are looked up."""
    named = source.get("torchvision_weights")
    if not named:
        return ImageInputs.of(image_size, mean, std)
    # the given values first (the weights may hold the other of mean/std: 0 and 1 stand in for it)
    ImageInputs.of(image_size, 0.0 if mean is None else mean, 1.0 if std is None else std)
    base = weights_inputs(str(source.get("architecture")), named)
    return ImageInputs.of(
        image_size if image_size is not None else base.size,
        mean if mean is not None else base.mean,
        std if std is not None else base.std,
        resize=None if image_size is not None else base.resize,
        interpolation=base.interpolation,
    )


def with_inputs(source: dict[str, Any], inputs: ImageInputs) -> dict[str, Any]:
    """``source`` with ``inputs`` recorded under :data:`INPUTS_KEY`; ``source`` unchanged when they are
    empty, so that a backbone recorded without them reads as it always did."""
    return source if inputs.empty else {**source, INPUTS_KEY: inputs.to_json()}


def recorded_inputs(backbone: Backbone | dict[str, Any] | None) -> ImageInputs:
    """The input transform recorded with a registered backbone (its record, or the record's source): empty
    when it records none. A malformed entry is one BackboneError line."""
    source = getattr(backbone, "source", backbone)
    name = getattr(backbone, "name", None)
    try:
        return ImageInputs.from_json((source or {}).get(INPUTS_KEY))
    except ConfigError as exc:
        whose = f"backbone {name!r}" if name else "the backbone"
        raise BackboneError(f"{whose} records inputs that do not hold: {exc}") from None


def image_transform_for(backbone: Backbone | dict[str, Any] | None) -> Callable[[Any], torch.Tensor]:
    """PIL image -> tensor as a registered backbone expects it (:func:`recorded_inputs`); for a backbone
    without recorded inputs, RGB values in [0, 1] at the image's own size."""
    return recorded_inputs(backbone).transform()

"""What the CLI does across the registry and the composition engine, as plain library functions.

torch is imported by the functions that need it, so that exporting a stored adapter file, or a command
refused before any model is built, never waits for it."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import checks
from .combine_methods import check_method
from .errors import ConfigError
from .registry import Hub
from .registry.errors import RegistryError
from .registry.export import FORMATS, export_version
from .registry.records import Backbone, Parent, Version
from .registry.refs import adapter_path, check_key, check_name

if TYPE_CHECKING:
    from .model import AdapterModel


def model_for(hub: Hub, of: Version | str, *, trust_code: bool = False) -> AdapterModel:
    """An AdapterModel on a registered backbone, rebuilt from the registry's record: the backbone version
    ``of`` was made for, or the backbone named ``of``. A record's ``module:callable`` runs only if allowed
    (``trust_code``, or inside :func:`adapter_hub.backbones.trusting_code`: see
    :func:`adapter_hub.backbones.rebuild`)."""
    from .backbones import rebuild
    from .model import AdapterModel

    record = hub.backbone(of.backbone if isinstance(of, Version) else of)
    return AdapterModel(rebuild(record.name, record.source, record.fingerprint, trust_code=trust_code))


def export_ref(
    hub: Hub,
    ref: str,
    dest: str | os.PathLike[str],
    *,
    fmt: str = "safetensors",
    overwrite: bool = False,
    trust_code: bool = False,
) -> tuple[Version, Path]:
    """Write version REF into directory DEST (see :func:`adapter_hub.registry.export.export_version`): its
    verified adapter file, or, for ``fmt="peft"``, a PEFT directory built on its backbone rebuilt here."""
    return export_version(hub, ref, dest, fmt=fmt, overwrite=overwrite,
                          model_for=lambda backbone: model_for(hub, backbone, trust_code=trust_code))  # fmt: skip


def import_adapter(
    hub: Hub,
    source: str | os.PathLike[str],
    *,
    task: str,
    adapter: str,
    backbone: str,
    fmt: str | None = None,
    peft_name: str = "default",
    parents: Sequence[str] = (),
    description: str | None = None,
    force: bool = False,
    key: str | None = None,
    trust_code: bool = False,
) -> Version:
    """Register SOURCE, a PEFT LoRA directory or an adapter file, as a new version of TASK/ADAPTER made for
    the registered ``backbone``. ``fmt`` is "peft" or "safetensors" (default: peft for a directory); ``force``
    loads an adapter file made for another backbone. The version is tagged ``imported_from`` =
    ``FORMAT:ABSOLUTE_PATH`` and has an ``imported_from`` edge to each of ``parents``."""
    src = Path(source).resolve()
    if not src.exists():
        raise RegistryError(f"{src} does not exist")
    fmt = fmt or ("peft" if src.is_dir() else "safetensors")
    if fmt not in FORMATS:
        raise RegistryError(f"unknown import format {fmt!r}: expected {' or '.join(FORMATS)}")
    # everything a user gave is checked before the backbone is rebuilt
    hub.task(task)
    check_name("adapter", adapter)
    if fmt == "peft" and not src.is_dir():
        raise RegistryError(f"a PEFT import needs a directory, got {src}")
    if key is not None:
        check_key(key)
    for parent in parents:
        hub.resolve(parent)
    model = model_for(hub, backbone, trust_code=trust_code)
    if fmt == "peft":
        model.import_peft(src, adapter, adapter_name=peft_name)
    else:
        model.load_adapter(adapter, src, force=force)
    return hub.register(model, adapter, task=task, backbone=backbone, parents=[(p, "imported_from") for p in parents],
                        tags={"imported_from": f"{fmt}:{src}"}, description=description, key=key)  # fmt: skip


def compose_refs(
    hub: Hub,
    refs: Sequence[str],
    output: str,
    *,
    weights: Sequence[float] | None = None,
    method: str = "linear",
    density: float | None = None,
    rank: int | None = None,
    head: str | None = None,
    seed: int = 0,
    key: str | None = None,
    norms: str | None = None,
) -> Version:
    """Combine registered versions into a new registered version ``output`` (TASK/ADAPTER), with a
    ``composed_from`` edge to each source carrying its weight, the method and its parameters. ``head`` and
    ``norms`` name the version whose head / normalisation layers the result keeps ("" for none); by default
    they are averaged (see AdapterModel.combine)."""
    # everything a user gave is checked before any backbone is rebuilt or adapter combined
    task, name = adapter_path(output, "-o")
    hub.task(task)
    if len(refs) < 2:
        raise ConfigError("compose needs at least two versions")
    check_method(method, density)  # the engine's own check, made before a backbone is rebuilt
    weights = checks.weights(weights, len(refs))
    if density is not None:
        density = checks.number("density", density, above=0, at_most=1)
    if rank is not None:
        rank = checks.whole("rank", rank, low=1)
    seed = checks.seed(seed)
    if key is not None:
        check_key(key)
    versions = [hub.resolve(ref) for ref in refs]
    names = [f"source{i}" for i in range(len(versions))]
    head_name, norms_name = (_source_name(hub, versions, names, flag, ref)
                             for flag, ref in (("--head", head), ("--norms", norms)))  # fmt: skip
    fingerprints = {v.fingerprint for v in versions}
    if len(fingerprints) > 1:
        raise ConfigError("the versions were made for different backbones; they cannot be combined")
    model = model_for(hub, versions[0])
    for version, local in zip(versions, names):
        hub.load_into(model, version.ref, name=local)
    params = {"density": density, "rank": rank, "seed": seed, "head": head_name, "norms": norms_name}
    combined = model.combine("combined", names, weights, method, **{k: v for k, v in params.items() if v is not None})
    # a text classifier's class names and max_length go with its head: the chosen one's, or the one all share
    texts = [model.adapters[n].metadata.get("text") for n in names]
    shared = texts[names.index(head_name)] if head_name else (texts[0] if all(t == texts[0] for t in texts) else None)
    if shared is not None:
        combined.metadata["text"] = shared
    recipe = combined.metadata["recipe"]
    parents = [
        Parent(v.ref, "composed_from", weight=w, method=method, params=recipe["params"])
        for v, w in zip(versions, recipe["weights"])
    ]
    return hub.register(model, "combined", task=task, name=name, parents=parents,
                        metrics={"compose/rel_error": recipe["rel_error"]},
                        description=f"{method} of {', '.join(v.ref for v in versions)}", key=key)  # fmt: skip


def _source_name(hub: Hub, versions: Sequence[Version], names: Sequence[str], flag: str, ref: str | None) -> str | None:
    """The local name of the composed version ``ref`` names ("" and None as given)."""
    if not ref:
        return ref
    wanted, refs_in = hub.resolve(ref).ref, [v.ref for v in versions]
    if wanted not in refs_in:
        raise ConfigError(f"{flag} {ref} is not one of the composed versions")
    return names[refs_in.index(wanted)]


def add_image_backbone(
    hub: Hub,
    name: str,
    architecture: str,
    *,
    weights: str | os.PathLike[str] | None = None,
    torchvision_weights: str | None = None,
    seed: int = 0,
    num_classes: int | None = None,
    image_size: int | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    description: str | None = None,
) -> Backbone:
    """Register image backbone ``name`` built from ``architecture`` (a catalogue or torchvision.models name,
    or ``module:callable``), with local ``weights`` or torchvision's ``torchvision_weights`` (downloaded by
    torchvision where there is internet), and the input transform of :func:`choose_inputs` recorded in its
    source. Every value is checked before the backbone is built; nothing is registered on a refusal."""
    from .backbones import build_backbone, choose_inputs, with_inputs

    check_name("backbone", name)
    seed = checks.seed(seed)
    if weights is not None and torchvision_weights is not None:
        raise ConfigError("give local weights or torchvision weights, not both")
    source: dict[str, Any] = {
        "architecture": architecture,
        "weights": str(Path(weights).resolve()) if weights else None,
        "seed": seed,
        "num_classes": num_classes,
    }
    if torchvision_weights is not None:
        source["torchvision_weights"] = torchvision_weights
    inputs = choose_inputs(source, image_size=image_size, mean=mean, std=std)
    module = build_backbone(source)
    return hub.add_backbone(name, module, architecture=architecture, source=with_inputs(source, inputs),
                            description=description)  # fmt: skip


def add_transformers_backbone(
    hub: Hub,
    name: str,
    directory: str | os.PathLike[str],
    *,
    num_classes: int = 2,
    seed: int = 0,
    pooling: str | None = None,
    description: str | None = None,
) -> Backbone:
    """Register backbone NAME from a local Transformers model directory (``save_pretrained``'s output): its
    fingerprint over the classifier's weights, a source that rebuilds it (directory, configuration, pooling,
    seed) and the tokenizer's files, stored in the registry by sha256 so that a rebuild anywhere tokenises
    as this one does. Nothing is registered when the directory is missing or does not load."""
    from .hf import from_transformers

    check_name("backbone", name)
    seed = checks.seed(seed)
    num_classes = checks.whole("num_classes", num_classes, low=1)
    read = from_transformers(directory, num_classes=num_classes, seed=seed, pooling=pooling)
    return hub.add_backbone(name, read.module, architecture=read.architecture, source=read.source,
                            description=description, files=read.tokenizer_files)  # fmt: skip


def tokenizer_for(hub: Hub, backbone: str) -> Any:
    """The tokenizer recorded with Transformers backbone ``backbone``, read from the registry (checked against
    its sha256), not from the model directory."""
    from .hf import load_tokenizer

    record = hub.backbone(backbone)
    return load_tokenizer(hub.backbone_files(record.name), record.source or {}, name=f"backbone {record.name!r}")


def _takes_text(record: Backbone, data: str | os.PathLike[str], max_length: int | None) -> bool:
    """Whether the backbone takes text (a Transformers backbone) or images; refuses data of the other kind.
    The backbone decides, the data must match: text is a .csv/.jsonl file or a folder of train/val/test
    files, images an ImageFolder directory."""
    from . import text
    from .hf import is_transformers

    path = Path(data)
    if is_transformers(record.source):
        if not path.exists():
            raise ConfigError(f"data file {path} does not exist")
        if not text.is_text_source(path):
            raise ConfigError(f"backbone {record.name!r} is a Transformers backbone: the data must be a .csv or "
                              f".jsonl file with text and label columns (or a folder of train, val and test files), "
                              f"got {path}")  # fmt: skip
        return True
    if path.exists() and text.is_text_source(path):
        raise ConfigError(f"backbone {record.name!r} takes images: the data must be an ImageFolder directory, not "
                          f"the text data {path}")  # fmt: skip
    if max_length is not None:
        raise ConfigError(f"--max-length is for text data; backbone {record.name!r} takes images")
    checks.directory(path)
    return False


def text_settings(model: AdapterModel, adapter: str) -> tuple[list[str] | None, int, int]:
    """(class names or None, max_length, number of classes) of text adapter ``adapter`` of ``model``: what it
    records in its metadata (``text``) and the width of its classifier head."""
    from . import hf, text

    meta = model.adapters[adapter].metadata.get("text") or {}
    classes = meta.get("classes")
    head = dict(model.adapters[adapter].head_items()).get(hf.HEAD)  # type: ignore[operator]
    width = getattr(head, "out_features", None)
    if not isinstance(width, int):
        raise ConfigError(f"adapter {adapter!r} has no {hf.HEAD} head: it is not a text classifier")
    max_length = meta.get("max_length")
    if not isinstance(max_length, int) or max_length < 1:  # an adapter made elsewhere (imported): the default
        config = getattr(getattr(model.backbone, "base", None), "config", None)
        positions = hf.max_positions(config.to_dict()) if config is not None else None
        max_length = min(text.DEFAULT_MAX_LENGTH, positions or text.DEFAULT_MAX_LENGTH)
    return (list(classes) if isinstance(classes, list) else None), max_length, width


def train_adapter(
    hub: Hub,
    output: str,
    *,
    backbone: str,
    data_dir: str,
    from_ref: str | None = None,
    rank: int | None = None,
    alpha: float | None = None,
    targets: Sequence[str] | None = None,
    epochs: int = 5,
    lr: float | None = None,
    seed: int = 0,
    full: bool = False,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
    key: str | None = None,
    max_length: int | None = None,
    dora: bool = False,
    head: str | None = None,
    norm_layers: str | None = None,
) -> Version | None:
    """Train TASK/ADAPTER on data over a registered backbone and register it, with its metrics; ``from_ref``
    starts from an existing version (``transferred_from`` another task, ``finetuned_from`` the same task),
    refused if it was made for another backbone. ``full`` also fine-tunes the whole network on the same data
    as a baseline and logs its accuracy on the version.

    The backbone decides the data: an ImageFolder directory for an image backbone; for a Transformers
    backbone a .csv/.jsonl file of ``text,label`` rows (or a folder of train/val/test files), tokenised with
    the backbone's recorded tokenizer, truncated at ``max_length`` (default 128, at most the model's
    positions). A text version records its class names and max_length in its metadata. ``dora`` trains a DoRA
    adapter (a magnitude per output channel, see LoRAConfig.use_dora); ``norm_layers`` the normalisation layers it
    owns (LoRAConfig.norm_layers, default "batchnorm"); with ``from_ref`` the new version keeps its parent's
    kind and norms.

    An image backbone outside the catalogue (any torchvision.models name, or ``module:callable``) takes
    ``targets``; its task head is ``head`` (a Linear or conv layer, replaced by a fresh one per adapter), else
    the parent's, the catalogue's, or the model's last Linear when that is unambiguous
    (:func:`adapter_hub.backbones.choose_head`; ``say`` reports it).

    Under torchrun every process trains its share of each batch; only rank 0 registers (the others
    return None). An interrupted run (Ctrl-C) raises TrainingInterrupted before anything is written."""
    import torch

    from . import backbones, data, distributed, hf, text, training
    from .lora import LoRAConfig

    # every name, ref, number and path is checked before the data is read or a step is taken
    task, name = adapter_path(output, "train")
    if from_ref is not None:  # the new version continues its parent's adapter: same layers, rank and kind
        given = [flag for flag, value in (("--rank", rank), ("--alpha", alpha), ("--targets", targets),
                                          ("--dora", dora or None), ("--norm-layers", norm_layers))
                 if value is not None]  # fmt: skip
        if given:
            raise ConfigError(f"{', '.join(given)} make a new adapter; --from continues REF's own adapter (its "
                              "targets, rank, alpha and kind): drop them, or train without --from")  # fmt: skip
    rank = checks.whole("rank", 8 if rank is None else rank, low=1, high=checks.MAX_RANK)
    alpha = checks.number("alpha", 16.0 if alpha is None else alpha, above=0, at_most=checks.MAX_ALPHA)
    if targets is not None:
        targets = checks.patterns("targets", targets)
    epochs = checks.whole("epochs", epochs, low=1, high=checks.MAX_EPOCHS)
    lr = None if lr is None else checks.number("lr", lr, above=0, at_most=checks.MAX_LR)  # None: training.DEFAULTS
    seed = checks.seed(seed)
    if max_length is not None:
        max_length = checks.whole("max-length", max_length, low=1)
    if key is not None:
        check_key(key)
    if not Path(data_dir).exists():  # before any registry lookup
        raise ConfigError(f"data {data_dir} does not exist")
    task_record = hub.task(task)
    record = hub.backbone(backbone)
    is_text = _takes_text(record, data_dir, max_length)
    parent = hub.resolve(from_ref) if from_ref is not None else None
    if parent is not None and parent.fingerprint != record.fingerprint:
        raise ConfigError(f"--from {parent.ref} was made for backbone {parent.backbone!r}, not {backbone!r}")
    head_path: str | None = None  # an image backbone's is chosen once the model is built
    found: str | None = None  # how, when nobody named it
    entry: backbones.Entry | None = None  # an image backbone's catalogue entry, if it has one
    if is_text:
        if head is not None and head != hf.HEAD:
            raise ConfigError(f"--head is for image backbones: a Transformers backbone's classifier is {hf.HEAD}")
        head_path = hf.HEAD
        positions = hf.max_positions((record.source or {})["hf"].get("config") or {})
        if max_length is not None and positions is not None and max_length > positions:
            raise ConfigError(f"--max-length {max_length} is more than backbone {backbone!r}'s {positions} positions")
        max_length = max_length or min(text.DEFAULT_MAX_LENGTH, positions or text.DEFAULT_MAX_LENGTH)
        if parent is None and not targets:
            targets = hf.default_targets(str((record.source or {})["hf"].get("model_type")))
    else:
        architecture = (record.source or {}).get("architecture")
        entry = backbones.CATALOGUE.get(architecture) if isinstance(architecture, str) else None
        if entry is None and parent is None and not targets:
            raise ConfigError(f"backbone {backbone!r} ({architecture}) is not in the catalogue, so it has no default "
                              "targets: pass --targets (module name patterns and/or classes, e.g. 'layer*.conv*' or "
                              "Conv2d)")  # fmt: skip
        targets = list(targets or (entry.targets if entry is not None else []))
    distributed.setup()
    # the model is built before the data is read: the head and the targets are checked against it first
    model = model_for(hub, record.name)
    if parent is not None:
        hub.load_into(model, parent.ref, name="parent")
    if head_path is None:
        inherited = [p for p, _ in model.adapters["parent"].head_items()] if parent is not None else []
        head_path, found = backbones.choose_head(
            model.backbone, given=head, default=entry.head if entry is not None else None, inherited=inherited,
            num_classes=(record.source or {}).get("num_classes"),
        )  # fmt: skip
    config = LoRAConfig(r=rank, alpha=alpha, targets=list(targets or []), heads=[head_path], use_dora=dora,
                        norm_layers=norm_layers or "batchnorm")  # fmt: skip
    if parent is None:
        model.resolve_targets(config)  # a pattern that matches nothing: one line, before any data is read
    num_classes = (task_record.output or {}).get("num_classes")
    dataset: Any
    if is_text:
        tokens = text.Tokenization(tokenizer_for(hub, record.name), max_length)
        if parent is not None and parent.task == task:  # the same task goes on: its classes, in its order
            classes, _, width = text_settings(model, "parent")
            dataset = text.load_text(data_dir, tokens, classes=classes, min_classes=1,
                                     num_classes=None if classes else num_classes or width)  # fmt: skip
        else:
            dataset = text.load_text(data_dir, tokens, num_classes=num_classes)
    else:
        dataset = data.load_imagefolder(data_dir, num_classes=num_classes, inputs=backbones.recorded_inputs(record))
    head_module = backbones.head_layer(model.backbone, head_path)
    torch.manual_seed(seed)  # the new head and LoRA factors: the same seed gives the same version
    new_head = backbones.new_head(head_module, dataset.num_classes)
    parents = []
    metrics: dict[str, float] = {}
    if parent is not None:
        training.transfer_init(model, "parent", "adapter", head_modules={head_path: new_head})
        relation = "finetuned_from" if parent.task == task else "transferred_from"
        parents.append((parent.ref, relation))
        model.activate("adapter")
        metrics["transfer/start_accuracy"] = training.evaluate(model, dataset.val)  # before any step here
    else:
        model.add_adapter("adapter", config, head_modules={head_path: new_head})
    if is_text:
        adapter = model.adapters["adapter"]
        adapter.metadata = {**adapter.metadata, "text": {"classes": dataset.classes, "max_length": max_length}}
    model.activate("adapter")
    if not is_text:  # a head named inside the network is refused here, not as a traceback mid-training
        backbones.check_head_output(model, dataset.train.x[:2], head_path, dataset.num_classes)
    if found is not None and say is not None and distributed.is_main():
        say(found)
    with training.interruptible():  # Ctrl-C anywhere before register leaves the registry as it was
        if say is not None and distributed.is_main():  # inside: a Ctrl-C right after the message is covered
            _, size = distributed.world()
            where = f" in {size} processes" if size > 1 else ""
            say(f"training {output} on {len(dataset.train)} {'texts' if is_text else 'images'} "
                f"({model.num_trainable_parameters('adapter'):,} trainable parameters){where}; Ctrl-C stops "
                "without registering")  # fmt: skip
        fit = training.fit(model, dataset.train, dataset.val, epochs=epochs, lr=lr, seed=seed, progress=progress,
                           description=output)  # fmt: skip
        metrics.update({"val/accuracy": fit.best_accuracy, "test/accuracy": training.evaluate(model, dataset.test),
                        "train/steps": float(fit.steps), "train/best_step": float(fit.best_step)})  # fmt: skip
        if full:
            baseline = training.full_finetune_copy(
                model.backbone, head_path, backbones.new_head(head_module, dataset.num_classes)
            )
            training.fit(baseline, dataset.train, dataset.val, epochs=epochs, lr=1e-3, seed=seed, progress=progress,
                         description=f"{output} full fine-tune")  # fmt: skip
            metrics["baseline/full_finetune_accuracy"] = training.evaluate(baseline, dataset.test)
            metrics["baseline/full_finetune_params"] = float(sum(p.numel() for p in baseline.parameters()))
    if not distributed.is_main():
        distributed.barrier()  # rank 0 registers; the others wait for it
        return None
    version = hub.register(model, "adapter", task=task, name=name, parents=parents, metrics=metrics,
                           backbone=backbone, key=key)  # fmt: skip
    distributed.barrier()
    return version


def evaluate_ref(hub: Hub, ref: str, data_dir: str, *, split: str = "test") -> tuple[Version, float]:
    """Accuracy of a registered version on a split of its kind of data (see :func:`train_adapter`), logged as
    the metric ``SPLIT/accuracy``. ``split`` is train, val, test (as training split the data) or all. A text
    version reads labels as the class names (or indices) it was trained with; images are transformed as the
    backbone records (:func:`adapter_hub.backbones.recorded_inputs`), as in training."""
    from . import backbones, data, text, training

    version = hub.resolve(ref)
    if split not in ("train", "val", "test", "all"):
        raise ConfigError(f"split must be train, val, test or all, got {split!r}")
    record = hub.backbone(version.backbone)
    is_text = _takes_text(record, data_dir, None)
    model = model_for(hub, version)
    hub.load_into(model, version.ref, name="adapter")
    dataset: Any
    if is_text:
        classes, max_length, width = text_settings(model, "adapter")
        tokens = text.Tokenization(tokenizer_for(hub, record.name), max_length)
        need = () if split == "all" else (split,)
        dataset = text.load_text(data_dir, tokens, classes=classes, num_classes=None if classes else width,
                                 min_classes=1, need=need)  # fmt: skip
    else:
        task = hub.task(version.task)
        dataset = data.load_imagefolder(data_dir, num_classes=(task.output or {}).get("num_classes"),
                                        inputs=backbones.recorded_inputs(record))  # fmt: skip
    model.activate("adapter")
    accuracy = training.evaluate(model, dataset.split(split))
    hub.log_metric(version.ref, f"{split}/accuracy", accuracy)
    return version, accuracy

"""AdapterModel: one frozen backbone carrying many named LoRA adapters and their task heads."""

from __future__ import annotations

import copy
import difflib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter import SEP, Adapter, head_from_tensors, module_at, module_key
from .compose.attention_site import AttentionSite
from .compose.combine import combine as combine_adapters
from .compose.policies import Stack, Switch
from .compose.routing import Plan, RoutedOutput, put_back, restore_order, route_inputs
from .compose.sites import HeadSite, LayerSite, Routing, plain_copy
from .errors import (
    AdapterFileError,
    AdapterHubWarning,
    AdapterNotFound,
    ConfigError,
    FingerprintMismatch,
    MergeError,
    TargetError,
)
from .formats import adapter_file, peft
from .formats.fingerprint import fingerprint as compute_fingerprint
from .formats.record import AdapterRecord
from .lora import LoRAConfig, LoRAConfigError, is_norm, lora_class_for, matches

__all__ = ["Adapter", "AdapterModel"]


class AdapterModel(nn.Module):
    """A frozen backbone with named LoRA adapters side by side.

    Every backbone parameter is frozen when wrapped; the backbone's module classes, parameter names
    and state dict stay as they are (deltas attach by taking over the adapted modules' forward).
    In training mode the backbone's batch-norm layers stay in eval mode, so the shared backbone's
    running statistics never move under one task's data; an adapter that owns its norms
    (``LoRAConfig.norm_layers``) trains and updates its own copies instead.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.backbone = backbone
        self.adapters = nn.ModuleDict()
        self.routing = Routing()
        self._sites: dict[str, LayerSite] = {}
        self._head_sites: dict[str, HeadSite] = {}
        self._active: str | Stack | Switch | None = None
        self._merged: tuple[tuple[str, float], ...] | None = None
        self._merged_head: str | None = None
        self._previous: tuple[Any, tuple[tuple[str, float], ...], str | None, bool] = (None, (), None, False)
        self._fingerprint = compute_fingerprint(backbone)
        self.train(backbone.training)  # batch-norm statistics are frozen from the start

    # --- identity ------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """sha256 of the frozen backbone (names, shapes, dtypes and bytes of parameters and buffers)."""
        return self._fingerprint

    def _module(self, path: str) -> nn.Module:
        return self.backbone.get_submodule(path)

    def _require(self, name: str) -> Adapter:
        if name not in self.adapters:
            known = ", ".join(self.adapters.keys()) or "none"
            raise AdapterNotFound(f"no adapter named {name!r} (adapters: {known})")
        return self.adapters[name]  # type: ignore[return-value]

    # --- building adapters ---------------------------------------------------------------------
    def resolve_targets(self, config: LoRAConfig) -> tuple[list[str], list[str]]:
        """The module paths that get deltas and those that are heads, for this backbone."""
        targets, heads, _ = self.resolve(config)
        return targets, heads

    def resolve(self, config: LoRAConfig) -> tuple[list[str], list[str], list[str]]:
        """The module paths that get deltas, those that are heads and the normalisation layers the adapter
        owns (every norm of ``config.norm_layers``' kind outside the heads), for this backbone."""
        named = [(p, m) for p, m in self.backbone.named_modules() if p]
        names = [p for p, _ in named]
        heads: list[str] = []
        for pattern in config.heads:
            hits = [p for p, m in named if matches(pattern, p, m)]
            if not hits:
                raise TargetError(f"head pattern {pattern!r} matches no module{_close(pattern, names)}")
            heads += [p for p in hits if p not in heads and not _under_any(p, heads)]
        attention = {p for p, m in named if isinstance(m, nn.MultiheadAttention)}
        targets: list[str] = []
        for pattern in config.targets:
            hits = [(p, m) for p, m in named if matches(pattern, p, m)]
            if not hits:
                raise TargetError(f"target pattern {pattern!r} matches no module{_close(pattern, names)}")
            usable, covered = [], 0
            for p, m in hits:
                parent = p.rpartition(".")[0]
                if parent in attention:  # out_proj is adapted through its MultiheadAttention
                    if not any(matches(pattern, parent, self._module(parent)) for pattern in config.targets):
                        raise TargetError(
                            f"{p} is the output projection of a MultiheadAttention: target {parent} itself "
                            "(its LoRA covers in_proj and out_proj)"
                        )
                    covered += 1
                    continue
                if p in heads or _under_any(p, heads):
                    covered += 1  # a head is trained in full; a delta on it would add nothing
                    continue
                if lora_class_for(m) is not None:
                    usable.append(p)
            if not usable and not covered:
                kinds = sorted({f"{type(m).__name__} ({p})" for p, m in hits[:5]})
                raise TargetError(
                    f"target pattern {pattern!r} matches only layer types without a LoRA variant: "
                    f"{', '.join(kinds)}; supported: Linear, Conv1d/2d/3d, Embedding, MultiheadAttention and "
                    "transformers' Conv1D"
                )
            targets += [p for p in usable if p not in targets]
        norms: list[str] = []  # a norm inside another owned norm is part of that copy
        for p, m in named:
            if is_norm(m, config.norm_layers) and p not in heads and not _under_any(p, [*heads, *norms]):
                norms.append(p)
        if not targets and not heads and not norms:
            raise TargetError("the configuration adapts nothing: give targets and/or heads")
        return targets, heads, norms

    def add_adapter(
        self,
        name: str,
        config: LoRAConfig | None = None,
        *,
        head_modules: Mapping[str, nn.Module] | None = None,
        layer_specs: Mapping[str, Mapping[str, Any]] | None = None,
        norm_paths: Sequence[str] | None = None,
    ) -> Adapter:
        """Add a new adapter: a LoRA layer on each target module, a trainable copy of each head and of each
        normalisation layer it owns (``config.norm_layers``).

        ``head_modules`` replaces the copy of a head with a module of your own (e.g. a classifier
        with another number of classes). ``layer_specs`` fixes each layer's r/alpha/rank/a_groups and
        ``norm_paths`` the norms it owns, as stored in an adapter file; by default they follow ``config``.
        """
        config = config or LoRAConfig()
        if not name or "." in name or SEP in name:
            raise ConfigError(f"adapter name {name!r} must be non-empty and hold no '.' or '/'")
        if name in self.adapters:
            raise ConfigError(f"an adapter named {name!r} already exists (delete_adapter it first)")
        if self._merged is not None:  # a new layer would take the merged weights for the backbone's (DoRA's ‖W‖)
            raise MergeError("adapters are merged into the backbone; unmerge() before adding another")
        if layer_specs is None:
            targets, heads, norms = self.resolve(config)
            specs: dict[str, Mapping[str, Any]] = {
                p: {"r": config.rank_for(p), "alpha": config.alpha_for(p)} for p in targets
            }
        else:
            specs, heads, norms = dict(layer_specs), list(config.heads), list(norm_paths or [])
        adapter = Adapter(config)
        for path, spec in specs.items():
            base = self._module_for_layer(path)
            cls = lora_class_for(base)
            if cls is None:
                raise TargetError(f"{path} is a {type(base).__name__}, which has no LoRA variant")
            adapter.layers[module_key(path)] = cls.from_spec(
                base, spec, use_rslora=config.use_rslora, dropout=config.dropout, init=config.init,
                use_dora=config.use_dora,
            )
        if layer_specs is None:  # a configuration's targets, not a file's layers (warned when it was made)
            _warn_oversized(name, adapter, self.backbone)
        head_modules = dict(head_modules or {})
        for path in heads:
            original = self._module_for_layer(path)
            head = head_modules.pop(path, None) or plain_copy(original)
            for p in head.parameters():
                p.requires_grad_(True)
            adapter.heads[module_key(path)] = head
        if head_modules:
            raise TargetError(f"head_modules names {sorted(head_modules)} which are not heads of this config")
        for path in norms:
            module = self._module_for_layer(path)
            taken = "a LoRA target" if path in specs else "a head" if path in heads else None
            nested = _under_any(path, [*heads, *norms]) or norms.count(path) > 1
            if taken is None and (nested or not is_norm(module, "all")):
                taken = "not a normalisation layer of its own"
            if taken is not None:
                raise TargetError(f"{path} cannot be a norm the adapter owns: it is {taken}")
            norm = plain_copy(module)  # starts from the backbone's statistics
            adapter.norms[module_key(path)] = norm
        adapter.to(next(iter(self.backbone.parameters()), torch.empty(0)).device)
        self.adapters[name] = adapter
        for path, layer in adapter.layer_items():
            self._site(path).add(name, layer)
        for path, head in adapter.head_items():
            self._head_site(path).add(name, head)
        for path, norm in adapter.norm_items():  # a module may be one adapter's head and another's norm
            self._head_site(path).add(name, norm)
        adapter.requires_grad_(False)
        adapter.train(self.training)
        return adapter

    def _module_for_layer(self, path: str) -> nn.Module:
        return module_at(self.backbone, path)

    def _site(self, path: str) -> LayerSite:
        if path not in self._sites:
            module = self._module(path)
            cls = AttentionSite if isinstance(module, nn.MultiheadAttention) else LayerSite
            self._sites[path] = cls(module, path, self.routing)
        return self._sites[path]

    def _head_site(self, path: str) -> HeadSite:
        if path not in self._head_sites:
            self._head_sites[path] = HeadSite(self._module(path), path, self.routing)
        return self._head_sites[path]

    def delete_adapter(self, name: str) -> None:
        adapter = self._require(name)
        if self._merged and any(n == name for n, _ in self._merged):
            raise MergeError(f"adapter {name!r} is merged into the backbone; unmerge() first")
        for path, _ in adapter.layer_items():
            self._sites[path].remove(name)
        for path, _ in adapter.head_items():
            self._head_sites[path].remove(name)
        for path, _ in adapter.norm_items():
            self._head_sites[path].remove(name)
        del self.adapters[name]
        if self._active is not None and name in _names(self._active):
            self.activate(None)

    def adapter_config(self, name: str) -> LoRAConfig:
        return self._require(name).config

    def set_head(self, name: str, path: str, module: nn.Module) -> None:
        """Replace adapter ``name``'s head at ``path`` with ``module`` (e.g. a classifier with another
        number of classes); it takes the adapter's device, mode and trainability."""
        adapter = self._require(name)
        key = module_key(path)
        if key not in adapter.heads:
            heads = ", ".join(p for p, _ in adapter.head_items()) or "none"
            raise TargetError(f"adapter {name!r} has no head {path!r} (heads: {heads})")
        module.to(next(iter(self.backbone.parameters()), torch.empty(0)).device)
        module.requires_grad_(name in _names(self._active))
        module.train(self.training)
        adapter.heads[key] = module
        self._head_sites[path].heads[name] = module

    # --- records: an adapter as plain data, for the file codecs --------------------------------
    def export_record(self, name: str) -> AdapterRecord:
        """A snapshot of adapter ``name``: config, layer specs, head and norm paths, tensors (CPU copies under
        their file keys), metadata and this backbone's fingerprint."""
        adapter = self._require(name)
        return AdapterRecord(
            config=copy.deepcopy(adapter.config),
            layers={p: m.spec() for p, m in adapter.layer_items()},
            heads=[p for p, _ in adapter.head_items()],
            norms=[p for p, _ in adapter.norm_items()],
            tensors=adapter.state_tensors(copy=True),
            metadata=copy.deepcopy(adapter.metadata),
            fingerprint=self.fingerprint,
        )

    def add_adapter_from_record(self, name: str, record: AdapterRecord, *, force: bool = False) -> Adapter:
        """Add adapter ``name`` from ``record``. A record made for another backbone is refused unless
        ``force``; heads take the saved output sizes; every tensor must match a key of the rebuilt adapter,
        with its shape. Nothing is added if anything is wrong."""
        source = record.source
        if record.fingerprint != self.fingerprint and not force:
            raise FingerprintMismatch(
                f"{source}: made for backbone {record.fingerprint[:12] or '?'}…, this backbone is "
                f"{self.fingerprint[:12]}… (pass force=True to load anyway)"
            )
        if name in self.adapters:
            raise ConfigError(f"an adapter named {name!r} already exists (delete_adapter it first)")
        config = copy.deepcopy(record.config)
        config.heads = list(record.heads)  # the paths the heads were found at, not the patterns
        tensors = record.tensors
        _check_claimed_ranks(record)
        head_modules = {p: head_from_tensors(self._module_for_layer(p), p, tensors, source) for p in config.heads}
        try:
            adapter = self.add_adapter(
                name, config, head_modules=head_modules, layer_specs=record.layers, norm_paths=record.norms
            )
        except LoRAConfigError as exc:  # a layer record the file holds: name the file
            raise AdapterFileError(f"{source}: {exc}") from None
        try:
            expected = adapter.state_tensors()
            missing = sorted(set(expected) - set(tensors))
            if missing:
                raise AdapterFileError(f"{source}: missing key {missing[0]}" + _more(missing))
            extra = sorted(set(tensors) - set(expected))
            if extra:
                raise AdapterFileError(f"{source}: unexpected key {extra[0]}" + _more(extra))
            for key in sorted(expected):
                got, want = tuple(tensors[key].shape), tuple(expected[key].shape)
                if got != want:
                    raise AdapterFileError(f"{source}: key {key} has shape {got}, expected {want}")
            for path, module in adapter.module_items():
                prefix = path + "."
                own = module.state_dict()
                module.load_state_dict({k[len(prefix) :]: t for k, t in tensors.items()
                                        if k.startswith(prefix) and k[len(prefix) :] in own})  # fmt: skip
        except Exception:
            self.delete_adapter(name)
            raise
        adapter.metadata = copy.deepcopy(record.metadata)
        return adapter

    # --- activation ----------------------------------------------------------------------------
    @property
    def active(self) -> str | Stack | Switch | None:
        return self._active

    def activate(self, spec: str | Stack | Switch | None) -> None:
        """Make ``spec`` the live composition. Only its adapters' parameters are trainable.

        O(1) in the number of layers: the sites read the shared routing at every forward.
        """
        if self._merged is not None:
            raise MergeError("adapters are merged into the backbone; unmerge() before activating others")
        names = _names(spec)
        for n in names:
            self._require(n)
        if isinstance(spec, Stack):  # a DoRA layer does not sum with other deltas (LayerSite.dora_blocker)
            self._check_stack_norms(spec)
            for site in self._sites.values():
                if (why := site.dora_blocker(spec.weighted)) is not None:
                    raise ConfigError(f"cannot activate {spec!r}: {why}")
        r = self.routing
        r.segments, r.switch = None, isinstance(spec, Switch)
        r.generation += 1
        if spec is None:
            r.weighted, r.head = (), None
        elif isinstance(spec, str):
            r.weighted, r.head = ((spec, 1.0),), spec
        elif isinstance(spec, Stack):
            r.weighted, r.head = spec.weighted, self._stack_head(spec)
        elif isinstance(spec, Switch):
            r.weighted, r.head = (), None
        else:
            raise ConfigError(f"cannot activate {spec!r}: give an adapter name, a Stack or a Switch")
        for n, adapter in self.adapters.items():
            adapter.requires_grad_(n in names)
        self._active = spec

    def _check_stack_norms(self, stack: Stack) -> None:
        """A Stack runs the norms of one adapter, the one whose head runs. Unless the Stack names it
        (``head=``), a stacked adapter that owns a norm where that one owns none would have its deltas run on
        the backbone's norm instead of its own without anyone having said so: refused."""
        if stack.head is not None:
            return
        head = self._stack_head(stack)
        mine = {p for p, _ in self.adapters[head].norm_items()} if head else set()
        for name in stack.names:
            missing = [p for p, _ in self._require(name).norm_items() if p not in mine]
            if missing:
                raise ConfigError(
                    f"cannot stack {name!r}: it owns the norm at {missing[0]}, and a Stack runs the norms of the "
                    f"adapter whose head runs ({head or 'none'}), which has none there; say which with Stack(..., "
                    f"head={name!r}), or combine them into one adapter"
                )

    def _stack_head(self, stack: Stack) -> str | None:
        if stack.head is not None:
            if stack.head:
                self._require(stack.head)
            return stack.head or None
        # with no head to run, the norms go with the first stacked adapter that owns some
        return next((n for n in stack.names if len(self.adapters[n].heads)), None) or next(
            (n for n in stack.names if len(self.adapters[n].norms)), None
        )

    @contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Run the bare backbone inside the block (merged deltas are taken out and put back exactly)."""
        merged = self._merged
        if merged is not None:
            self.unmerge()
        previous = self.routing.enabled
        self.routing.enabled = False
        try:
            yield
        finally:
            self.routing.enabled = previous
            if merged is not None:
                self._merge_weighted(merged, self._merged_head)

    # --- forward -------------------------------------------------------------------------------
    def forward(
        self, *args: Any, route: Sequence[str | None] | None = None, unrouted: Sequence[str] = (), **kwargs: Any
    ) -> Any:
        """The backbone's forward with the live composition. With an active Switch, ``route`` names one adapter
        (or None) per sample; every input tensor whose first dimension is the batch size is routed with its
        sample, except keyword arguments named in ``unrouted`` (a tensor whose first dimension only happens
        to equal the batch size)."""
        if route is None:
            if isinstance(self._active, Switch) and self.routing.enabled:
                raise ConfigError("a Switch is active: pass route=[adapter per sample]")
            if unrouted:
                raise ConfigError("unrouted= only means something with route=")
            out = self.backbone(*args, **kwargs)
            self.routing.keep_for_backward(out)
            return out
        return self._routed_forward(args, kwargs, route, unrouted)

    def _routed_forward(
        self, args: tuple, kwargs: dict, route: Sequence[str | None], unrouted: Sequence[str] = ()
    ) -> Any:
        """The backbone on the batch sorted by adapter. Every input tensor with the batch's rows travels with
        it (see compose/routing.py). A tensor output comes back as a RoutedOutput (each adapter's rows at
        its head's width); an output of any other structure (tuple, dict, ModelOutput…) comes back with the
        same structure, each per-sample tensor in input order (heads of different widths zero-padded)."""
        if not isinstance(self._active, Switch):
            raise ConfigError("route= needs an active Switch: model.activate(Switch('a', 'b', ...))")
        batch = len(route)
        device = next(iter(self.backbone.parameters()), torch.empty(0)).device
        plan = Plan.build(route, self._active.names, batch, device)
        caches: list[Any] = []  # key/value caches given: reordered in place, put back below
        r = self.routing
        try:
            routed_args, routed_kwargs = route_inputs(args, kwargs, plan.perm, batch, unrouted, caches)
            r.segments, r.batch_size, r.widths = plan.segments, batch, {}
            sorted_out = self.backbone(*routed_args, **routed_kwargs)
            r.keep_for_backward(sorted_out)  # checkpointed layers recompute with these rows in backward
            if isinstance(sorted_out, torch.Tensor):
                return RoutedOutput(sorted_out, plan, dict(r.widths))
            loss = sorted_out.get("loss") if isinstance(sorted_out, Mapping) else None
            if loss is not None and len(set(r.widths.values())) > 1:
                raise ConfigError(
                    f"the model computed its own loss over heads of different widths {dict(r.widths)}, whose "
                    "logits are zero-padded to the widest: call it without labels and take each task's loss from "
                    "its own rows at its own width"
                )
            return restore_order(sorted_out, plan.perm, batch, done=caches)
        finally:
            r.segments = None
            put_back(caches, plan.perm)

    def train(self, mode: bool = True) -> AdapterModel:
        super().train(mode)
        if mode:  # the shared backbone's running statistics are frozen like its weights
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    # --- merge ---------------------------------------------------------------------------------
    def merge(self, spec: str | Stack) -> None:
        """Fold the deltas into the backbone weights (zero-overhead inference); exact ``unmerge()``."""
        if self._merged is not None:
            raise MergeError("adapters are already merged; unmerge() first")
        if isinstance(spec, str):
            self._require(spec)
            weighted, head = ((spec, 1.0),), spec
        elif isinstance(spec, Stack):
            for n in spec.names:
                self._require(n)
            self._check_stack_norms(spec)
            weighted, head = spec.weighted, self._stack_head(spec)
        else:
            raise ConfigError(f"cannot merge {spec!r}: give an adapter name or a Stack")
        self._merge_weighted(weighted, head)

    def _merge_weighted(self, weighted: tuple[tuple[str, float], ...], head: str | None) -> None:
        for site in self._sites.values():  # check every layer before changing any
            if (why := site.merge_blocker(weighted)) is not None:
                raise MergeError(f"cannot merge: {why}")
        for site in self._sites.values():
            site.merge(weighted)
        self._previous = (self._active, self.routing.weighted, self.routing.head, self.routing.switch)
        self.routing.weighted, self.routing.head, self.routing.switch = (), head, False
        self.routing.generation += 1
        self._active = None  # the merged weights are the live composition until unmerge()
        self._merged, self._merged_head = weighted, head

    def unmerge(self) -> None:
        """Restore the backbone weights bit for bit."""
        if self._merged is None:
            return
        for site in self._sites.values():
            site.unmerge()
        self._active, self.routing.weighted, self.routing.head, self.routing.switch = self._previous
        self.routing.generation += 1
        self._merged = None

    @property
    def merged(self) -> tuple[tuple[str, float], ...] | None:
        return self._merged

    # --- combine --------------------------------------------------------------------------------
    def combine(
        self,
        new_name: str,
        names: Sequence[str],
        weights: Sequence[float] | None = None,
        method: str = "linear",
        **params: Any,
    ) -> Adapter:
        """A new adapter from several: Σ wᵢ·ΔWᵢ combined by ``method`` on each layer's full delta.

        Methods: ``linear`` / ``cat`` (exact, rank Σrᵢ; task arithmetic, negative weights allowed),
        ``svd`` (best rank-``rank`` approximation, from the factors), ``ties`` (``density``,
        ``sign="total"|"frequency"``), ``dare_linear`` / ``dare_ties`` (``density``, ``seed``),
        ``magnitude_prune`` (``density``); the dense methods are factorised back to ``rank``
        (default Σrᵢ). Weights default to 1/n. Heads are averaged with the weights normalised to sum 1,
        or taken from ``head="<adapter>"`` (``head=""``: none). Norms owned by the sources are
        averaged the same way — affine parameters and running mean and variance — or taken from
        ``norms="<adapter>"`` (``norms=""``: the backbone's). The recipe and the relative Frobenius
        error of each truncation are in ``adapter.metadata["recipe"]``.
        """
        sources = [(n, self._require(n)) for n in names]
        if new_name in self.adapters:
            raise ConfigError(f"an adapter named {new_name!r} already exists (delete_adapter it first)")
        record = combine_adapters(
            sources, weights, method, base_for=self._module_for_layer, fingerprint=self.fingerprint, **params
        )
        return self.add_adapter_from_record(new_name, record)

    # --- counts --------------------------------------------------------------------------------
    def num_backbone_parameters(self) -> int:
        return sum(p.numel() for p in self.backbone.parameters())

    def num_trainable_parameters(self, name: str) -> int:
        """Parameters trained for this adapter: its LoRA factors, heads and norms."""
        return self._require(name).num_parameters()

    def parameter_counts(self) -> dict[str, dict[str, float]]:
        """Per adapter: LoRA, head and norm parameters, total and share of the backbone's."""
        backbone = self.num_backbone_parameters()
        out = {}
        for name, adapter in self.adapters.items():
            lora = sum(p.numel() for p in adapter.layers.parameters())
            heads = sum(p.numel() for p in adapter.heads.parameters())
            norms = sum(p.numel() for p in adapter.norms.parameters())
            total = lora + heads + norms
            out[name] = {"lora": lora, "heads": heads, "norms": norms, "total": total, "share": total / backbone}
        return out

    # --- files ---------------------------------------------------------------------------------
    def save_adapter(self, name: str, path: str | Path) -> None:
        """Write adapter ``name`` as an adapter file (safetensors; the same adapter, the same bytes)."""
        adapter_file.save(self.export_record(name), path)

    def load_adapter(self, name: str, path: str | Path, *, force: bool = False) -> Adapter:
        return self.add_adapter_from_record(name, adapter_file.load(path), force=force)

    def adapter_to_bytes(self, name: str) -> bytes:
        return adapter_file.encode(self.export_record(name))

    def adapter_from_bytes(self, name: str, data: bytes, *, force: bool = False) -> Adapter:
        return self.add_adapter_from_record(name, adapter_file.decode(data), force=force)

    def export_peft(self, name: str, directory: str | Path, *, base_model_name_or_path: str | None = None) -> None:
        """Write adapter ``name`` as a PEFT LoRA directory. When PEFT is known to compute it differently (an
        nn.MultiheadAttention LoRA, PEFT <= 0.21), a ``PeftCompatibilityWarning`` says so in one line."""
        record = self.export_record(name)
        peft.export_peft(record, directory, base_model_name_or_path=base_model_name_or_path)
        for caveat in peft.peft_caveats(record):
            warnings.warn(f"adapter {name!r}: {caveat}", peft.PeftCompatibilityWarning, stacklevel=2)

    def import_peft(self, directory: str | Path, name: str, *, adapter_name: str = "default") -> Adapter:
        """Add the LoRA adapter of a PEFT directory as ``name``. When PEFT is known to compute it differently
        (an nn.MultiheadAttention LoRA, PEFT <= 0.21: outputs seen in PEFT are not the ones here), a
        ``PeftCompatibilityWarning`` says so in one line."""
        record = peft.import_peft(self.backbone, directory, adapter_name=adapter_name)
        # a PEFT directory names no backbone: finding every module it adapts in this one is the check
        adapter = self.add_adapter_from_record(name, record, force=True)
        for caveat in peft.peft_caveats(record):
            warnings.warn(f"adapter {name!r}: {caveat}", peft.PeftCompatibilityWarning, stacklevel=2)
        return adapter


def _names(spec: str | Stack | Switch | None) -> tuple[str, ...]:
    if spec is None:
        return ()
    if isinstance(spec, str):
        return (spec,)
    if isinstance(spec, Stack | Switch):
        return spec.names
    return ()


def _check_claimed_ranks(record: AdapterRecord) -> None:
    """Each layer's rank as its record states it (``rank``, else ``r``) against the rows of the lora_A tensor
    it comes with, before any layer is built: a hostile record claiming rank 4,194,304 beside rank-2 tensors
    is refused here instead of allocating gigabytes for factors the tensors then fail to fill."""
    missing = sorted(f"{path}.lora_A.weight" for path in record.layers if f"{path}.lora_A.weight" not in record.tensors)
    if missing:
        raise AdapterFileError(f"{record.source}: missing key {missing[0]}" + _more(missing))
    for path, spec in record.layers.items():
        if not isinstance(spec, dict):
            raise AdapterFileError(f"{record.source}: the record of layer {path} is not a mapping")
        a = record.tensors[f"{path}.lora_A.weight"]
        rows = a.shape[0] if a.dim() >= 1 else 0
        # A has ``rank`` rows where the record states it (a conv), else r; r never exceeds them (a grouped
        # conv's rank rounds r up to a multiple of the groups)
        rank, r = spec.get("rank"), spec.get("r")
        if type(rank) is int and rank != rows:
            wrong = ("rank", rank)
        elif type(r) is int and (r > rows or (rank is None and r != rows)):
            wrong = ("r", r)
        else:
            continue
        raise AdapterFileError(
            f"{record.source}: layer {path} is recorded with {wrong[0]} = {wrong[1]}, but its lora_A has {rows} rows"
        )


def _more(keys: list[str]) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""


def _under_any(path: str, roots: Sequence[str]) -> bool:
    return any(path.startswith(root + ".") for root in roots)


def _close(pattern: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(pattern, names, n=4, cutoff=0.5)
    if not close:
        close = [n for n in names if "." not in n][:4]
    return f"; close module names: {', '.join(close)}" if close else ""


class OversizedDeltaWarning(AdapterHubWarning):
    """Targets whose LoRA delta has more parameters than the layer it adapts: a depthwise conv gets rank
    ⌈r/g⌉ = 1 per channel, so its delta holds C·k² + C parameters against the layer's C·k²."""


def _warn_oversized(name: str, adapter: Adapter, backbone: nn.Module) -> None:
    """One warning per adapter, with the numbers, when some of its deltas outgrow their layers (all parameters
    of the LoRA layer against all of the base module's): such a layer is cheaper trained whole (in ``heads``)
    and cheapest left out of the targets."""
    over = []
    for path, layer in adapter.layer_items():
        delta = sum(p.numel() for p in layer.parameters())
        base = sum(p.numel() for p in module_at(backbone, path).parameters())
        if delta > base:
            over.append((path, delta, base))
    if over:
        path, delta, base = over[0]
        total, size = sum(o[1] for o in over), sum(o[2] for o in over)
        warnings.warn(OversizedDeltaWarning(
            f"adapter {name!r}: {len(over)} target layer(s) get a delta larger than the layer itself ({total:,} "
            f"delta parameters against {size:,} in those layers; {path}: {delta:,} against {base:,}); leave them "
            "out of the targets, or list them in heads to train them whole"
        ), stacklevel=3)  # fmt: skip

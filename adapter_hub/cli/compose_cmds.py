"""adapter-hub combine: combine registered versions into a new registered version (the library's ``combine``).

``compose average`` (the same command) and ``compose stack`` (``combine --method linear`` with weights 1 each)
are kept as aliases. Neither runs a ``Stack``: both register a new adapter; a ``Stack`` sums live adapters at
forward time and is a library call (``model.activate(Stack(...))``)."""

from __future__ import annotations

import click

from ..combine_methods import METHODS
from ..errors import ConfigError
from ._app import State, emit_json, key_option, pass_state


def _weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise ConfigError(f"--weights takes comma-separated numbers, got {text!r}") from None


_NORMS_HELP = ("REF whose normalisation layers the result keeps ('' for the backbone's); default: affine parameters "
               "and running statistics averaged with the weights.")  # fmt: skip


@click.group()
def compose() -> None:
    """Aliases of `combine`: `compose average` is `combine`; `compose stack` is `combine --method linear`
    with weights 1 each (the exact sum)."""


def _run(state: State, refs: tuple[str, ...], output: str, weights: str | None, method: str, **params) -> None:
    from ..pipelines import compose_refs

    version = compose_refs(state.hub(), list(refs), output, weights=_weights(weights), method=method, **params)
    if state.json:
        emit_json(version.to_dict())
    else:
        click.echo(f"registered {version.ref} ({method} of {len(refs)} versions)")


@compose.command("stack")
@click.argument("refs", nargs=-1, required=True)
@click.option("-o", "--output", required=True, help="TASK/ADAPTER of the new version.")
@click.option("--weights", help="Comma-separated weights (default 1 each; negative removes a task).")
@click.option("--head", help="REF whose head the result keeps ('' for none); default: averaged.")
@click.option("--norms", help=_NORMS_HELP)
@key_option
@pass_state
def stack(state: State, refs: tuple[str, ...], output: str, weights: str | None, head: str | None,
          norms: str | None, key: str | None) -> None:  # fmt: skip
    """Register the exact sum Σ wᵢ·ΔWᵢ of REFS (rank Σrᵢ) as one adapter: alias of `combine --method linear`
    with weights 1 each (not a live Stack)."""
    _run(state, refs, output, ",".join(["1"] * len(refs)) if weights is None else weights, "linear", head=head,
         norms=norms, key=key)  # fmt: skip


def _combine_command(name: str, help_text: str) -> click.Command:
    """The `combine` command under ``name``: built twice, as `combine` and as its alias `compose average`."""

    @click.command(name, help=help_text)
    @click.argument("refs", nargs=-1, required=True)
    @click.option("-o", "--output", required=True, help="TASK/ADAPTER of the new version.")
    @click.option("--weights", help="Comma-separated weights (default 1/n each).")
    @click.option("--method", type=click.Choice(METHODS), default="linear", show_default=True)
    @click.option("--density", type=float, help="ties, dare_*, magnitude_prune: in (0, 1].")
    @click.option("--rank", type=int, help="svd and the dense methods: rank of the result (at least 1).")
    @click.option("--seed", type=int, default=0, show_default=True, help="dare_*: seed of the drop mask.")
    @click.option("--head", help="REF whose head the result keeps ('' for none); default: averaged.")
    @click.option("--norms", help=_NORMS_HELP)
    @key_option
    @pass_state
    def command(state: State, refs: tuple[str, ...], output: str, weights: str | None, method: str,
                density: float | None, rank: int | None, seed: int, head: str | None, norms: str | None,
                key: str | None) -> None:  # fmt: skip
        _run(state, refs, output, weights, method, density=density, rank=rank, seed=seed, head=head, norms=norms,
             key=key)  # fmt: skip

    return command


combine = _combine_command(
    "combine",
    "Combine REFS into one new adapter by METHOD, on each layer's full delta, and register it as TASK/ADAPTER "
    "(recorded with composed_from edges). The backbone's weights are not changed (that would be a merge).",
)
average = _combine_command("average", "Alias of `adapter-hub combine`.")
compose.add_command(average)

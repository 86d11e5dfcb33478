"""adapter-hub compose stack|average: combine registered versions into a new registered version."""

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


@click.group()
def compose() -> None:
    """Combine adapter versions into a new one (recorded with composed_from edges)."""


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
@key_option
@pass_state
def stack(state: State, refs: tuple[str, ...], output: str, weights: str | None, head: str | None,
          key: str | None) -> None:  # fmt: skip
    """Register the exact sum Σ wᵢ·ΔWᵢ of REFS (rank Σrᵢ) as one adapter."""
    _run(state, refs, output, weights or ",".join(["1"] * len(refs)), "linear", head=head, key=key)


@compose.command("average")
@click.argument("refs", nargs=-1, required=True)
@click.option("-o", "--output", required=True, help="TASK/ADAPTER of the new version.")
@click.option("--weights", help="Comma-separated weights (default 1/n each).")
@click.option("--method", type=click.Choice(METHODS), default="linear", show_default=True)
@click.option("--density", type=float, help="ties, dare_*, magnitude_prune: in (0, 1].")
@click.option("--rank", type=int, help="svd and the dense methods: rank of the result (at least 1).")
@click.option("--seed", type=int, default=0, show_default=True, help="dare_*: seed of the drop mask.")
@click.option("--head", help="REF whose head the result keeps ('' for none); default: averaged.")
@key_option
@pass_state
def average(state: State, refs: tuple[str, ...], output: str, weights: str | None, method: str,
            density: float | None, rank: int | None, seed: int, head: str | None, key: str | None) -> None:  # fmt: skip
    """Combine REFS into one adapter by METHOD, on each layer's full delta."""
    _run(state, refs, output, weights, method, density=density, rank=rank, seed=seed, head=head, key=key)

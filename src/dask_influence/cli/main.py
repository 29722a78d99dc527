"""Entry point of the ``dask-influence`` command."""

from __future__ import annotations

import click

from .. import __version__
from .demo import demo
from .evaluate import evaluate
from .inspect import inspect_store
from .plot import plot
from .rank import rank
from .run import run
from .top import top


@click.group(name="influence", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dask-influence")
def cli() -> None:
    """Influence functions for PyTorch models at any scale."""


cli.add_command(run)
cli.add_command(inspect_store)
cli.add_command(top)
cli.add_command(rank)
cli.add_command(plot)
cli.add_command(demo)
cli.add_command(evaluate)


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":  # pragma: no cover
    main()

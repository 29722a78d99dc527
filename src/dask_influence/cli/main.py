"""Entry point of the ``dask-influence`` command.

Each subcommand's module is imported only when that subcommand runs (or when ``--help``
lists them), so a command that reads a store (``inspect``, ``top``, ``rank``) starts without
importing torch or ``distributed``: the modules import those inside the commands that need them.
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib import import_module
from typing import Any

import click

from .. import __version__

COMMANDS: dict[str, tuple[str, str]] = {
    "run": (".run", "run"),
    "inspect": (".inspect", "inspect_store"),
    "top": (".top", "top"),
    "rank": (".rank", "rank"),
    "plot": (".plot", "plot"),
    "report": (".report", "report"),
    "demo": (".demo", "demo"),
    "evaluate": (".evaluate", "evaluate"),
    "index": (".index", "index"),
    "query": (".index", "query"),
}
"""Subcommand -> (module of this package, name of its click command)."""


def _load(name: str) -> click.Command:
    module, attr = COMMANDS[name]
    command: click.Command = getattr(import_module(module, __package__), attr)
    return command


class LazyCommands(dict):
    """The subcommands of the group by name, each imported on first access.

    Listing the names (``sorted(cli.commands)``, ``name in cli.commands``) imports nothing;
    ``cli.commands.get(name)``, ``cli.commands[name]``, ``values()`` and ``items()`` import
    what they return. Commands added with ``add_command`` are kept as given.
    """

    def _ensure(self, name: Any) -> None:
        if name in COMMANDS and not dict.__contains__(self, name):
            dict.__setitem__(self, name, _load(name))

    def __missing__(self, name: Any) -> click.Command:
        self._ensure(name)
        if not dict.__contains__(self, name):
            raise KeyError(name)
        return dict.__getitem__(self, name)

    def get(self, name: Any, default: Any = None) -> Any:
        """The command ``name`` (imported now if it is not yet), or ``default``."""
        self._ensure(name)
        return dict.get(self, name, default)

    def __contains__(self, name: object) -> bool:
        return name in COMMANDS or dict.__contains__(self, name)

    def __iter__(self) -> Iterator[str]:
        yield from COMMANDS
        yield from (name for name in dict.__iter__(self) if name not in COMMANDS)

    def __len__(self) -> int:
        return len(set(COMMANDS) | set(dict.keys(self)))

    def keys(self) -> Any:
        """The names, without importing anything."""
        return list(self)

    def values(self) -> Any:
        """Every command (imports them all)."""
        return [self[name] for name in self]

    def items(self) -> Any:
        """``(name, command)`` pairs (imports them all)."""
        return [(name, self[name]) for name in self]


class LazyGroup(click.Group):
    """A click group whose subcommands (:data:`COMMANDS`) are imported on first use."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands = LazyCommands(self.commands)

    def list_commands(self, ctx: click.Context) -> list[str]:
        """The subcommands' names, sorted (nothing is imported)."""
        return sorted(self.commands)


@click.group(name="influence", cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dask-influence")
def cli() -> None:
    """Influence functions for PyTorch models at any scale."""


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":  # pragma: no cover
    main()

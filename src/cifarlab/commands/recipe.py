"""A recipe's model, data and trainer for the commands that are not fit/validate/test (stats, lr-find, audit).

They take every fit flag (``--config RECIPE``, ``--data.root``, ``--model.optimizer.lr`` ...) and their own typed
options beside them, in one parser: ``--help`` lists both, ``--print_config`` prints both.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from cifarlab.commands.fit import CifarLabCLI


class RecipeCLI(CifarLabCLI):
    """LightningCLI without subcommands: the recipe, plus ``command``'s typed parameters (all but its first, which
    receives this object) as top-level flags; ``build=False`` only parses (the audit hands the flags to its folds).
    The command's name is its function's (``lr_find``: ``cifarlab lr-find``), its docstring the ``--help``."""

    def __init__(self, command: Callable, args: list[str], build: bool = True):
        self.command = command
        self.args = list(args)  # as given: the audit passes them on to its folds
        self.build = build
        super().__init__(prog=f"cifarlab {command.__name__.replace('_', '-')}",
                         description=inspect.getdoc(command).split("\n\n")[0], args=args, run=False,
                         save_config_callback=None)

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_function_arguments(self.command, skip={self.first_parameter})

    @property
    def first_parameter(self) -> str:
        return next(iter(inspect.signature(self.command).parameters))

    def before_instantiate_classes(self) -> None:
        if self.build:
            super().before_instantiate_classes()

    def instantiate_classes(self) -> None:
        if self.build:
            super().instantiate_classes()

    def run_command(self):
        """Call ``command`` with this object and its parsed options."""
        names = list(inspect.signature(self.command).parameters)[1:]
        return self.command(self, **{name: self.config[name] for name in names})


def option_value(argv: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in ``argv`` (the last one wins, as in the parser)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def without_options(argv: list[str], *names: str) -> list[str]:
    """``argv`` without ``--name VALUE`` / ``--name=VALUE`` for each of ``names``: the flags a command passes on."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg in names and i + 1 < len(argv):
            skip = True
        elif not any(arg.startswith(name + "=") for name in names):
            out.append(argv[i])
    return out

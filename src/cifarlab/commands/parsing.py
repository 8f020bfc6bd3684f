"""The parsers of the commands: jsonargparse's, with one-line errors and a ``--config`` that accepts a fit recipe.

fit/validate/test/stats/lr-find/audit parse a recipe with LightningCLI (``fit.OneLineErrorParser``); app/predict/report/
export parse a typed function's parameters (``command_parser``). Both give ``--config FILE``, ``--print_config`` and
a ``--help`` that lists each typed option with its docstring.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

from cifarlab.errors import CifarlabError
from cifarlab.settings import LEGACY_NAMES


class HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help (each option's type and default after its docstring), the description's lines as written
    (the command table at the top of ``cifarlab --help``)."""


class OneLineErrors:
    """A bad option is one line on stderr and exit status 2, not the usage of every option above it."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:  # parsing inside a program (tests, debug mode): let the caller see the error
            return super().error(message, ex)
        summary = summarize_parse_error(str(message))
        summary += legacy_hint(summary)
        prog = self.prog.replace(" [options]", "")
        sys.stderr.write(f"cifarlab: error: {summary} (`{prog} --help` lists the options)\n")
        self.exit(2)


class CommandParser(OneLineErrors, ArgumentParser):
    """The parser of a command that reads checkpoints (app, predict, report, export)."""


def summarize_parse_error(message: str) -> str:
    """jsonargparse's error as one line: for a field of a settings group (a union with None), the field and what it
    expects (``Parser key "model.tta.level": Expected a typing.Literal[0, 1, 2]. Got value: 3``), not every type
    the union tried."""
    lines = [line.strip().removeprefix("- ") for line in message.splitlines() if line.strip()]
    keys = []
    for line in lines:
        key = re.match(r'Parser key "([^"]+)"', line)
        if key:
            keys.append(key.group(1))
        elif (line.startswith("Expected") and "NoneType" not in line or "is not accepted" in line) and keys:
            return f'Parser key "{".".join(keys)}": {line}'
    return " ".join(lines[:3]) + (" ..." if len(lines) > 3 else "")


def legacy_hint(message: str) -> str:
    """A hint when the error names a model argument that moved into a settings group (a flat ``--model.lr`` flag,
    ``model: {lr: 0.1}`` in an older recipe or suggested_lr.yaml)."""
    if "is not accepted" in message:
        return ""  # an unknown field inside a group: the message names it
    flat = re.findall(r"model\.(\w+)(?![.\w])", message)  # a flag, or a string where a group belongs
    if "Group 'model' does not accept option" in message:  # a flat key in a YAML file
        flat += re.findall(r"option '(\w+)'", message)
    moved = [name for name in flat if name in LEGACY_NAMES]
    if not moved:
        return ""
    group, field = LEGACY_NAMES[moved[0]]
    return (f"; model settings are grouped now: --model.{moved[0]} is --model.{group}.{field} "
            "(`cifarlab fit --config fast --print_config` shows a recipe's layout)")


# Sections of a fit configuration: in a recipe or a run's config.yaml given to a checkpoint command's --config, the
# options the command shares with fit (data.root, data.source) are taken and the rest of these sections skipped.
FIT_SECTIONS = {"seed_everything", "trainer", "model", "checkpoint", "run", "budget", "ckpt_path", "optimizer",
                "lr_scheduler", "data"}


class CommandConfigFile(ActionConfigFile):
    """``--config FILE``: a YAML file of the command's options, nested by their dots (later files, then flags after
    them, win); a fit recipe or a run's config.yaml contributes the options it shares with the command."""

    def __call__(self, parser, cfg, values, option_string=None):
        path = Path(values).expanduser()
        if not path.is_file():  # inline YAML: jsonargparse reads it, every key must be the command's
            return super().__call__(parser, cfg, values, option_string)
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except OSError as err:
            raise CifarlabError(f"--config {values}: cannot read it ({err.strerror or err})") from None
        except yaml.YAMLError as err:
            raise CifarlabError(f"--config {values} is not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(tree, dict):
            raise CifarlabError(f"--config {values} must be a YAML mapping of options (e.g. `ckpt: PATH`)")
        known = set(parser.get_defaults().keys()) - {self.dest}
        options = {}
        for key, value in _flatten(tree).items():
            if key in known:
                options[key] = value
            elif key.split(".")[0] not in FIT_SECTIONS:
                raise CifarlabError(f"--config {values}: unknown option {key!r}; {parser.prog} takes "
                                    f"{', '.join(sorted(known))}")
        self.apply_config(parser, cfg, self.dest, yaml.safe_dump(_nest(options)))


def _flatten(tree: dict, prefix: str = "") -> dict:
    """``{"data": {"root": "x"}}`` -> ``{"data.root": "x"}``."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _nest(flat: dict) -> dict:
    """``{"data.root": "x"}`` -> ``{"data": {"root": "x"}}``."""
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


@dataclass(frozen=True)
class EvalData:
    """The images a checkpoint command looks at (``--data.root``, ``--data.source``)."""

    root: str | None = None
    """Test data (ImageFolder root); default: the data the checkpoint was trained on."""
    source: Literal["auto", "cifar10", "folder"] = "auto"
    """What root holds: folder (train/<class>/, test/<class>/) or cifar10 (torchvision's files); auto: folder when a
    root is given. Without a root, the checkpoint's own source."""


CHECKPOINT_DATA = EvalData()  # the default: the data each checkpoint was trained on


def command_parser(command: Callable, prog: str, skip: set[str] | None = None) -> CommandParser:
    """A parser of ``command``'s typed parameters (``--name``; a dataclass parameter gives ``--name.field``), with
    ``--config``/``--print_config``; its docstring's first paragraph and ``Args:`` are the ``--help``."""
    description = inspect.getdoc(command).split("\n\n")[0]
    parser = CommandParser(prog=prog, description=description, formatter_class=HelpFormatter)
    parser.add_argument("--config", action=CommandConfigFile, metavar="FILE",
                        help="YAML file of these options (`ckpt: PATH`, `data: {root: DIR}`; a fit recipe or a run's "
                             "config.yaml gives its data.root). Flags after it win.")
    parser.add_function_arguments(command, as_group=False, skip=skip)
    return parser


def parse(parser: ArgumentParser, argv: list[str]) -> dict[str, Any]:
    """``argv`` parsed by ``parser``, dataclass options built: ``{option: value}`` (``--config`` left out)."""
    if "ensemble" in parser.get_defaults():
        argv = split_checkpoints(argv)
    options = parser.instantiate(parser.parse_args(argv)).as_dict()
    options.pop("config", None)
    return options


def split_checkpoints(argv: list[str]) -> list[str]:
    """``--ckpt A B C`` as ``--ckpt A --ensemble ["B", "C"]``: jsonargparse takes one value per flag."""
    out, i = [], 0
    while i < len(argv):
        out.append(argv[i])
        if argv[i] != "--ckpt":
            i += 1
            continue
        j = i + 1
        while j < len(argv) and not argv[j].startswith("-"):
            j += 1
        paths = argv[i + 1:j]
        out += paths[:1] + (["--ensemble", json.dumps(paths[1:])] if len(paths) > 1 else [])
        i = j
    return out

"""The ``cifarlab`` command.

  cifarlab stats    [--config RECIPE] [--data.root DIR]    mean/std of the training split + augmentation preview
  cifarlab lr-find  --config RECIPE [--num_iter 200] ...     LR range test -> plot + suggested LR
  cifarlab fit      --config RECIPE [--data.root DIR] ...    train, then test the best checkpoint
  cifarlab validate|test --config RECIPE --ckpt_path PATH
  cifarlab app      --ckpt PATH [--data.root DIR] [--host 127.0.0.1] [--port 7860]   Grad-CAM web app
  cifarlab predict  IMAGE... --ckpt PATH [--top_k 3]         top-k classes as JSON lines
  cifarlab report   --ckpt PATH [--data.root DIR] [--out DIR]  HTML report with curves, confusion, mistakes
  cifarlab export   --ckpt PATH --format onnx [--out FILE]    a model for onnxruntime (preprocessing inside)
  cifarlab audit    --config RECIPE --folds K [fit flags]     K-fold out-of-sample probabilities of the training set

fit/validate/test are LightningCLI's: every typed ``__init__`` argument of ``ImageClassifier``, ``CIFARDataModule``
and ``Trainer`` is a flag (``--model.optimizer.lr``, ``--data.batch_size``, ``--trainer.max_epochs``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import time
import warnings
from pathlib import Path

from jsonargparse import ArgumentError, set_parsing_settings
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ModelSummary
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cifarlab.budget import budget_callback, process_start_time
from cifarlab.callbacks import EpochSpeed, InterruptCheckpoint, RNGState, TestReport, last_checkpoint
from cifarlab.data import CIFARDataModule
from cifarlab.errors import CifarlabError
from cifarlab.loggers import run_loggers
from cifarlab.memory import tune_malloc
from cifarlab.module import ImageClassifier
from cifarlab.precision import choose_precision
from cifarlab.recipes import resolve_config_args
from cifarlab.runs import LAST, Run, claim_version, lr_find_dir, resolve_last, run_root
from cifarlab.signals import StopOnSignal, peer_failure, received_signal


class OneLineErrorParser(LightningArgumentParser):
    """jsonargparse's parser, but a bad option is one line on stderr, not the usage of every option above it."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:  # parsing inside a program (tests, debug mode): let the caller see the error
            return super().error(message, ex)
        summary = summarize_parse_error(str(message))
        summary += _legacy_hint(summary)
        prog = self.prog.replace(" [options]", "")
        sys.stderr.write(f"cifarlab: error: {summary} (`{prog} --help` lists the options)\n")
        self.exit(2)


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


class CommandParser(argparse.ArgumentParser):
    """argparse for the commands that are not LightningCLI's (app, predict, report, export, and the extra options of
    stats and lr-find): a bad option is one line on stderr, as for fit, not the usage above it."""

    def error(self, message: str):
        self.exit(2, f"cifarlab: error: {message} (`{self.prog} --help` lists the options)\n")


def _legacy_hint(message: str) -> str:
    """A hint when the error names a model argument that moved into a settings group (cifarlab before 2026-11-28's flat
    ``--model.lr``, ``model: {optimizer: muon}`` in an old recipe)."""
    from cifarlab.module import LEGACY_NAMES

    flat = re.findall(r"model\.(\w+)(?![.\w])", message)  # a flag, or a string where a group belongs
    if "Group 'model' does not accept option" in message:  # a flat key in a YAML file (an old suggested_lr.yaml)
        flat += re.findall(r"option '(\w+)'", message)
    if "is not accepted" in message:
        return ""  # an unknown field inside a group: the message names it
    moved = [name for name in flat if name in LEGACY_NAMES]
    if not moved:
        return ""
    group, field = LEGACY_NAMES[moved[0]]
    return (f"; model settings are grouped now: --model.{moved[0]} is --model.{group}.{field} "
            "(`cifarlab fit --config fast --print_config` shows a recipe's layout)")


class CifarLabCLI(LightningCLI):
    """LightningCLI with a run directory per run, checkpoint defaults, and a test of the best model after fit."""

    def __init__(self, **kwargs):
        self.ckpt = None  # the --ckpt_path Checkpoint, read while parsing
        self.resume_version: int | None = None  # the run version `fit --ckpt_path last` continues
        self.budget = None  # the --budget callback
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("trainer_defaults", {
            "callbacks": [LearningRateMonitor(logging_interval="step"), ModelSummary(max_depth=3),
                          EpochSpeed(), TestReport(), last_checkpoint(), InterruptCheckpoint(), RNGState(),
                          StopOnSignal()],
        })
        kwargs.setdefault("parser_class", OneLineErrorParser)
        kwargs.setdefault("parser_kwargs", {"description": __doc__,
                                            "formatter_class": argparse.RawDescriptionHelpFormatter})
        super().__init__(ImageClassifier, CIFARDataModule, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test; ``cifarlab predict`` is ours (image files in, JSON lines out)."""
        commands = LightningCLI.subcommands()
        commands.pop("predict", None)
        return commands

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run.dir", type=str, default="runs", help="Where run directories are created.")
        parser.add_argument("--run.name", type=str, default="default",
                            help="Runs go to <run.dir>/<run.name>/version_<n>/.")
        parser.add_argument("--budget", type=str | None, default=None,
                            help="fit only: a time budget for fit + test (10m, 90s, 1h30m, 600): a short probe of "
                                 "this machine's speed sizes the schedule (steps, epochs, early crops) to end "
                                 "within it; replaces --trainer.max_epochs/max_steps.")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val_acc", "checkpoint.mode": "max", "checkpoint.save_last": False,
                             "checkpoint.filename": CKPT_NAME,
                             "checkpoint.auto_insert_metric_name": False})
        # The head's size follows the data: folders with other class counts just work.
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads a --ckpt_path's hyperparameters into the model's configuration here, straight from the
        # file. Read it through Checkpoint instead: a pickle payload or a non-checkpoint is a one-line error, `fit`
        # refuses to continue another network, and checkpoints written with flat model arguments still load.
        from cifarlab.checkpoint import Checkpoint

        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        self.ckpt = None
        if not ckpt_path or ckpt_path == "last" or not Path(ckpt_path).expanduser().is_file():
            return
        self.ckpt = Checkpoint.read(ckpt_path)
        if sub == "fit":
            self.ckpt.check_arch(self.config[sub].get("model.arch"))
        hparams = {k: v for k, v in self.ckpt.hparams.items() if k != "class_names"}  # linked from the data
        exit_on_error, self.parser.exit_on_error = self.parser.exit_on_error, False
        try:
            self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)
        except ArgumentError as err:
            raise CifarlabError(f"--ckpt_path {ckpt_path}: its model settings do not fit this cifarlab version "
                                f"({summarize_parse_error(str(err))})") from None
        finally:
            self.parser.exit_on_error = exit_on_error

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        config["run"]["dir"] = run_root(config["run"]["dir"], config["trainer"].get("default_root_dir"))
        if config["trainer"].get("precision") is None:
            # Recipes leave precision to the machine: bf16 where it is native, fp32 on CPUs that only emulate it.
            choice = choose_precision(config["trainer"].get("accelerator"))
            config["trainer"]["precision"] = choice.precision
            if os.environ.get("LOCAL_RANK", "0") == "0":
                # stdout, like Lightning's own device lines: stderr stays for errors (one line each).
                print(f"cifarlab: precision {choice.precision} ({choice.reason}; --trainer.precision overrides)")
        if self.subcommand == "fit" and config["data"].get("val_size") == 0 and config["checkpoint"].get("monitor"):
            raise CifarlabError(f"--data.val_size 0 leaves nothing to validate, so --checkpoint.monitor "
                                f"{config['checkpoint']['monitor']} has no value to choose by: add "
                                "--checkpoint.monitor null (test the final weights) or hold images out")
        if self.subcommand == "validate" and config["data"].get("val_size") == 0:
            raise CifarlabError("--data.val_size 0 holds no image out to validate on: pass --data.val_size N "
                                "(or use `cifarlab test`)")
        if not config["checkpoint"].get("monitor") and config["checkpoint"].get("filename") == CKPT_NAME:
            config["checkpoint"]["filename"] = "epoch{epoch:02d}"  # no metric to put in the name
        if "weights_only" in config:
            config["weights_only"] = True  # Lightning's own loading of --ckpt_path: tensors and plain data, no pickles
        ckpt = config.get("ckpt_path")
        self.resume_version = None
        if ckpt == "last":
            config["ckpt_path"] = str(resolve_last(Path(config["run"]["dir"]) / config["run"]["name"]))
            if self.subcommand == "fit":
                self.resume_version = Run.of_checkpoint(config["ckpt_path"]).version  # log into the same run
        elif ckpt and ckpt not in ("best", "hpc", "registry") and not Path(ckpt).expanduser().is_file():
            # Now, not as Lightning's traceback after the run has started.
            raise CifarlabError(f"--ckpt_path {ckpt} not found: pass a .ckpt written by `cifarlab fit`, or 'last'")
        self.budget = budget_callback(config, self.subcommand, _COMMAND_START or time.time())

    def _check_checkpoint(self) -> None:
        """Refuse, in one line and before anything runs, a checkpoint with pickled objects or another network."""
        from cifarlab.checkpoint import Checkpoint

        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        if ckpt_path and Path(ckpt_path).expanduser().is_file():
            read_already = self.ckpt is not None and self.ckpt.path == Path(ckpt_path).expanduser()  # not "last"
            (self.ckpt if read_already else Checkpoint.read(ckpt_path)).check_fits(self.model)

    before_fit = before_validate = before_test = _check_checkpoint

    def instantiate_trainer(self, **kwargs):
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        logger = config["trainer"].get("logger")
        if self.subcommand in ("fit", "validate", "test") and logger is not False:
            # TensorBoard and CSV logs, checkpoints, config and report share one run directory; loggers the user
            # adds (W&B, MLflow, ...) come after these.
            root, name = Path(config["run"]["dir"]), config["run"]["name"]
            version = claim_version(root / name, self.resume_version if self.subcommand == "fit" else None)
            extra = [] if logger in (None, True) else list(logger) if isinstance(logger, (list, tuple)) else [logger]
            kwargs["logger"] = run_loggers(root, name, version, extra)
        elif self.subcommand is None:
            kwargs.setdefault("logger", False)  # stats / lr-find: no run directory
        trainer = super().instantiate_trainer(**kwargs)
        if self.budget is not None:
            trainer.callbacks.insert(0, self.budget)  # before the checkpoint callbacks, as Lightning orders them
        return trainer

    def after_fit(self) -> None:
        if self.trainer.interrupted or self.trainer.fast_dev_run:
            return
        # The recipe's checkpoint: the best by its monitor, or with `checkpoint.monitor: null` the final weights.
        best = next((c.best_model_path for c in self.trainer.checkpoint_callbacks
                     if c.filename != LAST and c.best_model_path), "")
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)


CKPT_NAME = "epoch{epoch:02d}-val_acc{val_acc:.4f}"  # the best checkpoint's name, when chosen on val_acc
_COMMAND_START: float | None = None  # when this command started (time.time()), for --budget


def _parse_extra(extra: argparse.ArgumentParser, argv: list[str]):
    """Split our own options off ``argv``; the rest is the recipe's, for LightningCLI."""
    if "-h" in argv or "--help" in argv:
        print(extra.format_help())  # LightningCLI prints the recipe's options next, and exits
    return extra.parse_known_args(argv)


def stats_main(argv: list[str]) -> None:
    """``cifarlab stats``: print mean/std of the training split, write an augmentation preview grid."""
    import numpy as np

    from cifarlab.report import save_image_grid

    extra = CommandParser(prog="cifarlab stats", add_help=False,
                                    description="Options of `cifarlab stats` (then the recipe's, below):")
    extra.add_argument("--out", default=None, help="Where to write augmentations.png (default <run.dir>/stats).")
    extra.add_argument("--num_images", type=int, default=32, help="Images in the preview grid.")
    opts, rest = _parse_extra(extra, argv)
    cli = CifarLabCLI(args=rest, run=False, save_config_callback=None)
    dm = cli.datamodule
    dm.prepare_data()
    dm.setup("fit")
    print(f"training images: {len(dm.train_set) + len(dm.val_set or [])} ({len(dm.classes)} classes) in {dm.data_root}")
    print(f"mean: {np.array2string(np.array(dm.mean), precision=4)}")
    print(f"std:  {np.array2string(np.array(dm.std), precision=4)}")
    print(f"cached in {dm.cache_dir}")
    out = Path(opts.out or Path(cli.config["run"]["dir"]) / "stats")
    out.mkdir(parents=True, exist_ok=True)
    n = min(opts.num_images, len(dm.train_set))
    x, y = dm.train_set.batch(range(n))  # raw uint8, augmented below by the recipe's back end
    aug = dm.train_transform()(x)
    save_image_grid(aug.numpy(), [dm.classes[i] for i in y.tolist()], out / "augmentations.png",
                    title=f"training augmentation ({dm.augment.backend})")
    print(f"augmentation preview: {out / 'augmentations.png'}")


def lr_find_main(argv: list[str]) -> None:
    """``cifarlab lr-find``: LR range test on the recipe's model and data."""
    from cifarlab.lr_find import lr_range_test

    extra = CommandParser(prog="cifarlab lr-find", add_help=False,
                                    description="Options of `cifarlab lr-find` (then the recipe's, below):")
    extra.add_argument("--min_lr", type=float, default=1e-7, help="First LR of the sweep.")
    extra.add_argument("--max_lr", type=float, default=10.0, help="Last LR of the sweep.")
    extra.add_argument("--num_iter", type=int, default=200, help="Batches in the sweep (LR grows exponentially).")
    extra.add_argument("--out", default=None, help="Output folder (default <run.dir>/<run.name>/lr_find).")
    opts, rest = _parse_extra(extra, argv)
    cli = CifarLabCLI(args=rest, run=False, save_config_callback=None)  # the sweep is no run: no config.yaml
    out = Path(opts.out or lr_find_dir(cli.config["run"]["dir"], cli.config["run"]["name"]))
    result = lr_range_test(cli.trainer, cli.model, cli.datamodule, out, opts.min_lr, opts.max_lr, opts.num_iter)
    print(f"suggested max LR: {result['lr']:.4g}  (plot: {result['plot']})")
    print(f"train with it:    cifarlab fit {' '.join(rest)} --model.optimizer.lr {result['lr']:.4g}")
    print(f"              or: cifarlab fit {' '.join(rest)} --config {result['config']}")


@contextlib.contextmanager
def _app_extras():
    """Turn a missing optional dependency of the app/report into a one-line error saying what to install."""
    try:
        yield
    except ImportError as err:
        raise CifarlabError(f"this command needs the app extras ({err.name} is missing): pip install -e '.[app]'") \
            from None


# Sections of a `fit` configuration that the checkpoint commands have no use for: a recipe or a run's config.yaml
# passed to `app`/`report`/`predict`/`export --config` contributes its data.root / data.source and nothing else.
FIT_SECTIONS = {"seed_everything", "trainer", "model", "checkpoint", "run", "budget", "ckpt_path", "optimizer",
                "lr_scheduler", "data"}


def _flatten(tree: dict, prefix: str = "") -> dict:
    """``{"data": {"root": "x"}}`` -> ``{"data.root": "x"}``."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with ``fit``'s two habits: ``--config FILE`` (YAML of the same options, nested
    by their dots; later files, then flags, win) and ``--print_config`` (the options as such a YAML file, then exit).
    """
    import yaml

    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML file of these options, e.g. `ckpt: PATH` and `data: {root: DIR}` (a fit recipe or "
                             "a run's config.yaml works too: its data.root is taken). Flags given after it win.")
    parser.add_argument("--print_config", action="store_true", help="Print the options as YAML and exit.")
    options = {opt.lstrip("-"): action for opt, action in parser._option_string_actions.items()
               if opt.startswith("--") and action.dest not in ("help", "config", "print_config")}
    files = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--config"]
    files += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
    for name in files:
        path = Path(name).expanduser()
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except OSError as err:
            raise CifarlabError(f"--config {name}: cannot read it ({err.strerror or err})") from None
        except yaml.YAMLError as err:
            raise CifarlabError(f"--config {name} is not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(tree, dict):
            raise CifarlabError(f"--config {name} must be a YAML mapping of options (e.g. `ckpt: PATH`)")
        for key, value in _flatten(tree).items():
            action = options.get(key)
            if action is None:
                if key.split(".")[0] in FIT_SECTIONS:
                    continue  # a fit recipe's setting: not this command's
                raise CifarlabError(f"--config {name}: unknown option {key!r}; {parser.prog} takes "
                                    f"{', '.join(sorted(options))}")
            parser.set_defaults(**{action.dest: value})
            action.required = False  # given by the file
    opts = parser.parse_args(argv)
    if opts.print_config:
        tree: dict = {}
        for key, action in sorted(options.items()):
            node = tree
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = getattr(opts, action.dest)
        print(yaml.safe_dump(tree, sort_keys=False), end="")
        raise SystemExit(0)
    return opts


def _ckpt_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = CommandParser(prog=prog, description=description)
    parser.add_argument("--ckpt", required=True, help="A checkpoint written by `cifarlab fit`.")
    parser.add_argument("--data.root", dest="root", default=None,
                        help="Test data (ImageFolder root); default: the data the checkpoint was trained on.")
    parser.add_argument("--data.source", dest="source", default="auto", choices=["auto", "cifar10", "folder"])
    return parser


def app_options(argv: list[str]) -> argparse.Namespace:
    """``cifarlab app``'s options. Gradio's own variables (GRADIO_SERVER_NAME, GRADIO_SERVER_PORT) set the defaults,
    as for any Gradio app; the flags win over them."""
    port = os.environ.get("GRADIO_SERVER_PORT", "7860")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise CifarlabError(f"GRADIO_SERVER_PORT={port!r} is not a port number: set it to 1-65535 or unset it")
    parser = _ckpt_parser("cifarlab app", "Serve the Grad-CAM web app for a checkpoint.")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="Interface to bind (0.0.0.0 exposes it to the network; default $GRADIO_SERVER_NAME "
                             "or 127.0.0.1).")
    parser.add_argument("--port", type=int, default=int(port), help="Port (default $GRADIO_SERVER_PORT or 7860).")
    parser.add_argument("--compare", default=None, metavar="CKPT",
                        help="A second checkpoint (same classes): adds a Compare tab (per-class accuracy, the images "
                             "one gets right and the other wrong, both CAMs).")
    parser.add_argument("--projection", default="tsne", choices=["tsne", "pca"],
                        help="How the embedding map is drawn (t-SNE: clearer clusters, ~30 s once per checkpoint).")
    return parse_with_config(parser, argv)


def app_main(argv: list[str]) -> None:
    """``cifarlab app``: the Gradio page, on 127.0.0.1 unless asked otherwise."""
    opts = app_options(argv)
    with _app_extras():
        from cifarlab.app import CifarApp, launch

    app = CifarApp(opts.ckpt, opts.root, opts.source, compare=opts.compare, projection=opts.projection)
    print(f"cifarlab app: http://{opts.host}:{opts.port}  (Ctrl-C to stop)")
    launch(app, opts.host, opts.port, block=True)


def predict_main(argv: list[str]) -> None:
    """``cifarlab predict``: top-k classes of image files, folders and globs, one JSON line each, as they are done."""
    import json

    import torch

    from cifarlab.checkpoint import load_classifier
    from cifarlab.inference import expand_images, predict_images

    parser = CommandParser(prog="cifarlab predict", description="Classify images (JSON lines, with the "
                           "recipe's test-time augmentation).")
    parser.add_argument("images", nargs="*", help="Image files, folders (searched recursively) or globs ('*.jpg').")
    parser.add_argument("--ckpt", required=True, help="A checkpoint written by `cifarlab fit`.")
    parser.add_argument("--top_k", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=64, help="Images per forward pass.")
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:1, mps ...")
    opts = parse_with_config(parser, argv)
    if not opts.images:
        raise CifarlabError("cifarlab predict needs images: files, folders or globs, e.g. cifarlab predict photo.jpg "
                            "--ckpt PATH")
    if opts.top_k < 1 or opts.batch_size < 1:
        raise CifarlabError("--top_k and --batch_size take positive integers")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if opts.device == "auto" else opts.device
    model = load_classifier(opts.ckpt)
    try:
        model.to(torch.device(device))
    except (RuntimeError, AssertionError, ValueError) as err:  # an unknown name, or no such device here
        raise CifarlabError(f"--device {opts.device}: {str(err).strip().splitlines()[0]}") from None
    paths, missing = expand_images(opts.images)
    failed = len(missing)
    for pattern in missing:
        print(json.dumps({"image": pattern, "error": "no such file, or no image in that folder or glob"}), flush=True)
    for record in predict_images(model, paths, opts.top_k, opts.batch_size):
        failed += "error" in record
        print(json.dumps(record), flush=True)
    if failed:
        raise SystemExit(1)


def report_main(argv: list[str]) -> None:
    """``cifarlab report``: a self-contained HTML report folder for a checkpoint."""
    from cifarlab.checkpoint import load_classifier
    from cifarlab.inference import eval_datamodule, predict_test_set

    with _app_extras():
        import cleanlab  # noqa: F401  (the data audit's label issues)
        import pytorch_grad_cam  # noqa: F401  (write_report draws CAMs)
    from cifarlab.audit import DUPLICATE_SIMILARITY, DataAudit, check_same_classes
    from cifarlab.report import write_report

    parser = _ckpt_parser("cifarlab report", "Write an HTML report (curves, confusion matrix, mistakes + CAMs, likely "
                                             "label errors, near-duplicates, embedding map, a second run compared).")
    parser.add_argument("--out", default=None, help="Output folder (default: <run dir>/report).")
    parser.add_argument("--count", type=int, default=32, help="Images shown per section.")
    parser.add_argument("--compare", default=None, metavar="CKPT", help="A second checkpoint to compare with.")
    parser.add_argument("--dup_threshold", type=float, default=DUPLICATE_SIMILARITY,
                        help="Similarity from which a test image counts as a near-duplicate of a training image.")
    parser.add_argument("--projection", default="tsne", choices=["tsne", "pca"], help="How the embedding map is drawn.")
    opts = parse_with_config(parser, argv)
    if opts.count < 1 or not 0 < opts.dup_threshold <= 1:
        raise CifarlabError("--count takes a positive integer and --dup_threshold a similarity in (0, 1]")
    model = load_classifier(opts.ckpt)
    other = load_classifier(opts.compare) if opts.compare else None
    if other is not None:
        check_same_classes(list(model.class_names), list(other.class_names), f"--ckpt {opts.ckpt}",
                           f"--compare {opts.compare}")
    dm = eval_datamodule(model, opts.root, opts.source)
    test = predict_test_set(model, opts.ckpt, dm)
    data_audit = DataAudit.build(model, opts.ckpt, test, dm, opts.projection)
    other_test = predict_test_set(other, opts.compare, dm) if other is not None else None
    out = Path(opts.out) if opts.out else Run.of_checkpoint(opts.ckpt).dir / "report"
    page = write_report(model, test, Path(opts.ckpt), out, opts.count, data_audit=data_audit, other=other,
                        other_test=other_test, dup_threshold=opts.dup_threshold)
    print(f"report: {page}")


def export_main(argv: list[str]) -> None:
    """``cifarlab export``: the checkpoint as an ONNX model (uint8 images in, probabilities out)."""
    from cifarlab.checkpoint import load_classifier
    from cifarlab.export import export_onnx

    parser = CommandParser(prog="cifarlab export", description="Export a checkpoint for deployment.")
    parser.add_argument("--ckpt", required=True, help="A checkpoint written by `cifarlab fit`.")
    parser.add_argument("--format", default="onnx", choices=["onnx"], help="Only ONNX for now.")
    parser.add_argument("--out", default=None, help="Output file (default: beside the checkpoint, .onnx).")
    parser.add_argument("--tta", action="store_true", help="Include the recipe's test-time augmentation.")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset version.")
    opts = parse_with_config(parser, argv)
    model = load_classifier(opts.ckpt)
    out = Path(opts.out) if opts.out else Path(opts.ckpt).with_suffix(".onnx")
    path = export_onnx(model, out, tta=opts.tta, opset=opts.opset)
    print(f"exported {path} ({path.stat().st_size / 2**20:.1f} MB): input 'images' (N, 3, 32, 32) uint8 RGB, "
          f"output 'probs' (N, {len(model.class_names)}) over {', '.join(model.class_names)}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``cifarlab`` console script."""
    global _COMMAND_START
    # A budget counts from the process's start for the console script (imports included), from this call for a
    # program that calls main() itself.
    _COMMAND_START = process_start_time() if argv is None else time.time()
    argv = list(sys.argv[1:] if argv is None else argv)
    # We hand LightningCLI the arguments it should parse (some are ours): its "args and sys.argv" notice is noise.
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    # Both loggers share the run directory on purpose; the CSV logger only rewrites its own metrics.csv.
    warnings.filterwarnings("ignore", message=".*Experiment logs directory .* exists and is not empty.*")
    # --data.val_size 0 hands Lightning no validation batches on purpose.
    warnings.filterwarnings("ignore", message=".*Total length of `list` across ranks is zero.*")
    # Dataclass fields (AugmentConfig) are documented by the string under each: show it in --help.
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    command = argv[0] if argv else None
    if command == "app":
        tune_malloc(server=True)
    elif command not in ("predict", "report", "export"):  # training and data work (fit, validate, test, lr-find, stats)
        tune_malloc()
    from cifarlab.crossval import audit_main

    commands = {"stats": stats_main, "lr-find": lr_find_main, "lr_find": lr_find_main, "app": app_main,
                "predict": predict_main, "report": report_main, "export": export_main, "audit": audit_main}
    try:
        argv = resolve_config_args(argv)  # `--config fast` is the packaged recipe
        if argv and argv[0] in commands:
            commands[argv[0]](argv[1:])
        else:
            CifarLabCLI(args=argv)
    except CifarlabError as err:
        print(f"cifarlab: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("cifarlab: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except SIGTERMException:  # every rank stopped at the same batch boundary (after saving last.ckpt when fitting)
        signum = received_signal() or signal.SIGTERM
        print(f"cifarlab: stopped by {signal.Signals(signum).name}", file=sys.stderr)
        raise SystemExit(128 + signum) from None
    except Exception as err:
        failure = peer_failure(err)
        if failure is None:
            raise
        print(f"cifarlab: error: {failure}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()

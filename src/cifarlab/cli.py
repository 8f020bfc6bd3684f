"""The ``cifarlab`` command.

  cifarlab stats    [--config RECIPE] [--data.root DIR]    mean/std of the training split + augmentation preview
  cifarlab lr-find  --config RECIPE [--num_iter 200] ...     LR range test -> plot + suggested --model.lr
  cifarlab fit      --config RECIPE [--data.root DIR] ...    train, then test the best checkpoint
  cifarlab validate|test --config RECIPE --ckpt_path PATH
  cifarlab app      --ckpt PATH [--data.root DIR] [--host 127.0.0.1] [--port 7860]   Grad-CAM web app
  cifarlab predict  IMAGE... --ckpt PATH [--top_k 3]         top-k classes as JSON lines
  cifarlab report   --ckpt PATH [--data.root DIR] [--out DIR]  HTML report with curves, confusion, mistakes
  cifarlab export   --ckpt PATH --format onnx [--out FILE]    a model for onnxruntime (preprocessing inside)
  cifarlab audit    --config RECIPE --folds K [fit flags]     K-fold out-of-sample probabilities of the training set

fit/validate/test are LightningCLI's: every typed ``__init__`` argument of ``ImageClassifier``,
``CIFARDataModule`` and ``Trainer`` is a flag (``--model.lr``, ``--data.batch_size``, ``--trainer.max_epochs``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import signal
import sys
import time
import warnings
from pathlib import Path

from jsonargparse import set_parsing_settings
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ModelSummary
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cifarlab.budget import budget_callback, process_start_time
from cifarlab.callbacks import EpochSpeed, InterruptCheckpoint, RNGState, TestReport
from cifarlab.data import CIFARDataModule
from cifarlab.errors import CifarlabError
from cifarlab.memory import tune_malloc
from cifarlab.module import ImageClassifier
from cifarlab.precision import choose_precision
from cifarlab.recipes import resolve_config_args
from cifarlab.runs import LAST, Run, check_writable, latest_checkpoint, lr_find_dir, next_version
from cifarlab.signals import StopOnSignal, peer_failure, received_signal


class OneLineErrorParser(LightningArgumentParser):
    """jsonargparse's parser, but a bad option is one line on stderr, not the usage of every option above it."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:  # parsing inside a program (tests, debug mode): let the caller see the error
            return super().error(message, ex)
        lines = [line.strip() for line in str(message).splitlines() if line.strip()]
        summary = " ".join(lines[:3]) + (" ..." if len(lines) > 3 else "")  # unions list every type tried
        prog = self.prog.replace(" [options]", "")
        sys.stderr.write(f"cifarlab: error: {summary} (`{prog} --help` lists the options)\n")
        self.exit(2)


class CifarLabCLI(LightningCLI):
    """LightningCLI with a run directory per run, checkpoint defaults, and a test of the best model after fit."""

    def __init__(self, **kwargs):
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
        # LightningCLI reads a --ckpt_path's hyperparameters into the model's config here. Read it safely first: a
        # pickle payload or a non-checkpoint is a one-line error, and `fit` refuses to continue another network.
        from cifarlab.inference import describe_model, read_checkpoint

        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if ckpt_path and ckpt_path != "last" and Path(ckpt_path).expanduser().is_file():
            self._checkpoint = (ckpt_path, read_checkpoint(ckpt_path))  # reused by _check_checkpoint
            hparams = self._checkpoint[1]["hyper_parameters"]
            wanted = self.config[sub].get("model.arch")
            if sub == "fit" and hparams.get("arch") != wanted:
                raise CifarlabError(f"checkpoint {ckpt_path} holds another network ({describe_model(hparams)}); "
                                    f"this run builds arch={wanted}: pass the recipe it was trained with, "
                                    "or train anew without --ckpt_path")
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        root_dir = config["trainer"].get("default_root_dir")
        if root_dir is not None:
            # Where every Lightning user puts a run: it is cifarlab's --run.dir (runs go to <dir>/<run.name>/).
            if config["run"]["dir"] not in ("runs", root_dir):
                raise CifarlabError(f"--trainer.default_root_dir {root_dir} and --run.dir {config['run']['dir']} "
                                    "both say where the run goes: pass one of them")
            config["run"]["dir"] = root_dir
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
        # A missing --ckpt_path would otherwise surface as Lightning's traceback after the run has started.
        ckpt = config.get("ckpt_path")
        self._resume_version = None
        if ckpt == "last":
            # Lightning looks for "last" in the new run's own (empty) folder: look in the run's earlier versions.
            run_root = Path(config["run"]["dir"]) / config["run"]["name"]
            found = latest_checkpoint(run_root)
            if found is None:
                raise CifarlabError(f"--ckpt_path last: no checkpoint under {run_root}/version_*/checkpoints/: "
                                    "start the run without --ckpt_path (or pass the --run.dir/--run.name it used)")
            config["ckpt_path"] = str(found)
            if self.subcommand == "fit":
                self._resume_version = Run(found.parent.parent).version  # log into the same run
        elif ckpt and ckpt not in ("best", "hpc", "registry") and not Path(ckpt).expanduser().is_file():
            raise CifarlabError(f"--ckpt_path {ckpt} not found: pass a .ckpt written by `cifarlab fit`, or 'last'")
        self._budget = budget_callback(config, self.subcommand, _COMMAND_START or time.time())
        if self.subcommand == "validate" and config["data"].get("val_size") == 0:
            raise CifarlabError("--data.val_size 0 holds no image out to validate on: pass --data.val_size N "
                                "(or use `cifarlab test`)")
        if not config["checkpoint"].get("monitor") and config["checkpoint"].get("filename") == CKPT_NAME:
            config["checkpoint"]["filename"] = "epoch{epoch:02d}"  # no metric to put in the name

    def _check_checkpoint(self) -> None:
        """Refuse, in one line and before anything runs, a checkpoint with pickled objects or another network."""
        from cifarlab.inference import check_fits, read_checkpoint

        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        if ckpt_path and Path(ckpt_path).expanduser().is_file():
            read = getattr(self, "_checkpoint", None)  # already read by _parse_ckpt_path, unless it was "last"
            ckpt = read[1] if read and read[0] == ckpt_path else read_checkpoint(ckpt_path)
            check_fits(ckpt, self.model, ckpt_path)

    before_fit = before_validate = before_test = _check_checkpoint

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "weights_only" in self._subcommand_method_arguments[subcommand]:
            kwargs["weights_only"] = True  # Lightning's own loading: tensors and plain data only, never pickles
        return kwargs

    def instantiate_trainer(self, **kwargs):
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        logger = config["trainer"].get("logger")
        if self.subcommand in ("fit", "validate", "test", "predict") and logger is not False:
            # TensorBoard and CSV logs, checkpoints, config and report share one run directory.
            root, name = Path(config["run"]["dir"]), config["run"]["name"]
            resume = getattr(self, "_resume_version", None) if self.subcommand == "fit" else None
            version = next_version(root / name) if resume is None else resume
            if os.environ.get("LOCAL_RANK", "0") != "0" and RUN_VERSION_ENV in os.environ:
                version = int(os.environ[RUN_VERSION_ENV])  # a DDP worker launched by rank 0: its folder
            os.environ[RUN_VERSION_ENV] = str(version)  # inherited by the DDP workers Lightning starts later
            check_writable(root / name)  # now, not when the first checkpoint is due
            # Loggers the user adds (W&B, MLflow, ...) come after these: the run directory (the first logger's),
            # metrics.csv, curves.png and --ckpt_path last keep working.
            extra = [] if logger in (None, True) else list(logger) if isinstance(logger, (list, tuple)) else [logger]
            kwargs["logger"] = [TensorBoardLogger(root, name=name, version=version, default_hp_metric=False),
                                KeepingCSVLogger(root, name=name, version=version), *extra]
        elif self.subcommand is None:
            kwargs.setdefault("logger", False)  # stats / lr-find: no run directory
        trainer = super().instantiate_trainer(**kwargs)
        if getattr(self, "_budget", None) is not None:
            trainer.callbacks.insert(0, self._budget)  # before the checkpoint callbacks, as Lightning orders them
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
RUN_VERSION_ENV = "CIFARLAB_RUN_VERSION"


def last_checkpoint() -> ModelCheckpoint:
    """Writes ``last.ckpt`` after every epoch. (Lightning 2.6's ``save_last=True`` only refreshes it when a
    top-k checkpoint is saved, so a run whose best epoch is not its final one would have a stale "last".)"""
    return ModelCheckpoint(filename=LAST, monitor=None, save_top_k=1, enable_version_counter=False)


class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing ``metrics.csv``; a resumed run appends to it instead."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])


class KeepingCSVLogger(CSVLogger):
    """``CSVLogger`` that keeps the rows already in ``metrics.csv`` (see ``_KeepingWriter``)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment


def _parse_extra(extra: argparse.ArgumentParser, argv: list[str]):
    """Split our own options off ``argv``; the rest is the recipe's, for LightningCLI."""
    if "-h" in argv or "--help" in argv:
        print(extra.format_help())  # LightningCLI prints the recipe's options next, and exits
    return extra.parse_known_args(argv)


def stats_main(argv: list[str]) -> None:
    """``cifarlab stats``: print mean/std of the training split, write an augmentation preview grid."""
    import numpy as np

    from cifarlab.report import save_image_grid

    extra = argparse.ArgumentParser(prog="cifarlab stats", add_help=False,
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

    extra = argparse.ArgumentParser(prog="cifarlab lr-find", add_help=False,
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
    print(f"train with it:    cifarlab fit {' '.join(rest)} --model.lr {result['lr']:.4g}")
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
    parser = argparse.ArgumentParser(prog=prog, description=description)
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

    from cifarlab.inference import (
        DECODE_MIN_SIZE,
        ImageError,
        classify,
        decode_upload,
        expand_images,
        load_classifier,
        model_input,
    )

    parser = argparse.ArgumentParser(prog="cifarlab predict", description="Classify images (JSON lines, with the "
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

    def flush(pending: list[tuple[str, torch.Tensor | str]]) -> None:
        # One forward pass for the decoded images; every line printed in the order the images were given.
        decoded = [x for _, x in pending if isinstance(x, torch.Tensor)]
        top = torch.topk(classify(model, torch.cat(decoded)), min(opts.top_k, len(model.class_names))) \
            if decoded else None
        row = 0
        for path, x in pending:
            if isinstance(x, str):
                print(json.dumps({"image": path, "error": x}), flush=True)
                continue
            values, indices = top.values[row].tolist(), top.indices[row].tolist()
            row += 1
            print(json.dumps({"image": path, "top_k": [{"class": model.class_names[i], "prob": round(float(p), 5)}
                                                       for p, i in zip(values, indices)]}), flush=True)

    pending: list[tuple[str, torch.Tensor | str]] = []
    in_batch = 0
    for path in paths:
        try:
            pending.append((path, model_input(decode_upload(path, min_size=DECODE_MIN_SIZE))))
            in_batch += 1
        except (ImageError, OSError) as err:
            failed += 1
            pending.append((path, str(err)))
        if in_batch == opts.batch_size:
            flush(pending)
            pending, in_batch = [], 0
    if pending:
        flush(pending)
    if failed:
        raise SystemExit(1)


def report_main(argv: list[str]) -> None:
    """``cifarlab report``: a self-contained HTML report folder for a checkpoint."""
    from cifarlab.inference import eval_datamodule, load_classifier, predict_test_set

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
    from cifarlab.export import export_onnx
    from cifarlab.inference import load_classifier

    parser = argparse.ArgumentParser(prog="cifarlab export", description="Export a checkpoint for deployment.")
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

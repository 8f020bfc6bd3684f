"""``cifarlab fit|validate|test``: LightningCLI over ``ImageClassifier`` and ``CIFARDataModule``.

Every typed ``__init__`` argument of the model, the data and the ``Trainer`` is a flag (``--model.optimizer.lr``,
``--data.batch_size``, ``--trainer.max_epochs``); a recipe (``--config fast``) sets many at once. ``CifarLabCLI`` adds a
run directory per run, checkpoint defaults, the machine's precision, ``--budget``, and a test of the best checkpoint
after fit. stats, lr-find and audit build their recipe's model and data with it too (``commands/recipe.py``).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ModelSummary
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cifarlab.budget import budget_callback
from cifarlab.callbacks import EpochSpeed, InterruptCheckpoint, RNGState, last_checkpoint
from cifarlab.checkpoint import Checkpoint
from cifarlab.commands.parsing import HelpFormatter, OneLineErrors, summarize_parse_error
from cifarlab.data import CIFARDataModule
from cifarlab.errors import CifarlabError
from cifarlab.fit_report import TestReport
from cifarlab.loggers import run_loggers
from cifarlab.module import ImageClassifier
from cifarlab.precision import choose_precision
from cifarlab.runs import LAST, Run, claim_version, resolve_last, run_root
from cifarlab.signals import StopOnSignal, exit_when_a_launched_rank_dies, peer_failure, received_signal

CKPT_NAME = "epoch{epoch:02d}-val_acc{val_acc:.4f}"  # the best checkpoint's name, when chosen on val_acc


class OneLineErrorParser(OneLineErrors, LightningArgumentParser):
    """LightningCLI's parser of a recipe (fit, validate, test; stats, lr-find and audit add their own options)."""


class CifarLabCLI(LightningCLI):
    """LightningCLI with a run directory per run, checkpoint defaults, and a test of the best model after fit."""

    def __init__(self, start: float | None = None, prog: str = "cifarlab", description: str | None = None, **kwargs):
        """``start``: when the command started (``time.time()``), from which ``--budget`` counts (default: now);
        ``prog`` and ``description``: the top of ``--help``. Other arguments are LightningCLI's."""
        self.start = time.time() if start is None else start
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
        kwargs.setdefault("parser_kwargs", {"prog": prog, "description": description or __doc__,
                                            "formatter_class": HelpFormatter})
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
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        self.ckpt = self.last_ckpt = None
        if ckpt_path == "last":  # the run's newest last.ckpt, found once; none found is an error later, with the others
            cfg = self.config[sub]
            try:
                ckpt_path = self.last_ckpt = str(resolve_last(
                    Path(run_root(cfg["run"]["dir"], cfg["trainer"].get("default_root_dir"))) / cfg["run"]["name"]))
            except CifarlabError:
                return
        if not ckpt_path or not Path(ckpt_path).expanduser().is_file():
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
            config["ckpt_path"] = self.last_ckpt or str(resolve_last(Path(config["run"]["dir"])
                                                                     / config["run"]["name"]))
            if self.subcommand == "fit":
                self.resume_version = Run.of_checkpoint(config["ckpt_path"]).version  # log into the same run
        elif ckpt and ckpt not in ("best", "hpc", "registry") and not Path(ckpt).expanduser().is_file():
            # Now, not as Lightning's traceback after the run has started.
            raise CifarlabError(f"--ckpt_path {ckpt} not found: pass a .ckpt written by `cifarlab fit`, or 'last'")
        # The time budget: planned now, its numbers written into the config the run is built from.
        self.budget = budget_callback(config, self.subcommand, self.start)
        if self.subcommand == "fit" and (config["data"].get("pruning") or {}).get("prune"):
            # Pruned epochs are shorter: the run's length is its steps, which the schedule is planned over.
            if not config["trainer"].get("max_steps") or config["trainer"]["max_steps"] < 0:
                raise CifarlabError("--data.pruning makes epochs shorter: give the run's length as "
                                    "--trainer.max_steps N (or --budget)")
            config["trainer"]["max_epochs"] = -1

    def _check_checkpoint(self) -> None:
        """Refuse, in one line and before anything runs, a checkpoint with pickled objects or another network."""
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


def main(argv: list[str], start: float | None = None, description: str | None = None) -> None:
    """``cifarlab fit|validate|test ...``: ``argv`` includes the subcommand."""
    exit_when_a_launched_rank_dies()
    CifarLabCLI(args=argv, start=start, description=description)


def stopped(err: BaseException) -> tuple[str | None, int]:
    """What to print and the exit status when a Lightning run ended by ``err``: a signal (every rank stopped at the
    same batch boundary, after saving last.ckpt when fitting) or a failed peer process; ``(None, 1)`` otherwise."""
    if isinstance(err, SIGTERMException):
        signum = received_signal() or signal.SIGTERM
        return f"stopped by {signal.Signals(signum).name}", 128 + signum
    failure = peer_failure(err)
    return (None, 1) if failure is None else (f"error: {failure}", 1)

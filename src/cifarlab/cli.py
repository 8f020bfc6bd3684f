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
and ``Trainer`` is a flag (``--model.optimizer.lr``, ``--data.batch_size``, ``--trainer.max_epochs``). Every command
takes ``--config FILE`` and ``--print_config``; ``cifarlab COMMAND --help`` lists its options.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import warnings
from pathlib import Path

from jsonargparse import set_parsing_settings

from cifarlab.errors import CifarlabError
from cifarlab.memory import tune_malloc
from cifarlab.recipes import resolve_config_args

# Each command's module, imported only when it runs: the app, predict and report never import Lightning (seconds of
# start-up). Each module's main takes the arguments after the command's name; fit's also takes the start time.
COMMANDS = {"stats": "stats", "lr-find": "lr_find", "lr_find": "lr_find", "app": "app", "predict": "predict",
            "report": "report", "export": "export", "audit": "audit"}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``cifarlab`` console script."""
    # A budget counts from the process's start for the console script (imports included), from this call for a
    # program that calls main() itself.
    start = process_start_time() if argv is None else time.time()
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_known_warnings()
    # Dataclass fields (AugmentConfig) are documented by the string under each: show it in --help.
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    command = argv[0] if argv else None
    if command == "app":
        tune_malloc(server=True)
    elif command not in ("predict", "report", "export"):  # training and data work (fit, validate, test, lr-find, stats)
        tune_malloc()
    try:
        argv = resolve_config_args(argv)  # `--config fast` is the packaged recipe
        if command in COMMANDS:
            importlib.import_module(f"cifarlab.commands.{COMMANDS[command]}").main(argv[1:])
        else:
            importlib.import_module("cifarlab.commands.fit").main(argv, start=start, description=__doc__)
    except CifarlabError as err:
        print(f"cifarlab: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("cifarlab: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except (Exception, SystemExit) as err:  # Lightning's SIGTERMException is a SystemExit
        if "lightning" not in sys.modules:  # only a Lightning run stops on a signal or a failed peer
            raise
        from cifarlab.commands.fit import stopped  # imported already: the command that ran used it

        message, status = stopped(err)
        if message is None:
            raise
        print(f"cifarlab: {message}", file=sys.stderr)
        raise SystemExit(status) from None


def process_start_time() -> float:
    """Wall-clock time (``time.time()`` scale) when this process started, so that start-up counts against the
    budget; the import time of this module where ``/proc`` is not available."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        start = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED_AT
    # (containers with their own time namespace can report a boot time that is not the host's)
    return start if _IMPORTED_AT - 3600 < start <= _IMPORTED_AT else _IMPORTED_AT


_IMPORTED_AT = time.time()


def _quiet_known_warnings() -> None:
    # We hand LightningCLI the arguments it should parse (some are ours): its "args and sys.argv" notice is noise.
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    # Both loggers share the run directory on purpose; the CSV logger only rewrites its own metrics.csv.
    warnings.filterwarnings("ignore", message=".*Experiment logs directory .* exists and is not empty.*")
    # --data.val_size 0 hands Lightning no validation batches on purpose.
    warnings.filterwarnings("ignore", message=".*Total length of `list` across ranks is zero.*")


if __name__ == "__main__":
    main()

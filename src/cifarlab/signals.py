"""Stopping a run on SIGTERM or Ctrl-C: every process at the same batch, then ``last.ckpt``.

A signal can reach one process of a multi-process (DDP) run or all of them (``kill`` and ``timeout`` signal the
launching process; a terminal's Ctrl-C and SLURM's ``scancel`` signal every one), at any moment: inside
``backward``, a validation pass, a checkpoint save. Lightning 2.6's SIGTERM handler calls
``torch.distributed.broadcast`` from the signal handler itself, wherever the interrupted rank happens to be,
while the other ranks are in another collective (a gradient all-reduce, the checkpoint's barrier): the two never
meet and the run hangs. (That broadcast came with Lightning PR #20825, a fix for
https://github.com/Lightning-AI/pytorch-lightning/issues/20806, where ranks raised SIGTERMException at different
steps.) Ctrl-C raises ``KeyboardInterrupt`` in each rank at a different line, with the same result.

Here a signal only sets a flag (and is passed on to the processes this one launched). At the end of every training
batch, and of the evaluation batches that every rank runs, all ranks combine their flags with one all-reduce: the
call sits at the same place in every rank's loop, so it always meets. When any rank was signalled, all of them set
Lightning's ``received_sigterm`` at the same batch and its loops stop there together; ``InterruptCheckpoint`` then
saves ``last.ckpt`` (a collective save every rank reaches). A second Ctrl-C stops at once, without saving.

Lightning has no public way to replace its handlers, so this swaps its private ``_SignalConnector`` into
``trainer._signal_connector``; pyproject pins the Lightning minor version this was tested on, and
tests/test_private_apis.py fails when the names or their shape change.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import sys
import threading

import lightning as L
import torch
import torch.distributed as dist

# Private: its SIGKILL of every rank loses the dead-rank line (exit_when_a_launched_rank_dies below)
from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

# Private: no public way to swap its DDP-hanging handler: https://github.com/Lightning-AI/pytorch-lightning/issues/20806
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
from lightning.pytorch.trainer.states import TrainerFn

_received: list[int] = []  # signals received by this process, in order (read by the CLI for its last line)


def received_signal() -> int | None:
    """The first stop signal this process received during a run, or None."""
    return _received[0] if _received else None


class _FlagOnlySignals(_SignalConnector):
    """Lightning's signal connector, with SIGTERM and SIGINT handlers that only set a flag."""

    def __init__(self, trainer: L.Trainer) -> None:
        super().__init__(trainer)
        self.requested: int | None = None  # the signal that asked this rank to stop

    def register_signal_handlers(self) -> None:
        super().register_signal_handlers()  # keeps SLURM's requeue handler and the teardown bookkeeping
        if threading.current_thread() is threading.main_thread():  # Python installs handlers from there only
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, self._on_stop_signal)

    def _on_stop_signal(self, signum: int, frame) -> None:
        if self.requested == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        first = self.requested is None
        self.requested = self.requested or signum
        _received.append(signum)
        if first:
            launcher = self.trainer.strategy.launcher
            if launcher is not None:
                # The ranks this process started (none in a launched rank) may not have been signalled. SIGTERM even
                # for a Ctrl-C: a terminal already sent them that SIGINT, and a second one would read as "stop at once".
                launcher.kill(signal.SIGTERM)
            name = signal.Signals(signum).name
            fitting = self.trainer.state.fn == TrainerFn.FITTING
            line = (f"cifarlab: {name} received (rank {self.trainer.global_rank}): stopping at the end of this batch "
                    "on every rank" + (", then saving last.ckpt" if fitting else "")
                    + (" (Ctrl-C again to stop at once, without saving)" if signum == signal.SIGINT else ""))
            # os.write, not print: the signal may have interrupted a write to sys.stderr (a reentrant call errors).
            with contextlib.suppress(OSError):
                os.write(sys.stderr.fileno(), (line + "\n").encode())


class StopOnSignal(L.Callback):
    """Makes SIGTERM and Ctrl-C stop every rank at the same batch (see the module docstring)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before the Trainer registers its handlers (right before the loops run), so ours are the ones it installs.
        if not isinstance(trainer._signal_connector, _FlagOnlySignals):
            trainer._signal_connector = _FlagOnlySignals(trainer)

    def _sync(self, trainer: L.Trainer) -> None:
        connector = trainer._signal_connector
        if not isinstance(connector, _FlagOnlySignals) or connector.received_sigterm:
            return
        stop = connector.requested is not None
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            flag = torch.tensor([int(stop)], device=trainer.strategy.root_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank is at this batch: the call meets
            stop = bool(flag.item())
        if stop:
            connector.received_sigterm = True  # Lightning's loops raise SIGTERMException at this batch's end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(trainer)

    def _sync_eval(self, trainer: L.Trainer, batch_idx: int, dataloader_idx: int, loaders) -> None:
        # Evaluation sets are split exactly (data.py), so ranks can run one batch more or less than each other:
        # only batches that every rank runs, and that are no rank's last, may hold the collective (Lightning's loop
        # does not raise at a last batch, and a rank that did not raise would wait in another collective).
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        loader = loaders[dataloader_idx] if dataloader_idx < len(loaders) else None
        if trainer.world_size > 1:
            size, batch_size = len(getattr(loader, "dataset", ())), getattr(loader, "batch_size", None)
            if not size or not batch_size:
                return
            common = math.ceil(size // trainer.world_size / batch_size)  # batches of the rank with fewest images
            limits = trainer.num_test_batches if trainer.testing else trainer.num_val_batches
            if limits and dataloader_idx < len(limits):
                common = min(common, limits[dataloader_idx])
            if batch_idx >= common - 1:
                return
        self._sync(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._sync_eval(trainer, batch_idx, dataloader_idx, trainer.val_dataloaders)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._sync_eval(trainer, batch_idx, dataloader_idx, trainer.test_dataloaders)


# What gloo and NCCL say when the process at the other end of a collective is gone or never answers.
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out", "timeout",
              "socket closed", "connection refused")


def peer_failure(err: BaseException) -> str | None:
    """One line for an error that means another process of this multi-process run died or stopped answering
    (killed, out of memory, or a collective that timed out); None for any other error."""
    initialized = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialized else int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    text = str(err).strip()
    if not isinstance(err, dist.DistError) and not any(m in text.lower() for m in _PEER_GONE):
        return None
    first = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text.splitlines()[0]) if text else type(err).__name__
    first = first.split(". ")[0][:160]  # gloo: "[.../pair.cc:561] Connection closed by peer [127.0.0.1]:46219. This"...
    return _peer_gone(world, first)


def _peer_gone(world: int, why: str) -> str:
    return (f"another process of this {world}-process run died or stopped answering ({why}); checkpoints already "
            "saved are intact: resume with the same command and --ckpt_path last")


def exit_when_a_launched_rank_dies() -> None:
    """Make the launching process end with the one line of ``peer_failure`` and status 1 when a rank it launched dies.

    Lightning's launcher polls its child ranks every 5 s and, on a dead one, SIGKILLs the others and itself, so its
    own collective's error (and the one line) is lost whenever the poll comes first. Private API
    (``_ChildProcessObserver._terminate_all``), fenced in tests/test_private_apis.py.
    """
    def terminate_all(observer: _ChildProcessObserver) -> None:
        children = observer._child_processes
        for child in children:
            child.send_signal(observer._termination_signal)  # as Lightning does: no zombie ranks
        codes = ", ".join(f"rank {i + 1} exited with {c.returncode}" for i, c in enumerate(children) if c.returncode)
        print(f"cifarlab: error: {_peer_gone(len(children) + 1, codes)}", file=sys.stderr, flush=True)
        os._exit(1)

    _ChildProcessObserver._terminate_all = terminate_all
